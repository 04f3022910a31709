"""The stage table: one row per stage, in the audit's order. The CLI builds its subcommands from it
(name, help, arguments, main output), the audit runs its rows in order, and tests/test_packaging.py
checks that the README lists exactly these stages (and the CLI's own commands, cxrmem/cli.py).

Adding a stage is its module under cxrmem/stages/, its result type (results.py) and one row here.
A row names its run function as "module:function", imported when the stage runs: `cxrmem --help`
loads no torch or Ray. Every run function is called `run(cfg, out, **inputs)`: `out` is the run it writes
(cxrmem/runfiles.py `Run`: store, layout, lease, model fingerprint) for a row that `writes_run`, the Store
for one that reads runs by their prefixes or writes elsewhere (verify, compare, enrich); the inputs are
the CLI arguments the row declares (by their dest) or, in the audit, what the row `takes` of the
audit's model pool (scored_batches, models).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import import_module
from typing import Any, Callable, Optional

from cxrmem.publish import SIGNING_KEY_ENV
from cxrmem.runfiles import Run
from cxrmem.stages.results import AnalyzeResult, PrepareSummary, ReferenceResult, ReportResult, ScoreResult, Skipped
from cxrmem.storage import Store
from cxrmem.summary import AttributionSection, CopiesSection, MitigationSection


@dataclass(frozen=True)
class Argument:
    """One command-line argument of a stage: argparse's flags and keywords (help, required, nargs, ...)."""

    flags: tuple[str, ...]
    options: dict

    @property
    def dest(self) -> str:
        """The run function's keyword for this argument (argparse's dest)."""
        return self.options.get("dest") or self.flags[0].lstrip("-").replace("-", "_")


def argument(*flags: str, **options: Any) -> Argument:
    return Argument(flags, options)


@dataclass(frozen=True)
class Stage:
    name: str  # the CLI subcommand
    help: str  # its one line in `cxrmem --help`
    run: str  # "module:function": run(cfg, out, **inputs) -> result (module notes)
    result: type  # what run returns (a Skipped where `off` says why not)
    output: str  # the result's field naming the main output, for the CLI's last line
    arguments: tuple[Argument, ...] = ()
    writes_run: bool = True  # writes under run.output: the CLI holds the run's lease (cxrmem/lease.py)
    audit: bool = True  # one of the audit's stages
    takes: tuple[str, ...] = ()  # what the audit hands it of its model pool
    # cfg -> why the stage is off (the setting), or None: a stage that is off runs nothing and returns Skipped.
    off: Callable[[Any], Optional[str]] = field(default=lambda cfg: None)

    def function(self) -> Callable:
        return load(self.run)


def load(path: str) -> Callable:
    """The function that "module:function" names, imported now."""
    module, name = path.split(":")
    return getattr(import_module(module), name)


def run_stage(stage: Stage, cfg, store: Store, **inputs):
    """The stage's result, on the run at cfg.run.output where it writes one; Skipped where its settings turn it off."""
    reason = stage.off(cfg)
    if reason is not None:
        return Skipped(stage.name, reason)
    return stage.function()(cfg, Run.of(cfg, store) if stage.writes_run else store, **inputs)


MODEL_POOL = ("scored_batches",)  # what the scoring stages take of the audit's pool
STAGES: tuple[Stage, ...] = (
    Stage("prepare", "read the corpus, extract prompts, deduplicate globally: prompts.parquet",
          "cxrmem.stages.prepare:run", PrepareSummary, "prompts_file"),
    Stage("score", "score every prompt with d_mem in one process: scores.parquet",
          "cxrmem.stages.cascade:score_or_cascade", ScoreResult, "scores", takes=MODEL_POOL),
    Stage("reference", "prepare and score the prompts the model never saw (analyze.reference): reference/scores.parquet",
          "cxrmem.stages.reference:run", ReferenceResult, "scores", takes=MODEL_POOL,
          off=lambda cfg: None if cfg.analyze.reference else "analyze.reference is empty"),
    Stage("analyze", "percentiles, memorized set, marker enrichment: summary.json, memorized_prompts.csv",
          "cxrmem.stages.analyze:run", AnalyzeResult, "memorized"),
    Stage("attribute", "token attribution of the memorized set: tokens.parquet",
          "cxrmem.stages.attribute:run", AttributionSection, "tokens", takes=("models",),
          off=lambda cfg: None if cfg.attribution.enabled else "attribution.enabled=false"),
    Stage("mitigate", "mitigation experiments on the memorized set: mitigation.parquet",
          "cxrmem.stages.mitigate:run", MitigationSection, "mitigation", takes=("models",),
          off=lambda cfg: None if cfg.mitigation.enabled else "mitigation.enabled=false"),
    Stage("copies", "generations of the memorized set against the training images (images.source): copies.parquet",
          "cxrmem.stages.copies:run", CopiesSection, "copies", takes=("models",),
          off=lambda cfg: None if cfg.images.source else "images.source is empty"),
    Stage("report", "figures/*.png and a self-contained report.html", "cxrmem.stages.report:run", ReportResult, "report"),
    Stage("verify", "check a published run's files against its manifest, and with --expect / --key that the manifest is "
          "the one published (exit 1 on a mismatch)", "cxrmem.stages.verify:run", dict, "prefix", (
              argument("run", help="the published run's prefix (local folder or s3://)"),
              argument("--expect", metavar="DIGEST",
                       help="the manifest's sha256 recorded at publish (the audit's output, its job log), or a record "
                       "holding it (rescoring's latest.json): the manifest must be that one"),
              argument("--key", metavar="FILE", nargs="?", const="",
                       help=f"check manifest.sig with the operator's HMAC key: the key file, or without FILE ${SIGNING_KEY_ENV}"),
          ), writes_run=False, audit=False),
    Stage("compare", "the rescore diff of any two published runs: what entered or left the memorized set",
          "cxrmem.stages.compare:run", dict, "out", (
              argument("run_a", help="the earlier run's prefix"),
              argument("run_b", help="the later run's prefix"),
              argument("--out", help="write diff.parquet and compare.json under this prefix"),
          ), writes_run=False, audit=False),
    Stage("enrich", "marker enrichment (crude, Mantel-Haenszel, adjusted for length and duplication) of a released list, no model",
          "cxrmem.stages.enrich:run", dict, "out", (
              argument("--memorized", dest="memorized_path", metavar="MEMORIZED", required=True,
                       help="table (CSV, Parquet, JSONL) of the prompts released as memorized"),
              argument("--controls", dest="controls_path", metavar="CONTROLS", required=True, help="table of the control prompts"),
              argument("--text-column", default="prompt", help="column holding the prompt in both tables"),
              argument("--out", help="also write enrichment.json under this prefix"),
              argument("--tokenizer", dest="use_tokenizer", action="store_true", help="count tokens with model.*'s tokenizer (default: words)"),
          ), writes_run=False, audit=False),
)  # fmt: skip
BY_NAME = {stage.name: stage for stage in STAGES}
AUDIT = tuple(stage for stage in STAGES if stage.audit)
