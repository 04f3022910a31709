"""Score parts carry their sha256 in their name; on resume a part that fails its check is set aside (moved,
never deleted) and its prompts are scored again, so an edited part never reaches scores.parquet."""

import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cxrmem.runfiles import RunLayout
from cxrmem.stages import score_parts
from cxrmem.storage import Store
from tests.cli_process import CXRMEM, REPO, cli_env


def cxrmem(*args):
    return subprocess.run([CXRMEM, *args], env=cli_env(), capture_output=True, text=True, cwd=REPO, timeout=300)


def rows(ids, d_mem=None):
    n = len(ids)
    values = np.linspace(0.01, 0.04, n) if d_mem is None else d_mem
    return pa.table({"prompt_id": ids, "d_mem": values, "model_fingerprint": ["fp1"] * n, "config_hash": ["cfg1"] * n})


def ids(n, start=0):
    return [f"{i:016x}" for i in range(start, start + n)]


def test_a_tampered_part_is_set_aside_and_rescored_by_a_real_resume(tiny_model_dir, tmp_path):
    output = tmp_path / "run"
    config = ["--config", str(REPO / "conf/test.yaml"), f"model.path={tiny_model_dir}", f"run.output={output}", "corpus.synthetic.n_reports=60"]
    assert cxrmem("prepare", *config).returncode == 0
    first = cxrmem("score", *config)
    assert first.returncode == 0, first.stderr[-2000:]
    layout = RunLayout(str(output))
    truth = pq.read_table(layout.scores).to_pandas().set_index("prompt_id")
    # The state an interrupted run leaves: its scores as two checked parts, no scores.parquet yet.
    table = pq.read_table(layout.scores)  # the schema the scorer writes
    half = table.num_rows // 2
    kept = score_parts.write_part(Store(), table.slice(0, half), layout.score_parts, 0)
    tampered = score_parts.write_part(Store(), table.slice(half), layout.score_parts, 1)
    (output / "scores.parquet").unlink()
    # Still valid Parquet, with the same name (so the same claimed checksum): four d_mem values x 1,000.
    edited = pq.read_table(tampered)
    d_mem = edited["d_mem"].to_numpy().copy()
    d_mem[:4] *= 1000
    pq.write_table(edited.set_column(edited.schema.get_field_index("d_mem"), "d_mem", pa.array(d_mem)), tampered)

    resumed = cxrmem("score", *config)

    assert resumed.returncode == 0, resumed.stderr[-2000:]
    lines = [line for line in resumed.stderr.splitlines() if "set aside" in line]
    assert len(lines) == 1 and "set aside 1 of 2 parts" in lines[0] and tampered.rsplit("/", 1)[-1] in lines[0], resumed.stderr[-2000:]
    assert f"{half} already done" in resumed.stderr  # the good part counted, the tampered one's prompts scored again
    scores = pq.read_table(layout.scores).to_pandas().set_index("prompt_id")
    assert len(scores) == len(truth) and scores.index.is_unique
    assert scores["d_mem"].max() < 10 * truth["d_mem"].max()  # no tampered value reached scores.parquet
    np.testing.assert_allclose(scores.loc[truth.index, "d_mem"], truth["d_mem"], rtol=1e-5)
    aside = output / "_parts" / "set_aside" / tampered.rsplit("/", 1)[-1]
    assert aside.is_file() and not (output / "_parts" / "scores").exists()  # moved, not deleted; the checked parts merged
    assert kept.rsplit("/", 1)[-1] not in {p.name for p in (output / "_parts" / "set_aside").iterdir()}


def test_truncated_and_unchecked_parts_are_set_aside_before_the_done_set_and_the_merge(tmp_path, caplog):
    layout = RunLayout(str(tmp_path / "run"))
    good = score_parts.write_part(Store(), rows(ids(10)), layout.score_parts, 0)
    truncated = score_parts.write_part(Store(), rows(ids(10, 10)), layout.score_parts, 1)
    with open(truncated, "r+b") as handle:
        handle.truncate(100)
    legacy = f"{layout.score_parts}/part-20260101T000000-00002-abcdef12.parquet"  # an older version's name: no checksum
    pq.write_table(rows(ids(10, 20)), legacy)

    with caplog.at_level("WARNING", logger="cxrmem.stages.score_parts"):
        sources = score_parts.score_sources(Store(), layout)
    assert sources == [good]
    assert len(score_parts.done_ids(Store(), sources, "fp1", "cfg1")) == 10
    assert "set aside 2 of 3 parts" in caplog.text and "edited or truncated" in caplog.text and "no checksum" in caplog.text
    assert sorted(p.rsplit("/", 1)[-1] for p in Store().list_files(layout.set_aside)) == sorted(
        p.rsplit("/", 1)[-1] for p in (truncated, legacy)
    )
    assert score_parts.consolidate(Store(), layout, "fp1", "cfg1") == {"rows": 10, "duplicates": 0, "parts": 1}


def test_a_merge_that_disagrees_with_its_sources_keeps_the_parts(tmp_path):
    layout = RunLayout(str(tmp_path / "run"))
    Store().write_table(rows(ids(5)), layout.scores)
    with pytest.raises(ValueError, match=r"scores.parquet holds 5 rows after merging \(5 written\), but its sources hold 6 distinct"):
        score_parts.check_merged(Store(), layout, 5, 6)
    score_parts.check_merged(Store(), layout, 5, 5)
