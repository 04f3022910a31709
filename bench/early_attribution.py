"""Attribution at early steps (issue 33, item 3): how well leave-one-out and the gradient over the first k DDIM
steps rank a memorized prompt's words the way the full-settings ones do, on both committed testbeds.

    python bench/early_attribution.py [--prompts 24] [--ks 1,2,5,10,20,30,40,50] [--out bench/RESULTS.md] [--json runs/early_attribution.json]

Per testbed (conf/testbed.yaml, conf/testbed_iuxray.yaml at their score settings, T = 50 DDIM steps, G = 4), over
the planted prompts taken in turn from each duplication level and marker condition, with the project's Scorer and seeds:

- leave-one-out: every variant (the prompt, and the prompt without each word unit) scored once over all T steps;
  d_mem over the first k steps is the mean of the first k steps' norms, which is what `attribution.steps` = k
  computes (the early score runs the first k steps of the same T-step schedule from the same noises);
- the gradient: per step of attribution.generations trajectories, the token gradient norms of
  cxrmem/attribution.py, so that the mean over the first k steps is `trajectory_token_norms` at k.

Against the full setting (k = T), per prompt: the Spearman correlation of the units' scores, and whether the
full setting's first unit is first at k (top-1 agreement); the table gives their mean over prompts with the
spread (standard deviation, minimum), and the marker's top-1 rate at each k.

Writes the section "## Attribution at early steps (issue 33)" of `--out`.
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
from scipy.stats import spearmanr  # noqa: E402

from cxrmem.attribution import AttributionConfig, declared_evaluations, token_gradient_norms, word_units  # noqa: E402
from cxrmem.config import load_config  # noqa: E402
from cxrmem.corpus.text import compile_marker_regex, delete_span, prompt_id  # noqa: E402
from cxrmem.models.loading import load_components  # noqa: E402
from cxrmem.results_page import cpu_name, write_results  # noqa: E402
from cxrmem.scoring.scorer import Scorer  # noqa: E402
from cxrmem.scoring.settings import ScoreSettings  # noqa: E402
from cxrmem.stages.worker import attribution_settings  # noqa: E402
from cxrmem.testbed.dataset import MANIFEST  # noqa: E402

HEADING = "## Attribution at early steps (issue 33)"
TOLERANCE = 0.02  # how far below the full setting's own split-half Spearman an early k may stay (the default's rule)
UNITS = 30  # word units of the memorized prompt the costs are given for (issue 33's figure)
GRADIENT_STEPS_BEFORE = 10  # attribution.steps before issue 33, when it set the gradient's steps only
TESTBEDS = [("testbed/model", "conf/testbed.yaml"), ("testbed/iuxray", "conf/testbed_iuxray.yaml")]

log = logging.getLogger("early_attribution")


def loo_step_norms(scorer: Scorer, variants: list[str], pid: str, batch_size: int) -> np.ndarray:
    """[variants, G, T]: each variant's noise norms per noise and step (d_mem over k steps is a prefix mean)."""
    norms = [scorer.score(variants[lo : lo + batch_size], [pid] * len(variants[lo : lo + batch_size])).step_norms
             for lo in range(0, len(variants), batch_size)]  # fmt: skip
    return np.concatenate(norms)


def gradient_step_norms(scorer: Scorer, prompt: str, pid: str, generations: int) -> np.ndarray:
    """[T, L]: per step, the token gradient norms (cxrmem/attribution.py) averaged over the trajectories."""
    cond_emb = scorer.encode([prompt]).embeddings
    trajectory = scorer.sample(cond_emb, scorer.initial_latents([pid], generations), keep_inputs=True)
    timesteps = trajectory.timesteps.to(scorer.device)
    per_step = []
    for s, x in enumerate(trajectory.model_inputs):
        x_t = x[0].to(scorer.device, scorer.dtype)  # [G, C, H, W]: the G trajectories at step s
        per_step.append(token_gradient_norms(scorer.conditional_noise_norms, x_t, timesteps[s].expand(generations), cond_emb[0]))
    return torch.stack(per_step).cpu().numpy()


