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
from datetime import datetime, timezone
from typing import Callable, Optional

import jinja2
import numpy as np
import pandas as pd
from markupsafe import Markup, escape
from omegaconf import DictConfig, OmegaConf

from cxrmem import figures, findings, stats
from cxrmem.config import config_hash, public_config
from cxrmem.judgement import halves_copying, judge_strategies
from cxrmem.mitigation import EMBEDDING_STRATEGIES

log = logging.getLogger(__name__)

# tokens.parquet score columns (cxrmem/attribution.py) -> method label shown in the report.
ATTRIBUTION_METHODS = {"grad_score": "gradient", "loo_delta": "leave-one-out"}
SUMMARY_ATTRIBUTION_KEYS = {
    "gradient": "gradient (sum over pieces)",
    "gradient_per_piece_mean": "gradient (mean per piece)",
    "leave_one_out": "leave-one-out",
}
# Over-guidance rule: generations whose median high-frequency share (stats.high_frequency_share)
# exceeds this are closer to white noise (0.75) than to an image (a radiograph: below 0.05).
OVERGUIDED_SHARE = 0.5


# -- formatting ---------------------------------------------------------------------------------
def fmt(value) -> str:
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


def interval(result: Optional[dict], key: str = "odds_ratio", low: str = "ci_low", high: str = "ci_high") -> str:
    """`value [low, high]`, or a dash with the reason when an odds ratio could not be computed."""
    if not result or result.get(key) is None:
        return f"– ({figures.no_odds_ratio_reason(result)})" if result and key == "odds_ratio" else "–"
    return f"{result[key]:.3g} [{result[low]:.3g}, {result[high]:.3g}]"


def mark(text, pattern: str) -> Markup:
    """Escaped text with every de-identification marker highlighted."""
    out, last, text = [], 0, str(text)
    for match in re.finditer(pattern, text):
        out.append(escape(text[last : match.start()]) + Markup("<mark>%s</mark>") % match.group())
        last = match.end()
    return Markup("").join(out) + escape(text[last:])


def _flatten(obj, prefix: str = "") -> dict:
    if not isinstance(obj, dict):
        return {prefix: obj}
    out = {}
    for key, value in obj.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


# -- the summary card -----------------------------------------------------------------------------
def run_facts(summary: dict, cfg: DictConfig) -> dict:
    """Model, fingerprint, G, T, w and the counts, from the scores' own config when analyze recorded it."""
    analysis = summary.get("analysis", {})
    used = OmegaConf.create(analysis.get("config") or public_config(cfg))
    model = used.model
    name = (f"RadEdit ({model.radedit.unet_repo} + {model.radedit.text_repo})" if model.kind == "radedit"
            else f"{model.kind}: {model.path}")
    counts = analysis.get("counts", {})
    return {
        "model": name, "fingerprint": ", ".join(analysis.get("model_fingerprints", [])) or "–",
        "G": used.score.generations, "T": used.score.screening_steps or used.score.steps, "w": used.score.guidance_scale,
        "prompts": counts.get("prompts"), "scored": counts.get("finite"), "nonfinite": counts.get("nonfinite"),
        "memorized": analysis.get("memorized_count"), "threshold": analysis.get("threshold"),
        "top_percent": analysis.get("top_percent"),
    }


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


def metrics(facts: dict, analysis: dict, detection: Optional[dict], strategies: list[dict], summary: dict, verdicts=()) -> dict:
    """Flat numeric metrics (metrics.json) that MLflow's log_metrics or wandb.log take as they are."""
    enrichment = analysis.get("marker_enrichment", {})
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
    flat |= {f"time_s.{k}": v for k, v in _flatten(summary.get("audit", {}).get("timings_s", {})).items()}
    flat |= {f"detector.{k}": v for k, v in _flatten((summary.get("detectors") or {}).get("detectors", {})).items()}
    flat |= verdict_metrics(list(verdicts))
    flat["length.spearman_d_mem_n_tokens"] = ((analysis.get("length") or {}).get("spearman") or {}).get("rho")
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
def detectors_context(section: Optional[dict]) -> Optional[dict]:
    """The Detectors table and the summary card's agreement line, from the analyze stage's summary["detectors"]."""
    if not section or not section.get("detectors"):
        return None
    top = fmt(section["top_percent"])
    rows = [{"name": name, **row} for name, row in section["detectors"].items()]
    card = {row["name"]: f"Spearman {fmt(row['spearman'])}, top {top}% overlap {percent(row['top_overlap'])}" for row in rows}
    return {"rows": rows, "card": card, "top_percent": top, "fpr": section.get("fpr")}


