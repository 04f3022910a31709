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
from cxrmem.stages.table import STAGES, Stage, argument, load, run_stage
from cxrmem.summary import Record

# The CLI's own commands beside the stage table's stages (cxrmem/stages/table.py), in the same row type: each
# runs `function(cfg, out, **arguments)` (the run at run.output for a writer, else the store). They sit above
# the stages (Ray, publishing) or beside them (tools).
COMMANDS: tuple[Stage, ...] = STAGES + (
    Stage("audit", "all stages in order on Ray, then publish the run's manifest", "cxrmem.distributed.audit:run_audit",
          dict, "report", audit=False),
    Stage("rescore", "rescore when the model fingerprint changed since the last run, and write a diff", "cxrmem.cli:rescore",
          dict, "run", (argument("--force", action="store_true", help="rescore even if the fingerprint is unchanged"),), audit=False),
    Stage("export", "copy a published run to another prefix (--to URI)", "cxrmem.cli:export", dict, "dst",
          (argument("--to", required=True, help="destination prefix (local folder or s3://)"),), audit=False),
    Stage("config", "print the resolved configuration (defaults <- FILE <- overrides), credentials removed", "cxrmem.cli:config",
          dict, "", writes_run=False, audit=False),
    Stage("deid-rewrite", "rewrite a corpus replacing every de-identification marker with a realistic surrogate",
          "cxrmem.cli:deid_rewrite", dict, "output", (
              argument("--input", required=True, help="table (CSV, Parquet, JSONL) with a text column"),
              argument("--output", required=True, help="rewritten table, same format as the input"),
              argument("--text-column", default="text", help="column holding the report text"),
          ), writes_run=False, audit=False),
)  # fmt: skip
BY_COMMAND = {command.name: command for command in COMMANDS}
# Commands that write under a run's prefix (run.output; export: --to): they hold its lease (cxrmem/lease.py).
WRITERS = {command.name for command in COMMANDS if command.writes_run}
# `cxrmem testbed <command>`: help and `function(cfg, args)`.
TESTBED = {
    "train": ("train the testbed model with planted memorized prompts (CPU, <= 30 min)", "cxrmem.cli:testbed_train"),
    "evaluate": ("detection AUC and TPR at 1% FPR on the planted prompts; writes bench/RESULTS.md", "cxrmem.cli:testbed_evaluate"),
    "export": ("write the testbed's training images (its phantoms) as PNG and images.csv, for images.source", "cxrmem.cli:testbed_export"),
    "reader": ("train the phantom findings reader (fidelity.measure=phantom_reader) and print its held-out accuracy",
               "cxrmem.cli:testbed_reader"),
}  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cxrmem",
        description="Audit a text-to-image chest X-ray diffusion model for memorization of its training prompts.",
        epilog="Overrides are OmegaConf dot-keys, e.g. score.steps=10 run.output=s3://bucket/run1. "
        "Every key and its default: the settings class of its section, named in cxrmem/config.py.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {cxrmem_version()}")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="<stage>")
    for command in COMMANDS:
        stage = sub.add_parser(command.name, help=command.help, description=command.help)
        stage.add_argument("--config", help="YAML file from conf/ (default: built-in defaults)")
        positional = [a for a in command.arguments if not a.flags[0].startswith("-")]
        for arg in positional:  # before the overrides, which take every other word
            stage.add_argument(*arg.flags, **arg.options)
        stage.add_argument("overrides", nargs="*", help="key=value overrides merged on top of the config")
        for arg in command.arguments:
            if arg not in positional:
                stage.add_argument(*arg.flags, **arg.options)

    model = sub.add_parser("model", help="build models: `cxrmem model tiny --out DIR`")
    model_sub = model.add_subparsers(dest="model_cmd", required=True)
    tiny = model_sub.add_parser("tiny", help="a random-initialised tiny model in diffusers layout, in seconds")
    tiny.add_argument("--out", required=True, help="output folder")
    tiny.add_argument("--radedit-shaped", action="store_true", help="RadEdit's UNet architecture (SD-1.x size), random weights")
    tiny.add_argument("--seed", type=int, default=0, help="initialisation seed")

    testbed = sub.add_parser("testbed", help="the memorization testbed: train it, or evaluate detection on it")
    testbed_sub = testbed.add_subparsers(dest="testbed_cmd", required=True)
    for name, (help_text, _) in TESTBED.items():
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
    if args.stage == "model":  # builds a model from flags alone: no config, no store
        from cxrmem.corpus.synthetic import tokenizer_texts
        from cxrmem.models.tiny import build_tiny_model

        texts = tokenizer_texts(seed=args.seed)
        return {"model": build_tiny_model(args.out, texts, radedit_shaped=args.radedit_shaped, seed=args.seed)}

    from cxrmem.storage import Store

    cfg = load_config(args.config, args.overrides)
    store = Store.from_config(cfg.storage)
    if args.stage == "testbed":
        return load(TESTBED[args.testbed_cmd][1])(cfg, args)
    command = BY_COMMAND[args.stage]
    inputs = {arg.dest: getattr(args, arg.dest) for arg in command.arguments}
    if not command.writes_run:
        return as_json(run_stage(command, cfg, store, **inputs))
    with writing(cfg, store, inputs.get("to", cfg.run.output), args.stage):  # export writes at --to
        return as_json(run_stage(command, cfg, store, **inputs))