def measure_testbed(path: str, config: str, n_prompts: int, raw: Path) -> None:
    """Writes `raw` (JSON): the per-prompt norms of up to `n_prompts` planted prompts, rewritten after each prompt;
    the prompts an earlier run left in `raw` are kept, not measured again (a stopped run resumes)."""
    cfg = load_config(ROOT / config, ["score.screening_steps=null"])
    scorer = Scorer(load_components(cfg.model), ScoreSettings.of(cfg.score), device=cfg.model.device)
    pattern = compile_marker_regex(cfg.corpus.marker_regex)
    planted = pd.read_csv(os.path.join(path, MANIFEST)).query("planted")
    planted = planted.assign(marker=planted.prompt.map(lambda p: pattern.search(p) is not None))
    # Round robin over the (marker, duplication level) cells: any first n prompts cover the cells evenly.
    chosen = planted.assign(turn=planted.groupby(["marker", "n_copies"]).cumcount()).sort_values(["turn", "marker", "n_copies"], kind="stable")
    chosen = chosen.head(n_prompts)
    generations = AttributionConfig().generations
    result = {"testbed": path, "config": config, "steps": scorer.settings.steps, "generations": scorer.settings.generations,
              "gradient_generations": generations, "prompts": [], "seconds": 0.0, "unet_samples": 0}  # fmt: skip
    if raw.exists():
        result = json.loads(raw.read_text())
    prompts, done, started = result["prompts"], {p["prompt"] for p in result["prompts"]}, time.time() - result["seconds"]
    earlier_samples = result["unet_samples"]
    for prompt in chosen.prompt[~chosen.prompt.isin(done)]:
        pid = prompt_id(prompt)
        units = word_units(scorer.tokenizer, prompt, pattern, scorer.max_length)
        variants = [prompt] + [delete_span(prompt, u.start, u.end) for u in units]
        gradient = gradient_step_norms(scorer, prompt, pid, generations)
        prompts.append({
            "prompt": prompt, "units": [u.text for u in units], "is_marker": [u.is_marker for u in units],
            "loo_norms": loo_step_norms(scorer, variants, pid, cfg.score.batch_size).tolist(),
            "grad_norms": [gradient[:, u.positions].sum(axis=1).tolist() for u in units],  # [U][T]
        })  # fmt: skip
        result.update(seconds=round(time.time() - started, 1), unet_samples=earlier_samples + scorer.work.unet_samples)
        raw.write_text(json.dumps(result))  # after every prompt: a run stopped early still has its prompts
        log.info("%s: %d/%d prompts, %.0f s", path, len(prompts), len(chosen), time.time() - started)


def loo_at(prompt: dict, k: int, noises: slice = slice(None)) -> np.ndarray:
    """Leave-one-out deltas of the prompt's units over the first k steps of these noises."""
    d = np.asarray(prompt["loo_norms"])[:, noises, :k].mean(axis=(1, 2))
    return d[0] - d[1:]


