"""`ray job submit -- python ray_jobs/train_testbed.py --config conf/testbed.yaml [key=value ...]`: train the testbed."""

from cxrmem.cli import job_main
from cxrmem.testbed.train import train

if __name__ == "__main__":
    job_main("Train the memorization testbed model (CPU).", train)
