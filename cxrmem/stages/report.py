"""`cxrmem report`: figures/*.png and one self-contained report.html from the run's own files."""

from __future__ import annotations

from cxrmem.publish import stage_writes
from cxrmem.report import build_report
from cxrmem.storage import Store


def run(cfg, store: Store) -> dict:
    with stage_writes(store, cfg.run.output, cfg.run.overwrite, "report"):
        return build_report(cfg, store)
