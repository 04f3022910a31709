"""Numbers as the report, summary.md and the verdict lines print them: one home, so every page agrees."""

from __future__ import annotations

import numpy as np


def fmt(value) -> str:
    """A dash for nothing, yes/no, thousands separators for counts, 4 significant digits (scientific when tiny or huge)."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return f"{value:.3e}" if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5) else f"{value:.4g}"
    return str(value)


def percent(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"
