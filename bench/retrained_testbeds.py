"""The paper's training-time advice, tested (issue 22): the planted prompts' memorization in the committed
testbed against its two retrained variants, split by planted prompts with and without markers.

    python bench/retrained_testbeds.py [--steps 20] [--out bench/RESULTS.md] [--json runs/retrained.json]

The variants (conf/testbed_random_markers.yaml: every training pair of a prompt with fresh surrogates for
its markers; conf/testbed_no_markers.yaml: the markers deleted) share the committed model's budget, seeds,
images and planted duplication; only the training texts differ. Every model is queried with the corpus as
it is written (markers in), the way an audit of the released model would query it; the marker-free model is
also queried with its own training texts (markers deleted), which is what its copies were trained on.

Per model and query, over the prompts of `cxrmem testbed evaluate` (every planted prompt and the seeded
sample of 200 never-duplicated ones), with the project's Scorer and seeds:

- d_mem AUC and TPR at 1% FPR of the planted prompts with and without markers against the never-duplicated;
- copy rate at w = 1: the copies stage's rule on the pixel embedder (cosine similarity of centred 32x32
  images): a prompt copies when the best of its G conditional generations is more similar to a training
  image than the 99% quantile of the never-duplicated prompts' best similarities (the controls; calibrated
  per model), with a Clopper-Pearson 95% interval; `own` counts the copies whose nearest training image is
  the prompt's own (re-identification);
- the marker's attribution against the null model, over the planted prompts with markers: the marker's
  top-1 rate and mean best rank under the summed gradient and its per-piece mean, observed against a
  re-initialised copy of the same model (attribution.null_comparison: exact one-sided sign test). Leave-one-out
  is off to keep the run short.

Writes the section "## Retrained testbeds: the paper's training-time advice (issue 22)" of `--out`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from scipy.stats import binomtest  # noqa: E402

from cxrmem.attribution import AttributionSettings, attribute_prompts, null_comparison, with_null  # noqa: E402
from cxrmem.config import load_config  # noqa: E402
from cxrmem.copies.embedders import EmbedderSettings, PixelEmbedder  # noqa: E402
from cxrmem.copies.evidence import calibrate_threshold, similarity_stats  # noqa: E402
from cxrmem.copies.find import search  # noqa: E402
from cxrmem.copies.settings import CopiesSettings  # noqa: E402
from cxrmem.corpus.text import compile_marker_regex, count_markers, delete_markers, prompt_id  # noqa: E402
from cxrmem.models.components import null_copy  # noqa: E402
from cxrmem.models.loading import load_components  # noqa: E402
from cxrmem.results_page import cpu_name, replace_section  # noqa: E402
from cxrmem.scoring.dmem import d_mem  # noqa: E402
from cxrmem.scoring.scorer import Scorer  # noqa: E402
from cxrmem.scoring.settings import ScoreSettings  # noqa: E402
from cxrmem.stats import roc_auc, tpr_at_fpr  # noqa: E402
from cxrmem.testbed.dataset import MANIFEST  # noqa: E402
from cxrmem.testbed.evaluate import evaluation_prompts, score_and_generate, training_images  # noqa: E402

HEADING = "## Retrained testbeds: the paper's training-time advice (issue 22)"
# (label, config, query): "written" queries the corpus text, "stripped" the text with its markers deleted.
MODELS = [
    ("committed", "conf/testbed.yaml", "written"),
    ("random_markers", "conf/testbed_random_markers.yaml", "written"),
    ("no_markers", "conf/testbed_no_markers.yaml", "written"),
    ("no_markers", "conf/testbed_no_markers.yaml", "stripped"),
]
GROUPS = {"with marker": True, "without marker": False}

log = logging.getLogger("retrained")


def proportion(k: int, n: int) -> dict:
    ci = binomtest(k, n).proportion_ci(0.95, method="exact") if n else None
    return {"k": int(k), "n": int(n), "rate": k / n if n else None, "ci": [ci.low, ci.high] if ci else None}


def measure(label: str, config: str, query: str, steps: int) -> dict:
    cfg = load_config(ROOT / config, [f"score.steps={steps}", "score.screening_steps=null"])
    tb, marker_regex = cfg.testbed, cfg.corpus.marker_regex
    torch.set_num_threads(tb.num_threads)
    started = time.time()
    manifest = pd.read_csv(os.path.join(tb.out, MANIFEST))
    own_images = torch.from_numpy(training_images(tb.out, manifest, cfg.corpus))
    frame = evaluation_prompts(manifest, tb.eval_unique, tb.seed)
    frame = frame[frame.kind != "template"]
    frame = frame.assign(has_marker=[count_markers(p, marker_regex) > 0 for p in frame.prompt])
    pattern = compile_marker_regex(marker_regex)
    # "stripped" deletes the markers as the no_markers training variant did (testbed/dataset.py).
    queries = [delete_markers(p, pattern) if query == "stripped" else p for p in frame.prompt]

    components = load_components(cfg.model)
    settings = ScoreSettings.of(cfg.score)
    scorer = Scorer(components, settings, device=cfg.model.device)
    shared = settings.seed_mode == "shared"
    # Seeds follow the prompt as written, so that both queries of a prompt start from the same noise.
    ids = [prompt_id(p) for p in frame.prompt]
    norms, _ = score_and_generate(scorer, queries, cfg.score.batch_size, shared, ids=ids)
    _, conditional = score_and_generate(scorer, queries, cfg.score.batch_size, shared, guidance=1.0, ids=ids)
    scores, _ = d_mem(norms)
    scores = scores.numpy()

    # The copies stage's search and copy rule, on every prompt's training image as the index.
    embedder = PixelEmbedder(EmbedderSettings(name="pixel", size=32))
    queries_embedded = embedder(conditional.flatten(0, 1)).reshape(*conditional.shape[:2], -1)
    sims, rows = search(queries_embedded, embedder(own_images), CopiesSettings(top_k=1))
    kind, planted, marked = frame.kind.to_numpy(), frame.planted.to_numpy(), frame.has_marker.to_numpy()
    threshold = calibrate_threshold(similarity_stats(sims)["max_similarity"][kind == "unique"], 0.99)
    best = similarity_stats(sims, threshold.value)
    is_copy = best["is_copy"]
    own = rows[np.arange(len(rows)), best["best_generation"], 0] == frame.index.to_numpy()
    negatives = scores[kind == "unique"]

    groups = {}
    for name, with_marker in GROUPS.items():
        chosen = planted & (marked == with_marker)
        groups[name] = {
            "n": int(chosen.sum()),
            "auc": roc_auc(scores[chosen], negatives),
            "tpr_at_1pct_fpr": tpr_at_fpr(scores[chosen], negatives),
            "d_mem_mean": float(scores[chosen].mean()),
            "copy_rate_w1": proportion(int(is_copy[chosen].sum()), int(chosen.sum())),
            "own_image_copies": int((is_copy & own)[chosen].sum()),
            "copied_prompts": sorted(frame.prompt[chosen & is_copy].map(prompt_id)),
        }

    attribution = None
    marked_planted = planted & marked & np.array([count_markers(q, marker_regex) > 0 for q in queries])
    if marked_planted.any():
        # Gradient only (leave-one-out off): its summed and per-piece ranks against the null model's.
        attr = AttributionSettings(generations=2, steps=5, leave_one_out=False, marker_regex=marker_regex)
        prompts = [q for q, m in zip(queries, marked_planted) if m]
        pids = [i for i, m in zip(ids, marked_planted) if m]
        tokens = attribute_prompts(scorer, prompts, pids, attr)
        null = Scorer(null_copy(components, 0), settings, device=cfg.model.device)
        comparison = null_comparison(with_null(tokens, attribute_prompts(null, prompts, pids, attr)))
        attribution = {key: comparison[key] for key in ("gradient", "gradient_per_piece_mean")}

    return {
        "model": label,
        "path": tb.out,
        "query": query,
        "steps": steps,
        "generations": settings.generations,
        "n_unique": int((kind == "unique").sum()),
        "d_mem_unique_mean": float(negatives.mean()),
        "threshold": threshold.summary(),
        "controls_copying": int(is_copy[kind == "unique"].sum()),
        "groups": groups,
        "attribution": attribution,
        "seconds": round(time.time() - started, 1),
    }


def copy_changes(row: dict, base: dict) -> dict:
    """Per group: planted prompts that copy under `base` (the committed model) but not `row`, and the reverse,
    with the exact two-sided sign test on those discordant prompts (the same prompts in both)."""
    out = {}
    for group in GROUPS:
        was, now = set(base["groups"][group]["copied_prompts"]), set(row["groups"][group]["copied_prompts"])
        lost, gained = len(was - now), len(now - was)
        out[group] = {"lost": lost, "gained": gained, "p": binomtest(lost, lost + gained).pvalue if lost + gained else None}
    return out


def fmt(value, digits=3):
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(rows: list[dict], minutes: float) -> str:
    first = rows[0]
    lines = [
        HEADING,
        "",
        "Command: `python bench/retrained_testbeds.py` (after `cxrmem testbed train --config conf/testbed_random_markers.yaml`",
        "and `--config conf/testbed_no_markers.yaml`, each 3,000 steps on 2 CPU threads, stopped by steps).",
        "",
        f"Scorer G={first['generations']}, w=7.5, T={first['steps']} DDIM steps; {first['n_unique']} never-duplicated prompts as",
        "negatives and as the copy controls; copies at w = 1 on the pixel embedder (threshold: 99% quantile of the",
        f"controls' best similarity, per model); attribution: gradient over G=2, 5 steps. {minutes:.1f} min in all, CPU: {cpu_name()}.",
        "",
        "| model | query | planted | n | d_mem AUC | TPR@1%FPR | mean d_mem | copy rate w=1 [95% CI] | own image | vs committed: lost / gained (p) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        changes = copy_changes(row, first)
        for group, g in row["groups"].items():
            rate, change = g["copy_rate_w1"], changes[group]
            versus = "baseline" if row is first else f"{change['lost']} / {change['gained']} ({fmt(change['p'])})"
            lines.append(
                f"| {row['model']} | {row['query']} | {group} | {g['n']} | {fmt(g['auc'])} | {fmt(g['tpr_at_1pct_fpr'], 2)} "
                f"| {fmt(g['d_mem_mean'])} | {rate['k']}/{rate['n']} = {fmt(rate['rate'], 2)} [{fmt(rate['ci'][0], 2)}, {fmt(rate['ci'][1], 2)}] "
                f"| {g['own_image_copies']} | {versus} |"
            )
    lines += [
        "",
        "Never-duplicated prompts (negatives): mean d_mem and controls above their own threshold:",
        "",
        "| model | query | mean d_mem | copy threshold | controls above |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['model']} | {r['query']} | {fmt(r['d_mem_unique_mean'])} | {fmt(r['threshold']['value'], 4)} | {r['controls_copying']}/{r['n_unique']} |"
        for r in rows
    ]
    lines += [
        "",
        "The marker's attribution on the planted prompts with markers, observed against the null model (sign test p, one-sided):",
        "",
        "| model | query | method | pairs | top-1 observed | top-1 null | p | mean rank observed | mean rank null | p |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for method, test in (row["attribution"] or {}).items():
            if test:
                lines.append(
                    f"| {row['model']} | {row['query']} | {method} | {test['pairs']} | {fmt(test['observed_top1'], 2)} | {fmt(test['null_top1'], 2)} "
                    f"| {fmt(test['top1_p'])} | {fmt(test['observed_mean_rank'], 1)} | {fmt(test['null_mean_rank'], 1)} | {fmt(test['rank_p'])} |"
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps of the score and the generations")
    parser.add_argument("--out", default=str(ROOT / "bench" / "RESULTS.md"))
    parser.add_argument("--json", default=str(ROOT / "runs" / "retrained.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started = time.time()
    rows = []
    for label, config, query in MODELS:
        rows.append(measure(label, config, query, args.steps))
        log.info("%s (%s): %s", label, query, json.dumps(rows[-1]["groups"], default=str))
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as stream:
        json.dump(rows, stream, indent=2, default=str)
    document = Path(args.out).read_text(encoding="utf-8") if os.path.exists(args.out) else ""
    Path(args.out).write_text(replace_section(document, HEADING, markdown(rows, (time.time() - started) / 60)), encoding="utf-8")
    print(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
