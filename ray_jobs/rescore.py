"""`ray job submit -- python ray_jobs/rescore.py --config FILE [--force] [key=value ...]`: rescore on a model change."""

import argparse
import json
import logging

from cxrmem.config import load_config
from cxrmem.distributed.rescore import rescore

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description="Rescore the corpus when the model fingerprint changed; write a diff.")
    parser.add_argument("--config", help="YAML file from conf/")
    parser.add_argument("--force", action="store_true", help="rescore even if the fingerprint is unchanged")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args()
    print(json.dumps(rescore(load_config(args.config, args.overrides), force=args.force), indent=2, default=str))
