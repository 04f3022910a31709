"""The corpus reader never reads a run: a run folder that an earlier run left inside the corpus folder
(its outputs, its _parts/, its manifest) is skipped and counted; a table beside it is still read."""

import json
import logging
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq

from cxrmem.corpus.files import corpus_files, is_run_file, run_folders
from cxrmem.publish import publish_manifest
from cxrmem.storage import Store
from tests.cli_process import CXRMEM, REPO, cli_env

REPORTS = ["no acute findings ___", "small left effusion", "small left effusion", "cardiomegaly ___ unchanged", "clear lungs"]


def prepare(tiny_model_dir, corpus, output) -> subprocess.CompletedProcess:
    command = [CXRMEM, "prepare", f"model.path={tiny_model_dir}", "corpus.source=table", f"corpus.path={corpus}", f"run.output={output}"]
    return subprocess.run(command, env=cli_env(), capture_output=True, text=True, cwd=REPO, timeout=120)


def test_a_run_inside_the_corpus_folder_is_never_read_as_corpus(tiny_model_dir, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "reports.csv").write_text("text\n" + "\n".join(REPORTS) + "\n")
    # An earlier run, written inside the corpus folder from the same reports (its output is not the corpus path).
    first = prepare(tiny_model_dir, corpus / "reports.csv", corpus / "run")
    assert first.returncode == 0, first.stderr[-2000:]
    publish_manifest(Store(), str(corpus / "run"), "fp", None)
    # A failed run's resume checkpoint (no manifest, lease released) that holds prompts as a table would.
    parts = corpus / "failed" / "_parts" / "scores"
    parts.mkdir(parents=True)
    pq.write_table(pa.table({"text": ["leftover prompt from a failed run"]}), parts / "part-00000.parquet")
    # A user's own table named like a run's output, in a folder that is no run: corpus.
    (corpus / "more").mkdir()
    pq.write_table(pa.table({"text": ["a report from the user's prompts table"]}), corpus / "more" / "prompts.parquet")

    second = prepare(tiny_model_dir, corpus, tmp_path / "out")

    assert second.returncode == 0, second.stderr[-2000:]
    summary = json.loads(second.stdout)
    assert summary["reports_read"] == len(REPORTS) + 1  # reports.csv and more/prompts.parquet, nothing of the runs
    skipped_lines = [line for line in second.stderr.splitlines() if "corpus: skipped" in line]
    assert len(skipped_lines) == 1 and "skipped 2 file(s) of 2 run folder(s)" in skipped_lines[0], second.stderr[-2000:]
    prompts = pq.read_table(tmp_path / "out" / "prompts.parquet").to_pandas()
    assert prompts["n_reports"].max() == 2  # the duplicated report, counted once per report and not again from the run
    assert "leftover prompt from a failed run" not in set(prompts["prompt"])


def test_run_files_are_told_apart_by_their_folders_markers(tmp_path, caplog):
    paths = [
        "reports.csv", "run/manifest.json", "run/prompts.parquet", "run/figures/a.png", "run/notes.csv",
        "live/_lease.json", "live/scores.parquet", "old/_parts/scores/part-00000.parquet", "old/memorized_prompts.csv",
        "plain/prompts.parquet",
    ]  # fmt: skip
    folders = run_folders(paths)
    assert folders == {"run", "live", "old"}
    skipped = [path for path in paths if is_run_file(path, folders)]
    assert skipped == ["run/manifest.json", "run/prompts.parquet", "run/figures/a.png", "live/_lease.json", "live/scores.parquet",
                       "old/_parts/scores/part-00000.parquet", "old/memorized_prompts.csv"]  # fmt: skip
    for path in paths:  # the same on disk, through the walk
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("x")
    with caplog.at_level(logging.WARNING, logger="cxrmem.corpus.files"):
        files, outside = corpus_files(str(tmp_path), (".csv", ".parquet"))
    assert [str(p.relative_to(tmp_path)) for p in map(type(tmp_path), files)] == ["plain/prompts.parquet", "reports.csv", "run/notes.csv"]
    assert outside == [] and "skipped 4 file(s) of 3 run folder(s)" in caplog.text  # of the .csv and .parquet ones
