"""`cxrmem <stage> --config FILE [key=value ...]`: the command line of the service.

Each stage reads and writes under `run.output` (docs/design.md, Outputs). `audit` runs them all
in order on Ray (in-process on the CPU unless `ray.address` names a cluster). A command prints
its result as JSON on stdout and ends with one line on stderr naming its main output; errors are
one line on stderr, exit code 1 (2 for usage and configuration errors).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from typing import Callable, Iterator, Optional

from cxrmem.config import ConfigError, load_config
from cxrmem.settings import public_config

SIGNING_KEY_ENV = "CXRMEM_SIGNING_KEY"  # cxrmem/publish.py's, named here without importing it for --help

STAGES = {
    "prepare": "read the corpus, extract prompts, deduplicate globally: prompts.parquet",
    "score": "score every prompt with d_mem in one process: scores.parquet",
    "reference": "prepare and score the prompts the model never saw (analyze.reference): reference/scores.parquet",
    "analyze": "percentiles, memorized set, marker enrichment: summary.json, memorized_prompts.csv",
    "attribute": "token attribution of the memorized set: tokens.parquet",
    "mitigate": "mitigation experiments on the memorized set: mitigation.parquet",
    "copies": "generations of the memorized set against the training images (images.source): copies.parquet",
    "report": "figures/*.png and a self-contained report.html",
    "audit": "all stages in order on Ray, then publish the run's manifest",
    "rescore": "rescore when the model fingerprint changed since the last run, and write a diff",
    "export": "copy a published run to another prefix (--to URI)",
    "verify": "check a published run's files against its manifest, and with --expect / --key that the manifest is the one published (exit 1 on a mismatch)",
    "config": "print the resolved configuration (defaults <- FILE <- overrides), credentials removed",
    "compare": "the rescore diff of any two published runs: what entered or left the memorized set",
    "deid-rewrite": "rewrite a corpus replacing every de-identification marker with a realistic surrogate",
    "enrich": "marker enrichment (crude, Mantel-Haenszel, adjusted for length and duplication) of a released list, no model",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cxrmem",
        description="Audit a text-to-image chest X-ray diffusion model for memorization of its training prompts.",
        epilog="Overrides are OmegaConf dot-keys, e.g. score.steps=10 run.output=s3://bucket/run1. "
        "Every key and its default: the settings class of its section, named in cxrmem/config.py.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {cxrmem_version()}")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="<stage>")
    for name, help_text in STAGES.items():
        stage = sub.add_parser(name, help=help_text, description=help_text)
        stage.add_argument("--config", help="YAML file from conf/ (default: built-in defaults)")
        if name == "verify":
            stage.add_argument("run", help="the published run's prefix (local folder or s3://)")
            stage.add_argument("--expect", metavar="DIGEST",
                               help="the manifest's sha256 recorded at publish (the audit's output, its job log), or a record "
                               "holding it (rescoring's latest.json): the manifest must be that one")  # fmt: skip
            stage.add_argument("--key", metavar="FILE", nargs="?", const="",
                               help=f"check manifest.sig with the operator's HMAC key: the key file, or without FILE ${SIGNING_KEY_ENV}")
        if name == "compare":
            stage.add_argument("run_a", help="the earlier run's prefix")
            stage.add_argument("run_b", help="the later run's prefix")
            stage.add_argument("--out", help="write diff.parquet and compare.json under this prefix")
        stage.add_argument("overrides", nargs="*", help="key=value overrides merged on top of the config")
        if name == "export":
            stage.add_argument("--to", required=True, help="destination prefix (local folder or s3://)")
        if name == "rescore":
            stage.add_argument("--force", action="store_true", help="rescore even if the fingerprint is unchanged")
        if name == "deid-rewrite":
            stage.add_argument("--input", required=True, help="table (CSV, Parquet, JSONL) with a text column")
            stage.add_argument("--output", required=True, help="rewritten table, same format as the input")
            stage.add_argument("--text-column", default="text", help="column holding the report text")
        if name == "enrich":
            stage.add_argument("--memorized", required=True, help="table (CSV, Parquet, JSONL) of the prompts released as memorized")
            stage.add_argument("--controls", required=True, help="table of the control prompts")
            stage.add_argument("--text-column", default="prompt", help="column holding the prompt in both tables")
            stage.add_argument("--out", help="also write enrichment.json under this prefix")
            stage.add_argument("--tokenizer", action="store_true", help="count tokens with model.*'s tokenizer (default: words)")

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
        "export": "write the testbed's training images (its phantoms) as PNG and images.csv, for images.source",
        "reader": "train the phantom findings reader (fidelity.measure=phantom_reader) and print its held-out accuracy",
    }.items():
        cmd = testbed_sub.add_parser(name, help=help_text, description=help_text)
        cmd.add_argument("--config", help="YAML file from conf/")
        if name in ("export", "reader"):
            cmd.add_argument("--out", required=True, help="output folder (local)")
        cmd.add_argument("overrides", nargs="*", help="key=value overrides")
    return parser


def cxrmem_version() -> str:
    from cxrmem.publish import cxrmem_version as version

    return version()


def _run(args: argparse.Namespace) -> dict:
    if args.stage == "model":
        from cxrmem.corpus.synthetic import tokenizer_texts
        from cxrmem.models.tiny import build_tiny_model

        texts = tokenizer_texts(seed=args.seed)
        return {"model": build_tiny_model(args.out, texts, radedit_shaped=args.radedit_shaped, seed=args.seed)}

    from cxrmem.storage import Store

    cfg = load_config(args.config, args.overrides)
    store = Store.from_config(cfg.storage)
    written = args.to if args.stage == "export" else cfg.run.output
    if args.stage not in WRITERS:
        return _stage(args, cfg, store)
    with writing(cfg, store, written, args.stage):
        return _stage(args, cfg, store)


@contextlib.contextmanager
def writing(cfg, store, prefix: str, command: str) -> Iterator[None]:
    """Where every command that writes under a run's prefix starts (the CLI's and the Ray jobs'): the prefix
    is checked against the config's inputs and for files no run wrote (cxrmem/output_guard.py) before anything
    is written there, then the run's lease is taken, before the stage's own imports (Ray, torch: seconds), so
    that a second writer is refused at once. The stages take the lease too (for library callers); held here,
    theirs is this one."""
    from cxrmem.lease import LeaseSettings, hold
    from cxrmem.output_guard import check_output

    check_output(cfg, store, prefix, command)
    with hold(store, prefix, LeaseSettings.of(cfg.run)):
        yield


def _stage(args: argparse.Namespace, cfg, store) -> dict:
    if args.stage == "testbed":
        if args.testbed_cmd == "train":
            from cxrmem.testbed.train import train

            return train(cfg)
        if args.testbed_cmd == "export":
            from cxrmem.testbed.export import INDEX, export_training_images

            table = export_training_images(cfg.testbed.out, args.out, cfg.corpus)
            return {"images": len(table), "planted": int(table["planted"].sum()), "index": os.path.join(args.out, INDEX)}
        if args.testbed_cmd == "reader":
            from cxrmem.testbed.reader import META, save_reader, train_reader

            trained = train_reader(seed=cfg.testbed.seed)
            save_reader(trained, args.out)
            return {"held_out_accuracy": trained.accuracy, "index": os.path.join(args.out, META)}
        from cxrmem.testbed.evaluate import evaluate

        return evaluate(cfg)
    if args.stage in STAGE_MODULES:
        from importlib import import_module

        # One module per stage (cxrmem/stages/), each `run(cfg, store)`; with cascade.enabled `score` is the cascade.
        if args.stage == "score" and cfg.cascade.enabled:
            return import_module("cxrmem.stages.cascade").run(cfg, store)
        return import_module(f"cxrmem.stages.{STAGE_MODULES[args.stage]}").run(cfg, store)
    if args.stage == "audit":
        from cxrmem.distributed.audit import run_audit

        return run_audit(cfg, store)
    if args.stage == "rescore":
        from cxrmem.distributed.rescore import rescore

        return rescore(cfg, force=args.force, store=store)
    if args.stage == "export":
        from cxrmem.publish import export_run

        return export_run(store, cfg.run.output, args.to, overwrite=cfg.run.overwrite)
    if args.stage == "verify":
        from cxrmem.publish import signing_key, verify_run

        key = None
        if args.key is not None:
            key = signing_key(args.key, from_env=not args.key)
            if key is None:
                raise ValueError(f"--key without a FILE reads ${SIGNING_KEY_ENV}, which is not set: give the key file")
        return verify_run(store, args.run, expect=args.expect, key=key)
    if args.stage == "compare":
        from cxrmem.stages.compare import run as compare

        return compare(store, args.run_a, args.run_b, args.out)
    if args.stage == "config":
        return public_config(cfg)
    if args.stage == "deid-rewrite":
        from cxrmem.corpus.deid import rewrite_corpus

        return rewrite_corpus(args.input, args.output, args.text_column, cfg.corpus.marker_regex, cfg.mitigation.seed, store)
    if args.stage == "enrich":
        from cxrmem.stages.enrich import run as enrich

        return enrich(cfg, args.memorized, args.controls, args.text_column, args.out, args.tokenizer, store)
    raise AssertionError(f"unhandled stage {args.stage}")


STAGE_MODULES = {name: name for name in ("prepare", "score", "reference", "analyze", "attribute", "mitigate", "copies", "report")}
# Commands that write under a run's prefix (run.output; export: --to): they hold its lease (cxrmem/lease.py).
WRITERS = {*STAGE_MODULES, "audit", "rescore", "export"}
# The result key that names each command's main output, for its last line.
MAIN_OUTPUT = {
    "prepare": "prompts_file", "score": "scores", "reference": "scores", "analyze": "memorized", "attribute": "tokens",
    "mitigate": "mitigation", "copies": "copies", "report": "report", "audit": "report", "rescore": "run", "export": "dst",
    "deid-rewrite": "output", "compare": "out", "enrich": "out", "model": "model", "verify": "prefix", "testbed": "index",
}  # fmt: skip


def last_line(stage: str, result: dict) -> str:
    """One line naming the command's main output (or why there is none)."""
    if stage == "verify":
        return verify_line(result)
    if stage == "enrich":
        crude, adjusted = result["crude"], result["adjusted"]["logistic"]
        adjusted_text = (f"refused ({adjusted['refused']})" if adjusted.get("refused")
                         else f"{adjusted['estimate']:.3g} [{adjusted['ci_low']:.3g}, {adjusted['ci_high']:.3g}]")
        crude_text = "–" if crude["odds_ratio"] is None else f"{crude['odds_ratio']:.3g} [{crude['ci_low']:.3g}, {crude['ci_high']:.3g}]"
        where = f"; output: {result['out']}" if result.get("out") else ""
        return f"cxrmem enrich: crude OR {crude_text}, adjusted OR {adjusted_text}: {result['verdict']['verdict']}{where}"
    if stage == "rescore" and result.get("status") == "unchanged":
        return f"cxrmem rescore: nothing to do, {result['previous']} is current"
    output = result.get(MAIN_OUTPUT.get(stage, ""))
    return f"cxrmem {stage}: done" + (f"; output: {output}" if output else "")


