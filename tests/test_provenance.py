"""A published run can prove where it came from (issue 31, item 7).

`verify` alone checks the files against the manifest beside them; an edit of a file and of its line
in the manifest passes it. The manifest's digest, printed at publish and recorded by rescoring in
latest.json, and the operator's optional HMAC signature are checked against records kept outside
the run: `verify --expect` and `verify --key` fail on that edit. Real `cxrmem` processes on real
folders; the fast cases publish a small run directly.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cxrmem import publish
from cxrmem.runfiles import SIGNATURE_NAME, RunLayout
from cxrmem.storage import Store
from tests.cli_process import CXRMEM, REPO, cli_env
from tests.test_publish import FINGERPRINT, write_run

LIGHT = ["corpus.synthetic.n_reports=60", "attribution.enabled=false", "mitigation.enabled=false", "report.figures=false"]
DIGEST_LINE = re.compile(r"published (\S+) with manifest sha256 ([0-9a-f]{64}); keep this digest outside the run")


def cxrmem(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([CXRMEM, *args], env=env or cli_env(), capture_output=True, text=True, cwd=REPO, timeout=timeout)


def last_line(process: subprocess.CompletedProcess) -> str:
    return process.stderr.strip().splitlines()[-1]


def tamper_report(run: Path) -> None:
    """The edit of the issue: report.html says something else, and its hash in manifest.json follows."""
    report = run / "report.html"
    report.write_text(report.read_text().replace("<h1>", "<p>The model is safe: nothing is memorized.</p><h1>", 1))
    manifest = json.loads((run / "manifest.json").read_text())
    data = report.read_bytes()
    manifest["files"]["report.html"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (run / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def test_the_digest_is_the_manifest_canonical_bytes_and_verify_checks_it(tmp_path):
    prefix = str(tmp_path / "run")
    write_run(prefix)
    manifest = publish.publish_manifest(Store(), prefix, FINGERPRINT, {"run": {"output": prefix}})
    digest = publish.manifest_digest(manifest)
    on_disk = json.loads((tmp_path / "run" / "manifest.json").read_text())
    canonical = json.dumps(on_disk, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert digest == hashlib.sha256(canonical).hexdigest() == publish.manifest_digest(on_disk)
    # Re-indenting the file changes no content, so not the digest.
    (tmp_path / "run" / "manifest.json").write_text(json.dumps(on_disk, indent=4) + "\n")
    result = publish.verify_run(Store(), prefix, expect=digest.upper())
    assert result["ok"] and result["manifest_sha256"] == digest and result["expected_from"] == "--expect"
    assert not publish.verify_run(Store(), prefix, expect="0" * 64)["ok"]
    with pytest.raises(FileNotFoundError, match="neither a manifest digest"):
        publish.verify_run(Store(), prefix, expect=digest[:-1])


def test_a_record_names_its_run_and_an_old_record_without_a_digest_says_so(tmp_path):
    prefix = str(tmp_path / "runs" / "r1")
    write_run(prefix)
    digest = publish.manifest_digest(publish.publish_manifest(Store(), prefix, FINGERPRINT, None))
    latest = tmp_path / "latest.json"
    latest.write_text(json.dumps({"run": prefix + "/", "manifest_sha256": digest}))
    assert publish.verify_run(Store(), prefix, expect=str(latest))["ok"]
    latest.write_text(json.dumps({"run": str(tmp_path / "runs" / "r0"), "manifest_sha256": digest}))
    with pytest.raises(ValueError, match=r"records the run .*r0, not .*r1"):
        publish.verify_run(Store(), prefix, expect=str(latest))
    latest.write_text(json.dumps({"run": prefix}))
    with pytest.raises(ValueError, match="records no manifest digest"):
        publish.verify_run(Store(), prefix, expect=str(latest))


def test_a_signing_key_file_signs_every_manifest_written_and_verify_key_checks_it(tmp_path, monkeypatch):
    monkeypatch.delenv(publish.SIGNING_KEY_ENV, raising=False)
    key_file, other_key = tmp_path / "operator.key", tmp_path / "other.key"
    key_file.write_text("correct horse battery staple\n")
    other_key.write_text("another key\n")
    prefix, store = str(tmp_path / "run"), Store()
    write_run(prefix)
    config = {"run": {"output": prefix, "signing_key_file": str(key_file)}}
    publish.publish_manifest(store, prefix, FINGERPRINT, config)
    signature = json.loads((tmp_path / "run" / SIGNATURE_NAME).read_text())
    assert signature["algorithm"] == "HMAC-SHA256" and signature["manifest_sha256"] == publish.manifest_digest(publish.read_manifest(store, prefix))
    key = publish.signing_key(str(key_file))
    assert key == b"correct horse battery staple"
    assert publish.verify_run(store, prefix, key=key)["signature"] == "valid"
    assert publish.verify_run(store, prefix)["ok"]  # the signature is not an unlisted file
    assert publish.verify_run(store, prefix, key=publish.signing_key(str(other_key)))["signature"] == "invalid"

    # An export is signed again (the manifest's config names the key), and an unsigned republish leaves no stale signature.
    exported = publish.export_run(store, prefix, str(tmp_path / "copy"))
    assert publish.verify_run(store, exported["dst"], expect=exported["manifest_sha256"], key=key)["ok"]
    publish.publish_manifest(store, prefix, FINGERPRINT, {"run": {"output": prefix}})
    assert not (tmp_path / "run" / SIGNATURE_NAME).exists()
    assert publish.verify_run(store, prefix, key=key)["signature"] == "missing"
    with pytest.raises(ValueError, match="cannot read the signing key file"):
        publish.signing_key(str(tmp_path / "absent.key"))


def test_verify_of_a_tampered_run_as_processes(tmp_path):
    """The issue's case at the fast level: a run published by the library, edited as a user would, checked by the CLI."""
    run = tmp_path / "run"
    write_run(str(run))
    (run / "report.html").write_text("<html><h1>cxrmem memorization audit</h1></html>")
    digest = publish.manifest_digest(publish.publish_manifest(Store(), str(run), FINGERPRINT, None))
    tamper_report(run)
    plain = cxrmem("verify", str(run))
    assert plain.returncode == 0 and "matches its manifest" in last_line(plain), plain.stderr[-2000:]
    expected = cxrmem("verify", str(run), "--expect", digest)
    assert expected.returncode == 1, expected.stderr[-2000:]
    assert f"is NOT the one expected ({digest}, from --expect)" in last_line(expected)
    assert len([line for line in expected.stderr.splitlines() if line.startswith("cxrmem")]) == 1


