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

from typing import Optional

import numpy as np
import pandas as pd

from cxrmem import storage
from cxrmem.analysis import list_enrichment
from cxrmem.corpus.prompts import build_prompts_table
from cxrmem.corpus.tables import iter_tables
from cxrmem.findings import FindingInputs, f1_enrichment
from cxrmem.storage import Store
from cxrmem.summary import AnalysisSection

UNBOUNDED = 1_000_000  # word counts are never truncated


def prepared_list(path: str, text_column: str, cfg, tokenizer, store: Store) -> tuple[pd.DataFrame, dict]:
    """One row per unique prompt of the list at `path` (prompt_id, n_reports, has_marker, n_markers, n_tokens) and its counts."""
    max_length = int(tokenizer.model_max_length) if tokenizer is not None else UNBOUNDED
    table, counts = build_prompts_table(iter_tables(path, text_column, [], store), cfg.corpus.marker_regex, tokenizer, max_length)
    if table.num_rows == 0:
        raise ValueError(f"{path}: no prompts in column {text_column!r} ({counts['reports_read']} rows read, skipped {counts['skipped']})")
    frame = table.select(["prompt_id", "n_reports", "has_marker", "n_markers", "n_tokens"]).to_pandas()
    return frame, {"rows": counts["reports_read"], "unique": len(frame), "skipped": counts["skipped"],
                   "marker_share": float(frame["has_marker"].mean())}  # fmt: skip


def run(cfg, memorized_path: str, controls_path: str, text_column: str = "prompt", out: Optional[str] = None,
        use_tokenizer: bool = False, store: Optional[Store] = None) -> dict:  # fmt: skip
    store = store or Store.from_config(cfg.storage)
    tokenizer = None
    if use_tokenizer:
        from cxrmem.models.loading import load_tokenizer

        tokenizer = load_tokenizer(cfg.model, store)
    memorized, mem_counts = prepared_list(memorized_path, text_column, cfg, tokenizer, store)
    controls, ctrl_counts = prepared_list(controls_path, text_column, cfg, tokenizer, store)
    both = controls["prompt_id"].isin(memorized["prompt_id"])
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
