"""Running the installed `cxrmem` command as its own process, as a user would (shared by the process tests)."""

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The console script next to this interpreter: the one `pip install -e .` put in the venv.
CXRMEM = str(Path(sys.executable).with_name("cxrmem"))


def cli_env(**extra: str) -> dict:
    """The environment for a `cxrmem` child: this checkout's code first, one torch thread (2-core CI machines)."""
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}
