"""The report's page: a run's data dict in, report.html, metrics.json and summary.md text out.

The `report` stage (cxrmem/stages/report.py) reads the run and writes the files; here the data
dict becomes a page context (`report_context`) and the page becomes HTML (`render_html`, a
jinja2 template with autoescape) and markdown (`render_summary_md`). Only what exists is rendered: a section whose input is absent says
which stage writes it, and the report is still written. Figures are embedded as base64 data
URIs, so nothing is fetched when the file is opened; the table script is inline.
"""

from __future__ import annotations

import base64
import io
import logging
import re
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Callable, Optional

import jinja2
import numpy as np
import pandas as pd
from markupsafe import Markup, escape
from omegaconf import DictConfig, OmegaConf

from cxrmem import findings, stats
from cxrmem import strategies as registry
from cxrmem.formatting import fmt, percent
from cxrmem.score_key import config_hash
from cxrmem.settings import NON_NEGATIVE, Settings, knob, public_config
from cxrmem.summary import AnalysisSection, CalibrationSection, CascadeSection, CopiesSection, DetectorsSection, RunSummary


@dataclass(frozen=True)
class ReportConfig(Settings):
    """The `report` config section."""

    figures: bool = True  # write figures/*.png and embed them in report.html
    grid_generations: int = knob(4, NON_NEGATIVE)  # generations per strategy shown in the image grid
    top_prompts: int = knob(3, NON_NEGATIVE)  # memorized prompts shown with token bars and image grids
    memorized_rows: int = knob(50, NON_NEGATIVE)  # rows of the memorized list shown in report.html (the CSV has them all)

log = logging.getLogger(__name__)


def figures():
    """cxrmem.figures, imported on first use: matplotlib loads only when a page is drawn (the config reads
    ReportConfig from this module)."""
    from cxrmem import figures as module

    return module

# tokens.parquet score columns (cxrmem/attribution.py) -> method label shown in the report.
ATTRIBUTION_METHODS = {"grad_score": "gradient", "loo_delta": "leave-one-out"}
SUMMARY_ATTRIBUTION_KEYS = {
    "gradient": "gradient (sum over pieces)",
    "gradient_per_piece_mean": "gradient (mean per piece)",
    "leave_one_out": "leave-one-out",
}
# Characters of a prompt shown in the report's tables; a longer one shows its beginning, the full text one click
# away (a <details> element), so that a corpus's 50,000-character "prompt" does not fill the page.
PROMPT_SHOWN = 300
# Over-guidance rule: generations whose median high-frequency share (stats.high_frequency_share)
# exceeds this are closer to white noise (0.75) than to an image (a radiograph: below 0.05).
OVERGUIDED_SHARE = 0.5


# -- formatting ---------------------------------------------------------------------------------
def interval(result: Optional[dict], key: str = "odds_ratio", low: str = "ci_low", high: str = "ci_high") -> str:
    """`value [low, high]`, or a dash with the reason when an odds ratio could not be computed."""
    if not result or result.get(key) is None:
        return f"– ({figures().no_odds_ratio_reason(result)})" if result and key == "odds_ratio" else "–"
    return f"{result[key]:.3g} [{result[low]:.3g}, {result[high]:.3g}]"


def mark(text, pattern: str) -> Markup:
    """Escaped text with every de-identification marker highlighted."""
    out, last, text = [], 0, str(text)
    for match in re.finditer(pattern, text):
        out.append(escape(text[last : match.start()]) + Markup("<mark>%s</mark>") % match.group())
        last = match.end()
    return Markup("").join(out) + escape(text[last:])


def prompt_html(text, pattern: str, shown: int = PROMPT_SHOWN) -> Markup:
    """A prompt for a table cell, markers highlighted: whole when short, else its first `shown` characters with
    the full text one click away."""
    text = str(text)
    if len(text) <= shown:
        return mark(text, pattern)
    return Markup('<details class="long"><summary>%s&hellip; <span class="small">(%s characters: click for the full text)</span>'
                  "</summary>%s</details>") % (mark(text[:shown], pattern), fmt(len(text)), mark(text, pattern))


def _flatten(obj, prefix: str = "") -> dict:
    if not isinstance(obj, dict):
        return {prefix: obj}
    out = {}
    for key, value in obj.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


