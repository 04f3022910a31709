"""Does d_mem find the planted prompts? Detection numbers on the trained testbed.

Scores every planted prompt and `testbed.eval_unique` never-duplicated prompts (a seeded sample)
with the project's `Scorer`, then reports:

- ROC AUC and TPR at 1% FPR, planted (positives) vs never-duplicated (negatives), overall and
  per duplication level, for the full score (mean over all steps) and for the first-step score
  (the norm at the first DDIM step only; with shared initial latents it equals the score of a
  `score.screening_steps=1` run, since the first step does not depend on how many follow);
- mean d_mem of planted prompts with and without `___` markers at each duplication level;
- how close the generations come to the training image: per prompt, the smallest RMS
  distance over its G generations to the image it was trained with (planted: the one fixed
  image; never-duplicated: its own image), for the guided generations the score is taken on
  (w = score.guidance_scale) and for plain conditional sampling (w = 1). At w = 7.5 this
  pixel-space model overshoots on memorized prompts (the very text-conditional noise d_mem
  measures, amplified 7.5x and clipped), so the copies show best at w = 1.

The section "Testbed detection" of `testbed.results` (bench/RESULTS.md) is replaced by the numbers.
"""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf

from cxrmem.corpus.text import count_markers, prompt_id
from cxrmem.models.loading import fingerprint_model, load_components
from cxrmem.scoring.dmem import d_mem
from cxrmem.scoring.scorer import Scorer, ScoreSettings
from cxrmem.stats import roc_auc, tpr_at_fpr
from cxrmem.testbed.dataset import MANIFEST, build_training_set
from cxrmem.testbed.train import SUMMARY

log = logging.getLogger(__name__)

SECTION = "## Testbed detection"


# -- detection metrics (pure) -----------------------------------------------------------------
def rms_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a - b||_2 / sqrt(numel) over the trailing image dims; broadcasts over the leading ones."""
    return (a - b).pow(2).flatten(-3).mean(-1).sqrt()


def detection_rows(scores: np.ndarray, frame: pd.DataFrame, levels) -> list[dict]:
    """AUC and TPR@1%FPR overall and per level; frame has columns planted, n_copies."""
    negatives = scores[~frame.planted.to_numpy()]
    rows = []
    for level in ["all", *levels]:
        chosen = frame.planted.to_numpy() & ((frame.n_copies == level).to_numpy() if level != "all" else True)
        rows.append(
            {
                "level": level,
                "n_pos": int(chosen.sum()),
                "n_neg": len(negatives),
                "auc": roc_auc(scores[chosen], negatives),
                "tpr_at_1pct_fpr": tpr_at_fpr(scores[chosen], negatives),
            }
        )
    return rows


# -- the run ----------------------------------------------------------------------------------
def evaluation_prompts(manifest: pd.DataFrame, n_unique: int, seed: int) -> pd.DataFrame:
    """Every planted prompt and a seeded sample of never-duplicated ones."""
    unique = manifest[~manifest.planted]
    sample = unique.sample(n=min(n_unique, len(unique)), random_state=seed)
    return pd.concat([manifest[manifest.planted], sample])


def training_images(model_dir: str, manifest: pd.DataFrame, marker_regex: str) -> np.ndarray:
    """Rebuild the training images from the config the model was trained with (they are seeded)."""
    with open(os.path.join(model_dir, SUMMARY), encoding="utf-8") as stream:
        tb_cfg = OmegaConf.create(json.load(stream)["testbed"])
    training_set = build_training_set(tb_cfg, marker_regex)
    if training_set.prompts != manifest.prompt.tolist():
        raise ValueError(
            f"{model_dir}/{MANIFEST} does not match the training set rebuilt from {SUMMARY}; retrain the testbed"
        )
    return training_set.images


def nearest_distances(images: torch.Tensor, own: torch.Tensor, frame: pd.DataFrame, levels) -> dict:
    """Mean over prompts of the smallest RMS distance of a prompt's generations to its training image."""
    nearest = rms_distance(images, own).min(dim=1).values.numpy()
    planted = frame.planted.to_numpy()
    return {
        "unique": float(nearest[~planted].mean()),
        **{f"planted_{level}": float(nearest[planted & (frame.n_copies == level).to_numpy()].mean()) for level in levels},
    }


def score_and_generate(scorer: Scorer, prompts: list[str], batch_size: int, shared: bool, guidance=None):
    """Step norms [N, G, T] and final images [N, G, 1, H, W] in [0, 1], at `guidance` (None: the configured w)."""
    norms, images = [], []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        encoded = scorer.encode(batch)
        latents = scorer.initial_latents([prompt_id(p) for p in batch])
        trajectory = scorer.sample(encoded.embeddings, latents, guidance=guidance, shared_first_step=shared)
        norms.append(trajectory.step_norms)
        final = trajectory.final_latents
        images.append(scorer.decode(final.flatten(0, 1)).reshape(final.shape))
        log.info("scored %d / %d prompts", start + len(batch), len(prompts))
    return torch.cat(norms), torch.cat(images)


