"""`ray job submit -- python ray_jobs/audit.py --config conf/cluster.yaml [key=value ...]`: the full audit."""

import argparse
import json
import logging

from cxrmem.config import load_config
from cxrmem.distributed.audit import run_audit

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description="Audit a model on the Ray cluster this job runs in.")
    parser.add_argument("--config", help="YAML file from conf/")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args()
    print(json.dumps(run_audit(load_config(args.config, args.overrides)), indent=2, default=str))