# -- the summary card -----------------------------------------------------------------------------
def run_facts(analysis: Optional[AnalysisSection], cfg: DictConfig) -> dict:
    """Model, fingerprint, G, T, w and the counts, from the scores' own config when analyze recorded it."""
    used = OmegaConf.create((analysis.config if analysis else None) or public_config(cfg))
    model = used.model
    name = (f"RadEdit ({model.radedit.unet_repo} + {model.radedit.text_repo})" if model.kind == "radedit"
            else f"{model.kind}: {model.path}")
    name += "".join(f" + LoRA {adapter.path} (scale {adapter.scale:g})" for adapter in model.get("adapters") or [])  # absent before adapters existed
    counts = analysis.counts if analysis else {}
    return {
        "model": name, "fingerprint": ", ".join(analysis.model_fingerprints if analysis else []) or "–",
        "G": used.score.generations, "T": used.score.screening_steps or used.score.steps, "w": used.score.guidance_scale,
        "prompts": counts.get("prompts"), "scored": counts.get("finite"), "nonfinite": counts.get("nonfinite"),
        "memorized": analysis.memorized_count if analysis else None, "threshold": analysis.threshold if analysis else None,
        "top_percent": analysis.top_percent if analysis else None,
        "set_rule": set_rule(analysis, used),
    }


def set_rule(analysis, used) -> Optional[str]:
    """What made the memorized set, as the card and summary.md say it."""
    if analysis is None:
        return None
    if analysis.memorized_by == "q_value":
        return f"q-value ≤ {fmt(used.analyze.fdr)} against prompts the model never saw"
    return f"top {fmt(analysis.top_percent)}%"


def detection_check(known: Optional[dict], top_percent) -> Optional[dict]:
    """Recall against known memorized prompts, next to the best recall a set of this size allows."""
    if not known or not known.get("known_scored"):
        return None
    size, listed = known["memorized"], known["known_scored"]
    best = min(size, listed) / listed
    note = (f"The memorized set (top {fmt(top_percent)}%) holds {fmt(size)} prompts, so at most {fmt(min(size, listed))} "
            f"of the {fmt(listed)} known prompts fit: recall cannot exceed {percent(best)}.") if size < listed else \
        f"The memorized set ({fmt(size)} prompts) could hold every one of the {fmt(listed)} known prompts."
    return {**known, "best_recall": best, "recall_of_best": known["recall"] / best if best else None, "note": note}


def mitigation_verdict(rows: list[dict]) -> Optional[dict]:
    """The strategy with the largest paired drop in d_mem against `original` (negative = lower)."""
    candidates = [r for r in rows if r["strategy"] != "original" and r.get("d_mem_change", {}).get("mean") is not None]
    return min(candidates, key=lambda r: r["d_mem_change"]["mean"]) if candidates else None


# metrics.json codes of a verdict (MLflow and W&B take numbers only); "not supported after adjustment" is 0
# with finding.F1.after_adjustment = 1.
VERDICT_CODES = {findings.SUPPORTED: 1, findings.NOT_SUPPORTED: 0, findings.NOT_AFTER_ADJUSTMENT: 0, findings.INCONCLUSIVE: -1}


def verdict_metrics(verdicts: list[dict]) -> dict:
    flat = {}
    for v in verdicts:
        flat[f"finding.{v['finding']}"] = VERDICT_CODES[v["verdict"]]
        flat |= {f"finding.{v['finding']}.{k}": x for k, x in _flatten(v["numbers"]).items()}
    flat["finding.F1.after_adjustment"] = int(any(v["verdict"] == findings.NOT_AFTER_ADJUSTMENT for v in verdicts))
    return flat


def metrics(facts: dict, summary: RunSummary, detection: Optional[dict], strategies: list[dict], verdicts=()) -> dict:
    """Flat numeric metrics (metrics.json) that MLflow's log_metrics or wandb.log take as they are."""
    analysis = summary.analysis
    enrichment = (analysis.marker_enrichment if analysis else None) or {}
    flat = {
        "prompts": facts["prompts"], "prompts_scored": facts["scored"], "memorized_count": facts["memorized"],
        "memorized_threshold": facts["threshold"], "top_percent": facts["top_percent"],
        "generations_G": facts["G"], "steps_T": facts["T"], "guidance_w": facts["w"],
        "marker_odds_ratio": enrichment.get("odds_ratio"), "marker_odds_ratio_ci_low": enrichment.get("ci_low"),
        "marker_odds_ratio_ci_high": enrichment.get("ci_high"), "marker_fisher_p": enrichment.get("fisher_p"),
    }
    if detection:
        flat |= {f"known_{k}": detection.get(k) for k in ("precision", "recall", "best_recall", "auc", "tpr_at_fpr")}
    for row in strategies:
        for key in ("d_mem_change", "distance_change"):
            for part in ("mean", "ci_low", "ci_high"):
                flat[f"mitigation.{row['strategy']}.{key}_{part}"] = row.get(key, {}).get(part)
    flat |= {f"time_s.{k}": v for k, v in (summary.audit.timings_s if summary.audit else {}).items()}
    flat |= {f"detector.{k}": v for k, v in _flatten(summary.detectors.detectors if summary.detectors else {}).items()}
    flat |= verdict_metrics(list(verdicts))
    flat["length.spearman_d_mem_n_tokens"] = (((analysis.length if analysis else None) or {}).get("spearman") or {}).get("rho")
    return {k: float(v) for k, v in flat.items() if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
            and np.isfinite(v)}