def verify_line(result: dict) -> str:
    """verify's one line: what matched, or every check that failed."""
    digest, expected, signature = result["manifest_sha256"], result.get("expected_sha256"), result.get("signature")
    files_ok = not (result["missing"] or result["changed"] or result["unlisted"])
    if result["ok"]:
        checked = (f"manifest sha256 {digest}, the expected digest ({result['expected_from']})" if expected
                   else f"manifest sha256 {digest}; compare it with the digest recorded at publish (--expect)")  # fmt: skip
        signed = "; signature valid" if signature == "valid" else ""
        return f"cxrmem verify: {result['prefix']} matches its manifest ({result['files']} files); {checked}{signed}"
    failed = []
    if expected and expected != digest:
        failed.append(f"has a manifest (sha256 {digest}) that is NOT the one expected ({expected}, from {result['expected_from']}): "
                      "the manifest was changed after that digest was recorded, or this is another run")  # fmt: skip
    if signature not in (None, "valid"):
        failed.append("has no manifest.sig: the run was published unsigned" if signature == "missing"
                      else "has a manifest.sig that does NOT match: the manifest was changed after signing, or the key is another")  # fmt: skip
    if not files_ok:
        failed.append(f"does NOT match its manifest: missing {result['missing']}, changed {result['changed']}, unlisted {result['unlisted']}")
    return f"cxrmem verify: {result['prefix']} {'; '.join(failed)} ({result['files']} files)"


