"""Does d_mem find the planted prompts? Detection numbers on the trained testbed.

Scores every planted prompt, `testbed.eval_unique` never-duplicated prompts (a seeded sample)
and every naturally duplicated prompt (a template: trained with several images, one per report;
the IU X-ray testbed has them) with the project's `Scorer`, then reports:

- ROC AUC and TPR at 1% FPR, planted (positives) vs never-duplicated (negatives), overall and
  per duplication level, for the full score (mean over all steps) and for the first-step score
  (the norm at the first DDIM step only; with shared initial latents it equals the score of a
  `score.screening_steps=1` run, since the first step does not depend on how many follow; on a
  flow-matching testbed it is 0 for every prompt: the schedule starts at sigma = 1, where the
  velocity's text difference implies no noise difference, docs/design.md "The score");
- how the templates rank against the never-duplicated prompts (AUC, share flagged at the 1% FPR
  threshold, the most-copied ones' percentiles) and against the planted ones: a template shared
  by many different images is a phrase the model learned, not a copy, and should not be flagged;
- mean d_mem of planted prompts with and without de-identification markers at each level;
- how close the generations come to the training image: per prompt, the smallest RMS
  distance over its G generations to the image it was trained with (planted: the one fixed
  image; never-duplicated: its own image), for the guided generations the score is taken on
  (w = score.guidance_scale) and for plain conditional sampling (w = 1). At w = 7.5 this
  pixel-space model overshoots on memorized prompts (the very text-conditional noise d_mem
  measures, amplified 7.5x and clipped), so the copies show best at w = 1.

Each testbed (`testbed.source`) has its own section of `testbed.results` (bench/RESULTS.md),
replaced by the numbers (cxrmem/results_page.py).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf

from cxrmem.corpus.text import count_markers, prompt_id
from cxrmem.models.loading import fingerprint_model, load_components
from cxrmem.results_page import cpu_name, write_results
from cxrmem.scoring.dmem import d_mem
from cxrmem.scoring.scorer import Scorer
from cxrmem.scoring.settings import ScoreSettings
from cxrmem.stats import roc_auc, tpr_at_fpr
from cxrmem.testbed.dataset import MANIFEST, TestbedConfig, build_training_set
from cxrmem.testbed.train import SUMMARY

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Section:
    heading: str  # the RESULTS.md section this testbed owns
    config: str  # the config the command names
    marker: str  # de-identification marker as the source writes it


# Keyed by (testbed.source, testbed.denoiser).
SECTIONS = {
    ("synthetic", "unet"): Section("## Testbed detection", "conf/testbed.yaml", "___"),
    ("iuxray", "unet"): Section("## Testbed detection: IU X-ray reports", "conf/testbed_iuxray.yaml", "XXXX"),
    ("synthetic", "sana"): Section("## Testbed detection: flow-matching transformer", "conf/testbed_dit.yaml", "___"),
}


# How the results name the sampling loop's scheduler.
SAMPLERS = {"DDIMScheduler": "DDIM", "FlowMatchEulerDiscreteScheduler": "flow-matching Euler"}


# -- detection metrics (pure) -----------------------------------------------------------------
def rms_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a - b||_2 / sqrt(numel) over the trailing image dims; broadcasts over the leading ones."""
    return (a - b).pow(2).flatten(-3).mean(-1).sqrt()


def detection_rows(scores: np.ndarray, frame: pd.DataFrame, levels) -> list[dict]:
    """AUC and TPR@1%FPR overall and per level; frame has columns planted, n_copies, kind."""
    negatives = scores[(frame.kind == "unique").to_numpy()]
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


def template_ranking(scores: np.ndarray, frame: pd.DataFrame, top: int = 5) -> dict | None:
    """Templates against never-duplicated prompts (AUC, share flagged at 1% FPR) and planted ones; None if none."""
    kind = frame.kind.to_numpy()
    templates, negatives = scores[kind == "template"], scores[kind == "unique"]
    if templates.size == 0:
        return None
    most = frame.assign(score=scores)[kind == "template"].nlargest(top, "n_copies")
    return {
        "n": int(templates.size),
        "auc_vs_unique": roc_auc(templates, negatives),
        "flagged_at_1pct_fpr": tpr_at_fpr(templates, negatives),
        "auc_planted_vs_templates": roc_auc(scores[kind == "planted"], templates),
        "most_copied": [
            {"prompt": p, "n_copies": int(n), "d_mem": float(v), "percentile": float((negatives < v).mean())}
            for p, n, v in zip(most.prompt, most.n_copies, most.score)
        ],
    }


