"""`ray job submit -- python ray_jobs/train_testbed.py --config conf/testbed.yaml [key=value ...]`: train the testbed."""

import argparse
import json
import logging

from cxrmem.config import load_config
from cxrmem.testbed.train import train

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description="Train the memorization testbed model (CPU).")
    parser.add_argument("--config", help="YAML file from conf/")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args()
    print(json.dumps(train(load_config(args.config, args.overrides)), indent=2, default=str))