def scores_at(prompt: dict, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(leave-one-out deltas, gradient scores) of the prompt's units over the first k steps."""
    return loo_at(prompt, k), np.asarray(prompt["grad_norms"])[:, :k].mean(axis=1)


def summarise(rhos: list, top1: list, top3: list) -> dict:
    return {"spearman_mean": float(np.mean(rhos)), "spearman_sd": float(np.std(rhos, ddof=1)), "spearman_min": float(np.min(rhos)),
            "top1": float(np.mean(top1)), "top3": float(np.mean(top3))}  # fmt: skip


def compare(pairs) -> dict:
    """Over (scores, reference scores) pairs, one per prompt: Spearman, top-1 agreement, reference's first in the top 3."""
    rhos, top1, top3 = [], [], []
    for scores, reference in pairs:
        if len(scores) > 1:
            rhos.append(spearmanr(scores, reference).statistic)
        first = int(np.argmax(reference))
        top1.append(int(np.argmax(scores)) == first)
        top3.append(first in np.argsort(-scores)[:3])
    return summarise(rhos, top1, top3)


def agreement(testbed: dict, k: int) -> dict:
    """Per method, at k against the full setting (compare), and leave-one-out's marker top-1 rate at k."""
    t, prompts = testbed["steps"], testbed["prompts"]
    out = {m: compare((scores_at(p, k)[i], scores_at(p, t)[i]) for p in prompts) for i, m in enumerate(("leave_one_out", "gradient"))}
    marked = [p for p in prompts if any(p["is_marker"])]
    out["marker_top1"] = float(np.mean([p["is_marker"][int(np.argmax(loo_at(p, k)))] for p in marked])) if marked else None
    return out


def split_half(testbed: dict) -> dict:
    """The full setting against itself on other noises: full-T leave-one-out over the first half of the G noises
    against the second half (the reference's own noise floor, for reading the table)."""
    g, t = testbed["generations"], testbed["steps"]
    return compare((loo_at(p, t, slice(0, g // 2)), loo_at(p, t, slice(g // 2, g))) for p in testbed["prompts"])


def spearman_cell(m: dict) -> str:
    return f"{m['spearman_mean']:.2f} ± {m['spearman_sd']:.2f} ({m['spearman_min']:.2f})"


def markdown(results: list[dict], ks: list[int], minutes: float) -> str:
    first = results[0]
    lines = [
        HEADING,
        "",
        "Command: `OMP_NUM_THREADS=1 nice -n 10 python bench/early_attribution.py --testbed testbed/model` and `--testbed",
        "testbed/iuxray` side by side, stopped after the prompts below (a rerun resumes from runs/early_attribution.*.json),",
        f"then `--from-json` for this section. {minutes:.0f} min of measurement in all, 1 thread each, CPU: {cpu_name()}, 2 cores",
        "shared with other jobs (load 10-17).",
        "",
        "Per testbed, its planted prompts taken in turn from each duplication level and marker condition, at the testbed's",
        f"score settings (G={first['generations']}, w=7.5, T={first['steps']} DDIM steps, shared seeds). Leave-one-out (LOO) at k is d_mem",
        "over the first k steps of the same schedule and noises (what `attribution.steps` = k runs); the gradient is over",
        f"G={first['gradient_generations']} trajectories. Each is compared per prompt with its own full setting (k = T = 50; for LOO the",
        "full G): Spearman over the prompt's word units (mean ± sd over prompts, min in brackets), top-1 agreement (the",
        "full setting's first unit is first at k), the full setting's first unit within the top 3 at k, and the share of",
        "marker-bearing prompts whose first LOO unit is a marker. The row `full, other noises` is the reference against",
        "itself: full-T LOO on noises 1-2 against noises 3-4, the ranking's own noise floor (at half the G, so a low one).",
        "",
        "| testbed | prompts | units/prompt | k | LOO Spearman mean ± sd (min) | LOO top-1 agree | LOO top-3 | LOO marker top-1 "
        "| gradient Spearman mean ± sd (min) | gradient top-1 agree |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for testbed in results:
        head = f"| {testbed['testbed']} | {len(testbed['prompts'])} | {np.mean([len(p['units']) for p in testbed['prompts']]):.1f}"
        for k in ks:
            a = agreement(testbed, k)
            loo, grad = a["leave_one_out"], a["gradient"]
            marker = "n/a" if a["marker_top1"] is None else f"{a['marker_top1']:.2f}"
            lines.append(f"{head} | {k} | {spearman_cell(loo)} | {loo['top1']:.2f} | {loo['top3']:.2f} | {marker} "
                         f"| {spearman_cell(grad)} | {grad['top1']:.2f} |")  # fmt: skip
        half = split_half(testbed)
        lines.append(f"{head} | full, other noises | {spearman_cell(half)} | {half['top1']:.2f} | {half['top3']:.2f} | | | |")
    return "\n".join(lines + ["", *choice(results, ks)]) + "\n"


def choice(results: list[dict], ks: list[int]) -> list[str]:
    """The rule that sets attribution.steps' default, applied, and the cost per memorized prompt at the defaults."""
    below_t = [k for k in ks if k < results[0]["steps"]]
    fits = [k for k in below_t if all(agreement(t, k)["leave_one_out"]["spearman_mean"] >= split_half(t)["spearman_mean"] - TOLERANCE
                                      for t in results)]  # fmt: skip
    cfg = load_config(None, [])
    score, plan = ScoreSettings.of(cfg.score), attribution_settings(cfg)
    full = declared_evaluations(UNITS, plan.replace(steps=score.steps), score)
    gradient_before = declared_evaluations(0, plan.replace(steps=GRADIENT_STEPS_BEFORE), score)
    before = full - declared_evaluations(0, plan.replace(steps=score.steps), score) + gradient_before
    costs = ", ".join(f"k={k}: {declared_evaluations(UNITS, plan.replace(steps=k), score):,}" for k in below_t)
    return [
        f"Rule: the default k is the smallest whose mean LOO Spearman with the full setting is within {TOLERANCE} of the full",
        f"setting's own agreement across noises on every testbed: k = {fits[0] if fits else 'none of ' + str(below_t)}. UNet evaluations per",
        f"memorized prompt of {UNITS} units at the defaults (G={score.generations}, T={score.steps}, shared seeds, gradient over",
        f"G={plan.generations}; attribution.declared_evaluations, which tests/test_cost.py holds equal to the count): before, with",
        f"leave-one-out over all T and the gradient over {GRADIENT_STEPS_BEFORE} steps: {before:,}; with both over the first k steps: {costs}. The null",
        "model (attribution.null_model) doubles each.",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=24, help="planted prompts per testbed (a round robin over the cells)")
    parser.add_argument("--ks", default="1,2,5,10,20,30,40,50", help="early step counts to compare with the full T")
    parser.add_argument("--testbed", action="append", help="only these testbed paths (default: both)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "RESULTS.md"))
    parser.add_argument("--json", default=str(ROOT / "runs" / "early_attribution.json"), help="raw per-prompt norms (reused with --from-json)")
    parser.add_argument("--from-json", action="store_true", help="write the table from --json's files without scoring")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    ks, started = [int(k) for k in args.ks.split(",")], time.time()
    chosen = [(p, c) for p, c in TESTBEDS if not args.testbed or p in args.testbed]
    results = []
    for path, config in chosen:
        raw = Path(args.json).with_suffix(f".{Path(path).name}.json")
        if not args.from_json:
            raw.parent.mkdir(parents=True, exist_ok=True)
            measure_testbed(path, config, args.prompts, raw)
        results.append(json.loads(raw.read_text()))
    minutes = sum(r["seconds"] for r in results) / 60 if args.from_json else (time.time() - started) / 60
    write_results(args.out, HEADING, markdown(results, ks, minutes))
    print(markdown(results, ks, minutes))


if __name__ == "__main__":
    main()