def cascade_context(section: Optional[dict]) -> Optional[dict]:
    """The Cascade section (issue 21): the stages of every round, the compute and the self-check's verdict."""
    if not section:
        return None
    rows = [
        {"round": n, "stage": i + 1, **stage, "misses": r["missed_by_stage"].get(str(i), r["missed_by_stage"].get(i, 0))}
        for n, r in enumerate(section["rounds"], 1) for i, stage in enumerate(r["stages"])
    ]
    audit, spent = section["audit"], section["evaluations"]
    return {"rows": rows, "audit": audit, "evaluations": spent, "verdict": section["verdict"],
            "ok": audit["sample"] > 0 and audit["misses"] == 0, "corpus": section["corpus"], "fully_scored": section["fully_scored"]}


def run_rows(summary: dict) -> list[dict]:
    """Durations and rates recorded by the stages, each value once (stages repeat the audit's timings)."""
    flat = _flatten({k: v for k, v in summary.items() if k != "analysis"})
    # Stages record durations as `seconds`, `timings_s.<stage>` or `<name>_s`; `<name>_per_s` is a rate.
    rows, seen = [], set()
    for key, value in sorted(flat.items()):
        is_rate = key.endswith("per_s")
        if not (is_rate or re.search(r"(seconds|timings|(?<!per)_s$)", key)) or isinstance(value, (dict, list)):
            continue
        leaf = (key.rsplit(".", 1)[-1], value)
        if leaf not in seen:
            seen.add(leaf)
            rows.append({"key": ("rate: " if is_rate else "time (s): ") + key, "value": fmt(value)})
    return rows


def memorized_rows(memorized: pd.DataFrame, pattern: str, limit: int) -> list[dict]:
    rows = memorized.head(limit).to_dict("records")
    return [{**row, "rank": i + 1, "prompt_html": mark(row["prompt"], pattern),
             "markers": int(row.get("n_markers", int(bool(row.get("has_marker", False)))))} for i, row in enumerate(rows)]


def enrichment_rows(analysis: dict) -> list[dict]:
    overall, by_bucket = analysis["marker_enrichment"], analysis["marker_enrichment_by_n_reports"]
    rows = [{"group": name, "prompts": fmt(g["n_prompts"]), "memorized": fmt(g["n_memorized"]),
             "mem_share": percent(g["memorized_marker_share"]), "base_share": percent(g["base_marker_share"]),
             "or": interval(g) + (" (+0.5 corrected)" if g["corrected"] else ""), "p": fmt(g["fisher_p"])}
            for name, g in [("all prompts", overall)] + [(f"n_reports {b['bucket']}", b) for b in by_bucket["buckets"]]]
    rows.append({"group": f"pooled over buckets (Mantel-Haenszel, {by_bucket['mantel_haenszel']['strata']} strata)",
                 **dict.fromkeys(("prompts", "memorized", "mem_share", "base_share", "p"), ""),
                 "or": interval(by_bucket["mantel_haenszel"])})
    return rows + adjusted_rows(analysis.get("marker_enrichment_adjusted"))


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
    text_strategy = (mitigation["strategy"] != "original") & ~mitigation["strategy"].isin(EMBEDDING_STRATEGIES)
    return text_strategy & (mitigation["mitigated_prompt"] == mitigation["prompt"])


def strategy_rows(mitigation: pd.DataFrame, order: list[str]) -> list[dict]:
    """Per strategy: means over the prompts it changed, and paired differences against `original` (95% CI)."""
    unchanged = unchanged_rows(mitigation)
    used = mitigation[~unchanged]
    rows = []
    for strategy in order:
        own = used[used["strategy"] == strategy].set_index("prompt_id")
        row = {"strategy": strategy, "prompts": len(own), "unchanged": int((unchanged & (mitigation["strategy"] == strategy)).sum()),
               "d_mem_mean": own["d_mem"].mean() if len(own) else None,
               "distance_mean": own["pairwise_distance"].mean() if len(own) else None}
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
            shares.setdefault(strategy, []).extend(stats.high_frequency_share(figures.as_images(images)).tolist())
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