@pytest.mark.slow
def test_a_published_audit_prints_its_digest_and_a_tampered_copy_fails_verify_expect(tiny_model_dir, tmp_path):
    output, key_file = tmp_path / "run", tmp_path / "operator.key"
    key_file.write_text("the operator's key\n")
    config = ["--config", str(REPO / "conf/test.yaml"), f"model.path={tiny_model_dir}", *LIGHT]
    env = {k: v for k, v in cli_env().items() if k != publish.SIGNING_KEY_ENV}
    audit = cxrmem("audit", *config, f"run.output={output}", env=env, timeout=400)
    assert audit.returncode == 0, audit.stderr[-3000:]
    lines = audit.stderr.strip().splitlines()
    assert lines[-1] == f"cxrmem audit: done; output: {output}/report.html"
    where, digest = DIGEST_LINE.search(lines[-2]).groups()
    assert where == str(output) and json.loads(audit.stdout)["manifest_sha256"] == digest
    assert f"manifest sha256 {digest}" in audit.stderr  # the publish log line, what a job's log keeps
    assert cxrmem("verify", str(output), "--expect", digest).returncode == 0

    tampered = tmp_path / "tampered"
    shutil.copytree(output, tampered)
    tamper_report(tampered)
    plain = cxrmem("verify", str(tampered))
    assert plain.returncode == 0, plain.stderr[-2000:]  # what verify alone cannot see
    checked = cxrmem("verify", str(tampered), "--expect", digest)
    assert checked.returncode == 1 and "is NOT the one expected" in last_line(checked), checked.stderr[-2000:]

    # Rescoring records the digest of the run it points at; verify checks a rescored run against that record,
    # and the operator's key (here from the environment) signs it.
    signed_env = {**env, publish.SIGNING_KEY_ENV: "the operator's key"}
    rescored = cxrmem("rescore", *config, f"run.output={output}", "--force", env=signed_env, timeout=400)
    assert rescored.returncode == 0, rescored.stderr[-3000:]
    result = json.loads(rescored.stdout)
    latest = json.loads((output / "latest.json").read_text())
    assert latest["run"] == result["run"] and latest["manifest_sha256"] == result["manifest_sha256"]
    run = Path(result["run"])
    ok = cxrmem("verify", str(run), "--expect", str(output / "latest.json"), "--key", str(key_file))
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert last_line(ok).endswith(f"the expected digest ({output}/latest.json); signature valid")
    env_key = cxrmem("verify", str(run), "--key", env=signed_env)
    assert env_key.returncode == 0, env_key.stderr[-2000:]
    tamper_report(run)
    for check in (["--expect", str(output / "latest.json")], ["--key", str(key_file)]):
        failed = cxrmem("verify", str(run), *check)
        assert failed.returncode == 1, failed.stderr[-2000:]
        assert "NOT" in last_line(failed), last_line(failed)
    assert cxrmem("verify", str(run)).returncode == 0
    assert not os.path.exists(RunLayout(str(output)).path(SIGNATURE_NAME))  # the first audit ran unsigned
