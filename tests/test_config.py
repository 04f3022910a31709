"""Configuration fails fast and names the key; every shipped config loads."""

import dataclasses
import json
import os
import subprocess
import sys
import typing
from pathlib import Path
from typing import Optional

import pytest

from cxrmem.cli import BY_COMMAND, main
from cxrmem.config import ConfigError, CxrmemConfig, load_config
from cxrmem.score_key import config_hash
from cxrmem.settings import knobs, public_config, redact

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.mark.parametrize("name", sorted(p.name for p in CONF.glob("*.yaml")))
def test_shipped_configs_load(name):
    load_config(CONF / name)


def test_overrides_merge_on_top_of_the_file():
    cfg = load_config(CONF / "demo.yaml", ["score.steps=7", "run.output=s3://bucket/x"])
    assert cfg.score.steps == 7 and cfg.run.output == "s3://bucket/x"
    assert cfg.model.path == "testbed/model"  # from the file


@pytest.mark.parametrize(
    "override, key",
    [
        ("score.stepz=3", "score.stepz"),
        ("score.steps=many", "score.steps"),
        ("score.seed_mode=random", "score.seed_mode"),
        ("score.generations=0", "score.generations"),
        ("analyze.top_percent=150", "analyze.top_percent"),
        ("model.dtype=float8", "model.dtype"),
        ("mitigation.strategies=[original,magic]", "mitigation.strategies"),
    ],
)
def test_bad_keys_and_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_typo_in_yaml_file_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("score:\n  guidance: 7.5\n")
    with pytest.raises(ConfigError, match=r"score\.guidance.*bad\.yaml"):
        load_config(bad)


def test_screening_steps_cannot_exceed_steps():
    with pytest.raises(ConfigError, match="score.screening_steps"):
        load_config(None, ["score.steps=5", "score.screening_steps=6"])


def test_config_hash_ignores_batch_size_but_not_steps():
    base = config_hash(load_config(None))
    assert config_hash(load_config(None, ["score.batch_size=99"])) == base
    assert config_hash(load_config(None, ["score.steps=49"])) != base


def test_cli_reports_config_errors_with_exit_code_2(capsys):
    assert main(["prepare", "score.stepz=1"]) == 2
    assert "score.stepz" in capsys.readouterr().err


def test_cli_help_documents_every_stage():
    out = subprocess.run([sys.executable, "-m", "cxrmem.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for stage in [*BY_COMMAND, "model", "testbed"]:
        assert stage in out


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("run:\n  output: runs/x\nscore:\n  steps: 5\n   generations: 2\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml line 5: not valid YAML"):
        load_config(bad)


def test_a_yaml_file_that_is_not_a_mapping_is_a_config_error(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: the file must be a mapping"):
        load_config(bad)


@pytest.mark.parametrize("override", ["score.steps=many", "score.stepz=1", "score.steps=[1"])
def test_override_errors_name_the_override_not_the_file(override):
    with pytest.raises(ConfigError) as err:
        load_config(CONF / "test.yaml", [override])
    message = str(err.value)
    assert f"override {override!r}" in message and "test.yaml" not in message
    assert "\n" not in message  # one line


@pytest.mark.parametrize(
    "override",
    [
        "mitigation.steps=0",  # crashed later with ZeroDivisionError
        "attribution.max_prompts=-1",  # silently dropped a prompt
        "attribution.max_prompts=0",
        "mitigation.sample_size=-1",
        "mitigation.optimisation_iters=0",
        "ray.num_cpus_per_worker=0",
        "ray.resource_wait_s=0",
        "ray.max_restarts=-2",
        "report.top_prompts=-1",
        "model.radedit.tokenizer_max_length=0",
        "testbed.duplication_levels=[32,0]",
        "testbed.train_steps=0",
        "score.seed=-1",
    ],
)
def test_count_like_keys_have_range_rules(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config(None, [override])


NUMERIC = {int, float, Optional[int], Optional[float], tuple[int, ...]}


def _numeric_knobs(cls, prefix=""):
    """(dot-key, field) of every int / float / tuple-of-int field of the schema, nested sections included."""
    for field_, kind in knobs(cls):
        key = f"{prefix}{field_.name}"
        inner = typing.get_args(kind)[0] if typing.get_origin(kind) in (tuple, list) else kind
        if dataclasses.is_dataclass(inner):
            yield from _numeric_knobs(inner, key + ".")
        elif kind in NUMERIC:
            yield key, field_


def test_every_numeric_key_of_the_schema_has_a_range_rule():
    numeric = dict(_numeric_knobs(CxrmemConfig))
    assert len(numeric) > 60 and "cascade.stages.keep_percent" in numeric and "model.radedit.tokenizer_max_length" in numeric
    assert [key for key, field_ in numeric.items() if field_.metadata.get("rule") is None] == []


def test_job_entry_points_print_the_cli_one_line_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("score: [1\n")
    for script, args in [("audit.py", ["score.stepz=1"]), ("rescore.py", ["--config", str(bad)])]:
        done = subprocess.run(
            [sys.executable, str(CONF.parent / "ray_jobs" / script), *args],
            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(CONF.parent)},
        )  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith("cxrmem: configuration error: ")
        assert "Traceback" not in done.stderr


def test_public_config_drops_only_credentials():
    cfg = load_config(None, ["storage.access_key_id=AKIAMARKER", "storage.secret_access_key=MARKER-SECRET"])
    public = public_config(cfg)
    assert "access_key_id" not in public["storage"] and "secret_access_key" not in public["storage"]
    assert public["model"]["radedit"]["tokenizer_max_length"] == 128
    assert public["testbed"]["max_tokens"] == 96
    assert "MARKER" not in json.dumps(public)
    nested = {"auth": {"token": "t", "password": "p", "session_token": "s", "max_tokens": 3}, "list": [{"api_key": "k"}]}
    assert redact(nested) == {"auth": {"max_tokens": 3}, "list": [{}]}


def test_loading_a_config_imports_neither_torch_nor_diffusers():
    """Every `cxrmem` command loads a config first, `--help` and `verify` too: the settings classes live in modules
    without torch, diffusers or matplotlib (a command that needs no model starts in about a second, not five)."""
    code = ("import sys; from cxrmem.cli import main; from cxrmem.config import load_config; load_config('conf/demo.yaml');"
            "print(sorted(m for m in ('torch', 'diffusers', 'matplotlib', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=CONF.parent, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_every_registered_embedder_names_a_class_that_fingerprints_its_settings():
    """copies/settings.py's EMBEDDERS names each class as text (no torch at config load): a misspelt entry fails here."""
    from cxrmem.copies.embedders import EmbedderSettings, embedder_class
    from cxrmem.copies.settings import EMBEDDERS

    for name in EMBEDDERS:
        cls = embedder_class(EmbedderSettings(name=name))
        assert isinstance(cls, type) and callable(cls.fingerprint_of), name
    with pytest.raises(ValueError, match="use one of pixel, rad_dino, hf"):
        embedder_class(EmbedderSettings(name="clip"))