def harm_metrics(harm: list[dict]) -> dict:
    """mitigation.<strategy>.w=<g>.copy_rate / copy_rate_change_* / fidelity for metrics.json."""
    flat = {}
    for h in harm:
        for row in h["rows"]:
            key = f"mitigation.{row['strategy']}.w={h['guidance']:g}"
            flat |= {f"{key}.copy_rate": row["copy_rate"], f"{key}.fidelity": row["fidelity"]}
            flat |= {f"{key}.copy_rate_change_{part}": (row["copy_rate_change"] or {}).get(part) for part in ("mean", "ci_low", "ci_high")}
    return {k: float(v) for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)}


# -- sections -------------------------------------------------------------------------------------
def detectors_context(section: Optional[DetectorsSection]) -> Optional[dict]:
    """The Detectors table and the summary card's agreement line, from the analyze stage's detectors section."""
    if not section or not (section.detectors or section.skipped):
        return None
    top = fmt(section.top_percent)
    rows = [{"name": name, **row} for name, row in section.detectors.items()]
    card = {row["name"]: f"Spearman {fmt(row['spearman'])}, top {top}% overlap {percent(row['top_overlap'])}" for row in rows}
    return {"rows": rows, "card": card, "top_percent": top, "fpr": section.fpr, "skipped": section.skipped}


def calibration_context(section: Optional[CalibrationSection]) -> Optional[dict]:
    """The Calibrated calls section (issue 34): the reference, the calibrated set beside the top set, F0's p-value."""
    return asdict(section) if section else None


def cascade_context(section: Optional[CascadeSection]) -> Optional[dict]:
    """The Cascade section (issue 21): the stages of every round, the compute and the self-check's verdict."""
    if not section:
        return None
    rows = [
        {"round": n, "stage": i + 1, **stage, "misses": r["missed_by_stage"][i]}
        for n, r in enumerate(section.rounds, 1) for i, stage in enumerate(r["stages"])
    ]
    audit = section.audit
    return {"rows": rows, "audit": audit, "evaluations": section.evaluations, "verdict": section.verdict,
            "ok": audit["sample"] > 0 and audit["misses"] == 0, "corpus": section.corpus, "fully_scored": section.fully_scored,
            "bounds": section.bounds or None}


# Denoiser samples per second per GPU behind the Run section's GPU-hours: an ESTIMATE, issue 33's 250-400 for RadEdit's
# UNet at 512x512 (bench/RESULTS.md has no GPU measurement yet; replace it with the measured rate once it does).
# The page shows both ends and says it is an estimate.
ESTIMATED_SAMPLES_PER_GPU_S = (250, 400)


def cost_context(summary: RunSummary) -> Optional[dict]:
    """The counted model work per stage and in total (summary.json's cost), with GPU-hours at the estimated rate."""
    cost = summary.cost
    if cost is None:
        return None
    slow, fast = ESTIMATED_SAMPLES_PER_GPU_S

    def row(stage: str, work: dict) -> dict:
        per_prompt = work["evaluations"] / cost.corpus_prompts if cost.corpus_prompts else None
        hours = f"{fmt(work['evaluations'] / fast / 3600)} – {fmt(work['evaluations'] / slow / 3600)}"
        return {"stage": stage, **{k: fmt(v) for k, v in work.items()}, "per_prompt": fmt(per_prompt), "gpu_hours": hours}

    return {"rows": [row(stage, work) for stage, work in cost.stages.items()] + [row("total", cost.total)],
            "corpus_prompts": cost.corpus_prompts, "slow": slow, "fast": fast}  # fmt: skip


def run_rows(summary: RunSummary) -> list[dict]:
    """The durations and rates the sections declare (RunSummary.timings), labelled by stage."""
    return [{"key": key, "value": fmt(value)} for key, value in summary.timings().items()]


def memorized_rows(memorized: pd.DataFrame, pattern: str, limit: int) -> list[dict]:
    rows = memorized.head(limit).to_dict("records")
    return [{**row, "rank": i + 1, "prompt_html": prompt_html(row["prompt"], pattern), "sort_key": str(row["prompt"])[:PROMPT_SHOWN],
             "markers": int(row.get("n_markers", int(bool(row.get("has_marker", False))))),
             "truncated": str(row.get("truncated", False)).lower() == "true", "token_limit": _count(row.get("token_limit"))}
            for i, row in enumerate(rows)]  # fmt: skip


def _count(value) -> Optional[int]:
    """An integer from a CSV cell that may be empty (NaN)."""
    return None if value is None or value == "" or (isinstance(value, float) and not np.isfinite(value)) else int(value)