def run_reporting_errors(name: str, command: Callable[[], dict]) -> tuple[int, Optional[dict]]:
    """(exit code, result) of a command; a known error becomes one line on stderr, printed last.

    Storage, missing-file, published-run, model-store, Ray-resource and bad-input errors say what
    to do (1); configuration errors name the key or override (2); SIGTERM / SIGINT stop it cleanly
    (cxrmem/interrupts.py: 143 / 130, and how to resume).
    """
    from cxrmem.interrupts import Interrupted, as_interrupted, interrupted_line, stop_on_signals
    from cxrmem.scoring.device import DeviceOutOfMemory, DeviceUnavailable

    try:
        with stop_on_signals():
            try:
                return 0, command()
            except BaseException as err:
                raise as_interrupted(err) from None  # a signal arrived: whatever ended the command, it was the stop
    except ConfigError as err:
        line, code = f"cxrmem: configuration error: {err}", 2
    except (OSError, ValueError, DeviceUnavailable, DeviceOutOfMemory) as err:
        from cxrmem.storage import name_too_long

        line, code = f"cxrmem {name}: {name_too_long(err) or err}", 1  # [Errno 36]: which name is over the limit
    except Interrupted as err:  # SIGTERM / SIGINT: every finally has run (parts kept, Ray down, lease released)
        line, code = interrupted_line(name, err), err.exit_code
    # Log lines and whatever Ray printed while shutting down go out first: the user's last line is ours.
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)
    return code, None


