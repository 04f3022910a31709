"""The report's figures as PNG files (matplotlib, Agg; no pyplot state, so safe in any process).

Each function takes data and a binary file object and writes one PNG into it; where the bytes go
is the report stage's business. Markers and the memorized tail are red throughout, everything else grey-blue.
"""

from __future__ import annotations

import textwrap
from typing import BinaryIO, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

RED = "#c62828"
BLUE = "#4a6f8a"
GREY = "#9e9e9e"
DPI = 130


def _figure(width: float, height: float, ncols: int = 1, nrows: int = 1, **kwargs):
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    return fig, axes


def _save(fig: Figure, out: BinaryIO) -> None:
    fig.savefig(out, format="png", dpi=DPI)


def dmem_curve(d_mem: np.ndarray, threshold: float, out: BinaryIO, top_percent: float) -> None:
    """Paper Fig. 2: d_mem of every prompt, largest to smallest, the memorized top percentile in red."""
    ordered = np.sort(np.asarray(d_mem, dtype=np.float64))[::-1]
    n_top = int(np.sum(ordered >= threshold))
    rank = np.arange(1, ordered.size + 1)
    fig, axes = _figure(7.5, 4.0)
    ax = axes[0, 0]
    ax.plot(rank[n_top - 1 :], ordered[n_top - 1 :], color=BLUE, lw=1.5, label="other prompts")
    ax.plot(rank[:n_top], ordered[:n_top], color=RED, lw=2.5, label=f"top {top_percent:g}% (memorized): {n_top:,} prompts")
    ax.fill_between(rank[:n_top], ordered[:n_top], ordered[-1], color=RED, alpha=0.15, lw=0)
    ax.axhline(threshold, color=RED, ls="--", lw=0.8)
    ax.annotate(f"threshold d_mem = {threshold:.4g}", (rank[-1], threshold), xytext=(-4, 4),
                textcoords="offset points", ha="right", va="bottom", color=RED, fontsize=9)
    ax.set_xlim(0, ordered.size + 1)
    ax.set_xlabel(f"prompt rank by d_mem (1 = highest; {ordered.size:,} unique prompts)")
    ax.set_ylabel("d_mem (mean text-conditional noise norm)")
    ax.set_title("Memorization score of every unique prompt, sorted")
    ax.legend(loc="upper right", frameon=False)
    ax.grid(alpha=0.3)
    if ordered.size > 20 * n_top:
        # The memorized tail is a sliver at full scale: zoom on the first 5x of it.
        zoom = min(ordered.size, 5 * n_top)
        inset = ax.inset_axes([0.22, 0.48, 0.33, 0.42])
        inset.plot(rank[n_top - 1 : zoom], ordered[n_top - 1 : zoom], color=BLUE, lw=1.2)
        inset.plot(rank[:n_top], ordered[:n_top], color=RED, lw=2)
        inset.axhline(threshold, color=RED, ls="--", lw=0.8)
        inset.set_title(f"zoom: ranks 1-{zoom:,}", fontsize=8)
        inset.tick_params(labelsize=7)
        inset.grid(alpha=0.3)
    _save(fig, out)


