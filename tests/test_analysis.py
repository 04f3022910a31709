"""The analyze stage on real parquet files written here, and its pure table core."""

import io
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cxrmem.analysis import analyze, analyze_tables
from cxrmem.config import load_config
from cxrmem.storage import RunLayout

N = 300  # 1% of 300 is 3 memorized prompts


def _pid(i: int) -> str:
    return f"{i:016x}"


def _write_run(out, d_mem, nonfinite):
    rng = np.random.default_rng(0)
    has_marker = rng.random(N) < 0.2
    has_marker[:3] = True  # the planted top three carry markers
    n_reports = rng.choice([1, 1, 1, 2, 3, 7, 40, 200], size=N)
    prompts = pa.table(
        {
            "prompt_id": [_pid(i) for i in range(N)],
            "prompt": [f"Finding {i}, compared to ___." if m else f"Finding {i}, no change." for i, m in enumerate(has_marker)],
            "n_reports": n_reports.astype(np.int64),
            "source_ids": [[f"r{i}"] for i in range(N)],
            "has_marker": has_marker,
            "n_markers": has_marker.astype(np.int64),
            "n_tokens": np.full(N, 8, dtype=np.int64),
            "truncated": np.zeros(N, dtype=bool),
        }
    )
    scores = pa.table(
        {
            "prompt_id": [_pid(i) for i in range(N)],
            "prompt": prompts["prompt"],
            "d_mem": d_mem.astype(np.float32),
            "step_norms": [[[float(v)] * 2] * 2 for v in d_mem],
            "model_fingerprint": ["fp-test"] * N,
            "config_hash": ["hash-test"] * N,
            "nonfinite": nonfinite,
            "n_tokens": np.full(N, 8, dtype=np.int64),
            "truncated": np.zeros(N, dtype=bool),
        }
    )
    layout = RunLayout(str(out))
    pq.write_table(prompts, layout.prompts, row_group_size=64)  # several row groups: the text scan is filtered
    pq.write_table(scores, layout.scores)
    return layout, has_marker, n_reports


@pytest.fixture
def run(tmp_path):
    rng = np.random.default_rng(1)
    d_mem = rng.normal(1.0, 0.05, N)
    d_mem[[0, 1, 2]] = [3.0, 2.5, 2.0]  # planted memorized prompts
    d_mem[10] = np.nan
    nonfinite = np.zeros(N, dtype=bool)
    nonfinite[[10, 11]] = True  # row 11 has a finite mean but a flagged non-finite step: excluded as well
    layout, has_marker, n_reports = _write_run(tmp_path, d_mem, nonfinite)
    (tmp_path / "summary.json").write_text(json.dumps({"score": {"timings": {"total_s": 1.5}}}))
    cfg = load_config(None, [f"run.output={tmp_path}"])
    return cfg, layout, has_marker, n_reports


def test_analyze_writes_the_memorized_list_and_merges_the_summary(run):
    cfg, layout, has_marker, _ = run
    result = analyze(cfg)
    assert result["memorized_count"] == 3

    csv_text = open(layout.memorized).read()
    assert csv_text.splitlines()[0].split(",")[:6] == ["prompt", "d_mem", "percentile", "n_reports", "has_marker", "prompt_id"]
    memorized = pd.read_csv(io.StringIO(csv_text), dtype={"prompt_id": str})  # all-digit hex ids stay text
    assert memorized["prompt_id"].tolist() == [_pid(0), _pid(1), _pid(2)]
    assert memorized["prompt"].tolist() == ["Finding 0, compared to ___.", "Finding 1, compared to ___.", "Finding 2, compared to ___."]
    assert memorized["d_mem"].tolist() == pytest.approx([3.0, 2.5, 2.0])
    assert memorized["percentile"].iloc[0] == pytest.approx(100.0)

    summary = json.loads(open(layout.summary).read())
    assert summary["score"] == {"timings": {"total_s": 1.5}}  # other stages' keys survive
    analysis = summary["analysis"]
    assert analysis["counts"] == {"prompts": N, "scored": N, "unscored": 0, "finite": N - 2, "nonfinite": 2}
    assert analysis["threshold"] == pytest.approx(2.0)
    assert analysis["percentiles"]["max"] == pytest.approx(3.0)
    assert set(analysis["percentiles"]) == {"p50", "p90", "p95", "p99", "p99.9", "max"}
    assert analysis["zscore_view"]["count"] == 3 and analysis["zscore_view"]["in_memorized_set"] == 3
    enrichment = analysis["marker_enrichment"]
    finite = np.ones(N, bool)
    finite[[10, 11]] = False
    assert enrichment["n_prompts"] == N - 2
    assert enrichment["memorized_marker_share"] == 1.0
    assert enrichment["base_marker_share"] == pytest.approx(has_marker[finite].mean())
    assert enrichment["corrected"] is True and enrichment["odds_ratio"] > 1
    assert [b["bucket"] for b in analysis["marker_enrichment_by_n_reports"]["buckets"]] == ["1", "2-4", "5-19", "20-99", "100+"]
    assert sum(b["n_prompts"] for b in analysis["marker_enrichment_by_n_reports"]["buckets"]) == N - 2
    assert analysis["model_fingerprints"] == ["fp-test"]
    assert analysis["config"]["analyze"]["top_percent"] == 1.0


def test_analyze_names_the_missing_input(tmp_path):
    cfg = load_config(None, [f"run.output={tmp_path}"])
    with pytest.raises(FileNotFoundError, match="scores.parquet.*cxrmem score"):
        analyze(cfg)


def test_analyze_tables_keeps_ties_and_rejects_foreign_scores():
    scores = pd.DataFrame({"prompt_id": list("abcde"), "d_mem": [1.0, 5.0, 5.0, 2.0, 0.5], "nonfinite": [False] * 5})
    prompts = pd.DataFrame(
        {"prompt_id": list("abcdef"), "n_reports": [1, 1, 3, 3, 30, 1], "has_marker": [0, 1, 1, 0, 0, 1], "prompt": list("ABCDEF")}
    )
    memorized, analysis = analyze_tables(scores, prompts, top_percent=20, zscore=3.0, buckets=[1, 2, 5])
    assert memorized.columns[0] == "prompt"
    assert sorted(memorized["prompt_id"]) == ["b", "c"]  # k = 1, but b and c tie at the threshold
    assert analysis["counts"]["unscored"] == 1
    assert analysis["marker_enrichment"]["table"] == [[2, 0], [0, 3]]

    foreign = pd.concat([scores, pd.DataFrame({"prompt_id": ["z"], "d_mem": [1.0], "nonfinite": [False]})])
    with pytest.raises(ValueError, match="not in prompts.*first: z"):
        analyze_tables(foreign, prompts, 20, 3.0, [1])