def truncated_context(memorized: Optional[pd.DataFrame]) -> Optional[dict]:
    """The memorized prompts the model read only in part (longer than its token limit), for the card; None: none."""
    if memorized is None or "truncated" not in memorized.columns:
        return None
    flagged = memorized[memorized["truncated"].astype(str).str.lower() == "true"]
    if flagged.empty:
        return None
    limits = [_count(v) for v in flagged["token_limit"]] if "token_limit" in flagged.columns else []
    limit = next((v for v in limits if v is not None), None)
    return {"count": len(flagged), "memorized": len(memorized), "limit": limit,
            "longest": _count(flagged["n_tokens"].max()) if "n_tokens" in flagged.columns else None}


def enrichment_rows(analysis: AnalysisSection) -> list[dict]:
    overall, by_bucket = analysis.marker_enrichment, analysis.marker_enrichment_by_n_reports
    rows = [{"group": name, "prompts": fmt(g["n_prompts"]), "memorized": fmt(g["n_memorized"]),
             "mem_share": percent(g["memorized_marker_share"]), "base_share": percent(g["base_marker_share"]),
             "or": interval(g) + (" (+0.5 corrected)" if g["corrected"] else ""), "p": fmt(g["fisher_p"])}
            for name, g in [("all prompts", overall)] + [(f"n_reports {b['bucket']}", b) for b in by_bucket["buckets"]]]
    rows.append({"group": f"pooled over buckets (Mantel-Haenszel, {by_bucket['mantel_haenszel']['strata']} strata)",
                 **dict.fromkeys(("prompts", "memorized", "mem_share", "base_share", "p"), ""),
                 "or": interval(by_bucket["mantel_haenszel"])})
    return rows + adjusted_rows(analysis.marker_enrichment_adjusted)


def adjusted_rows(adjusted: Optional[dict]) -> list[dict]:
    """The adjusted models as enrichment-table rows; a refused fit shows its reason instead of numbers."""
    if not adjusted:
        return []
    rows = []
    for key, label in (("logistic", "odds ratio of being memorized"), ("percentile", "shift of the d_mem percentile, points (OLS, HC3)")):
        model = adjusted.get(key)
        if not model:
            continue
        used = ", ".join(model.get("covariates") or []) or "nothing"
        dropped = f"; dropped: {', '.join(model['dropped'])}" if model.get("dropped") else ""
        value = (f"refused: {model['refused']}" if model.get("refused")
                 else f"{model['estimate']:.3g} [{model['ci_low']:.3g}, {model['ci_high']:.3g}]")
        rows.append({"group": f"adjusted for {used}{dropped}: {label}", **dict.fromkeys(("prompts", "memorized", "mem_share", "base_share"), ""),
                     "prompts": fmt(model.get("n")), "or": value, "p": fmt(model.get("p"))})
    return rows


def unchanged_rows(mitigation: pd.DataFrame) -> pd.Series:
    """Rows of a strategy that left the prompt as it was (e.g. remove_marker or attention_rescaling without a marker).

    mitigation.parquet says so in `changed`; files written before it had that column judge text rewrites by their text."""
    if "changed" in mitigation.columns:
        return (mitigation["strategy"] != "original") & ~mitigation["changed"].astype(bool)
    return mitigation["strategy"].isin(registry.rewrites()) & (mitigation["mitigated_prompt"] == mitigation["prompt"])


def strategy_rows(mitigation: pd.DataFrame, order: list[str]) -> list[dict]:
    """Per strategy: means over the prompts it changed, and paired differences against `original` (95% CI)."""
    unchanged = unchanged_rows(mitigation)
    used = mitigation[~unchanged]
    rows = []
    for strategy in order:
        own = used[used["strategy"] == strategy].set_index("prompt_id")
        row = {"strategy": strategy, "prompts": len(own), "unchanged": int((unchanged & (mitigation["strategy"] == strategy)).sum()),
               "d_mem_mean": own["d_mem"].mean() if len(own) else None,
               "distance_mean": own["pairwise_distance"].mean() if len(own) else None,
               "fidelity_mean": own["fidelity"].mean() if "fidelity" in own and own["fidelity"].notna().any() else None}
        base = used[used["strategy"] == "original"].set_index("prompt_id")
        if strategy != "original" and len(base):
            for column, key in (("d_mem", "d_mem_change"), ("pairwise_distance", "distance_change")):
                pairs = pd.concat([own[column], base[column]], axis=1, join="inner").dropna()
                row[key] = stats.paired_difference_ci(pairs.iloc[:, 0].to_numpy(), pairs.iloc[:, 1].to_numpy())
        rows.append(row)
    return rows


def overguidance(generations: dict, w) -> Optional[dict]:
    """The over-guidance rule applied to every saved generation grid; None without grids."""
    shares: dict[str, list[float]] = {}
    for grids in generations.values():
        for strategy, images in grids.items():
            shares.setdefault(strategy, []).extend(stats.high_frequency_share(figures().as_images(images)).tolist())
    if not shares:
        return None
    median = {s: float(np.median(v)) for s, v in shares.items()}
    flagged = [s for s, m in median.items() if m > OVERGUIDED_SHARE]
    return {"median_share": median, "flagged": flagged, "original": "original" in flagged, "w": w,
            "prompts": len(generations), "threshold": OVERGUIDED_SHARE}


