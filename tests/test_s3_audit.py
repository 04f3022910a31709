"""A full audit whose corpus, model and outputs all live in S3, and a resume from S3 score parts."""

import os

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from cxrmem import publish, storage
from cxrmem.config import load_config
from cxrmem.corpus.synthetic import generate_reports
from cxrmem.distributed.audit import run_audit
from cxrmem.runfiles import RunLayout
from cxrmem.stages import score_parts
from cxrmem.storage import Store

pytestmark = [pytest.mark.s3, pytest.mark.slow]

CONF = os.path.join(os.path.dirname(__file__), "..", "conf", "test.yaml")
SECRET = "audit-secret-must-not-leak"


def upload_folder(local_root: str, uri: str, storage_cfg) -> None:
    for folder, _, names in os.walk(local_root, followlinks=True):
        for name in names:
            path = os.path.join(folder, name)
            Store.from_config(storage_cfg).copy_file(path, storage.join(uri, os.path.relpath(path, local_root)))


def test_audit_in_s3_publishes_and_resumes_from_s3_parts(tiny_model_dir, s3_server, s3_bucket, tmp_path, monkeypatch):
    # Credentials only in the config (not the environment), to check that no output records them.
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "unused")
    storage_cfg = s3_server.storage_cfg(access_key_id=s3_server.access_key, secret_access_key=s3_server.secret_key)
    bucket = f"s3://{s3_bucket}"
    reports = generate_reports(40, seed=3)
    Store.from_config(storage_cfg).write_table(pa.Table.from_pylist(reports), f"{bucket}/corpus/reports.parquet")
    upload_folder(tiny_model_dir, f"{bucket}/models/tiny", storage_cfg)
    output = f"{bucket}/runs/audit"
    overrides = [
        f"run.output={output}",
        "corpus.source=table",
        f"corpus.path={bucket}/corpus/reports.parquet",
        f"model.path={bucket}/models/tiny",
        f"model.cache_dir={tmp_path / 'model-cache'}",
        "ray.checkpoint_every=8",
        "attribution.enabled=false",  # storage is under test here; the stages have their own tests
        "mitigation.enabled=false",
        "report.figures=false",
        *(f"storage.{key}={value}" for key, value in storage_cfg.items() if value is not None),
    ]
    cfg = load_config(CONF, overrides)
    assert cfg.storage.secret_access_key == s3_server.secret_key

    first = run_audit(cfg)

    manifest = publish.require_published(Store.from_config(cfg.storage), output)
    assert {"prompts.parquet", "scores.parquet", "summary.json", "report.html"} <= set(manifest["files"])
    assert publish.verify_run(Store.from_config(cfg.storage), output)["ok"]
    layout = RunLayout(output)
    scores = Store.from_config(cfg.storage).read_table(layout.scores).sort_by("prompt_id")
    n = manifest["files"]["prompts.parquet"]["rows"]
    assert scores.num_rows == n == first["scoring"]["computed"]
    for name in ["manifest.json", "summary.json"]:
        text = Store.from_config(cfg.storage).read_text(layout.path(name))
        assert s3_server.secret_key not in text and s3_server.access_key not in text, name

    # A run that died mid-scoring: half of the prompts in a durable part, no scores.parquet, no manifest.
    half = scores.slice(0, n // 2)
    score_parts.write_part(Store.from_config(cfg.storage), half, layout.score_parts, 0)
    Store.from_config(cfg.storage).delete(layout.scores)
    Store.from_config(cfg.storage).delete(layout.manifest)

    second = run_audit(cfg)

    assert second["scoring"]["resumed"] == n // 2 and second["scoring"]["computed"] == n - n // 2
    assert publish.verify_run(Store.from_config(cfg.storage), output)["ok"]
    rescored = Store.from_config(cfg.storage).read_table(layout.scores).sort_by("prompt_id")
    assert rescored.column("prompt_id").equals(scores.column("prompt_id"))
    assert pc.max(pc.abs(pc.subtract(rescored["d_mem"], scores["d_mem"]))).as_py() < 1e-4

    with pytest.raises(publish.RunExistsError, match="run.overwrite=true"):
        run_audit(cfg)
