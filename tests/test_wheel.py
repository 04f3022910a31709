"""The installed package, not the source tree, renders a report: the wheel carries every file the code
reads at run time (the report's templates, sections/ included). The cluster image installs the package
with `pip install .`, so a file missing from package data fails every audit at its last stage there."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.test_report import _analyzed_run, _check_html

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def unpacked_wheel(tmp_path_factory):
    """The project's wheel, built without network (the venv's setuptools) from a copy of the tree (a build/
    folder left in the tree would carry files of an earlier build), and unpacked outside the tree."""
    out = tmp_path_factory.mktemp("wheel")
    source = out / "source"
    left_out = {".git", ".venv", "runs", "testbed", "build", "cxrmem.egg-info"}  # at the root only: cxrmem/testbed is code
    shutil.copytree(ROOT, source, ignore=lambda folder, names: [n for n in names if Path(folder) == ROOT and n in left_out or n == "__pycache__"])
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
                   check=True, capture_output=True, timeout=300, cwd=out)  # fmt: skip
    (wheel,) = out.glob("cxrmem-*.whl")
    site = out / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    return site


def test_the_wheel_holds_every_template_of_the_source_tree(unpacked_wheel):
    source = {p.relative_to(ROOT / "cxrmem") for p in (ROOT / "cxrmem" / "templates").rglob("*.j2")}
    packaged = {p.relative_to(unpacked_wheel / "cxrmem") for p in (unpacked_wheel / "cxrmem" / "templates").rglob("*.j2")}
    assert source and packaged == source, sorted(source - packaged)


def test_the_installed_package_renders_a_report_apart_from_the_source_tree(unpacked_wheel, tmp_path):
    cfg, layout = _analyzed_run(tmp_path, ["report.figures=false"])  # a tiny analyzed run
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(unpacked_wheel)}
    code = ("import cxrmem, sys; from cxrmem.cli import main; print(cxrmem.__file__, flush=True); "
            f"sys.exit(main(['report', 'run.output={layout.prefix}', 'report.figures=false']))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[0].startswith(str(unpacked_wheel))  # the wheel's copy, not the source tree's
    _check_html(Path(layout.report).read_text(encoding="utf-8"))