def known_ranks(d_mem: np.ndarray, known: np.ndarray, threshold: float, out: BinaryIO) -> None:
    """The sorted d_mem curve with every prompt known to be memorized marked at its rank."""
    d_mem = np.asarray(d_mem, dtype=np.float64)
    order = np.argsort(-d_mem, kind="stable")
    ordered, rank = d_mem[order], np.arange(1, d_mem.size + 1)
    marked = np.asarray(known, dtype=bool)[order]
    fig, axes = _figure(7.5, 3.6)
    ax = axes[0, 0]
    ax.plot(rank, ordered, color=BLUE, lw=1.2, label="all prompts")
    ax.scatter(rank[marked], ordered[marked], color=RED, s=18, zorder=3,
               label=f"known memorized: {int(marked.sum()):,} prompts")
    ax.axhline(threshold, color=RED, ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("prompt rank by d_mem (log scale; 1 = highest)")
    ax.set_ylabel("d_mem")
    ax.set_title("Where the known memorized prompts rank")
    ax.legend(loc="upper right", frameon=False)
    ax.grid(alpha=0.3)
    _save(fig, out)


def dmem_histogram(d_mem: np.ndarray, threshold: float, out: BinaryIO) -> None:
    """Histogram of d_mem (log counts), the memorized threshold marked."""
    d_mem = np.asarray(d_mem, dtype=np.float64)
    fig, axes = _figure(7.5, 3.6)
    ax = axes[0, 0]
    bins = np.histogram_bin_edges(d_mem, bins=min(100, max(10, d_mem.size // 20)))
    ax.hist(d_mem[d_mem < threshold], bins=bins, color=BLUE, label="other prompts")
    ax.hist(d_mem[d_mem >= threshold], bins=bins, color=RED, label="memorized (top percentile)")
    ax.axvline(threshold, color=RED, ls="--", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("d_mem")
    ax.set_ylabel("prompts (log scale)")
    ax.set_title("Distribution of d_mem")
    ax.legend(frameon=False)
    ax.grid(alpha=0.3)
    _save(fig, out)


def token_bars(
    tokens: pd.DataFrame, out: BinaryIO, top_units: int = 25, prompt: Optional[str] = None
) -> None:
    """Paper Fig. 3: the top units of one prompt by attribution score, markers in red.

    `tokens`: the rows of one prompt and one method (columns unit, score, is_marker, method).
    """
    top = tokens.sort_values("score", ascending=False, kind="stable").head(top_units)
    colors = [RED if marker else BLUE for marker in top["is_marker"].astype(bool)]
    # Horizontal bars keep every word (and a `___` marker) readable without rotated labels.
    fig, axes = _figure(8.0, 0.26 * len(top) + 1.8)
    ax = axes[0, 0]
    y = np.arange(len(top))
    ax.barh(y, top["score"], color=colors)
    ax.set_yticks(y, [_clip(u, 24) for u in top["unit"]], fontsize=9)
    for tick, color in zip(ax.get_yticklabels(), colors):
        tick.set_color(color)
    ax.set_ylim(len(top) - 0.4, -0.6)  # the top unit first
    ax.axvline(0.0, color="black", lw=0.6)
    method = str(tokens["method"].iloc[0]) if len(tokens) else "?"
    ax.set_xlabel(f"contribution to d_mem ({method})")
    ax.grid(axis="x", alpha=0.3)
    heading = f"Top {len(top)} words (red: de-identification marker)"
    if prompt:
        heading += "\n" + "\n".join(textwrap.wrap(_clip(prompt, 300), 90))
    ax.set_title(heading, fontsize=9, loc="left")
    _save(fig, out)


def _clip(text: str, n: int) -> str:
    text = str(text)
    return text if len(text) <= n else text[: n - 1] + "…"


def as_images(array: np.ndarray) -> np.ndarray:
    """[N, H, W], [N, C, H, W] or [N, H, W, C] -> [N, H, W] (grey) or [N, H, W, 3], clipped to [0, 1]."""
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 4 and array.shape[1] in (1, 3) and array.shape[-1] not in (1, 3):
        array = np.moveaxis(array, 1, -1)
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (3, 4):
        raise ValueError(f"generations must be [N, H, W] or [N, C, H, W] images, got shape {array.shape}")
    return np.clip(array, 0.0, 1.0)


def generation_grid(
    images: Mapping[str, np.ndarray],
    out: BinaryIO,
    n_per_strategy: int = 4,
    title: Optional[str] = None,
    row_notes: Optional[Mapping[str, str]] = None,
) -> None:
    """Paper Fig. 4: rows = strategies, columns = generations from the same seeds, images in [0, 1]."""
    rows = {name: as_images(array)[:n_per_strategy] for name, array in images.items()}
    n_cols = max(len(a) for a in rows.values())
    fig, axes = _figure(1.6 * n_cols + 1.4, 1.6 * len(rows) + (0.6 if title else 0.2), ncols=n_cols, nrows=len(rows))
    for r, (name, array) in enumerate(rows.items()):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(array):
                ax.imshow(array[c], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            else:
                ax.set_axis_off()
        label = name if not row_notes or name not in row_notes else f"{name}\n{row_notes[name]}"
        axes[r, 0].set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center")
    for c in range(n_cols):
        axes[0, c].set_title(f"generation {c + 1}", fontsize=8)
    if title:
        fig.suptitle("\n".join(textwrap.wrap(_clip(title, 240), 100)), fontsize=8)
    _save(fig, out)


def copy_pairs(rows: Sequence[Mapping], out: BinaryIO, title: Optional[str] = None) -> None:
    """Paper Fig. 1: one row per guidance, the closest generation beside its nearest training image.

    Each row: {"label": str, "generation": [H, W], "nearest": [h, w], "similarity": float, "copy": bool}.
    """
    fig, axes = _figure(4.2, 2.0 * len(rows) + (0.6 if title else 0.2), ncols=2, nrows=len(rows))
    for r, row in enumerate(rows):
        for c, key in enumerate(("generation", "nearest")):
            ax = axes[r, c]
            ax.imshow(np.clip(np.asarray(row[key], dtype=np.float32), 0, 1), cmap="gray", vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
        verdict = "copy" if row["copy"] else "no copy"
        axes[r, 0].set_ylabel(row["label"], fontsize=8)
        axes[r, 1].set_title(f"nearest training image\ncosine {row['similarity']:.3f} ({verdict})", fontsize=8,
                             color=RED if row["copy"] else "black")  # fmt: skip
        axes[r, 0].set_title("closest generation", fontsize=8)
    if title:
        fig.suptitle("\n".join(textwrap.wrap(_clip(title, 240), 60)), fontsize=8)
    _save(fig, out)


def enrichment_chart(overall: dict, by_bucket: dict, out: BinaryIO) -> None:
    """Marker share of memorized prompts against the base rate, overall and per n_reports bucket,
    next to the odds ratios with 95% intervals (log scale)."""
    groups = [("all", overall)] + [(b["bucket"], b) for b in by_bucket["buckets"]]
    labels = [f"{name}\nn={g['n_prompts']:,}\nmem={g['n_memorized']:,}" for name, g in groups]
    x = np.arange(len(groups))
    fig, axes = _figure(11.0, 4.2, ncols=2, width_ratios=[3, 2])
    ax = axes[0, 0]
    memorized = [_nan(g["memorized_marker_share"]) for _, g in groups]
    base = [_nan(g["base_marker_share"]) for _, g in groups]
    ax.bar(x - 0.2, memorized, width=0.4, color=RED, label="memorized prompts")
    ax.bar(x + 0.2, base, width=0.4, color=GREY, label="all prompts (base rate)")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_xlabel("reports sharing the prompt (n_reports)")
    ax.set_ylabel("share of prompts with a marker")
    ax.set_ylim(0, 1.05)
    ax.set_title("De-identification markers: memorized vs all prompts", fontsize=10)
    ax.legend(frameon=False, fontsize=8)
    ax.grid(axis="y", alpha=0.3)

    ax = axes[0, 1]
    pooled = by_bucket.get("mantel_haenszel") or {}
    rows = groups + [("pooled (MH)", pooled)]
    for i, (name, g) in enumerate(rows):
        if g.get("odds_ratio") is None:
            # x in axes fraction, y in data: the note sits at the left whatever the OR range.
            ax.text(0.02, i, f"n/a: {no_odds_ratio_reason(g)}", transform=ax.get_yaxis_transform(),
                    va="center", ha="left", fontsize=8, color=GREY, bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
            continue
        low, high = g["ci_low"], g["ci_high"]
        ax.errorbar(g["odds_ratio"], i, xerr=[[g["odds_ratio"] - low], [high - g["odds_ratio"]]], fmt="o",
                    color=RED if name in ("all", "pooled (MH)") else BLUE, capsize=3)
    ax.axvline(1.0, color="black", ls=":", lw=0.8)
    ax.set_xscale("log")
    ax.set_yticks(np.arange(len(rows)), [name for name, _ in rows], fontsize=8)
    ax.set_ylim(len(rows) - 0.5, -0.5)  # first row on top
    ax.set_xlabel("odds ratio, marker | memorized (95% CI, log)")
    ax.set_title("Odds ratio by duplication bucket", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    _save(fig, out)


def no_odds_ratio_reason(group: dict) -> str:
    """Why an enrichment result (stats.marker_enrichment or stats.mantel_haenszel) has no odds ratio."""
    if "strata" in group:
        return "a zero cell in every stratum"
    if group["n_memorized"] == 0:
        return "no memorized prompts"
    if group["n_memorized"] == group["n_prompts"]:
        return "every prompt memorized"
    return "markers in all or none"


def _nan(value) -> float:
    return np.nan if value is None else float(value)


def mitigation_chart(mitigation: pd.DataFrame, out: BinaryIO, strategies: Optional[Sequence[str]] = None) -> None:
    """d_mem and mean pairwise distance of the generations per strategy: boxes, prompts as dots, means as
    diamonds; the dashed line is the unmitigated (`original`) mean. Memorization shows as high d_mem and
    low pairwise distance."""
    present = list(dict.fromkeys(mitigation["strategy"]))
    order = [s for s in (strategies or present) if s in present] + [s for s in present if s not in (strategies or [])]
    fig, axes = _figure(max(8.0, 1.3 * len(order) + 2.0), 7.0, nrows=2, sharex=True)
    rng = np.random.default_rng(0)  # jitter only
    for ax, column, label in (
        (axes[0, 0], "d_mem", "d_mem (higher = more memorized)"),
        (axes[1, 0], "pairwise_distance", "mean pairwise RMS distance\n(lower = more memorized)"),
    ):
        values = [mitigation.loc[mitigation["strategy"] == s, column].dropna().to_numpy(float) for s in order]
        x = np.arange(len(order))
        non_empty = [i for i, v in enumerate(values) if v.size]
        if non_empty:
            ax.boxplot([values[i] for i in non_empty], positions=x[non_empty], widths=0.5, showfliers=False,
                       medianprops={"color": "black"})
        for i, v in enumerate(values):
            color = RED if order[i] == "original" else BLUE
            ax.scatter(i + rng.uniform(-0.15, 0.15, v.size), v, s=10, color=color, alpha=0.6, zorder=3)
            if v.size:
                ax.scatter(i, v.mean(), marker="D", s=40, color="black", zorder=4)
        if "original" in order and values[order.index("original")].size:
            ax.axhline(values[order.index("original")].mean(), color=RED, ls="--", lw=0.8)
        ax.set_ylabel(label, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[1, 0].set_xticks(np.arange(len(order)), order, rotation=30, ha="right")
    axes[0, 0].set_title("Mitigation strategies on the memorized prompts (same seeds per strategy)", fontsize=10)
    _save(fig, out)


def copy_fidelity_chart(harm: Sequence[dict], out: BinaryIO) -> None:
    """Copy rate (y) against fidelity (x) per strategy, one panel per guidance; `original` in red. A frontier:
    down and right is better. Strategies without a fidelity value are drawn at 0 with a hollow marker."""
    fig, axes = _figure(5.0 * max(1, len(harm)), 4.5, ncols=max(1, len(harm)))
    for ax, h in zip(axes[0], harm):
        for k, row in enumerate(h["rows"]):
            if row["copy_rate"] is None:
                continue
            x = row["fidelity"] if row["fidelity"] is not None else 0.0
            color = RED if row["strategy"] == "original" else BLUE
            original = row["strategy"] == "original"
            ax.scatter(x, row["copy_rate"], s=60 if original else 30, edgecolors=color,
                       facecolors=color if row["fidelity"] is not None else "none", zorder=4 if original else 3)
            # Staggered labels: strategies that change nothing sit on the same point.
            ax.annotate(row["strategy"], (x, row["copy_rate"]), fontsize=7, xytext=(3, 3 - 9 * (k % 4)), textcoords="offset points")
        ax.set_xlim(-0.05, 1.05)
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("fidelity (share of generations with the prompt's findings)", fontsize=9)
        ax.set_ylabel("copy rate of the memorized prompts", fontsize=9)
        ax.set_title(h["name"], fontsize=10)
        ax.grid(alpha=0.3)


def length_chart(bins: Sequence[Mapping], memorized: pd.DataFrame, threshold: Optional[float], out: BinaryIO) -> None:
    """d_mem against token count: per token-count bin the median with its interquartile range, the
    memorized prompts as red dots (columns n_tokens, d_mem), and the memorized threshold."""
    fig, axes = _figure(7.5, 3.8)
    ax = axes[0, 0]
    centre = np.array([(b["min_tokens"] + b["max_tokens"]) / 2 for b in bins], dtype=np.float64)
    median = np.array([b["median"] for b in bins], dtype=np.float64)
    low = median - np.array([b["q1"] for b in bins], dtype=np.float64)
    high = np.array([b["q3"] for b in bins], dtype=np.float64) - median
    ax.errorbar(centre, median, yerr=[low, high], color=BLUE, marker="o", ms=4, capsize=3, lw=1.2,
                label="all prompts: median and IQR per token-count bin")
    if len(memorized) and {"n_tokens", "d_mem"} <= set(memorized.columns):
        ax.scatter(memorized["n_tokens"], memorized["d_mem"], color=RED, s=18, zorder=3, label=f"memorized ({len(memorized):,})")
    if threshold is not None:
        ax.axhline(threshold, color=RED, ls="--", lw=0.8)
    ax.set_xlabel("tokens in the prompt")
    ax.set_ylabel("d_mem")
    ax.set_title("Memorization score against prompt length")
    ax.legend(loc="upper left", frameon=False, fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, out)
