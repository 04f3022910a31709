"""The files of one run: where each lives (`RunLayout`), summary.json's sections, the memorized set's I/O.

Every stage finds its inputs and outputs here, so a file name is written in one place. Prompt
ids read back from a run are checked against their 16-hex form before anything is built from
them (a figure name, a filter), and every file name built from data is checked to stay inside
the run's prefix.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Iterable, Optional, Protocol

from cxrmem.storage import PARTIAL_MARK, Store, join, join_inside
from cxrmem.summary import BY_NAME, CostSection, RunSummary, Section

if TYPE_CHECKING:  # pandas is imported where a table is read: the lease (cxrmem/lease.py) needs this module at start
    import pandas as pd

PROMPT_ID = re.compile(r"[0-9a-f]{16}")


def check_prompt_ids(ids: Iterable, where: str) -> None:
    """Raise naming the first row whose prompt_id is not 16 lower-case hex characters."""
    for row, value in enumerate(ids):
        if not isinstance(value, str) or not PROMPT_ID.fullmatch(value):
            raise ValueError(
                f"{where}: row {row} has prompt_id {value!r}, not 16 hex characters; the file is corrupt or "
                "was not written by cxrmem: rerun the stage that writes it"
            )


# Working files: under a run's prefix but never part of the published run, by rule. A first path
# component starting with `_` is the writer's (`_lease.json`, `_parts/` resume checkpoints,
# `_staging/` of an overwrite); `*.partial-*` files are being written; `latest.json` and `runs/`
# are rescoring's layout when its runs live under a prefix that also holds a run.
WORKING_PREFIX = "_"
RESCORE_NAMES = ("latest.json", "runs")
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"  # the operator's HMAC of the manifest, beside it (cxrmem/publish.py); never listed
# The outputs a run writes, by name under its prefix (the properties of RunLayout below, and rescoring's
# diff.parquet), and its one folder of outputs. With the working files these are the only files a run
# writes: anything else under a prefix is foreign, never published and never deleted (cxrmem/publish.py).
OUTPUT_NAMES = frozenset({
    "prompts.parquet", "prepare_summary.json", "scores.parquet", "summary.json", "memorized_prompts.csv", "tokens.parquet",
    "mitigation.parquet", "mitigation_embeddings.parquet", "copies.parquet", "report.html", "metrics.json", "summary.md", "diff.parquet", "calibration.parquet",
})  # fmt: skip
OUTPUT_FOLDERS = ("figures", "reference")  # reference: the run of the prompts the model never saw (RunLayout.reference)


@dataclass(frozen=True)
class RunLayout:
    """Where each output of one run lives under its output prefix (docs/design.md, Outputs)."""

    prefix: str

    @staticmethod
    def is_working(relative_path: str) -> bool:
        """True for the files under a prefix that no manifest lists and `verify` does not report (see WORKING_PREFIX)."""
        first = str(relative_path).split("/", 1)[0]
        return first.startswith(WORKING_PREFIX) or first in RESCORE_NAMES or PARTIAL_MARK in relative_path or relative_path in (MANIFEST_NAME, SIGNATURE_NAME)

    @staticmethod
    def knows(relative_path: str) -> bool:
        """True for the files a run writes under its prefix: its outputs (OUTPUT_NAMES, OUTPUT_FOLDERS) and working files."""
        path = str(relative_path)
        return RunLayout.is_working(path) or path in OUTPUT_NAMES or path.split("/", 1)[0] in OUTPUT_FOLDERS

    def path(self, name: str) -> str:
        return join(self.prefix, name)

    def figure(self, name: str) -> str:
        """figures/<name>, refusing a name (built from data) that would leave the run's folder."""
        return join_inside(self.figures, name, "figure file name")

    prompts = property(lambda self: self.path("prompts.parquet"))
    prepare_summary = property(lambda self: self.path("prepare_summary.json"))
    scores = property(lambda self: self.path("scores.parquet"))
    # Durable part files written while scoring streams; the unit of resume.
    score_parts = property(lambda self: self.path("_parts/scores"))
    summary = property(lambda self: self.path("summary.json"))
    memorized = property(lambda self: self.path("memorized_prompts.csv"))
    calibration = property(lambda self: self.path("calibration.parquet"))  # p- and q-values against the reference
    reference = property(lambda self: RunLayout(self.path("reference")))  # the reference of non-members, prepared and scored
    tokens = property(lambda self: self.path("tokens.parquet"))
    mitigation = property(lambda self: self.path("mitigation.parquet"))
    # mitigation's generations embedded for the copies check, which reuses them (cxrmem/stages/copies_reuse.py)
    mitigation_embeddings = property(lambda self: self.path("mitigation_embeddings.parquet"))
    copies = property(lambda self: self.path("copies.parquet"))
    # The training-image index when images.index is empty (a resume checkpoint: not published).
    image_index = property(lambda self: self.path("_parts/image_index"))
    figures = property(lambda self: self.path("figures"))
    report = property(lambda self: self.path("report.html"))
    metrics = property(lambda self: self.path("metrics.json"))
    summary_md = property(lambda self: self.path("summary.md"))
    manifest = property(lambda self: self.path(MANIFEST_NAME))
    # The one-writer lease (cxrmem/lease.py): a working file, never published.
    lease = property(lambda self: self.path("_lease.json"))
    # The folder of the resume checkpoints (score parts, image index): removed once nothing is left in it.
    parts = property(lambda self: self.path("_parts"))
    # Score parts that failed their checksum, moved here instead of deleted (cxrmem/stages/score_parts.py).
    set_aside = property(lambda self: self.path("_parts/set_aside"))