def finish(name: str, result: dict) -> int:
    print(json.dumps(result, indent=2, default=str), flush=True)
    digest = result.get("manifest_sha256")
    if digest and name != "verify":  # a run was published: the digest a reviewer checks it against, kept elsewhere
        where = result.get("run") or result.get("dst") or result.get("output")
        print(f"cxrmem {name}: published {where} with manifest sha256 {digest}; keep this digest outside the run and "
              f"check it with `cxrmem verify {where} --expect {digest}`", file=sys.stderr, flush=True)  # fmt: skip
    print(last_line(name, result), file=sys.stderr, flush=True)
    return 0 if result.get("ok", True) else 1


def job_main(description: str, stage, force_flag: bool = False) -> None:
    """The body of a `ray_jobs/` entry point: `--config FILE [--force] [key=value ...]` -> stage(cfg),
    ending like the CLI: one line naming the main output, or one error line and its exit code."""
    quiet_libraries()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML file from conf/")
    if force_flag:
        parser.add_argument("--force", action="store_true", help="rescore even if the fingerprint is unchanged")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args()
    name = os.path.basename(parser.prog).removesuffix(".py")

    def command() -> dict:
        from cxrmem.storage import Store

        cfg = load_config(args.config, args.overrides)
        guard = writing(cfg, Store.from_config(cfg.storage), cfg.run.output, name) if name in WRITERS else contextlib.nullcontext()
        with guard:
            return stage(cfg, force=args.force) if force_flag else stage(cfg)

    code, result = run_reporting_errors(name, command)
    sys.exit(code if result is None else finish(name, result))


def quiet_libraries() -> None:
    """Model loading reports and optional-backend notices from transformers/diffusers are noise here
    (the workers get the same through cxrmem/distributed/session.py); a user's own setting wins."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    code, result = run_reporting_errors(args.stage, lambda: _run(args))
    if result is None:
        return code
    if args.stage == "config":
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(OmegaConf.create(result)), end="")
        return 0
    return finish(args.stage, result)


if __name__ == "__main__":
    sys.exit(main())
