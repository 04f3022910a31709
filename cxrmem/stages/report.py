"""`cxrmem report`: figures/*.png and one self-contained report.html from the run's own files."""

from __future__ import annotations

from typing import Optional

from cxrmem.publish import stage_writes
from cxrmem.report import build_report
from cxrmem.storage import Store


def run(cfg, store: Optional[Store] = None) -> dict:
    store = store or Store.from_config(cfg.storage)
    with stage_writes(store, cfg.run.output, cfg.run.overwrite, "report"):
        return build_report(cfg, store)
