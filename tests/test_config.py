"""Configuration fails fast and names the key; every shipped config loads."""

import subprocess
import sys
from pathlib import Path

import pytest

from cxrmem.cli import STAGES, main
from cxrmem.config import ConfigError, config_hash, load_config

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
    for stage in [*STAGES, "model", "testbed"]:
        assert stage in out