def evaluate(cfg) -> dict:
    tb = cfg.testbed
    torch.set_num_threads(tb.num_threads)
    started = time.time()
    manifest = pd.read_csv(os.path.join(tb.out, MANIFEST))
    train_images = torch.from_numpy(training_images(tb.out, manifest, cfg.corpus.marker_regex))
    frame = evaluation_prompts(manifest, tb.eval_unique, tb.seed)
    frame = frame.assign(has_marker=[count_markers(p, cfg.corpus.marker_regex) > 0 for p in frame.prompt])

    score_cfg = OmegaConf.merge(cfg.score, {"steps": tb.eval_steps or cfg.score.steps, "screening_steps": None})
    model_cfg = OmegaConf.merge(cfg.model, {"path": tb.out})
    components = load_components(model_cfg)
    scorer = Scorer(components, ScoreSettings.of(score_cfg), device=cfg.model.device)
    shared = score_cfg.seed_mode == "shared"
    norms, generated = score_and_generate(scorer, frame.prompt.tolist(), cfg.score.batch_size, shared)

    full, nonfinite = d_mem(norms)
    first, _ = d_mem(norms[:, :, :1])
    full, first = full.numpy(), first.numpy()
    if nonfinite.any():
        raise ValueError(f"{int(nonfinite.sum())} prompts gave non-finite noise norms; the testbed model is broken")
    levels = list(tb.duplication_levels)
    _, conditional = score_and_generate(scorer, frame.prompt.tolist(), cfg.score.batch_size, shared, guidance=1.0)
    own = train_images[list(frame.index)][:, None]  # [N, 1, 1, H, W] against [N, G, 1, H, W]
    planted = frame.planted.to_numpy()

    result = {
        "model": tb.out,
        "fingerprint": fingerprint_model(model_cfg),
        "score": {"generations": score_cfg.generations, "steps": score_cfg.steps, "guidance": score_cfg.guidance_scale},
        "n_planted": int(planted.sum()),
        "n_unique": int((~planted).sum()),
        "full": detection_rows(full, frame, levels),
        "first_step": detection_rows(first, frame, levels),
        "marker": [
            {
                "level": level,
                "d_mem_marker": float(full[planted & (frame.n_copies == level).to_numpy() & frame.has_marker.to_numpy()].mean()),
                "d_mem_no_marker": float(full[planted & (frame.n_copies == level).to_numpy() & ~frame.has_marker.to_numpy()].mean()),
            }
            for level in levels
        ],
        "d_mem_unique_mean": float(full[~planted].mean()),
        "distance": {
            name: nearest_distances(images, own, frame, levels)
            for name, images in (("guided", generated), ("conditional", conditional))
        },
        "minutes": round((time.time() - started) / 60, 2),
    }
    write_results(tb.results, results_markdown(result, cfg))
    return result


# -- bench/RESULTS.md -------------------------------------------------------------------------
def results_markdown(result: dict, cfg) -> str:
    score = result["score"]
    lines = [
        SECTION,
        "",
        "Command: `cxrmem testbed evaluate --config conf/testbed.yaml`",
        "",
        f"Model `{result['model']}` (fingerprint `{result['fingerprint'][:16]}`): {result['n_planted']} planted prompts "
        f"vs {result['n_unique']} never-duplicated prompts (a seeded sample). Scorer with G={score['generations']}, "
        f"w={score['guidance']}, T={score['steps']} DDIM steps"
        + (" (fewer than the default 50, for CPU time)" if score["steps"] < 50 else "")
        + f"; {result['minutes']} min on {cfg.testbed.num_threads} CPU thread(s).",
        "",
        "| score | copies | planted | negatives | AUC | TPR at 1% FPR |",
        "|---|---|---|---|---|---|",
    ]
    for name, key in (("full (all steps)", "full"), ("first step only", "first_step")):
        for row in result[key]:
            lines.append(
                f"| {name} | {row['level']} | {row['n_pos']} | {row['n_neg']} | {row['auc']:.3f} | {row['tpr_at_1pct_fpr']:.2f} |"
            )
    lines += [
        "",
        f"Mean d_mem of planted prompts, with vs without `___` markers (never-duplicated prompts: {result['d_mem_unique_mean']:.3f}):",
        "",
        "| copies | with markers | without markers |",
        "|---|---|---|",
    ]
    lines += [f"| {m['level']} | {m['d_mem_marker']:.3f} | {m['d_mem_no_marker']:.3f} |" for m in result["marker"]]
    guided, conditional = result["distance"]["guided"], result["distance"]["conditional"]
    lines += [
        "",
        "Smallest RMS distance (images in [0, 1]) of a prompt's G generations to its training image, for the",
        f"guided generations the score is taken on (w={score['guidance']}) and for conditional sampling (w=1):",
        "",
        f"| prompts | guided, w={score['guidance']} | conditional, w=1 |",
        "|---|---|---|",
    ]
    lines += [
        f"| {'never-duplicated (own image)' if key == 'unique' else 'planted, ' + key.split('_')[1] + ' copies'} "
        f"| {value:.3f} | {conditional[key]:.3f} |"
        for key, value in guided.items()
    ]
    return "\n".join(lines) + "\n"


def replace_section(document: str, section: str) -> str:
    """Swap the markdown section that starts with SECTION for `section`, or append it."""
    start = document.find(SECTION)
    if start < 0:
        return document.rstrip("\n") + ("\n\n" if document.strip() else "") + section
    end = document.find("\n## ", start + len(SECTION))
    rest = document[end + 1 :] if end >= 0 else ""
    return document[:start] + section + ("\n" + rest if rest else "")


def write_results(path: str, section: str) -> None:
    document = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as stream:
            document = stream.read()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as stream:
        stream.write(replace_section(document, section))
