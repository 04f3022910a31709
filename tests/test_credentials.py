"""Credentials never reach outputs or logs; settings whose names merely contain "token" do."""

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from cxrmem.config import load_config
from cxrmem.runfiles import RunLayout
from cxrmem.settings import public_config
from cxrmem.storage import Store

MARKER = "MARKERc0ffee5ecret"


def files_containing(root: Path, needle: str) -> list[str]:
    """Every file under root whose bytes contain `needle` (logs, tables, JSON, HTML alike)."""
    return sorted(str(p) for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes())


@pytest.mark.slow
def test_a_secret_reaches_no_output_or_log_of_an_audit(tiny_model_dir, tmp_path, monkeypatch, capfd, caplog):
    import ray

    from cxrmem.distributed.audit import run_audit

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", f"AKIA{MARKER}")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", MARKER)
    monkeypatch.setenv("AWS_SESSION_TOKEN", MARKER)
    output = tmp_path / "run"
    ray_dir = Path(tempfile.mkdtemp(prefix="cxrcred", dir="/tmp"))  # short: Ray's socket paths live under it
    cfg = load_config(
        Path(__file__).resolve().parents[1] / "conf" / "test.yaml",
        [
            f"run.output={output}",
            f"model.path={tiny_model_dir}",
            f"storage.access_key_id=AKIA{MARKER}",
            f"storage.secret_access_key={MARKER}",
            "corpus.synthetic.n_reports=40",
            "attribution.max_prompts=1",
            "report.figures=false",
        ],
    )
    caplog.set_level("DEBUG")
    # The audit's own Ray session, with its logs where this test can read them.
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=str(ray_dir), logging_level="WARNING")
    try:
        run_audit(cfg)
    finally:
        ray.shutdown()
    leaked_logs = files_containing(ray_dir, MARKER)  # worker logs, job configs, session files
    shutil.rmtree(ray_dir, ignore_errors=True)

    captured = capfd.readouterr()
    assert MARKER not in captured.out + captured.err + caplog.text
    assert files_containing(output, MARKER) == []
    assert leaked_logs == []
    manifest = Store().read_json(RunLayout(str(output)).manifest)
    assert "access_key_id" not in json.dumps(manifest) and "secret_access_key" not in json.dumps(manifest)


def test_public_config_keeps_token_length_settings():
    cfg = load_config(None, [f"storage.secret_access_key={MARKER}", f"storage.access_key_id=AKIA{MARKER}"])
    public = public_config(cfg)
    assert public["model"]["radedit"]["tokenizer_max_length"] == cfg.model.radedit.tokenizer_max_length
    assert public["testbed"]["max_tokens"] == cfg.testbed.max_tokens
    assert MARKER not in json.dumps(public)
    assert set(public) == set(cfg)  # every section is there; only the credential keys are gone
    assert set(cfg.storage) - set(public["storage"]) == {"access_key_id", "secret_access_key"}
