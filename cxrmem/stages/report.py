"""`cxrmem report`: report.html, metrics.json, summary.md and figures/*.png from the run's own files.

`read_run_inputs` is the only code that reads the run for the report; cxrmem/report.py turns
that data into the page and cxrmem/figures.py draws the figures, neither touching storage.
"""

from __future__ import annotations

import io
import json
import logging
import re
from typing import Callable, Optional

import numpy as np
import pandas as pd

from cxrmem.publish import stage_writes
from cxrmem.report import Draw, Figures, render_html, render_summary_md, report_context, sections
from cxrmem.runfiles import Run, RunLayout, check_prompt_ids
from cxrmem.stages.analyze import read_known_memorized
from cxrmem.stages.results import ReportResult

log = logging.getLogger(__name__)


def read_run_inputs(cfg, out: Run) -> dict:
    """Everything the report shows, read from the run `out`; absent inputs are None."""
    store, layout = out.store, out.layout

    def optional(uri: str, read: Callable[[str], object]):
        return read(uri) if store.exists(uri) else None

    def scores(uri: str) -> pd.DataFrame:
        table = store.read_table(uri, columns=["prompt_id", "d_mem", "nonfinite"]).to_pandas()
        finite = np.isfinite(table["d_mem"].to_numpy(dtype=np.float64)) & ~table["nonfinite"].to_numpy(dtype=bool)
        return table.loc[finite, ["prompt_id", "d_mem"]]

    def npz(uri: str) -> dict:
        with np.load(io.BytesIO(store.read_bytes(uri))) as data:
            return {name: data[name] for name in data.files}

    known = cfg.analyze.known_memorized
    grids = {re.sub(r"^generations_|\.npz$", "", g.rsplit("/", 1)[-1]): g for g in store.list_files(layout.figures, suffix=".npz") if "/generations_" in g}
    check_prompt_ids(grids, layout.figures)  # a grid's id names a figure file below
    pairs = {re.sub(r"^copies_|\.npz$", "", g.rsplit("/", 1)[-1]): g for g in store.list_files(layout.figures, suffix=".npz") if "/copies_" in g}
    check_prompt_ids(pairs, layout.figures)
    return {
        "prefix": layout.prefix,
        "summary": out.read_summary(),
        "memorized": optional(layout.memorized, lambda _: out.read_memorized()),
        "scores": optional(layout.scores, scores),
        "known_ids": read_known_memorized(store, known) if known and store.exists(known) else None,
        "tokens": optional(layout.tokens, lambda u: store.read_table(u).to_pandas()),
        "mitigation": optional(layout.mitigation, lambda u: store.read_table(u).to_pandas()),
        "generations": {pid: npz(uri) for pid, uri in grids.items()},
        "copies": optional(layout.copies, lambda u: store.read_table(u).to_pandas()),
        "copy_figures": {pid: npz(uri) for pid, uri in pairs.items()},
    }


def check_one_model(summary, layout: RunLayout) -> None:
    """Refuse a run whose parts came from different models (scores, tokens, mitigation, copies): the report
    would put one model's memorized set beside another's attributions and mitigations."""
    scored = set(summary.analysis.model_fingerprints) if summary.analysis else set()
    made = {name: section.model["model_fingerprint"] for name, section in
            (("attribution", summary.attribution), ("mitigation", summary.mitigation), ("copies", summary.copies))
            if section is not None and section.model}  # fmt: skip
    fingerprints = scored | set(made.values())
    if len(fingerprints) > 1:
        parts = [f"scores {', '.join(sorted(scored))}"] + [f"{name} {fp}" for name, fp in made.items()]
        raise ValueError(f"{layout.prefix} mixes models ({'; '.join(parts)}): rerun the stages after `cxrmem score` "
                         "with one model (or `cxrmem rescore` into a new run) before the report")  # fmt: skip


def run(cfg, out: Optional[Run] = None) -> ReportResult:
    """Write report.html, metrics.json, summary.md and figures/*.png for the run `out` (default: at run.output)."""
    out = out or Run.of(cfg)
    store, layout = out.store, out.layout

    def write(name: str, draw: Draw) -> bytes:
        buffer = io.BytesIO()
        draw(buffer)
        store.write_bytes(layout.figure(name), buffer.getvalue())
        return buffer.getvalue()

    with stage_writes(store, cfg.run, "report"):
        figure = Figures(bool(cfg.report.figures), write)
        inputs = read_run_inputs(cfg, out)
        check_one_model(inputs["summary"], layout)
        page = report_context(inputs, cfg, figure)
        store.write_text(layout.report, render_html(page))
        store.write_text(layout.metrics, json.dumps(page["metrics"], indent=2, sort_keys=True) + "\n")
        store.write_text(layout.summary_md, render_summary_md(page))
    drawn = [layout.figure(name) for name in figure.drawn]
    log.info("report: %s (%d figures)", layout.report, len(drawn))
    return ReportResult(report=layout.report, metrics=layout.metrics, summary_md=layout.summary_md, figures=drawn, sections=sections(page))
