"""The `report` stage: figures/*.png and one self-contained report.html (readable offline).

Inputs are the outputs of the earlier stages of the run at cfg.run.output. Only what exists is
rendered: a section whose input is absent says which stage writes it, and the report is still
written. Figures are embedded as base64 data URIs, every text is escaped, and nothing is
fetched when the file is opened.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import re
from datetime import datetime, timezone
from typing import Callable, Optional

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from cxrmem import figures
from cxrmem.config import config_hash, public_config
from cxrmem.runfiles import RunLayout, read_known_memorized, read_memorized
from cxrmem.storage import Store

log = logging.getLogger(__name__)

# tokens.parquet score columns (cxrmem/attribution.py) -> method label shown in the report.
ATTRIBUTION_METHODS = {"grad_score": "gradient", "loo_delta": "leave-one-out"}
SUMMARY_ATTRIBUTION_KEYS = {
    "gradient": "gradient (sum over pieces)",
    "gradient_per_piece_mean": "gradient (mean per piece)",
    "leave_one_out": "leave-one-out",
}


class Page:
    """The report being built: HTML parts, the figures written, and each section's status."""

    def __init__(self, layout: RunLayout, cfg: DictConfig, store: Store):
        self.layout, self.cfg, self.store = layout, cfg, store
        self.parts: list[str] = []
        self.figures: list[str] = []
        self.sections: dict[str, str] = {}

    def figure(self, name: str, draw: Callable[[str], str], caption: str) -> None:
        """Draw figures/<name> with `draw(path)` and embed it; a note instead when figures are off."""
        if not self.cfg.report.figures:
            self.parts.append(_note("Figures are off (report.figures=false)."))
            return
        path = draw(self.layout.figure(name))
        self.figures.append(path)
        data = base64.b64encode(self.store.read_bytes(path)).decode("ascii")
        self.parts.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{_e(caption)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>"
        )


# -- small HTML helpers -----------------------------------------------------------------------
def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _fmt(value) -> str:
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


