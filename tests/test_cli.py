"""The command line an operator uses: version, config, verify, compare, published runs staying immutable,
and names built from data that must stay inside the run."""

import json

import numpy as np
import pandas as pd
import pytest

from cxrmem.cli import main
from cxrmem.publish import publish_manifest
from cxrmem.runfiles import Run, RunLayout
from cxrmem.storage import PARTIAL_MARK, Store, join_inside
from tests.test_analysis import N, _write_run


def analyzed_run(out, shift=0.0):
    """A run with prompts, scores and an analysis, as the stages before attribution leave it."""
    d_mem = np.random.default_rng(1).normal(1.0, 0.05, N)
    d_mem[[0, 1, 2]] = [3.0 + shift, 2.5, 2.0 - 2 * shift]
    out.mkdir(parents=True, exist_ok=True)
    _write_run(out, d_mem, np.zeros(N, dtype=bool))
    assert main(["analyze", f"run.output={out}"]) == 0
    return RunLayout(str(out))


def published_run(out, shift=0.0):
    layout = analyzed_run(out, shift)
    publish_manifest(Store(), layout.prefix, "fp-test", {"run": {"output": layout.prefix}})
    return layout


def test_version_and_resolved_config(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.startswith("cxrmem ")
    secret = "MARKER-not-a-real-secret"
    assert main(["config", "--config", "conf/demo.yaml", "score.steps=7", f"storage.secret_access_key={secret}"]) == 0
    out = capsys.readouterr().out
    assert "steps: 7" in out and "output: runs/demo" in out and secret not in out


def test_a_stage_ends_with_one_line_naming_its_main_output(tmp_path, capsys):
    analyzed_run(tmp_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"cxrmem analyze: done; output: {RunLayout(str(tmp_path)).memorized}"


def test_verify_passes_a_published_run_and_fails_a_changed_one(tmp_path, capsys):
    layout = published_run(tmp_path)
    assert main(["verify", layout.prefix]) == 0
    assert "matches its manifest" in capsys.readouterr().err
    with open(layout.memorized, "a") as stream:
        stream.write("tampered\n")
    assert main(["verify", layout.prefix]) == 1
    assert "memorized_prompts.csv" in capsys.readouterr().err.splitlines()[-1]
    assert main(["verify", str(tmp_path / "nothing")]) == 1
    assert "no published run" in capsys.readouterr().err


def test_verify_reports_added_files_but_not_the_working_files(tmp_path, capsys):
    layout = published_run(tmp_path / "run")
    store = Store()
    working_files = ["_lease.json", "_parts/scores/part-x.parquet", "_staging/summary.json", f"summary.json{PARTIAL_MARK}ab12cd34",
                     "latest.json", "runs/r1/scores.parquet"]
    for working in working_files:
        store.write_text(layout.path(working), "{}")  # the writer's, resume checkpoints, being written, rescoring's
    assert main(["verify", layout.prefix]) == 0
    capsys.readouterr()
    store.write_text(layout.path("extra.txt"), "added")
    store.write_bytes(layout.figure("evil.png"), b"\x89PNG")
    assert main(["verify", layout.prefix]) == 1
    assert capsys.readouterr().err.splitlines()[-1].endswith("unlisted ['extra.txt', 'figures/evil.png'] (4 files)")


def test_a_stage_refuses_a_published_run_unless_overwrite_then_republishes(tmp_path, capsys):
    layout = published_run(tmp_path)
    before = open(layout.memorized).read()
    assert main(["analyze", f"run.output={tmp_path}", "analyze.top_percent=5"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "published" in err and "run.overwrite=true" in err and "cxrmem export" in err
    assert open(layout.memorized).read() == before  # nothing changed under the manifest

    assert main(["analyze", f"run.output={tmp_path}", "analyze.top_percent=5", "run.overwrite=true"]) == 0
    assert open(layout.memorized).read() != before
    assert main(["verify", layout.prefix]) == 0  # republished over the new files


def test_compare_two_published_runs(tmp_path, capsys):
    first, second = published_run(tmp_path / "a"), published_run(tmp_path / "b", shift=1.0)
    capsys.readouterr()
    assert main(["compare", first.prefix, second.prefix, "--out", str(tmp_path / "diff")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prompts"] == N and result["compared"] == N
    assert result["left_ids"] == [f"{2:016x}"]  # its d_mem fell from 2.0 to 0.0
    assert result["entered"] == 1 and result["stayed"] == 2
    diff = pd.read_parquet(tmp_path / "diff" / "diff.parquet")
    assert diff.loc[diff["prompt_id"] == f"{0:016x}", "d_mem_change"].item() == pytest.approx(1.0)
    assert main(["compare", first.prefix, str(tmp_path / "unpublished")]) == 1


def test_crafted_prompt_id_never_becomes_a_path(tmp_path):
    layout = analyzed_run(tmp_path)
    memorized = pd.read_csv(layout.memorized, dtype=str, keep_default_na=False)
    memorized.loc[1, "prompt_id"] = "/../../../../tmp/x"
    memorized.to_csv(layout.memorized, index=False)
    with pytest.raises(ValueError, match=r"row 1 has prompt_id '/../../../../tmp/x'"):
        Run(Store(), layout).read_memorized()
    with pytest.raises(ValueError, match="outside"):
        layout.figure("generations_/../../../../tmp/x.npz")


@pytest.mark.parametrize("key", ["../outside", "models--a/../../x", "/etc/passwd", "a//b"])
def test_crafted_store_key_never_leaves_the_cache(tmp_path, key):
    with pytest.raises(ValueError, match="outside"):
        join_inside(str(tmp_path), key, "model store key")
    assert join_inside(str(tmp_path), "models--a/snapshots/b/config.json", "key").startswith(str(tmp_path))


def test_rescore_with_latest_naming_a_deleted_run_says_what_to_do(tmp_path, capsys):
    from cxrmem.distributed.rescore import latest_uri, previous_run

    output = str(tmp_path / "service")
    gone = f"{output}/runs/20261101T000000Z-aaaa"
    Store().write_json(latest_uri(output), {"run": gone, "model_fingerprint": "aaaa", "config_hash": "x", "created": "20261101T000000Z"})
    assert main(["rescore", f"run.output={output}"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"cxrmem rescore: {latest_uri(output)} names the run {gone}, which is gone"), last
    assert "--force" in last and "point latest.json at a published run" in last and "delete it" in last
    assert previous_run(Store(), output, force=True) is None  # --force: scored afresh, no diff
    assert not Store().exists(f"{output}/_lease.json")
