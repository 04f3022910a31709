"""`cxrmem enrich --memorized MEM.csv --controls CTRL.csv`: marker enrichment of a released list, no model.

Both lists are prepared as `prepare` prepares a corpus (cxrmem/corpus: whitespace normalised,
markers by corpus.marker_regex, duplicated rows one unique prompt with its n_reports), counted
in tokens of the configured model's tokenizer (`--tokenizer`) or else in words; then the crude,
duplication-stratified and length- and duplication-adjusted odds ratios (cxrmem/analysis.py
`list_enrichment`) and the F1 verdict (cxrmem/findings.py). A prompt on both lists counts as
memorized and is left out of the controls. With `out`, the result is also written as
enrichment.json under that prefix. It is how a curator checks a paper's released list.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import pandas as pd

from cxrmem import storage
from cxrmem.analysis import list_enrichment
from cxrmem.corpus.prompts import build_prompts_table
from cxrmem.corpus.tables import TextColumnError, iter_tables
from cxrmem.findings import FindingInputs, f1_enrichment
from cxrmem.storage import Store
from cxrmem.summary import AnalysisSection

log = logging.getLogger(__name__)

UNBOUNDED = 1_000_000  # word counts are never truncated
SHOWN = 5  # prompts on both lists named in the warning (all are counted)


def prepared_list(path: str, text_column: str, cfg, tokenizer, store: Store) -> tuple[pd.DataFrame, dict]:
    """One row per unique prompt of the list at `path` (prompt_id, n_reports, has_marker, n_markers, n_tokens) and its counts."""
    max_length = int(tokenizer.model_max_length) if tokenizer is not None else UNBOUNDED
    try:
        table, counts = build_prompts_table(iter_tables(path, text_column, [], store), cfg.corpus.marker_regex, tokenizer, max_length)
    except TextColumnError as err:
        raise err.naming("--text-column") from None  # this command's flag picks the column, not corpus.text_column
    if table.num_rows == 0:
        raise ValueError(
            f"{path}: no prompts in column {text_column!r} ({counts['reports_read']} rows read, skipped {counts['skipped']}); "
            "check the file, or set --text-column"
        )
    frame = table.select(["prompt_id", "prompt", "n_reports", "has_marker", "n_markers", "n_tokens"]).to_pandas()
    return frame, {"rows": counts["reports_read"], "unique": len(frame), "skipped": counts["skipped"],
                   "marker_share": float(frame["has_marker"].mean())}  # fmt: skip


def report_on_both(prompts: list[str], n_controls: int) -> None:
    """One line on stderr naming the control prompts dropped as also memorized, with their count: a list that
    loses most or all of its controls this way makes the odds ratios meaningless, and the JSON alone hides it."""
    if not prompts:
        return
    shown = "; ".join(repr(p if len(p) <= 80 else p[:77] + "...") for p in prompts[:SHOWN])
    more = f" and {len(prompts) - SHOWN} more" if len(prompts) > SHOWN else ""
    every = " (every control: the lists are the same prompts)" if len(prompts) == n_controls else ""
    log.warning(
        "enrich: %d of %d control prompts are also on the memorized list%s; they count as memorized and are left out of the "
        "controls: %s%s", len(prompts), n_controls, every, shown, more,
    )  # fmt: skip


def run(cfg, store: Optional[Store], memorized_path: str, controls_path: str, text_column: str = "prompt", out: Optional[str] = None,
        use_tokenizer: bool = False) -> dict:  # fmt: skip
    """The enrichment of the memorized list against the controls (tables), in words or (`use_tokenizer`) model tokens."""
    store = store or Store.from_config(cfg.storage)
    tokenizer = None
    if use_tokenizer:
        from cxrmem.models.loading import load_tokenizer

        tokenizer = load_tokenizer(cfg.model, store)
    memorized, mem_counts = prepared_list(memorized_path, text_column, cfg, tokenizer, store)
    controls, ctrl_counts = prepared_list(controls_path, text_column, cfg, tokenizer, store)
    both = controls["prompt_id"].isin(memorized["prompt_id"])
    report_on_both(controls.loc[both, "prompt"].tolist(), len(controls))
    table = pd.concat([memorized, controls[~both]], ignore_index=True)
    flag = np.arange(len(table)) < len(memorized)
    numbers = list_enrichment(table, flag, list(cfg.analyze.n_reports_buckets), list(cfg.analyze.covariates))
    # The two numbers F1 is judged on, as the analyze stage's section would hold them (no scores here).
    analysis = AnalysisSection.from_json({"marker_enrichment": numbers["crude"], "marker_enrichment_adjusted": numbers["adjusted"]})
    result = {
        "memorized": {"path": memorized_path, **mem_counts}, "controls": {"path": controls_path, **ctrl_counts},
        "on_both_lists": int(both.sum()), "length_unit": "tokens" if tokenizer is not None else "words",
        **numbers, "verdict": f1_enrichment(FindingInputs(analysis)).to_dict(),
    }  # fmt: skip
    if out:
        result["out"] = storage.join(out, "enrichment.json")
        store.write_json(result["out"], result)
    return result