def marker_means(full: np.ndarray, frame: pd.DataFrame, levels) -> list[dict]:
    """Mean d_mem of planted prompts with and without markers, per level."""
    planted, marked = frame.planted.to_numpy(), frame.has_marker.to_numpy()
    rows = []
    for level in levels:
        at_level = planted & (frame.n_copies == level).to_numpy()
        marked_mean, unmarked_mean = float(full[at_level & marked].mean()), float(full[at_level & ~marked].mean())
        rows.append({"level": level, "d_mem_marker": marked_mean, "d_mem_no_marker": unmarked_mean})
    return rows


# -- the run ----------------------------------------------------------------------------------
def prompt_kinds(manifest: pd.DataFrame) -> np.ndarray:
    """planted | template (unplanted, trained with several images) | unique (unplanted, one image, seen once)."""
    planted, several = manifest.planted.to_numpy(), (manifest.n_images > 1).to_numpy()
    return np.select([planted, several], ["planted", "template"], "unique")


def evaluation_prompts(manifest: pd.DataFrame, n_unique: int, seed: int) -> pd.DataFrame:
    """Every planted prompt, a seeded sample of never-duplicated ones and every template, with a `kind` column."""
    manifest = manifest.assign(kind=prompt_kinds(manifest))
    unique = manifest[manifest.kind == "unique"]
    sample = unique.sample(n=min(n_unique, len(unique)), random_state=seed)
    return pd.concat([manifest[manifest.kind == "planted"], sample, manifest[manifest.kind == "template"]])


def training_images(model_dir: str, manifest: pd.DataFrame, corpus_cfg) -> np.ndarray:
    """Each prompt's first training image, rebuilt from the config the model was trained with (they are seeded)."""
    with open(os.path.join(model_dir, SUMMARY), encoding="utf-8") as stream:
        tb_cfg = OmegaConf.merge(OmegaConf.structured(TestbedConfig), json.load(stream)["testbed"])
    training_set = build_training_set(tb_cfg, corpus_cfg)
    if training_set.prompts != manifest.prompt.tolist():
        raise ValueError(
            f"{model_dir}/{MANIFEST} does not match the training set rebuilt from {SUMMARY} and the config's corpus "
            "settings (corpus.path, corpus.sections, corpus.max_reports); retrain the testbed or use its training config"
        )
    return training_set.images[: len(training_set.prompts)]


def nearest_distances(images: torch.Tensor, own: torch.Tensor, frame: pd.DataFrame, levels) -> dict:
    """Mean over prompts of the smallest RMS distance of a prompt's generations to its training image."""
    nearest = rms_distance(images, own).min(dim=1).values.numpy()
    planted = frame.planted.to_numpy()
    return {
        "unique": float(nearest[~planted].mean()),
        **{f"planted_{level}": float(nearest[planted & (frame.n_copies == level).to_numpy()].mean()) for level in levels},
    }