def distribution_context(analysis: dict, d_mem: Optional[np.ndarray], figure: Figures) -> dict:
    ordered = sorted((k for k in analysis["percentiles"] if k != "max"), key=lambda k: float(k[1:]))
    columns = ["min", *ordered, "max", "mean", "std"]
    values = {**analysis["percentiles"], **analysis.get("d_mem", {})}
    out = {"columns": columns, "values": [fmt(values.get(c)) for c in columns], "figures": [], "missing": None}
    if d_mem is None or d_mem.size == 0 or analysis["threshold"] is None:
        out["missing"] = "scores.parquet is absent" if d_mem is None else "scores.parquet has no finite d_mem"
        return out
    threshold, top = analysis["threshold"], analysis["top_percent"]
    out["figures"] = [
        figure("dmem_sorted.png", lambda p: figures.dmem_curve(d_mem, threshold, p, top),
               f"d_mem of every prompt, largest to smallest; the top {top:g}% (memorized) in red (cf. paper Fig. 2)."),
        figure("dmem_histogram.png", lambda p: figures.dmem_histogram(d_mem, threshold, p),
               "Histogram of d_mem, log counts; the dashed line is the memorized threshold."),
    ]
    return out


def known_figure(data: dict, threshold, figure: Figures) -> Optional[dict]:
    scores, known_ids = data["scores"], data["known_ids"]
    if scores is None or known_ids is None or threshold is None:
        return None
    known = scores["prompt_id"].isin(known_ids).to_numpy()
    return figure("known_memorized.png", lambda p: figures.known_ranks(scores["d_mem"].to_numpy(), known, threshold, p),
                  "Every scored prompt by d_mem rank (log scale); red dots: the prompts known to be memorized.")


def attribution_context(data: dict, cfg: DictConfig, figure: Figures) -> dict:
    tokens, memorized = data["tokens"], data["memorized"]
    stats_ = data["summary"].get("attribution", {})
    null = stats_.get("null") or {}
    rows = [{"method": label, "top1": percent(stats_[key].get("marker_top1")), "rank": fmt(stats_[key].get("marker_mean_rank")),
             "chance": percent(stats_[key].get("chance_top1")), "null": null_cells(null.get(key))}
            for key, label in SUMMARY_ATTRIBUTION_KEYS.items() if isinstance(stats_.get(key), dict)]
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
                                    lambda p, f=frame, t=prompt: figures.token_bars(f, p, cfg.attribution.top_units, t),
                                    f"Prompt {pid}: top {cfg.attribution.top_units} words by {label} attribution; markers in red (cf. paper Fig. 3)."))
    return {"prompts": fmt(stats_.get("prompts", tokens["prompt_id"].nunique())),
            "with_marker": fmt(stats_.get("prompts_with_marker")), "rows": rows, "figures": shown,
            "null": {"test": null.get("test"), "seed": stats_.get("null_seed"), "seconds": stats_.get("null_seconds")} if null else None}


def null_cells(test: Optional[dict]) -> Optional[dict]:
    """The null model's side of an attribution row: its top-1 rate and mean rank, and the paired tests."""
    if not test:
        return None
    return {"top1": percent(test["null_top1"]), "rank": fmt(test["null_mean_rank"]), "pairs": fmt(test["pairs"]),
            "top1_p": fmt(test["top1_p"]), "rank_p": fmt(test["rank_p"])}


def length_context(analysis: dict, memorized: Optional[pd.DataFrame], figure: Figures) -> Optional[dict]:
    """Spearman of d_mem with token count, the token means, the length-adjusted set, and the figure."""
    length = analysis.get("length")
    if not length:
        return None
    shown = memorized if memorized is not None else pd.DataFrame()
    return {**length, "adjusted": analysis.get("length_adjusted"),
            "figure": figure("length.png", lambda p: figures.length_chart(length["bins"], shown, analysis.get("threshold"), p),
                             "d_mem against the prompt's token count: median and interquartile range per token-count bin "
                             "(all prompts), memorized prompts in red, the memorized threshold dashed.")}


def verdict_line(v: dict) -> str:
    """The numbers behind a verdict, in one line for the summary card."""
    n = v["numbers"]
    if v["finding"] == "F1":
        return (f"crude OR {fmt(n.get('crude_or'))} [{fmt(n.get('crude_ci_low'))}, {fmt(n.get('crude_ci_high'))}], "
                f"adjusted OR {fmt(n.get('adjusted_or'))} [{fmt(n.get('adjusted_ci_low'))}, {fmt(n.get('adjusted_ci_high'))}] "
                f"p {fmt(n.get('adjusted_p'))} (adjusted for {', '.join(n.get('covariates') or []) or '–'})")
    if v["finding"] == "F2":
        if "pairs" not in n:
            return f"marker first in {percent(n.get('observed_top1'))} of marker-bearing prompts (summed gradient), no null"
        return (f"summed gradient: marker first in {percent(n['observed_top1'])} of {fmt(n['pairs'])} prompts vs "
                f"{percent(n['null_top1'])} on the null model (sign test p {fmt(n['top1_p'])}); mean best rank "
                f"{fmt(n['observed_mean_rank'])} vs {fmt(n['null_mean_rank'])} (p {fmt(n['rank_p'])})")
    parts = [f"{s}: d_mem change {fmt(x['d_mem_change'])} [{fmt(x['ci_low'])}, {fmt(x['ci_high'])}] over {fmt(x['prompts'])} prompts"
             + (f", copies stopped at {', '.join(x['removes_copies_at'])}" if x["removes_copies_at"] else "")
             for s, x in n.get("strategies", {}).items()]
    return "; ".join(parts) + f" (threshold {fmt(n.get('threshold'))})" if parts else "–"


