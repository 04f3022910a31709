"""The analyze stage on real parquet files written here, and its pure table core."""

import io
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cxrmem.analysis import analyze_tables, known_memorized_check
from cxrmem.config import load_config
from cxrmem.corpus.text import prompt_id
from cxrmem.runfiles import RunLayout
from cxrmem.stages import analyze

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
    result = analyze.run(cfg)
    assert result.memorized_count == 3

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
        analyze.run(cfg)


def test_analyze_tables_keeps_ties_and_rejects_foreign_scores():
    scores = pd.DataFrame({"prompt_id": list("abcde"), "d_mem": [1.0, 5.0, 5.0, 2.0, 0.5], "nonfinite": [False] * 5})
    prompts = pd.DataFrame(
        {"prompt_id": list("abcdef"), "n_reports": [1, 1, 3, 3, 30, 1], "has_marker": [0, 1, 1, 0, 0, 1], "prompt": list("ABCDEF")}
    )
    memorized, analysis = analyze_tables(scores, prompts, top_percent=20, zscore=3.0, buckets=[1, 2, 5])
    assert memorized.columns[0] == "prompt"
    assert sorted(memorized["prompt_id"]) == ["b", "c"]  # k = 1, but b and c tie at the threshold
    assert analysis.counts["unscored"] == 1
    assert analysis.marker_enrichment["table"] == [[2, 0], [0, 3]]

    foreign = pd.concat([scores, pd.DataFrame({"prompt_id": ["z"], "d_mem": [1.0], "nonfinite": [False]})])
    with pytest.raises(ValueError, match="not in prompts.*first: z"):
        analyze_tables(foreign, prompts, 20, 3.0, [1])


def test_known_memorized_check_hand_computed():
    d_mem = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    memorized = np.array([True, True, False, False, False])
    known = np.array([True, False, True, False, False])
    check = known_memorized_check(d_mem, memorized, known)
    assert check["known_in_memorized"] == 1 and check["precision"] == 0.5 and check["recall"] == 0.5
    # positives 5 and 3 against negatives 4, 2, 1: 5 of 6 pairs ordered right
    assert check["auc"] == pytest.approx(5 / 6)
    assert check["tpr_at_fpr"] == 0.5  # 1% of 3 negatives lets none through: threshold 4


def _ids_from_text(layout):
    """Give the fixture's rows the ids prepare would: the hash of the normalised prompt."""
    for uri in (layout.prompts, layout.scores):
        table = pq.read_table(uri)
        ids = pa.array([prompt_id(p) for p in table["prompt"].to_pylist()])
        pq.write_table(table.set_column(table.schema.get_field_index("prompt_id"), "prompt_id", ids), uri)


def test_analyze_checks_detection_against_a_known_list(run, tmp_path):
    _, layout, _, _ = run
    _ids_from_text(layout)
    known_csv = tmp_path / "manifest.csv"
    pd.DataFrame(
        {
            "prompt": ["Finding 0, compared to  ___.", "Finding 1, compared to ___.", "Finding 5, no change.", "Not in corpus."],
            "n_copies": [32, 32, 1, 8],
            "planted": [True, True, False, True],
        }
    ).to_csv(known_csv, index=False)  # whitespace differs in row 0: prompts are normalised before matching
    analyze.run(load_config(None, [f"run.output={tmp_path}", f"analyze.known_memorized={known_csv}"]))
    known = json.loads(open(layout.summary).read())["analysis"]["known_memorized"]
    assert known["listed"] == 3  # the planted=false row is not a known memorized prompt
    assert known["known_scored"] == 2 and known["known_in_memorized"] == 2
    assert known["precision"] == pytest.approx(2 / 3) and known["recall"] == 1.0 and known["auc"] == 1.0
    memorized = pd.read_csv(layout.memorized, dtype={"prompt_id": str})
    assert memorized["known_memorized"].tolist() == [True, True, False]


def test_known_memorized_file_errors_name_the_key(run, tmp_path):  # noqa: ARG001 (run writes the inputs)
    def analyze_with(known):
        analyze.run(load_config(None, [f"run.output={tmp_path}", f"analyze.known_memorized={known}"]))

    with pytest.raises(FileNotFoundError, match="analyze.known_memorized"):
        analyze_with(tmp_path / "absent.csv")
    (tmp_path / "bad.csv").write_text("text\nsomething\n")
    with pytest.raises(ValueError, match="no `prompt` column"):
        analyze_with(tmp_path / "bad.csv")
