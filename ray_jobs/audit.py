"""`ray job submit -- python ray_jobs/audit.py --config conf/cluster.yaml [key=value ...]`: the full audit."""

from cxrmem.cli import job_main
from cxrmem.distributed.audit import run_audit

if __name__ == "__main__":
    job_main("Audit a model on the Ray cluster this job runs in.", run_audit)