def as_json(result) -> dict:
    """What a command prints: a typed result's JSON, or the dict a command returned."""
    return result.to_json() if isinstance(result, Record) else result


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


# The CLI's commands, each `(cfg, out, **arguments)` as the table calls them.
def rescore(cfg, out, force: bool = False) -> dict:
    from cxrmem.distributed.rescore import rescore as rescore_run

    return rescore_run(cfg, force=force, store=out.store)  # its runs live under run.output, each audited on its own


def export(cfg, out, to: str) -> dict:
    from cxrmem.publish import export_run

    return export_run(out.store, out.layout.prefix, to, overwrite=cfg.run.overwrite)


def config(cfg, store) -> dict:
    return public_config(cfg)


def deid_rewrite(cfg, store, input: str, output: str, text_column: str) -> dict:
    from cxrmem.corpus.deid import rewrite_corpus

    return rewrite_corpus(input, output, text_column, cfg.corpus.marker_regex, cfg.mitigation.seed, store)


def testbed_train(cfg, args) -> dict:
    from cxrmem.testbed.train import train

    return train(cfg)


def testbed_evaluate(cfg, args) -> dict:
    from cxrmem.testbed.evaluate import evaluate

    return evaluate(cfg)


def testbed_export(cfg, args) -> dict:
    from cxrmem.testbed.export import INDEX, export_training_images

    table = export_training_images(cfg.testbed.out, args.out, cfg.corpus)
    return {"images": len(table), "planted": int(table["planted"].sum()), "index": os.path.join(args.out, INDEX)}


def testbed_reader(cfg, args) -> dict:
    from cxrmem.testbed.reader import META, save_reader, train_reader

    trained = train_reader(seed=cfg.testbed.seed)
    save_reader(trained, args.out)
    return {"held_out_accuracy": trained.accuracy, "index": os.path.join(args.out, META)}


# The result key that names each command's main output, for its last line.
MAIN_OUTPUT = {command.name: command.output for command in COMMANDS} | {"model": "model", "testbed": "index"}


def last_line(stage: str, result: dict) -> str:
    """One line naming the command's main output (or why there is none)."""
    if stage in OWN_LINES:
        line = OWN_LINES[stage](result)
        if line:
            return line
    output = result.get(MAIN_OUTPUT.get(stage, ""))
    return f"cxrmem {stage}: done" + (f"; output: {output}" if output else "")


def enrich_line(result: dict) -> str:
    """enrich's one line: the crude and adjusted odds ratios and the verdict."""
    crude, adjusted = result["crude"], result["adjusted"]["logistic"]
    adjusted_text = (f"refused ({adjusted['refused']})" if adjusted.get("refused")
                     else f"{adjusted['estimate']:.3g} [{adjusted['ci_low']:.3g}, {adjusted['ci_high']:.3g}]")
    crude_text = "–" if crude["odds_ratio"] is None else f"{crude['odds_ratio']:.3g} [{crude['ci_low']:.3g}, {crude['ci_high']:.3g}]"
    where = f"; output: {result['out']}" if result.get("out") else ""
    return f"cxrmem enrich: crude OR {crude_text}, adjusted OR {adjusted_text}: {result['verdict']['verdict']}{where}"


def rescore_line(result: dict) -> Optional[str]:
    """rescore's one line when the fingerprint is unchanged (else the common one)."""
    return f"cxrmem rescore: nothing to do, {result['previous']} is current" if result.get("status") == "unchanged" else None


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


# Commands whose last line says more than their main output.
OWN_LINES: dict[str, Callable[[dict], Optional[str]]] = {"verify": verify_line, "enrich": enrich_line, "rescore": rescore_line}


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
