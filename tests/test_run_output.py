"""A run touches only its own files: never an input folder, never a file it did not write.

Real `cxrmem` processes on real folders:
- run.output equal to, inside or containing the model folder or a corpus is refused at start (exit 2,
  one line naming both paths and keys), and every file of the input is still there, unchanged;
- a folder of files no run wrote is refused unless run.allow_foreign_files, and even then those files
  are never published nor deleted;
- an overwrite of an earlier run replaces that run's files (those its manifest lists), and nothing else;
- the audit's last line names the report where it is published, not the _staging prefix.
"""

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pytest

from cxrmem import publish, storage
from cxrmem.runfiles import OUTPUT_FOLDERS, OUTPUT_NAMES, RunLayout
from cxrmem.storage import Store
from tests.cli_process import CXRMEM, REPO, cli_env
from tests.test_publish import FINGERPRINT, write_run

LIGHT = ["corpus.synthetic.n_reports=60", "attribution.enabled=false", "mitigation.enabled=false", "report.figures=false"]


def snapshot(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `folder`."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.rglob("*")) if path.is_file()
    }


def cxrmem(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([CXRMEM, *args], env=cli_env(), capture_output=True, text=True, cwd=REPO, timeout=timeout)


def last_line(process: subprocess.CompletedProcess) -> str:
    return process.stderr.strip().splitlines()[-1]


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path) -> Path:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    return model


def test_the_model_folder_survives_an_overwrite_attempt(model_copy):
    before = snapshot(model_copy)
    assert "model_index.json" in before and any(path.startswith("unet/") for path in before)
    config = ["--config", str(REPO / "conf/test.yaml"), f"model.path={model_copy}", *LIGHT]
    cases = {
        "is": ("audit", model_copy, "run.overwrite=true"),
        "is inside": ("prepare", model_copy / "unet" / "run", "run.overwrite=true"),
        "contains": ("score", model_copy.parent, "run.overwrite=true"),
    }
    for relation, (stage, output, extra) in cases.items():
        done = cxrmem(stage, *config, f"run.output={output}", extra)
        line = last_line(done)
        assert done.returncode == 2, done.stderr[-2000:]
        assert line.startswith("cxrmem: configuration error: run.output"), line
        assert f"run.output {output} {relation} model.path {model_copy}:" in line, line
    assert snapshot(model_copy) == before  # not even a lease file was written there


def test_a_corpus_folder_as_output_is_refused(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "reports.csv").write_text("text\nno acute findings ___\nsmall effusion\n")
    before = snapshot(corpus)
    for path in (corpus, corpus / "reports.csv"):  # a folder corpus, and a file corpus inside the output
        done = cxrmem("prepare", "corpus.source=table", f"corpus.path={path}", f"run.output={corpus}")
        assert done.returncode == 2, done.stderr[-2000:]
        relation = "is" if path == corpus else "contains"
        assert f"run.output {corpus} {relation} corpus.path {path}:" in last_line(done)
    assert snapshot(corpus) == before


def test_a_folder_of_foreign_files_is_refused_unless_allowed_and_never_published(tmp_path):
    corpus = tmp_path / "corpus.csv"
    corpus.write_text("text\nno acute findings ___\nsmall effusion\nsmall effusion\n")
    output = tmp_path / "shared"
    output.mkdir()
    (output / "notes.txt").write_text("the operator's notes")
    prepare = ["prepare", "corpus.source=table", f"corpus.path={corpus}", f"run.output={output}"]

    refused = cxrmem(*prepare)
    assert refused.returncode == 1, refused.stderr[-2000:]
    assert f"{output}/notes.txt" in last_line(refused) and "run.allow_foreign_files=true" in last_line(refused)
    assert sorted(os.listdir(output)) == ["notes.txt"]

    done = cxrmem(*prepare, "run.allow_foreign_files=true")
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = publish.publish_manifest(Store(), str(output), FINGERPRINT, {})
    assert "notes.txt" not in manifest["files"] and manifest["foreign"] == ["notes.txt"]
    assert "prompts.parquet" in manifest["files"]
    report = publish.verify_run(Store(), str(output))
    assert report["ok"] and report["foreign"] == ["notes.txt"]
    assert (output / "notes.txt").read_text() == "the operator's notes"


def test_an_overwrite_replaces_the_earlier_runs_files_and_spares_a_foreign_file(tmp_path):
    first, second, target = (str(tmp_path / name) for name in ("first", "second", "target"))
    write_run(first, tag="old")
    Store().write_table(pa.table({"unit": ["___"]}), storage.join(first, "tokens.parquet"))  # only in the first run
    publish.publish_manifest(Store(), first, FINGERPRINT, {})
    new = write_run(second, tag="new", n_rows=7)
    publish.publish_manifest(Store(), second, "fp-new", {})

    assert cxrmem("export", "--to", target, f"run.output={first}").returncode == 0
    Path(target, "notes.txt").write_text("beside the run")  # a file the run did not write
    done = cxrmem("export", "--to", target, f"run.output={second}", "run.overwrite=true")

    assert done.returncode == 0, done.stderr[-2000:]
    manifest = publish.read_manifest(Store(), target)
    assert manifest["model_fingerprint"] == "fp-new" and set(manifest["files"]) == set(new)
    assert set(publish.run_files(Store(), target)) == set(new)  # the first run's tokens.parquet is gone
    assert Store().read_bytes(storage.join(target, "summary.json")) == new["summary.json"]
    assert Path(target, "notes.txt").read_text() == "beside the run"
    assert manifest["foreign"] == ["notes.txt"] and publish.verify_run(Store(), target)["ok"]
    assert not os.path.exists(publish.staging_prefix(target))


