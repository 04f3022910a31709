"""Edges a user meets at the command line (issue 31, item 8), with real `cxrmem` processes and files:

- an audit whose every score is non-finite (the model's weights hold NaN) exits 1 with one line,
  and publishes nothing;
- a path component over the filesystem's limit (ENAMETOOLONG, [Errno 36]) is named in one line.
"""

import os
import shutil
import subprocess

import pytest

from cxrmem.runfiles import RunLayout
from cxrmem.storage import name_too_long
from tests.cli_process import CXRMEM, REPO, cli_env

LIGHT = ["corpus.synthetic.n_reports=60", "attribution.enabled=false", "mitigation.enabled=false", "report.figures=false"]


def cxrmem(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([CXRMEM, *args], env=cli_env(), capture_output=True, text=True, cwd=REPO, timeout=timeout)


def own_lines(process: subprocess.CompletedProcess) -> list[str]:
    """The lines cxrmem itself printed on stderr (not the log's)."""
    return [line for line in process.stderr.splitlines() if line.startswith("cxrmem")]


@pytest.fixture
def nan_model(tiny_model_dir, tmp_path):
    """The tiny model with a NaN output bias: every noise prediction, so every d_mem, is NaN."""
    import torch
    from safetensors.torch import load_file, save_file

    model = tmp_path / "nan_model"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state["conv_out.bias"] = torch.full_like(state["conv_out.bias"], float("nan"))
    save_file(state, str(weights))
    return model


def test_an_audit_that_scored_nothing_exits_1_with_one_line(nan_model, tmp_path):
    output = tmp_path / "run"
    done = cxrmem("audit", "--config", str(REPO / "conf/test.yaml"), f"model.path={nan_model}", f"run.output={output}", *LIGHT)
    assert done.returncode == 1, done.stderr[-3000:]
    lines = own_lines(done)
    assert len(lines) == 1, lines
    assert lines[0] == done.stderr.strip().splitlines()[-1]
    assert lines[0].startswith("cxrmem audit: nothing was scored: all ") and "scores.parquet are non-finite" in lines[0], lines[0]
    assert "check the model" in lines[0]
    assert not os.path.exists(RunLayout(str(output)).manifest)  # nothing published, nothing reported
    assert not os.path.exists(RunLayout(str(output)).report)


def test_a_name_over_the_filesystem_limit_is_named_in_one_line(tmp_path):
    name = "r" * 300
    for output in (tmp_path / name / "run", tmp_path / name):  # a folder on the way, and the run's own folder
        done = cxrmem("prepare", "--config", str(REPO / "conf/test.yaml"), f"run.output={output}", *LIGHT, timeout=120)
        assert done.returncode == 1, done.stderr[-3000:]
        lines = own_lines(done)
        assert len(lines) == 1 and lines[0] == done.stderr.strip().splitlines()[-1], lines
        line = lines[0]
        assert line.startswith("cxrmem prepare: the name 'rrrrrrrr") and "(300 bytes)" in line, line
        assert "longer than this filesystem allows (255 bytes per file or folder name)" in line and "run.output" in line
        assert "Errno" not in line and name not in line  # named once, shortened, not the raw error


def test_name_too_long_leaves_other_errors_alone(tmp_path):
    assert name_too_long(FileNotFoundError(2, "No such file or directory", str(tmp_path / "x"))) is None
    assert name_too_long(ValueError("not an OS error")) is None
    long_path = str(tmp_path / ("n" * 260) / "file.txt")
    try:
        open(long_path, "w")
    except OSError as err:
        wrapped = RuntimeError("while writing")
        wrapped.__cause__ = err
        assert "(260 bytes)" in name_too_long(wrapped)
    else:
        pytest.skip("this filesystem takes 260-byte names")