# -- the page context -----------------------------------------------------------------------------
Draw = Callable[[io.BytesIO], object]  # a cxrmem.figures function bound to its data, drawing into a buffer


class Figures:
    """Draws figures/<name>.png through `write(name, draw)` and keeps what to embed; off: nothing drawn."""

    def __init__(self, enabled: bool, write: Callable[[str, Draw], bytes]):
        self.enabled, self.write, self.drawn = enabled, write, []

    def __call__(self, name: str, draw: Draw, caption: str) -> Optional[dict]:
        if not self.enabled:
            return None
        data = self.write(name, draw)
        self.drawn.append(name)
        return {"src": "data:image/png;base64," + base64.b64encode(data).decode("ascii"), "caption": caption}


def distribution_context(data: dict, cfg: DictConfig, figure: Figures) -> Optional[dict]:
    analysis, d_mem = data["summary"].analysis, data["d_mem"]
    if not analysis:
        return None
    ordered = sorted((k for k in analysis.percentiles if k != "max"), key=lambda k: float(k[1:]))
    columns = ["min", *ordered, "max", "mean", "std"]
    values = {**analysis.percentiles, **(analysis.d_mem or {})}
    out = {"columns": columns, "values": [fmt(values.get(c)) for c in columns], "figures": [], "missing": None,
           "counts": analysis.counts, "zscore_view": analysis.zscore_view}
    if d_mem is None or d_mem.size == 0 or analysis.threshold is None:
        out["missing"] = "scores.parquet is absent" if d_mem is None else "scores.parquet has no finite d_mem"
        return out
    threshold, top = analysis.threshold, analysis.top_percent
    out["figures"] = [
        figure("dmem_sorted.png", lambda p: figures().dmem_curve(d_mem, threshold, p, top),
               f"d_mem of every prompt, largest to smallest; the top {top:g}% (memorized) in red (cf. paper Fig. 2)."),
        figure("dmem_histogram.png", lambda p: figures().dmem_histogram(d_mem, threshold, p),
               "Histogram of d_mem, log counts; the dashed line is the memorized threshold."),
    ]
    return out


def known_figure(data: dict, threshold, figure: Figures) -> Optional[dict]:
    scores, known_ids = data["scores"], data["known_ids"]
    if scores is None or known_ids is None or threshold is None:
        return None
    known = scores["prompt_id"].isin(known_ids).to_numpy()
    return figure("known_memorized.png", lambda p: figures().known_ranks(scores["d_mem"].to_numpy(), known, threshold, p),
                  "Every scored prompt by d_mem rank (log scale); red dots: the prompts known to be memorized.")


def memorized_context(data: dict, cfg: DictConfig, figure: Figures) -> Optional[dict]:
    """The memorized table (markers highlighted) and, with known memorized prompts, the detection check."""
    analysis, memorized = data["summary"].analysis, data["memorized"]
    if memorized is None and not data["detection"]:
        return None
    return {"rows": memorized_rows(memorized, cfg.corpus.marker_regex, cfg.report.memorized_rows) if memorized is not None else None,
            "total": len(memorized) if memorized is not None else 0, "detection": data["detection"],
            "known_figure": known_figure(data, analysis.threshold, figure) if data["detection"] else None}


def enrichment_context(data: dict, cfg: DictConfig, figure: Figures) -> Optional[dict]:
    analysis = data["summary"].analysis
    if not analysis:
        return None
    return {"rows": enrichment_rows(analysis), "figure": figure("marker_enrichment.png", lambda p: figures().enrichment_chart(
        analysis.marker_enrichment, analysis.marker_enrichment_by_n_reports, p),
        "Share of prompts with a de-identification marker, memorized vs all, per duplication bucket; "
        "right: odds ratios with 95% intervals (log scale).")}