def test_promotion_deletes_only_what_the_old_manifest_lists_and_the_layout_knows(tmp_path):
    prefix = str(tmp_path / "run")
    write_run(prefix, tag="old")
    Store().write_text(storage.join(prefix, "model_index.json"), "{}")  # listed by a manifest written before foreign files were told apart
    Store().write_text(storage.join(prefix, "unet/config.json"), "{}")
    publish.publish_manifest(Store(), prefix, FINGERPRINT, {})
    manifest = Store().read_json(publish.manifest_uri(prefix))
    manifest["files"]["model_index.json"] = {"bytes": 2, "sha256": "x"}
    Store().write_json(publish.manifest_uri(prefix), manifest)
    Store().write_text(storage.join(prefix, "metrics.json"), "{}")  # a layout name the old manifest does not list: not its file

    work = publish.prepare_output(Store(), prefix, overwrite=True)
    write_run(work, tag="new")
    publish.publish_run(Store(), prefix, work, "fp-new", {})

    for name in ("model_index.json", "unet/config.json", "metrics.json"):
        assert Store().exists(storage.join(prefix, name)), name
    assert json.loads(Store().read_text(storage.join(prefix, "summary.json")))["tag"] == "new"


def test_an_interrupted_promotion_still_removes_only_the_old_runs_files(tmp_path):
    prefix = str(tmp_path / "run")
    write_run(prefix, tag="old")
    Store().write_table(pa.table({"unit": ["___"]}), storage.join(prefix, "tokens.parquet"))
    publish.publish_manifest(Store(), prefix, FINGERPRINT, {})
    Store().write_text(storage.join(prefix, "notes.txt"), "mine")
    work = publish.prepare_output(Store(), prefix, overwrite=True)
    new = write_run(work, tag="new")
    publish.publish_manifest(Store(), work, "fp-new", {})
    # Step 1 ran (the old run's files recorded, its manifest deleted), then the process died.
    assert publish.replaced_files(Store(), work, prefix) and not publish.is_published(Store(), prefix)

    publish.finish_interrupted_promotion(Store(), prefix)

    assert set(publish.run_files(Store(), prefix)) == set(new)  # tokens.parquet, the old run's only, is gone
    assert Store().read_text(storage.join(prefix, "notes.txt")) == "mine"
    assert publish.verify_run(Store(), prefix)["ok"]


def test_every_output_of_the_layout_is_known_and_working_files_stay_unpublished():
    from cxrmem.distributed.rescore import DIFF_FILE

    layout = RunLayout("/run")
    properties = [name for name, value in vars(RunLayout).items() if isinstance(value, property)]
    assert len(properties) > 10
    for name in properties:  # every place the layout names, so that a new output cannot be left unpublished
        value = getattr(layout, name)
        path = (value.prefix if isinstance(value, RunLayout) else value).removeprefix("/run/")
        if RunLayout.is_working(path):
            continue
        assert path in OUTPUT_NAMES or path in OUTPUT_FOLDERS, name
        assert RunLayout.knows(path if path in OUTPUT_NAMES else f"{path}/any.file"), name
    assert DIFF_FILE in OUTPUT_NAMES and RunLayout.knows("figures/dmem_hist.png") and RunLayout.knows("reference/scores.parquet")
    for path in ("model_index.json", "unet/config.json", "reports.csv", "figuresX/a.png"):
        assert not RunLayout.knows(path), path


@pytest.mark.slow
def test_an_audit_overwrite_ends_naming_the_published_report(tiny_model_dir, tmp_path):
    output = tmp_path / "run"
    command = ["audit", "--config", str(REPO / "conf/test.yaml"), f"model.path={tiny_model_dir}", f"run.output={output}", *LIGHT]
    first = cxrmem(*command, timeout=400)
    assert first.returncode == 0, first.stderr[-3000:]
    (output / "notes.txt").write_text("beside the run")
    second = cxrmem(*command, "run.overwrite=true", timeout=400)
    assert second.returncode == 0, second.stderr[-3000:]
    assert last_line(second) == f"cxrmem audit: done; output: {output}/report.html"
    assert (output / "report.html").is_file() and not (output / "_staging").exists()
    assert (output / "notes.txt").read_text() == "beside the run"
    assert subprocess.run([CXRMEM, "verify", str(output)], env=cli_env(), capture_output=True, cwd=REPO).returncode == 0