class WriterLease(Protocol):
    """What a run needs of its writer's lease (cxrmem/lease.py `Lease`, which sits above this module)."""

    def check(self) -> None:
        """Raise when another writer took the run over."""


@dataclass(frozen=True)
class Run:
    """One run as its stages see it: the store that holds it, where its files live, the lease of its writer
    (the audit's, once taken) and the model's fingerprint once known. A stage reads and writes its run
    through this object, so the store and the layout travel together and downward (docs/design.md, Layers).
    """

    store: Store
    layout: RunLayout
    lease: Optional[WriterLease] = None
    fingerprint: Optional[str] = None

    @classmethod
    def of(cls, cfg, store: Optional[Store] = None) -> Run:
        """The run at `cfg.run.output`, on `store` (default: the one `cfg.storage` names)."""
        return cls(store or Store.from_config(cfg.storage), RunLayout(cfg.run.output))

    def held_by(self, lease: WriterLease) -> Run:
        return replace(self, lease=lease)

    def with_fingerprint(self, fingerprint: str) -> Run:
        return replace(self, fingerprint=fingerprint)

    def at(self, prefix: str) -> Run:
        """A run of its own under `prefix` (the cascade's screens and audit), on this store, for this model."""
        return replace(self, layout=RunLayout(prefix))

    @property
    def reference(self) -> Run:
        """The run of the reference's prompts (`reference/` under this one), on the same store, for the same model."""
        return replace(self, layout=self.layout.reference)

    def exists(self, uri: str) -> bool:
        return self.store.exists(uri)

    def read_summary(self) -> RunSummary:
        """summary.json as typed sections (cxrmem/summary.py); an absent file is an empty summary."""
        uri = self.layout.summary
        return RunSummary.from_json(self.store.read_json(uri) if self.store.exists(uri) else {})

    def write_sections(self, *sections: Section, clear: tuple[str, ...] = ()) -> None:
        """Replace these sections of summary.json (each stage owns its sections) and remove the `clear`ed ones
        (e.g. the detectors section an earlier analysis of other scores left); the other sections stay as they are."""
        unknown = [name for name in clear if name not in BY_NAME]
        if unknown:
            raise ValueError(f"summary.json has no section {unknown}; the sections are {list(BY_NAME)}")
        uri = self.layout.summary
        summary = self.store.read_json(uri) if self.store.exists(uri) else {}
        for name in clear:
            summary.pop(name, None)
        summary.update({section.name: section.to_json() for section in sections})
        self.store.write_json(uri, summary)

    def record_cost(self, stage: str, work: dict) -> None:
        """summary.json's cost section with `stage`'s counted model work (UNetWork.to_json) in place of its last
        record, per prompt of the run's corpus."""
        prompts = self.layout.prompts
        corpus = self.store.read_table(prompts, columns=["prompt_id"]).num_rows if self.store.exists(prompts) else 0
        self.write_sections(CostSection.with_stage(self.read_summary().cost, corpus, stage, work))

    def write_memorized(self, memorized: pd.DataFrame) -> None:
        """memorized_prompts.csv: the paper's released list, column `prompt` first, most memorized first."""
        self.store.write_text(self.layout.memorized, memorized.to_csv(index=False))

    def read_memorized(self, limit: Optional[int] = None) -> pd.DataFrame:
        """The memorized set, most memorized first, cut to `limit` rows; ids checked."""
        import pandas as pd

        uri = self.layout.memorized
        if not self.store.exists(uri):
            raise FileNotFoundError(f"{uri} does not exist; run `cxrmem analyze` for this run first")
        memorized = pd.read_csv(
            io.BytesIO(self.store.read_bytes(uri)),
            dtype={"prompt": str, "prompt_id": str},  # an all-digit id keeps its leading zeros
            keep_default_na=False,  # a prompt that reads "NA" stays a prompt
        )
        missing = [c for c in ("prompt", "prompt_id") if c not in memorized.columns]
        if missing:
            raise ValueError(f"{uri} lacks the columns {missing} (has {list(memorized.columns)}); rerun `cxrmem analyze`")
        check_prompt_ids(memorized["prompt_id"], uri)
        return memorized.head(limit) if limit is not None else memorized