def attribution_context(data: dict, cfg: DictConfig, figure: Figures) -> Optional[dict]:
    tokens, memorized, section = data["tokens"], data["memorized"], data["summary"].attribution
    if tokens is None:
        return None
    methods = {key: getattr(section, key, None) if section else None for key in SUMMARY_ATTRIBUTION_KEYS}
    null = (section.null if section else None) or {}
    rows = [{"method": label, "prompts": fmt(methods[key].get("prompts")), "top1": percent(methods[key].get("marker_top1")),
             "rank": fmt(methods[key].get("marker_mean_rank")),
             "chance": percent(methods[key].get("chance_top1")), "null": null_cells(null.get(key))}
            for key, label in SUMMARY_ATTRIBUTION_KEYS.items() if isinstance(methods[key], dict)]
    order = list(memorized["prompt_id"]) if memorized is not None else []
    attributed = list(dict.fromkeys(tokens["prompt_id"]))
    chosen = [p for p in order if p in set(attributed)] or attributed
    shown = []
    for pid in chosen[: cfg.report.top_prompts]:
        units = tokens[tokens["prompt_id"] == pid]
        prompt = str(units["prompt"].iloc[0]) if "prompt" in units else ""
        for column, label in ATTRIBUTION_METHODS.items():
            if column in units and not units[column].isna().all():
                frame = units.rename(columns={column: "score"}).assign(method=label)
                shown.append(figure(f"tokens_{pid}_{column}.png",
                                    lambda p, f=frame, t=prompt: figures().token_bars(f, p, cfg.attribution.top_units, t),
                                    f"Prompt {pid}: top {cfg.attribution.top_units} words by {label} attribution; markers in red (cf. paper Fig. 3)."))
    return {"prompts": fmt(section.prompts if section else tokens["prompt_id"].nunique()),
            "with_marker": fmt(section.prompts_with_marker if section else None), "rows": rows, "figures": shown,
            "null": {"test": null.get("test"), "seed": section.null_seed, "seconds": section.null_seconds} if null else None}


def null_cells(test: Optional[dict]) -> Optional[dict]:
    """The null model's side of an attribution row: its top-1 rate and mean rank, and the paired tests."""
    if not test:
        return None
    return {"top1": percent(test["null_top1"]), "rank": fmt(test["null_mean_rank"]), "pairs": fmt(test["pairs"]),
            "top1_p": fmt(test["top1_p"]), "rank_p": fmt(test["rank_p"])}


def length_context(data: dict, cfg: DictConfig, figure: Figures) -> Optional[dict]:
    """Spearman of d_mem with token count, the token means, the length-adjusted set, and the figure."""
    analysis = data["summary"].analysis
    length = analysis.length if analysis else None
    if not length:
        return None
    shown = data["memorized"] if data["memorized"] is not None else pd.DataFrame()
    return {**length, "adjusted": analysis.length_adjusted,
            "figure": figure("length.png", lambda p: figures().length_chart(length["bins"], shown, analysis.threshold, p),
                             "d_mem against the prompt's token count: median and interquartile range per token-count bin "
                             "(all prompts), memorized prompts in red, the memorized threshold dashed.")}


def grid_context(data: dict, order: list[str], cfg: DictConfig, figure: Figures) -> list[dict]:
    """Image grids of the most memorized prompts that have saved generations, with the prompts used."""
    mitigation, memorized = data["mitigation"], data["memorized"]
    by_id = data["generations"]
    ranked = [p for p in (list(memorized["prompt_id"]) if memorized is not None else []) if p in by_id]
    ranked += sorted(p for p in by_id if p not in ranked)
    unchanged = unchanged_rows(mitigation)
    out = []
    for pid in ranked[: cfg.report.top_prompts]:
        images = {s: by_id[pid][s] for s in order if s in by_id[pid]} | {s: a for s, a in by_id[pid].items() if s not in order}
        rows = mitigation[mitigation["prompt_id"] == pid].assign(unchanged=unchanged).set_index("strategy")
        notes = {s: f"dist {rows.loc[s, 'pairwise_distance']:.3f}" for s in images
                 if s in rows.index and np.isfinite(rows.loc[s, "pairwise_distance"])}
        title = str(rows.loc["original", "mitigated_prompt"]) if "original" in rows.index else pid
        original = str(rows.loc["original", "mitigated_prompt"]) if "original" in rows.index else None

        def text(strategy: str) -> Markup:  # a strategy that kept the original text (an embedding's) does not repeat it
            used = str(rows.loc[strategy, "mitigated_prompt"])
            same = strategy != "original" and used == original
            return Markup("<i>the original text</i>") if same else prompt_html(used, cfg.corpus.marker_regex)
        out.append({
            "figure": figure(f"grid_{pid}.png", lambda p, i=images, n=notes, t=title: figures().generation_grid(
                i, p, cfg.report.grid_generations, t, n), f"Prompt {pid}: generations from the same seeds per strategy (cf. paper Fig. 4)."),
            "prompts": [{"strategy": s, "text": text(s), "unchanged": bool(rows.loc[s, "unchanged"])} for s in order if s in rows.index],
        })
    return out