def findings_context(summary: dict, analysis: dict, mitigation_rows: Optional[list[dict]]) -> list[dict]:
    """F1-F3 with their verdicts, rules and numbers (cxrmem/findings.py), for the card, summary.md and metrics."""
    found = findings.verdicts(analysis, summary.get("attribution"), mitigation_rows, summary.get("copies"))
    return [{**v.to_dict(), "line": verdict_line(v.to_dict())} for v in found]


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
        out.append({
            "figure": figure(f"grid_{pid}.png", lambda p, i=images, n=notes, t=title: figures.generation_grid(
                i, p, cfg.report.grid_generations, t, n), f"Prompt {pid}: generations from the same seeds per strategy (cf. paper Fig. 4)."),
            "prompts": [{"strategy": s, "text": mark(rows.loc[s, "mitigated_prompt"], cfg.corpus.marker_regex),
                         "unchanged": bool(rows.loc[s, "unchanged"])} for s in order if s in rows.index],
        })
    return out


def harm_context(data: dict, order: list[str], figure: Figures) -> tuple[list[dict], Optional[dict]]:
    """Per copies guidance the StrategyJudgement rows (cxrmem/judgement.py) as dicts, and the copy-rate vs fidelity figure."""
    table = data.get("copies")
    if table is None or not (table["group"] == "memorized").any():
        return [], None
    checked = set(table["strategy"].replace({"none": "original"}))
    order = [s for s in order if s in checked]
    harm = []
    for guidance in sorted(set(table["guidance"].astype(float)), reverse=True):
        rows = judge_strategies(table, data["mitigation"], guidance, order)
        harm.append({"name": f"w = {guidance:g}", "guidance": guidance, "rows": [r.as_dict() for r in rows],
                     "halve": halves_copying(rows)})
    frontier = figure("mitigation_frontier.png", lambda p: figures.copy_fidelity_chart(harm, p),
                      "Copy rate against fidelity per strategy and guidance: down and right is better (fewer copies, "
                      "the prompt's findings kept); strategies without a fidelity measure sit at fidelity 0.")
    return harm, frontier


def mitigation_context(data: dict, cfg: DictConfig, w, figure: Figures) -> dict:
    mitigation = data["mitigation"]
    order = [s for s in cfg.mitigation.strategies if s in set(mitigation["strategy"])]
    order += [s for s in dict.fromkeys(mitigation["strategy"]) if s not in order]
    rows = strategy_rows(mitigation, order)
    kept = mitigation[~unchanged_rows(mitigation)]
    harm, frontier = harm_context(data, order, figure)
    return {
        "harm": harm, "frontier": frontier, "fidelity_measure": cfg.fidelity.measure,
        "rows": rows, "best": mitigation_verdict(rows), "overguidance": overguidance(data["generations"], w),
        "figure": figure("mitigation.png", lambda p: figures.mitigation_chart(kept, p, order),
                         "d_mem and mean pairwise distance of the generations per strategy, prompts a rewrite left "
                         "unchanged left out; dots are prompts, diamonds means, the dashed line the unmitigated mean."),
        "grids": grid_context(data, order, cfg, figure),
    }


def summary_line(summary: dict, name: str) -> dict:
    """What the summary card shows of a section: its headline when it has one, else the whole section."""
    section = summary[name]
    return section.get("headline", section) if isinstance(section, dict) else section


