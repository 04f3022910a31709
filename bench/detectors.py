"""Benchmark (not a test): every memorization detector side by side on testbeds with known answers.

For each testbed directory (a trained diffusers model with `manifest.csv`: prompt, n_copies,
planted), the evaluation set is every planted prompt, a seeded sample of never-duplicated
prompts (n_copies == 1) and, where the testbed has them, a seeded sample of naturally duplicated
prompts (n_copies > 1, not planted). Each detector of cxrmem/detectors.py runs on it through
`Scorer.detect`, one detector at a time, so that its CPU time is its own. Reported:

- AUC and TPR at 1% FPR, planted (positives) against never-duplicated prompts (negatives).
  TPR at 1% FPR is `cxrmem.stats.tpr_at_fpr`: the share of positives strictly above the
  (floor(0.01 n_neg) + 1)-th largest negative score, so at most 1% of negatives are flagged and
  positives tied with that negative do not count (with 200 negatives: above the 3rd largest);
- natural duplicates, ranked apart: AUC of naturally duplicated against never-duplicated
  prompts (0.5: ranked like any prompt; 1: ranked like memorized ones);
- UNet sample evaluations per prompt (declared costs, REGISTRY; the shared unconditional passes
  spread over a batch) and derivative samples (JVPs and VJPs) per prompt; CPU seconds per prompt (process time);
- cascade recall: share of the full d_mem's top 1% of the evaluation set that the screen's top q%
  holds, q in {2, 5, 10}, with the cascade's UNet evaluations per prompt (screen + q x full).

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python bench/detectors.py --testbed testbed/model testbed/iuxray
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf

from cxrmem.corpus.text import prompt_id
from cxrmem.detectors import REGISTRY, DetectorSettings, oriented, screen_recall
from cxrmem.models.loading import fingerprint_model, load_components
from cxrmem.models.settings import ModelConfig
from cxrmem.results_page import cpu_name, write_results
from cxrmem.scoring.scorer import Scorer
from cxrmem.scoring.settings import ScoreConfig, ScoreSettings
from cxrmem.stats import roc_auc, top_percent_mask, tpr_at_fpr

SECTION = "## Detectors"
SCREEN_PERCENTS = (2.0, 5.0, 10.0)
FULL = "d_mem full"


def runs(steps: int, generations: int) -> list[tuple[str, str, DetectorSettings]]:
    """(label, detector, settings): the screens, then the full d_mem every screen is measured against."""
    return [
        ("d_mem k=1 G=1", "dmem", DetectorSettings(generations=1, steps=1)),
        ("d_mem k=1 G=2", "dmem", DetectorSettings(generations=2, steps=1)),
        ("d_mem k=1 G=4", "dmem", DetectorSettings(generations=4, steps=1)),
        ("d_mem k=2 G=1", "dmem", DetectorSettings(generations=1, steps=2)),
        ("sharpness G=1", "sharpness", DetectorSettings(generations=1)),
        ("anisotropy G=1", "anisotropy", DetectorSettings(generations=1)),
        ("attention entropy G=1", "attention_entropy", DetectorSettings(generations=1)),
        ("latent update k=1 G=1", "latent_update", DetectorSettings(generations=1, steps=1)),
        ("latent update k=2 G=1", "latent_update", DetectorSettings(generations=1, steps=2)),
        ("hessian difference G=1", "hessian_difference", DetectorSettings(generations=1)),
        ("bright ending G=1", "bright_ending", DetectorSettings(generations=1)),
        (FULL, "dmem", DetectorSettings(generations=generations, steps=steps)),
    ]


def evaluation_set(manifest: pd.DataFrame, n_unique: int, n_natural: int, seed: int) -> pd.DataFrame:
    planted = manifest[manifest.planted]
    unique = manifest[~manifest.planted & (manifest.n_copies == 1)]
    natural = manifest[~manifest.planted & (manifest.n_copies > 1)]
    parts = [planted, unique.sample(n=min(n_unique, len(unique)), random_state=seed)]
    if len(natural):
        parts.append(natural.sample(n=min(n_natural, len(natural)), random_state=seed))
    frame = pd.concat(parts).reset_index(drop=True)
    return frame.assign(kind=np.where(frame.planted, "planted", np.where(frame.n_copies == 1, "unique", "natural")))


def run_detector(scorer: Scorer, frame: pd.DataFrame, name: str, settings: DetectorSettings, batch: int):
    """Columns of one detector over the evaluation set, and its CPU seconds per prompt."""
    columns: dict[str, list] = {}
    started = time.process_time()
    for start in range(0, len(frame), batch):
        prompts = frame.prompt.iloc[start : start + batch].tolist()
        for key, values in scorer.detect(prompts, [prompt_id(p) for p in prompts], [name], settings).items():
            columns.setdefault(key, []).append(values)
    seconds = (time.process_time() - started) / len(frame)
    return {key: np.concatenate(parts) for key, parts in columns.items()}, seconds


def detection_row(scores: np.ndarray, frame: pd.DataFrame, name: str) -> dict:
    s = oriented(scores, name)
    kind = frame.kind.to_numpy()
    natural = s[kind == "natural"]
    return {
        "auc": roc_auc(s[kind == "planted"], s[kind == "unique"]),
        "tpr": tpr_at_fpr(s[kind == "planted"], s[kind == "unique"]),
        "natural_auc": roc_auc(natural, s[kind == "unique"]) if natural.size else None,
        "natural_top1": float(np.mean(top_percent_mask(s, 1.0)[0][kind == "natural"])) if natural.size else None,
    }


def bench_testbed(path: str, args) -> dict:
    manifest = pd.read_csv(os.path.join(path, "manifest.csv"))
    frame = evaluation_set(manifest, args.n_unique, args.n_natural, args.seed)
    model_cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), {"path": path, "device": "cpu"})
    components = load_components(model_cfg)
    score_cfg = OmegaConf.merge(OmegaConf.structured(ScoreConfig), {"steps": args.steps, "seed": args.seed})
    scorer = Scorer(components, ScoreSettings.of(score_cfg), device="cpu")
    rows, scores = [], {}
    chosen = [r for r in runs(args.steps, args.generations) if not args.detectors or r[1] in args.detectors or r[0] == FULL]
    for label, name, settings in chosen:
        columns, seconds = run_detector(scorer, frame, name, settings, args.batch_size)
        cost = REGISTRY[name].cost_of(settings.generations, settings.steps, True, args.steps)
        evaluations = cost.per_prompt + cost.per_batch / args.batch_size
        for key, values in columns.items():
            row_label = label if key == name else f"{label}: {key.replace(name + '_', '')}"
            scores[row_label] = (name, values)
            rows.append({"label": row_label, "evaluations": evaluations, "jvps": cost.jvps_per_prompt + cost.vjps_per_prompt, "cpu_s": seconds,
                         **detection_row(values, frame, name)})
        print(f"{path}: {label} done ({seconds:.3f} CPU s/prompt)", flush=True)
    full_evaluations = next(r["evaluations"] for r in rows if r["label"] == FULL)
    for row in rows:
        name, values = scores[row["label"]]
        row["recall"] = {q: screen_recall(scores[FULL][1], values, name, 1.0, q) for q in SCREEN_PERCENTS}
        row["cascade"] = {q: row["evaluations"] + q / 100 * full_evaluations for q in SCREEN_PERCENTS}
    counts = frame.kind.value_counts().to_dict()
    if args.scores_dir:  # per prompt: kind, n_copies and every score, to rank the natural templates one by one
        frame.assign(**{label: values for label, (_, values) in scores.items()}).to_csv(
            os.path.join(args.scores_dir, f"{os.path.basename(os.path.normpath(path))}_scores.csv"), index=False
        )
    return {"path": path, "fingerprint": fingerprint_model(model_cfg), "counts": counts, "rows": rows}


def table(result: dict) -> list[str]:
    natural = result["counts"].get("natural", 0) > 0
    head = "| detector | UNet evals / prompt | JVPs+VJPs / prompt | CPU s / prompt | AUC | TPR@1%FPR |"
    head += " natural dup. AUC | natural dup. in top 1% |" if natural else ""
    head += "".join(f" recall q={q:g}% (evals/prompt) |" for q in SCREEN_PERCENTS)
    lines = [head, "|" + "---|" * head.count(" |")]
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    for r in result["rows"]:
        line = f"| {r['label']} | {r['evaluations']:.2f} | {r['jvps']} | {r['cpu_s']:.3f} | {fmt(r['auc'], '.3f')} | {fmt(r['tpr'], '.2f')} |"
        line += f" {fmt(r['natural_auc'], '.3f')} | {fmt(r['natural_top1'], '.2f')} |" if natural else ""
        line += "".join(f" {r['recall'][q]:.2f} ({r['cascade'][q]:.1f}) |" for q in SCREEN_PERCENTS)
        lines.append(line)
    return lines


def markdown(results: list[dict], args, minutes: float) -> str:
    lines = [
        SECTION,
        "",
        f"Command: `OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python bench/detectors.py {' '.join(sys.argv[1:])}`"
        f" ({cpu_name()}, {args.threads} thread, {minutes:.1f} min). Full d_mem: G={args.generations}, T={args.steps}, w=7.5,"
        " shared seeds; the screens run on the first timestep of that T-step schedule. Costs: UNet sample evaluations per"
        f" prompt as declared in cxrmem/detectors.py (shared unconditional passes spread over batches of {args.batch_size});"
        " TPR@1%FPR: positives strictly above the (floor(0.01 n_neg)+1)-th largest negative (cxrmem.stats.tpr_at_fpr);"
        " recall: share of the full d_mem's top 1% of the evaluation set inside the screen's top q%, with the cascade's"
        " UNet evaluations per prompt (screen + q x full) in brackets.",
    ]
    for result in results:
        counts = result["counts"]
        lines += ["", f"`{result['path']}` (fingerprint `{result['fingerprint'][:16]}`): {counts.get('planted', 0)} planted,"
                  f" {counts.get('unique', 0)} never-duplicated, {counts.get('natural', 0)} naturally duplicated prompts.", ""]
        lines += table(result)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--testbed", nargs="+", default=["testbed/model"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--n-unique", type=int, default=200)
    parser.add_argument("--n-natural", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", default="bench/RESULTS.md")
    parser.add_argument("--detectors", nargs="+", help="bench only these REGISTRY detectors (and the full d_mem)")
    parser.add_argument("--scores-dir", default=None, help="also write <testbed>_scores.csv (every prompt's scores) here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    results = [bench_testbed(path, args) for path in args.testbed if os.path.exists(os.path.join(path, "manifest.csv"))]
    text = markdown(results, args, (time.time() - started) / 60)
    print(text)
    write_results(args.results, text.split("\n", 1)[0], text)


if __name__ == "__main__":
    main()
