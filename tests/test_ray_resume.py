"""Part files, the done set, consolidation and the rescore diff: the driver-side pieces, without Ray."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cxrmem.analysis import score_diff
from cxrmem.progress import Progress
from cxrmem.runfiles import RunLayout
from cxrmem.stages import score_parts as resume
from cxrmem.storage import Store


def rows(ids, fingerprint="fp1", key="cfg1", d_mem=None):
    """scores.parquet-shaped rows; d_mem defaults to a value derived from the id, so copies agree."""
    d_mem = d_mem if d_mem is not None else [int(i, 16) % 1000 / 1000 for i in ids]
    return pa.table(
        {
            "prompt_id": pa.array(ids, pa.string()),
            "prompt": pa.array([f"prompt {i}" for i in ids], pa.string()),
            "d_mem": pa.array(d_mem, pa.float32()),
            "step_norms": pa.array([[[v, v], [v, v]] for v in d_mem], pa.list_(pa.list_(pa.float32()))),
            "model_fingerprint": pa.array([fingerprint] * len(ids), pa.string()),
            "config_hash": pa.array([key] * len(ids), pa.string()),
        }
    )


def hex_ids(n, seed=0):
    rng = np.random.default_rng(seed)
    return [f"{v:016x}" for v in rng.integers(0, 2**62, n)]


def test_parts_are_sorted_and_atomic(tmp_path):
    parts_dir = str(tmp_path / "_parts" / "scores")
    ids = hex_ids(20)
    uri = resume.write_part(Store(), rows(ids), parts_dir, 0)
    assert Store().list_files(parts_dir, suffix=".parquet") == [uri]
    assert pq.read_table(uri)["prompt_id"].to_pylist() == sorted(ids)
    # Nothing half-written is left behind under a part name.
    assert [p.name for p in (tmp_path / "_parts" / "scores").iterdir()] == [uri.rsplit("/", 1)[1]]


def test_done_ids_only_count_the_current_key(tmp_path):
    layout = RunLayout(str(tmp_path))
    ids = hex_ids(30)
    resume.write_part(Store(), rows(ids[:10]), layout.score_parts, 0)
    resume.write_part(Store(), rows(ids[10:20], fingerprint="old-model"), layout.score_parts, 1)
    resume.write_part(Store(), rows(ids[20:], key="other-settings"), layout.score_parts, 2)
    done = resume.done_ids(Store(), resume.score_sources(Store(), layout), "fp1", "cfg1")
    assert sorted(done.to_pylist()) == sorted(ids[:10])


def test_consolidate_merges_sorted_without_duplicates_and_removes_parts(tmp_path, monkeypatch):
    monkeypatch.setattr(resume, "MERGE_READ_ROWS", 7)  # many small read batches per source
    monkeypatch.setattr(resume, "MERGE_WRITE_ROWS", 11)  # several row groups in the output
    layout = RunLayout(str(tmp_path))
    ids = hex_ids(100, seed=1)
    Store().write_table(rows(sorted(ids[:30])), layout.scores)  # an earlier consolidation
    resume.write_part(Store(), rows(ids[30:60]), layout.score_parts, 0)
    resume.write_part(Store(), rows(ids[60:] + ids[40:45]), layout.score_parts, 1)  # 5 rows scored twice
    resume.write_part(Store(), rows(hex_ids(5, seed=2), fingerprint="old-model"), layout.score_parts, 2)

    counts = resume.consolidate(Store(), layout, "fp1", "cfg1")

    merged = pq.read_table(layout.scores)
    assert counts == {"rows": 100, "duplicates": 5, "parts": 3}
    assert merged["prompt_id"].to_pylist() == sorted(ids)
    assert merged.schema.equals(rows(ids[:1]).schema)
    expected = rows(sorted(ids))
    np.testing.assert_array_equal(merged["d_mem"].to_numpy(), expected["d_mem"].to_numpy())
    assert merged["step_norms"].to_pylist() == expected["step_norms"].to_pylist()
    assert Store().list_files(layout.score_parts, suffix=".parquet") == []
    assert not (tmp_path / "_parts").exists()  # nothing of the parts stays once merged
    # Consolidating again is a no-op.
    assert resume.consolidate(Store(), layout, "fp1", "cfg1") == {"rows": 100, "duplicates": 0, "parts": 0}


def test_consolidate_keeps_the_image_index_beside_the_parts(tmp_path):
    layout = RunLayout(str(tmp_path))
    Store().write_text(f"{layout.image_index}/part-0.parquet", "embeddings")  # a reusable checkpoint, not a score part
    resume.write_part(Store(), rows(hex_ids(5)), layout.score_parts, 0)
    resume.consolidate(Store(), layout, "fp1", "cfg1")
    assert not (tmp_path / "_parts" / "scores").exists() and (tmp_path / "_parts" / "image_index" / "part-0.parquet").exists()


def test_consolidate_without_anything_names_the_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="scores.parquet"):
        resume.consolidate(Store(), RunLayout(str(tmp_path)), "fp1", "cfg1")


def test_score_diff_counts_prompts_entering_and_leaving():
    old = pd.DataFrame({"prompt_id": ["a", "b", "c", "d"], "d_mem": [1.0, 2.0, 3.0, 4.0], "memorized": [False, False, True, True]})
    new = pd.DataFrame({"prompt_id": ["a", "b", "c", "e"], "d_mem": [1.5, 5.0, 1.0, 2.0], "memorized": [False, True, False, False]})
    diff, counts = score_diff(old, new)
    by_id = diff.set_index("prompt_id")
    assert by_id.loc["b", "change"] == "entered" and by_id.loc["c", "change"] == "left"
    assert by_id.loc["d", "change"] == "left"  # gone from the corpus: no longer memorized
    assert by_id.loc["a", "d_mem_change"] == pytest.approx(0.5)
    assert np.isnan(by_id.loc["e", "d_mem_change"])
    assert counts["entered"] == 1 and counts["left"] == 2 and counts["stayed"] == 0
    assert counts["compared"] == 3 and counts["max_abs_d_mem_change"] == pytest.approx(3.0)


def test_progress_rate_and_eta():
    progress = Progress(total=10, every_s=3600, already_done=5)
    progress.start -= 4.0  # as if four seconds had passed
    progress.update(4)
    assert progress.rate == pytest.approx(1.0, rel=0.05)
    assert progress.eta_s == pytest.approx(6.0, rel=0.05)
    assert "4/10 prompts (+5 resumed)" in progress.line()


def test_cascade_selection_and_recall():
    """The cascade selects with detectors.screen_top and measures with screen_recall (tests/test_detector_columns.py: costs)."""
    from cxrmem.detectors import screen_recall, screen_top

    full = np.arange(100, dtype=float)  # prompt i has full score i: the top 1% is prompt 99
    screen = full.copy()
    screen[99] = 50.0  # the screen underrates it: out of the top 10%, inside the top 60%
    screen[3] = np.nan  # never selected
    assert screen_recall(full, screen, "dmem", top_percent=1, screen_percent=10) == 0.0
    assert screen_recall(full, screen, "dmem", top_percent=1, screen_percent=60) == 1.0
    assert screen_recall(full, full, "dmem", top_percent=5, screen_percent=10) == 1.0
    assert set(screen_top(np.arange(100), screen, 10)) == set(range(89, 99))  # 99 finite scores: top 10