def score_and_generate(scorer: Scorer, prompts: list[str], batch_size: int, shared: bool, guidance=None, ids=None):
    """Step norms [N, G, T] and final images [N, G, 1, H, W] in [0, 1], at `guidance` (None: the configured w).

    The initial noise is seeded by `ids` (default: each prompt's own id), so that two texts of one
    prompt can start from the same noise."""
    ids = [prompt_id(p) for p in prompts] if ids is None else list(ids)
    norms, images = [], []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        encoded = scorer.encode(batch)
        latents = scorer.initial_latents(ids[start : start + batch_size])
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
    train_images = torch.from_numpy(training_images(tb.out, manifest, cfg.corpus))
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
    # Distances to "the" training image only for prompts that have one (not templates).
    single = (frame.kind != "template").to_numpy()
    _, conditional = score_and_generate(scorer, frame.prompt[single].tolist(), cfg.score.batch_size, shared, guidance=1.0)
    own = train_images[list(frame.index[single])][:, None]  # [N, 1, 1, H, W] against [N, G, 1, H, W]
    kind = frame.kind.to_numpy()

    result = {
        "model": tb.out,
        "source": tb.source,
        "fingerprint": fingerprint_model(model_cfg),
        "score": {"generations": score_cfg.generations, "steps": score_cfg.steps, "guidance": score_cfg.guidance_scale,
                  "sampler": SAMPLERS.get(type(components.scheduler).__name__, type(components.scheduler).__name__)},
        "n_planted": int((kind == "planted").sum()),
        "n_unique": int((kind == "unique").sum()),
        "full": detection_rows(full, frame, levels),
        "first_step": detection_rows(first, frame, levels),
        "templates": {"full": template_ranking(full, frame), "first_step": template_ranking(first, frame)},
        "marker": marker_means(full, frame, levels),
        "d_mem_unique_mean": float(full[kind == "unique"].mean()),
        "distance": {
            name: nearest_distances(images, own, frame[single], levels)
            for name, images in (("guided", generated[torch.tensor(single)]), ("conditional", conditional))
        },
        "minutes": round((time.time() - started) / 60, 2),
    }
    section = SECTIONS.get((tb.source, tb.denoiser))
    if section is None:
        raise ValueError(f"no bench/RESULTS.md section for testbed.source={tb.source} with testbed.denoiser={tb.denoiser}; "
                         f"evaluate one of {sorted(SECTIONS)}")  # fmt: skip
    write_results(tb.results, section.heading, results_markdown(result, cfg, section))
    return result


# -- bench/RESULTS.md -------------------------------------------------------------------------
def results_markdown(result: dict, cfg, section: Section) -> str:
    score = result["score"]
    lines = [
        section.heading,
        "",
        f"Command: `cxrmem testbed evaluate --config {section.config}`",
        "",
        f"Model `{result['model']}` (fingerprint `{result['fingerprint'][:16]}`): {result['n_planted']} planted prompts "
        f"vs {result['n_unique']} never-duplicated prompts (a seeded sample). Scorer with G={score['generations']}, "
        f"w={score['guidance']}, T={score['steps']} {score['sampler']} steps"
        + (" (fewer than the default 50, for CPU time)" if score["steps"] < 50 else "")
        + f"; {result['minutes']} min on {cfg.testbed.num_threads} CPU thread(s), CPU: {cpu_name()}.",
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
        f"Mean d_mem of planted prompts, with vs without `{section.marker}` markers (never-duplicated prompts: {result['d_mem_unique_mean']:.3f}):",
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
    return "\n".join(lines + template_markdown(result["templates"])) + "\n"


def template_markdown(templates: dict) -> list[str]:
    """Lines on how the naturally duplicated prompts rank; none when the testbed has no templates."""
    if templates["full"] is None:
        return []
    lines = [
        "",
        f"Naturally duplicated prompts ({templates['full']['n']} templates, each trained with one different image per",
        "report) against the never-duplicated prompts and the planted ones; flagged: above the 1% FPR threshold",
        "of the never-duplicated prompts (the same threshold as TPR at 1% FPR):",
        "",
        "| score | AUC templates vs never-duplicated | templates flagged | AUC planted vs templates |",
        "|---|---|---|---|",
    ]
    for name, key in (("full (all steps)", "full"), ("first step only", "first_step")):
        row = templates[key]
        lines.append(
            f"| {name} | {row['auc_vs_unique']:.3f} | {row['flagged_at_1pct_fpr']:.2f} | {row['auc_planted_vs_templates']:.3f} |"
        )
    lines += [
        "",
        "The most-copied templates: d_mem and its percentile among the never-duplicated prompts:",
        "",
        "| template | copies | full d_mem | percentile | first-step d_mem | percentile |",
        "|---|---|---|---|---|---|",
    ]
    for full, first in zip(templates["full"]["most_copied"], templates["first_step"]["most_copied"]):
        lines.append(
            f"| {full['prompt']} | {full['n_copies']} | {full['d_mem']:.3f} | {full['percentile']:.2f} "
            f"| {first['d_mem']:.3f} | {first['percentile']:.2f} |"
        )
    return lines
