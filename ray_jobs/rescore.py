"""`ray job submit -- python ray_jobs/rescore.py --config FILE [--force] [key=value ...]`: rescore on a model change."""

from cxrmem.cli import job_main
from cxrmem.distributed.rescore import rescore

if __name__ == "__main__":
    job_main("Rescore the corpus when the model fingerprint changed; write a diff.", rescore, force_flag=True)
