"""`cxrmem compare RUN_A RUN_B`: the rescore diff of any two published runs.

Per prompt: d_mem in each run, the change, and whether it entered or left the memorized set;
with counts. Both runs must be published (their files are trusted only then). With `out`, the
diff is written as diff.parquet and the counts as compare.json under that prefix.
"""

from __future__ import annotations

from typing import Optional

import pyarrow as pa

from cxrmem import storage
from cxrmem.analysis import score_diff
from cxrmem.publish import require_published
from cxrmem.runfiles import Run, RunLayout
from cxrmem.storage import Store


def memorized_scores(store: Store, prefix: str):
    """prompt_id, d_mem and the memorized flag of one run (the d_mem column, never the norms)."""
    published = Run(store, RunLayout(prefix))
    scores = store.read_table(published.layout.scores, columns=["prompt_id", "d_mem"]).to_pandas()
    scores["memorized"] = scores["prompt_id"].isin(published.read_memorized()["prompt_id"])
    return scores


def run(cfg, store: Store, run_a: str, run_b: str, out: Optional[str] = None) -> dict:
    manifests = [require_published(store, prefix) for prefix in (run_a, run_b)]
    diff, counts = score_diff(memorized_scores(store, run_a), memorized_scores(store, run_b))
    result = {
        "run_a": run_a,
        "run_b": run_b,
        "model_fingerprints": [m.get("model_fingerprint") for m in manifests],
        **counts,
        "entered_ids": diff.loc[diff["change"] == "entered", "prompt_id"].tolist(),
        "left_ids": diff.loc[diff["change"] == "left", "prompt_id"].tolist(),
    }
    if out:
        store.write_table(pa.Table.from_pandas(diff, preserve_index=False), storage.join(out, "diff.parquet"))
        store.write_json(storage.join(out, "compare.json"), result)
        result["out"] = out
    return result