def copies_context(data: dict, cfg: DictConfig, figure: Figures) -> dict:
    """Per guidance: AUC, copies per group, re-identification, known-set check; per strategy: copies of the
    rewritten memorized prompts; and generation | nearest training image figures of the top prompts."""
    section, table = data["summary"].get("copies", {}), data["copies"]
    guidance_rows = [{"name": name, **g, "known": g.get("known") or {}} for name, g in section.get("guidances", {}).items()]
    strategies = sorted({s for g in guidance_rows for s in g.get("strategies", {})})
    shown = []
    for pid, arrays in data["copy_figures"].items():
        n = len([k for k in arrays if k.startswith("generation_")])
        rows = [{"label": f"w = {float(arrays[f'guidance_{i}']):g}", "generation": arrays[f"generation_{i}"],
                 "nearest": arrays[f"nearest_{i}"], "similarity": float(arrays[f"similarity_{i}"]),
                 "copy": float(arrays[f"similarity_{i}"]) > _threshold_at(table, float(arrays[f"guidance_{i}"]))} for i in range(n)]  # fmt: skip
        prompt = table.loc[table["prompt_id"] == pid, "prompt"].iloc[0] if (table["prompt_id"] == pid).any() else pid
        shown.append(figure(f"copies_{pid}.png", lambda p, r=rows, t=prompt: figures.copy_pairs(r, p, t),
                            f"Prompt {pid}: its generation closest to a training image, and that image, per guidance (cf. paper Fig. 1)."))
    return {"section": section, "rows": guidance_rows, "strategies": strategies, "figures": shown}


def _threshold_at(table: pd.DataFrame, guidance: float) -> float:
    values = table.loc[np.isclose(table["guidance"], guidance), "threshold"]
    return float(values.iloc[0]) if len(values) else float("inf")


def report_context(data: dict, cfg: DictConfig, figure: Figures) -> dict:
    """The page as plain data: summary card, sections, metrics. Reads nothing; draws through `figure`."""
    summary = data["summary"]
    analysis = summary.get("analysis", {})
    facts = run_facts(summary, cfg)
    d_mem = None if data["scores"] is None else data["scores"]["d_mem"].to_numpy(dtype=np.float64)
    detection = detection_check(analysis.get("known_memorized"), analysis.get("top_percent"))
    page = {
        "prefix": data["prefix"], "facts": facts, "analysis": analysis, "detection": detection,
        "enrichment": analysis.get("marker_enrichment"), "cfg": cfg,
        "written": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "config_hash": config_hash(cfg),
        "extra": {"copies": {k: fmt(v) for k, v in _flatten(summary_line(summary, "copies")).items()}} if summary.get("copies") else {},
        "run_rows": run_rows(summary),
        "config_yaml": OmegaConf.to_yaml(OmegaConf.create(analysis.get("config") or public_config(cfg))),
    }
    detectors = detectors_context(summary.get("detectors"))
    if detectors:
        page["detectors"], page["extra"]["detectors"] = detectors, detectors["card"]
    cascade = cascade_context(summary.get("cascade"))
    if cascade:
        page["cascade"] = cascade
    if analysis:
        page["distribution"] = distribution_context(analysis, d_mem, figure)
        page["enrichment_rows"] = enrichment_rows(analysis)
        page["enrichment_figure"] = figure("marker_enrichment.png", lambda p: figures.enrichment_chart(
            analysis["marker_enrichment"], analysis["marker_enrichment_by_n_reports"], p),
            "Share of prompts with a de-identification marker, memorized vs all, per duplication bucket; "
            "right: odds ratios with 95% intervals (log scale).")
        page["known_figure"] = known_figure(data, analysis.get("threshold"), figure) if detection else None
    if data["memorized"] is not None:
        page["memorized"] = memorized_rows(data["memorized"], cfg.corpus.marker_regex, cfg.report.memorized_rows)
        page["memorized_total"] = len(data["memorized"])
    if data["tokens"] is not None:
        page["attribution"] = attribution_context(data, cfg, figure)
    if data["mitigation"] is not None:
        page["mitigation"] = mitigation_context(data, cfg, facts["w"], figure)
    if data.get("copies") is not None:
        page["copies"] = copies_context(data, cfg, figure)
    page["length"] = length_context(analysis, data["memorized"], figure) if analysis else None
    page["findings"] = findings_context(summary, analysis, page["mitigation"]["rows"] if "mitigation" in page else None) if analysis else []
    page["metrics"] = metrics(facts, analysis, detection, page.get("mitigation", {}).get("rows", []), summary, page["findings"])
    page["metrics"] |= harm_metrics(page.get("mitigation", {}).get("harm", []))
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
    absent = {"distribution": ("analysis", "analysis"), "memorized": ("memorized", "memorized_prompts.csv"),
              "enrichment": ("analysis", "analysis"), "attribution": ("attribution", "tokens.parquet"),
              "mitigation": ("mitigation", "mitigation.parquet"), "copies": ("copies", "copies.parquet")}
    out = {"run": "rendered"}
    for name, (key, label) in absent.items():
        out[name] = "rendered" if page.get(key) else f"absent: {label}"
    if page.get("distribution", {}).get("missing"):
        out["distribution"] = f"rendered without figures: {page['distribution']['missing']}"
    return out