def harm_context(copies: Optional[CopiesSection], figure: Figures) -> tuple[list[dict], Optional[dict]]:
    """Per copies guidance, largest first, the copies stage's StrategyJudgement rows, and the copy-rate vs fidelity figure."""
    judged = [(name, (copies.guidances[name].get("judgement") or {})) for name in (copies.judgements() if copies else {})]
    harm = [{"name": name.replace("=", " = "), "guidance": j["guidance"], "rows": j["strategies"], "halve": j["halve_copying"]}
            for name, j in judged if j.get("strategies")]
    if not harm:
        return [], None
    harm.sort(key=lambda h: -h["guidance"])
    frontier = figure("mitigation_frontier.png", lambda p: figures().copy_fidelity_chart(harm, p),
                      "Copy rate against fidelity per strategy and guidance: down and right is better (fewer copies, "
                      "the prompt's findings kept); strategies without a fidelity measure sit at fidelity 0.")
    return harm, frontier


def mitigation_context(data: dict, cfg: DictConfig, figure: Figures) -> Optional[dict]:
    mitigation = data["mitigation"]
    if mitigation is None:
        return None
    order = [s for s in cfg.mitigation.strategies if s in set(mitigation["strategy"])]
    order += [s for s in dict.fromkeys(mitigation["strategy"]) if s not in order]
    rows = strategy_rows(mitigation, order)
    kept = mitigation[~unchanged_rows(mitigation)]
    harm, frontier = harm_context(data["summary"].copies, figure)
    return {
        "harm": harm, "frontier": frontier, "fidelity_measure": cfg.fidelity.measure,
        "rows": rows, "best": mitigation_verdict(rows), "overguidance": overguidance(data["generations"], data["facts"]["w"]),
        "figure": figure("mitigation.png", lambda p: figures().mitigation_chart(kept, p, order),
                         "d_mem and mean pairwise distance of the generations per strategy, prompts a rewrite left "
                         "unchanged left out; dots are prompts, diamonds means, the dashed line the unmitigated mean."),
        "grids": grid_context(data, order, cfg, figure),
        "skipped": data["summary"].mitigation.skipped if data["summary"].mitigation else {},
    }


def copies_context(data: dict, cfg: DictConfig, figure: Figures) -> Optional[dict]:
    """Per guidance: AUC, copies per group, re-identification, known-set check; per strategy: copies of the
    rewritten memorized prompts; and generation | nearest training image figures of the top prompts."""
    section, table = data["summary"].copies, data["copies"]
    if table is None or section is None:  # copies.parquet without its summary section: an interrupted copies stage
        return None
    guidance_rows = [{"name": name, **g, "known": g.get("known") or {}} for name, g in section.guidances.items()]
    strategies = sorted({s for g in guidance_rows for s in g.get("strategies", {})})
    shown = []
    for pid, arrays in data["copy_figures"].items():
        n = len([k for k in arrays if k.startswith("generation_")])
        rows = [{"label": f"w = {float(arrays[f'guidance_{i}']):g}", "generation": arrays[f"generation_{i}"],
                 "nearest": arrays[f"nearest_{i}"], "similarity": float(arrays[f"similarity_{i}"]),
                 "copy": float(arrays[f"similarity_{i}"]) > _threshold_at(table, float(arrays[f"guidance_{i}"]))} for i in range(n)]  # fmt: skip
        prompt = table.loc[table["prompt_id"] == pid, "prompt"].iloc[0] if (table["prompt_id"] == pid).any() else pid
        shown.append(figure(f"copies_{pid}.png", lambda p, r=rows, t=prompt: figures().copy_pairs(r, p, t),
                            f"Prompt {pid}: its generation closest to a training image, and that image, per guidance (cf. paper Fig. 1)."))
    return {"section": section, "rows": guidance_rows, "strategies": strategies, "figures": shown}


def _threshold_at(table: pd.DataFrame, guidance: float) -> float:
    values = table.loc[np.isclose(table["guidance"], guidance), "threshold"]
    return float(values.iloc[0]) if len(values) else float("inf")


def run_context(data: dict, cfg: DictConfig, figure: Figures) -> dict:
    """The Run table: config hashes, the stages' durations and rates, and the configuration the scores used."""
    analysis = data["summary"].analysis
    return {"config_hashes": analysis.config_hashes if analysis else [], "config_hash": config_hash(cfg),
            "timings": run_rows(data["summary"]), "cost": cost_context(data["summary"]),
            "config_yaml": OmegaConf.to_yaml(OmegaConf.create((analysis.config if analysis else None) or public_config(cfg)))}


@dataclass(frozen=True)
class ReportSection:
    """One section of report.html: its anchor, its title, the context builder and its template block.

    `build(data, cfg, figure)` returns the section's context (None: its input `needs` is absent) and
    templates/sections/<key>.html.j2 renders it as `s.context`. An `optional` section is left out
    of the page when absent; the others print `absent`: which stage writes their input."""

    key: str
    title: str
    build: Callable[[dict, DictConfig, Figures], Optional[dict]]
    needs: str = ""
    absent: str = ""
    optional: bool = False