def _table(rows: list[dict], columns: dict[str, str], raw: tuple[str, ...] = ()) -> str:
    """An HTML table of `rows`; `columns` maps row keys to headers; keys in `raw` hold ready HTML."""
    head = "".join(f"<th>{_e(title)}</th>" for title in columns.values())
    body = "".join(
        "<tr>" + "".join(f"<td>{row.get(k, '') if k in raw else _e(_fmt(row.get(k)))}</td>" for k in columns) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _mark(text: str, pattern: re.Pattern) -> str:
    """Escaped text with every de-identification marker highlighted."""
    out, last = [], 0
    for match in pattern.finditer(text):
        out.append(_e(text[last : match.start()]) + f"<mark>{_e(match.group())}</mark>")
        last = match.end()
    return "".join(out) + _e(text[last:])


def _percent(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _interval(result: dict) -> str:
    if result.get("odds_ratio") is None:
        return f"– ({figures.no_odds_ratio_reason(result)})"
    return f"{result['odds_ratio']:.3g} [{result['ci_low']:.3g}, {result['ci_high']:.3g}]"


# -- inputs --------------------------------------------------------------------------------------
def _read_optional(store: Store, uri: str, read: Callable[[str], object]):
    return read(uri) if store.exists(uri) else None


def _read_scores(store: Store, uri: str) -> pd.DataFrame:
    """prompt_id and d_mem of the finite scores (the only whole-corpus columns the report reads)."""
    table = store.read_table(uri, columns=["prompt_id", "d_mem", "nonfinite"]).to_pandas()
    finite = np.isfinite(table["d_mem"].to_numpy(dtype=np.float64)) & ~table["nonfinite"].to_numpy(dtype=bool)
    return table.loc[finite, ["prompt_id", "d_mem"]]


def _flatten(obj, prefix: str = "") -> dict:
    if not isinstance(obj, dict):
        return {prefix: obj}
    out = {}
    for key, value in obj.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


# -- sections --------------------------------------------------------------------------------------
def _run_info(page: Page, summary: dict) -> None:
    analysis = summary.get("analysis", {})
    cfg_dict = analysis.get("config") or public_config(page.cfg)
    flat = _flatten({k: v for k, v in summary.items() if k != "analysis"})
    # Stages record durations as `seconds`, `timings_s.<stage>` or `<name>_s`; `<name>_per_s` is a rate.
    timings = {k: v for k, v in flat.items() if re.search(r"(seconds|timings|(?<!per)_s$)", k) and not k.endswith("per_s")}
    rates = {k: v for k, v in flat.items() if k.endswith("per_s")}
    rows = [
        {"key": "run output", "value": page.layout.prefix},
        {"key": "model fingerprint", "value": ", ".join(analysis.get("model_fingerprints", [])) or "–"},
        {"key": "config hash (scores)", "value": ", ".join(analysis.get("config_hashes", [])) or "–"},
        {"key": "config hash (this config)", "value": config_hash(page.cfg)},
        {"key": "report written", "value": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")},
    ]
    rows += [{"key": f"time (s): {k}", "value": v} for k, v in sorted(timings.items())]
    rows += [{"key": f"rate: {k}", "value": v} for k, v in sorted(rates.items())]
    page.parts.append(_table(rows, {"key": "item", "value": "value"}))
    yaml = OmegaConf.to_yaml(OmegaConf.create(cfg_dict))
    page.parts.append(f"<details><summary>Configuration (YAML)</summary><pre>{_e(yaml)}</pre></details>")
    page.sections["run"] = "rendered"


def _distribution(page: Page, analysis: dict, d_mem: Optional[np.ndarray]) -> None:
    if not analysis:
        page.parts.append(_note("summary.json has no analysis: run `cxrmem analyze` first."))
        page.sections["distribution"] = "absent: analysis"
        return
    counts = analysis["counts"]
    page.parts.append(
        f"<p>{_fmt(counts['finite'])} prompts with a finite score ({_fmt(counts['nonfinite'])} non-finite, left out; "
        f"{_fmt(counts['unscored'])} of {_fmt(counts['prompts'])} prompts not scored). "
        f"Memorized set: the top {_e(_fmt(analysis['top_percent']))}% by d_mem, "
        f"<b>{_fmt(analysis['memorized_count'])}</b> prompts with d_mem &ge; {_e(_fmt(analysis['threshold']))}. "
        f"z-score view: {_fmt(analysis['zscore_view']['count'])} prompts with z &gt; {_e(_fmt(analysis['zscore_view']['zscore']))}, "
        f"{_fmt(analysis['zscore_view']['in_memorized_set'])} of them in the memorized set.</p>"
    )
    # summary.json sorts its keys; show min, p50 ... p99.9, max in order.
    ordered = sorted((k for k in analysis["percentiles"] if k != "max"), key=lambda k: float(k[1:]))
    columns = {"min": "min", **{k: k for k in ordered}, "max": "max", "mean": "mean", "std": "std"}
    page.parts.append(_table([{**analysis["percentiles"], **analysis.get("d_mem", {})}], columns))
    if d_mem is None or d_mem.size == 0 or analysis["threshold"] is None:
        reason = "scores.parquet is absent" if d_mem is None else "scores.parquet has no finite d_mem"
        page.parts.append(_note(f"{reason}: no distribution figures."))
        page.sections["distribution"] = f"rendered without figures: {reason}"
        return
    threshold, top = analysis["threshold"], analysis["top_percent"]
    page.figure("dmem_sorted.png", lambda p: figures.dmem_curve(d_mem, threshold, p, top, page.store),
                f"d_mem of every prompt, largest to smallest; the top {top:g}% (memorized) in red (cf. paper Fig. 2).")
    page.figure("dmem_histogram.png", lambda p: figures.dmem_histogram(d_mem, threshold, p, page.store),
                "Histogram of d_mem, log counts; the dashed line is the memorized threshold.")
    page.sections["distribution"] = "rendered"


def _known_check(page: Page, known: dict, threshold: Optional[float], scores: Optional[pd.DataFrame]) -> None:
    """Detection against prompts known to be memorized (analyze.known_memorized): checked, not believed."""
    page.parts.append(
        f"<p><b>Check against known memorized prompts</b> ({_e(page.cfg.analyze.known_memorized)}): "
        f"{_fmt(known['known_in_memorized'])} of the {_fmt(known['memorized'])} prompts in the memorized set are known "
        f"to be memorized, and the set holds {_fmt(known['known_in_memorized'])} of the {_fmt(known['known_scored'])} "
        f"known prompts that were scored ({_fmt(known['listed'])} listed).</p>"
    )
    page.parts.append(_table([{
        "precision": _percent(known["precision"]), "recall": _percent(known["recall"]), "auc": known["auc"],
        "tpr": known["tpr_at_fpr"],
    }], {"precision": "precision of the memorized set", "recall": "recall of known prompts",
         "auc": "AUC (known vs other prompts)", "tpr": f"TPR at {_percent(known['fpr'])} FPR"}))
    if scores is None or threshold is None or not page.cfg.analyze.known_memorized:
        return
    known_ids = read_known_memorized(page.store, page.cfg.analyze.known_memorized)
    page.figure("known_memorized.png",
                lambda p: figures.known_ranks(scores["d_mem"].to_numpy(), scores["prompt_id"].isin(known_ids).to_numpy(),
                                              threshold, p, page.store),
                "Every scored prompt by d_mem rank (log scale); red dots: the prompts known to be memorized.")


def _memorized(page: Page, memorized: Optional[pd.DataFrame], analysis: dict, scores: Optional[pd.DataFrame]) -> None:
    if "known_memorized" in analysis:
        _known_check(page, analysis["known_memorized"], analysis.get("threshold"), scores)
    if memorized is None:
        page.parts.append(_note("memorized_prompts.csv is absent: run `cxrmem analyze` first."))
        page.sections["memorized"] = "absent: memorized_prompts.csv"
        return
    pattern = re.compile(page.cfg.corpus.marker_regex)
    shown = memorized.head(page.cfg.report.memorized_rows)
    rows = [{**row, "rank": i + 1, "prompt_html": _mark(str(row["prompt"]), pattern)} for i, row in enumerate(shown.to_dict("records"))]
    page.parts.append(
        f"<p>The {_fmt(len(shown))} most memorized of {_fmt(len(memorized))} prompts (markers highlighted); "
        "the full list is memorized_prompts.csv.</p>"
    )
    columns = {"rank": "#", "prompt_html": "prompt", "d_mem": "d_mem", "percentile": "percentile",
               "n_reports": "n_reports", "prompt_id": "prompt_id"}
    if "known_memorized" in memorized:
        columns["known_memorized"] = "known memorized"
    page.parts.append(_table(rows, columns, raw=("prompt_html",)))
    page.sections["memorized"] = "rendered"


def _enrichment(page: Page, analysis: dict) -> None:
    if not analysis:
        page.parts.append(_note("summary.json has no analysis: run `cxrmem analyze` first."))
        page.sections["enrichment"] = "absent: analysis"
        return
    overall, by_bucket = analysis["marker_enrichment"], analysis["marker_enrichment_by_n_reports"]
    rows = []
    for name, g in [("all prompts", overall)] + [(f"n_reports {b['bucket']}", b) for b in by_bucket["buckets"]]:
        rows.append({
            "group": name, "prompts": g["n_prompts"], "memorized": g["n_memorized"],
            "mem_share": _percent(g["memorized_marker_share"]), "base_share": _percent(g["base_marker_share"]),
            "or": _interval(g) + (" (+0.5 corrected)" if g["corrected"] else ""), "p": g["fisher_p"],
        })
    rows.append({"group": f"pooled over buckets (Mantel-Haenszel, {by_bucket['mantel_haenszel']['strata']} strata)",
                 "or": _interval(by_bucket["mantel_haenszel"])})
    page.parts.append(_table(rows, {
        "group": "group", "prompts": "prompts", "memorized": "memorized",
        "mem_share": "memorized with marker", "base_share": "all with marker (base rate)",
        "or": "odds ratio [95% CI]", "p": "Fisher p (two-sided)",
    }))
    page.figure("marker_enrichment.png", lambda p: figures.enrichment_chart(overall, by_bucket, p, page.store),
                "Share of prompts with a de-identification marker, memorized vs all, per duplication bucket; "
                "right: odds ratios with 95% intervals (log scale).")
    page.sections["enrichment"] = "rendered"


def _attribution(page: Page, summary: dict, tokens: Optional[pd.DataFrame], memorized: Optional[pd.DataFrame]) -> None:
    if tokens is None:
        page.parts.append(_note("tokens.parquet is absent: run `cxrmem attribute` (attribution.enabled=true)."))
        page.sections["attribution"] = "absent: tokens.parquet"
        return
    stats = summary.get("attribution", {})
    rows = [
        {"method": label, **stats[key], "top1": _percent(stats[key].get("marker_top1")), "chance": _percent(stats[key].get("chance_top1"))}
        for key, label in SUMMARY_ATTRIBUTION_KEYS.items()
        if isinstance(stats.get(key), dict)
    ]
    page.parts.append(
        f"<p>{_fmt(stats.get('prompts', tokens['prompt_id'].nunique()))} memorized prompts attributed, "
        f"{_fmt(stats.get('prompts_with_marker'))} of them with a marker. Among those: how often a marker is "
        "the top word, its mean best rank, and how often a random ranking would put a marker first.</p>"
    )
    if rows:
        page.parts.append(_table(rows, {"method": "method", "top1": "marker ranked first",
                                        "marker_mean_rank": "marker mean best rank", "chance": "by chance"}))
    order = list(memorized["prompt_id"]) if memorized is not None else []
    attributed = list(dict.fromkeys(tokens["prompt_id"]))
    chosen = [p for p in order if p in set(attributed)] or attributed
    for pid in chosen[: page.cfg.report.top_prompts]:
        units = tokens[tokens["prompt_id"] == pid]
        prompt = str(units["prompt"].iloc[0]) if "prompt" in units else ""
        for column, label in ATTRIBUTION_METHODS.items():
            if column not in units or units[column].isna().all():
                continue
            frame = units.rename(columns={column: "score"}).assign(method=label)
            page.figure(f"tokens_{pid}_{column}.png",
                        lambda p, f=frame, t=prompt: figures.token_bars(f, p, page.cfg.attribution.top_units, t, page.store),
                        f"Prompt {pid}: top {page.cfg.attribution.top_units} words by {label} attribution; markers in red (cf. paper Fig. 3).")
    page.sections["attribution"] = "rendered"


def _mitigation(page: Page, mitigation: Optional[pd.DataFrame], memorized: Optional[pd.DataFrame]) -> None:
    if mitigation is None:
        page.parts.append(_note("mitigation.parquet is absent: run `cxrmem mitigate` (mitigation.enabled=true)."))
        page.sections["mitigation"] = "absent: mitigation.parquet"
        return
    order = [s for s in page.cfg.mitigation.strategies if s in set(mitigation["strategy"])]
    order += [s for s in dict.fromkeys(mitigation["strategy"]) if s not in order]
    page.parts.append(_table(mitigation_table(mitigation, order), {
        "strategy": "strategy", "prompts": "prompts", "d_mem_mean": "mean d_mem", "d_mem_sd": "sd",
        "d_mem_change": "mean change vs original (paired)", "distance_mean": "mean pairwise distance",
        "distance_sd": "sd", "distance_change": "mean change vs original (paired)",
    }))
    page.figure("mitigation.png", lambda p: figures.mitigation_chart(mitigation, p, order, page.store),
                "d_mem and mean pairwise distance of the generations per strategy; dots are prompts, diamonds means, "
                "the dashed line the unmitigated mean. A strategy that works lowers d_mem and raises the distance.")
    grids = page.store.list_files(page.layout.figures, suffix=".npz")
    by_id = {re.sub(r"^generations_|\.npz$", "", g.rsplit("/", 1)[-1]): g for g in grids if "/generations_" in g}
    ranked = [p for p in (list(memorized["prompt_id"]) if memorized is not None else []) if p in by_id]
    ranked += sorted(p for p in by_id if p not in ranked)
    if not ranked:
        page.parts.append(_note("No sample generations (figures/generations_<prompt_id>.npz) were saved by `cxrmem mitigate`."))
    for pid in ranked[: page.cfg.report.top_prompts]:
        with np.load(io.BytesIO(page.store.read_bytes(by_id[pid]))) as npz:
            images = {s: npz[s] for s in order if s in npz.files} | {s: npz[s] for s in npz.files if s not in order}
        rows = mitigation[mitigation["prompt_id"] == pid].set_index("strategy")
        notes = {s: f"dist {rows.loc[s, 'pairwise_distance']:.3f}" for s in images if s in rows.index
                 and np.isfinite(rows.loc[s, "pairwise_distance"])}
        title = str(rows["mitigated_prompt"].get("original", "")) if "original" in rows.index else pid
        page.figure(f"grid_{pid}.png",
                    lambda p, i=images, n=notes, t=title: figures.generation_grid(i, p, page.cfg.report.grid_generations, t, n, page.store),
                    f"Prompt {pid}: generations from the same seeds per strategy (cf. paper Fig. 4).")
        if len(rows):
            prompts = [{"strategy": s, "prompt_html": _mark(str(rows.loc[s, "mitigated_prompt"]), re.compile(page.cfg.corpus.marker_regex))}
                       for s in order if s in rows.index]
            page.parts.append(_table(prompts, {"strategy": "strategy", "prompt_html": "prompt used"}, raw=("prompt_html",)))
    page.sections["mitigation"] = "rendered"


def mitigation_table(mitigation: pd.DataFrame, order: list[str]) -> list[dict]:
    """Per strategy: mean and sd of d_mem and pairwise distance, and the mean paired change against `original`."""
    wide = {c: mitigation.pivot_table(index="prompt_id", columns="strategy", values=c, aggfunc="mean")
            for c in ("d_mem", "pairwise_distance")}
    rows = []
    for strategy in order:
        row = {"strategy": strategy, "prompts": int((mitigation["strategy"] == strategy).sum())}
        for column, key in (("d_mem", "d_mem"), ("pairwise_distance", "distance")):
            values = wide[column][strategy].dropna() if strategy in wide[column] else pd.Series(dtype=float)
            row[f"{key}_mean"] = float(values.mean()) if len(values) else None
            row[f"{key}_sd"] = float(values.std(ddof=1)) if len(values) > 1 else None
            if strategy != "original" and "original" in wide[column]:
                change = (wide[column][strategy] - wide[column]["original"]).dropna()
                row[f"{key}_change"] = float(change.mean()) if len(change) else None
        rows.append(row)
    return rows


HOW_TO_READ = """
<div class="howto"><h2>How to read this report</h2><ul>
<li><b>d_mem</b> is the text-conditional noise norm of Wen et al. (ICLR 2024): how strongly the prompt pulls the
denoiser away from the unconditional prediction, averaged over the sampling steps and several initial noises. A
memorized prompt pulls hard and the same way whatever the noise, so its d_mem is high.</li>
<li>The <b>memorized set</b> is the top percentile of d_mem (ties at the threshold included); it is a ranking of
suspicion, not proof of memorization. The z-score view is a second, distribution-relative cut. When prompts known to
be memorized are given (<code>analyze.known_memorized</code>), the section first checks the ranking against them.</li>
<li><b>Marker enrichment</b> compares the share of memorized prompts that carry a de-identification marker
(<code>___</code>, <code>XXXX</code>) with the base rate. An odds ratio above 1 whose 95% interval excludes 1 means
markers are over-represented in the memorized set. Duplication (<code>n_reports</code>) is the other known cause, so
the same comparison is repeated within duplication buckets and pooled (Mantel-Haenszel).</li>
<li><b>Token attribution</b> ranks the words of a memorized prompt by their contribution to d_mem: the gradient of the
noise norm with respect to each word's embedding, and the drop in d_mem when the word is left out.</li>
<li><b>Mitigation</b>: each strategy rewrites the prompt (or perturbs its embedding) and regenerates with the same
seeds. Memorization shows as high d_mem and low mean pairwise distance between generations (near-identical images).
A strategy that works lowers d_mem and raises the distance compared with <code>original</code>.</li>
</ul></div>
"""

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.8em 0;font-size:.88em}th,td{border:1px solid #ddd;padding:.3em .55em;text-align:left;vertical-align:top}
th{background:#f4f4f4}td{max-width:640px}figure{margin:1em 0}img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.85em;color:#555}.note{color:#8a5a00;background:#fff8e6;padding:.4em .7em;border-left:3px solid #e0a000}
.howto{background:#f3f7fb;border:1px solid #c9d9ea;padding:.2em 1.2em;margin:1.2em 0}mark{background:#ffd6d6;color:#a00000}
pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:.8em}
"""


def build_report(cfg: DictConfig, store: Store) -> dict:
    """Write figures/*.png and report.html for the run at cfg.run.output; returns what was written."""
    layout = RunLayout(cfg.run.output)
    summary = _read_optional(store, layout.summary, store.read_json) or {}
    analysis = summary.get("analysis", {})
    memorized = _read_optional(store, layout.memorized, lambda _: read_memorized(store, layout))
    scores = _read_optional(store, layout.scores, lambda u: _read_scores(store, u))
    d_mem = None if scores is None else scores["d_mem"].to_numpy(dtype=np.float64)
    tokens = _read_optional(store, layout.tokens, lambda u: store.read_table(u).to_pandas())
    mitigation = _read_optional(store, layout.mitigation, lambda u: store.read_table(u).to_pandas())

    page = Page(layout, cfg, store)
    sections = [
        ("run", "Run", lambda: _run_info(page, summary)),
        ("distribution", "Score distribution", lambda: _distribution(page, analysis, d_mem)),
        ("memorized", "Memorized prompts", lambda: _memorized(page, memorized, analysis, scores)),
        ("enrichment", "De-identification marker enrichment", lambda: _enrichment(page, analysis)),
        ("attribution", "Token attribution", lambda: _attribution(page, summary, tokens, memorized)),
        ("mitigation", "Mitigation", lambda: _mitigation(page, mitigation, memorized)),
    ]
    page.parts.append(HOW_TO_READ)
    for key, title, render in sections:
        page.parts.append(f'<h2 id="{key}">{_e(title)}</h2>')
        render()
    toc = " · ".join(f'<a href="#{key}">{_e(title)}</a>' for key, title, _ in sections)
    document = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>cxrmem report: {_e(layout.prefix)}</title><style>{STYLE}</style></head><body>"
        f"<h1>cxrmem memorization audit</h1><p>{_e(layout.prefix)}</p><nav>{toc}</nav>"
        + "\n".join(page.parts)
        + "</body></html>\n"
    )
    store.write_text(layout.report, document)
    log.info("report: %s (%d figures)", layout.report, len(page.figures))
    return {"report": layout.report, "figures": page.figures, "sections": page.sections}
