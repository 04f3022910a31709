"""`cxrmem <stage> --config FILE [key=value ...]`: the command line of the service.

Each stage reads and writes under `run.output` (DESIGN.md, Outputs). `audit` runs them all in
order on Ray (in-process on the CPU unless `ray.address` names a cluster).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from cxrmem.config import ConfigError, load_config

STAGES = {
    "prepare": "read the corpus, extract prompts, deduplicate globally: prompts.parquet",
    "score": "score every prompt with d_mem in one process: scores.parquet",
    "analyze": "percentiles, memorized set, marker enrichment: summary.json, memorized_prompts.csv",
    "attribute": "token attribution of the memorized set: tokens.parquet",
    "mitigate": "mitigation experiments on the memorized set: mitigation.parquet",
    "report": "figures/*.png and a self-contained report.html",
    "audit": "all stages in order on Ray, then publish the run's manifest",
    "rescore": "rescore when the model fingerprint changed since the last run, and write a diff",
    "export": "copy a published run to another prefix (--to URI)",
    "deid-rewrite": "rewrite a corpus replacing every de-identification marker with a realistic surrogate",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cxrmem",
        description="Audit a text-to-image chest X-ray diffusion model for memorization of its training prompts.",
        epilog="Overrides are OmegaConf dot-keys, e.g. score.steps=10 run.output=s3://bucket/run1. "
        "Every key and its default: cxrmem/config.py.",
    )
    sub = parser.add_subparsers(dest="stage", required=True, metavar="<stage>")
    for name, help_text in STAGES.items():
        stage = sub.add_parser(name, help=help_text, description=help_text)
        stage.add_argument("--config", help="YAML file from conf/ (default: built-in defaults)")
        stage.add_argument("overrides", nargs="*", help="key=value overrides merged on top of the config")
        if name == "export":
            stage.add_argument("--to", required=True, help="destination prefix (local folder or s3://)")
        if name == "rescore":
            stage.add_argument("--force", action="store_true", help="rescore even if the fingerprint is unchanged")
        if name == "deid-rewrite":
            stage.add_argument("--input", required=True, help="table (CSV, Parquet, JSONL) with a text column")
            stage.add_argument("--output", required=True, help="rewritten table, same format as the input")
            stage.add_argument("--text-column", default="text", help="column holding the report text")

    model = sub.add_parser("model", help="build models: `cxrmem model tiny --out DIR`")
    model_sub = model.add_subparsers(dest="model_cmd", required=True)
    tiny = model_sub.add_parser("tiny", help="a random-initialised tiny model in diffusers layout, in seconds")
    tiny.add_argument("--out", required=True, help="output folder")
    tiny.add_argument("--radedit-shaped", action="store_true", help="RadEdit's UNet architecture (SD-1.x size), random weights")
    tiny.add_argument("--seed", type=int, default=0, help="initialisation seed")

    testbed = sub.add_parser("testbed", help="the memorization testbed: train it, or evaluate detection on it")
    testbed_sub = testbed.add_subparsers(dest="testbed_cmd", required=True)
    for name, help_text in {
        "train": "train the testbed model with planted memorized prompts (CPU, <= 30 min)",
        "evaluate": "detection AUC and TPR at 1% FPR on the planted prompts; writes bench/RESULTS.md",
    }.items():
        cmd = testbed_sub.add_parser(name, help=help_text, description=help_text)
        cmd.add_argument("--config", help="YAML file from conf/")
        cmd.add_argument("overrides", nargs="*", help="key=value overrides")
    return parser


def _run(args: argparse.Namespace) -> dict:
    if args.stage == "model":
        from cxrmem.models.tiny import build_tiny_model

        return {"model": build_tiny_model(args.out, radedit_shaped=args.radedit_shaped, seed=args.seed)}

    cfg = load_config(args.config, args.overrides)
    if args.stage == "testbed":
        if args.testbed_cmd == "train":
            from cxrmem.testbed.train import train

            return train(cfg)
        from cxrmem.testbed.evaluate import evaluate

        return evaluate(cfg)
    if args.stage == "prepare":
        from cxrmem.corpus.prepare import prepare

        return prepare(cfg)
    if args.stage == "score":
        from cxrmem.scoring.run import score_prompts_file

        return score_prompts_file(cfg)
    if args.stage == "analyze":
        from cxrmem.analysis import analyze

        return analyze(cfg)
    if args.stage == "attribute":
        from cxrmem.attribution import attribute_run

        return attribute_run(cfg)
    if args.stage == "mitigate":
        from cxrmem.mitigation import mitigate_run

        return mitigate_run(cfg)
    if args.stage == "report":
        from cxrmem.report import build_report

        return build_report(cfg)
    if args.stage == "audit":
        from cxrmem.distributed.audit import run_audit

        return run_audit(cfg)
    if args.stage == "rescore":
        from cxrmem.distributed.rescore import rescore

        return rescore(cfg, force=args.force)
    if args.stage == "export":
        from cxrmem.publish import export_run

        return export_run(cfg.run.output, args.to, cfg.storage, overwrite=cfg.run.overwrite)
    if args.stage == "deid-rewrite":
        from cxrmem.corpus.deid import rewrite_corpus

        return rewrite_corpus(args.input, args.output, text_column=args.text_column, cfg=cfg)
    raise AssertionError(f"unhandled stage {args.stage}")


def job_main(description: str, stage, force_flag: bool = False) -> None:
    """The body of a `ray_jobs/` entry point: `--config FILE [--force] [key=value ...]` -> stage(cfg).

    Errors end the job with the CLI's one-line messages and exit codes (2: configuration, 1: data or storage).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML file from conf/")
    if force_flag:
        parser.add_argument("--force", action="store_true", help="rescore even if the fingerprint is unchanged")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args()
    try:
        cfg = load_config(args.config, args.overrides)
        result = stage(cfg, force=args.force) if force_flag else stage(cfg)
    except ConfigError as err:
        print(f"cxrmem: configuration error: {err}", file=sys.stderr)
        sys.exit(2)
    except (OSError, ValueError) as err:
        print(f"cxrmem {parser.prog.removesuffix('.py')}: {err}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(result, indent=2, default=str))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    try:
        result = _run(args)
    except ConfigError as err:
        print(f"cxrmem: configuration error: {err}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as err:
        # Storage, missing-file, published-run, model-store and bad-input errors say what to do.
        print(f"cxrmem {args.stage}: {err}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