NO_ANALYSIS = "summary.json has no analysis: run `cxrmem analyze` first."
SECTIONS = (
    ReportSection("distribution", "Score distribution", distribution_context, "analysis", NO_ANALYSIS),
    ReportSection("memorized", "Memorized prompts", memorized_context, "memorized_prompts.csv",
                  "memorized_prompts.csv is absent: run `cxrmem analyze` first."),
    ReportSection("calibration", "Calibrated calls", lambda data, cfg, figure: calibration_context(data["summary"].calibration), optional=True),
    ReportSection("detectors", "Detectors", lambda data, cfg, figure: detectors_context(data["summary"].detectors), optional=True),
    ReportSection("cascade", "Cascade", lambda data, cfg, figure: cascade_context(data["summary"].cascade), optional=True),
    ReportSection("enrichment", "De-identification marker enrichment", enrichment_context, "analysis", NO_ANALYSIS),
    ReportSection("length", "Prompt length", length_context, "n_tokens",
                  "No token counts in the analysis (prompts.parquet without n_tokens): rerun `cxrmem prepare` and `cxrmem analyze`."),
    ReportSection("attribution", "Token attribution", attribution_context, "tokens.parquet",
                  "tokens.parquet is absent: run `cxrmem attribute` (attribution.enabled=true)."),
    ReportSection("mitigation", "Mitigation", mitigation_context, "mitigation.parquet",
                  "mitigation.parquet is absent: run `cxrmem mitigate` (mitigation.enabled=true)."),
    ReportSection("copies", "Copies of training images", copies_context, "copies.parquet",
                  "copies.parquet is absent: set images.source and run `cxrmem copies`."),
    ReportSection("run", "Run", run_context),
    ReportSection("howto", "How to read this report", lambda data, cfg, figure: {}),
)


def card_context(data: dict, page: dict) -> dict:
    """The summary card's lines beyond the verdicts: copy evidence, detector agreement, the cascade check."""
    summary = data["summary"]
    extra = {}
    if summary.copies:
        extra["copy evidence"] = {k: fmt(v) for k, v in _flatten(summary.copies.headline or {}).items()}
    if page["detectors"] and page["detectors"]["card"]:
        extra["detector agreement"] = page["detectors"]["card"]
    return {"extra": extra, "cascade": page["cascade"], "enrichment": summary.analysis.marker_enrichment if summary.analysis else None,
            "mitigation": page["mitigation"], "truncated": truncated_context(data["memorized"])}


def report_context(data: dict, cfg: DictConfig, figure: Figures) -> dict:
    """The page as plain data: summary card, sections, metrics. Reads nothing; draws through `figure`."""
    summary: RunSummary = data["summary"]
    analysis = summary.analysis
    facts = run_facts(analysis, cfg)
    d_mem = None if data["scores"] is None else data["scores"]["d_mem"].to_numpy(dtype=np.float64)
    detection = detection_check(analysis.known_memorized if analysis else None, analysis.top_percent if analysis else None)
    data = {**data, "facts": facts, "d_mem": d_mem, "detection": detection}
    built = {section.key: section.build(data, cfg, figure) for section in SECTIONS}
    shown = [{"key": s.key, "title": s.title, "context": built[s.key], "needs": s.needs, "absent": s.absent}
             for s in SECTIONS if built[s.key] is not None or not s.optional]
    mitigation_rows = built["mitigation"]["rows"] if built["mitigation"] else None
    inputs = findings.FindingInputs(analysis, summary.attribution, mitigation_rows, summary.copies, summary.calibration,
                                    int(cfg.analyze.reference_min))  # fmt: skip
    found = findings.verdicts(inputs) if analysis else []
    verdicts = [v.to_dict() for v in found]
    page = {"prefix": data["prefix"], "facts": facts, "detection": detection, "cfg": cfg, "sections": shown, **built,
            "findings": verdicts, "written": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    page["card"] = card_context(data, page)
    page["metrics"] = metrics(facts, summary, detection, (built["mitigation"] or {}).get("rows", []), verdicts)
    page["metrics"] |= harm_metrics((built["mitigation"] or {}).get("harm", []))
    return page


# -- rendering --------------------------------------------------------------------------------------
_ENV = jinja2.Environment(loader=jinja2.PackageLoader("cxrmem", "templates"), autoescape=True,
                          undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
_ENV.filters.update(fmt=fmt, percent=percent, interval=interval)


def render_html(page: dict) -> str:
    return _ENV.get_template("report.html.j2").render(**page)


def render_summary_md(page: dict) -> str:
    return _ENV.overlay(autoescape=False).get_template("summary.md.j2").render(**page)


def sections(page: dict) -> dict:
    """Each section's status: rendered, or which input is absent."""
    out = {}
    for s in page["sections"]:
        context = s["context"]
        out[s["key"]] = "rendered" if context is not None else f"absent: {s['needs']}"
        if s["key"] == "distribution" and context and context.get("missing"):
            out["distribution"] = f"rendered without figures: {context['missing']}"
    return out
