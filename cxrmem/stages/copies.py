"""`cxrmem copies`: do the memorized prompts' generations copy training images? copies.parquet, summary["copies"].

    images.source -> the image index (stages/image_index.py, built once, resumable)
    memorized set + a seeded random sample of other prompts (controls)
      -> per guidance (the scoring one, and copies.second_guidance): N generations per prompt,
         embedded on the model workers (ModelWorker.copies) -> exact top-k search here
      -> copy threshold calibrated on the controls -> per-prompt evidence rows
      -> each mitigation strategy on the memorized prompts mitigation ran it on (its stratified sample,
         cut where its sequential rule stopped it), against that threshold
    -> copies.parquet, figures/copies_<prompt_id>.npz (generation, nearest image), summary["copies"]

Off when images.source is empty. The workers return embeddings, not images (except the few the
figures need), so the search and the index stay in this process.
"""

from __future__ import annotations

import io
import logging
from typing import Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from cxrmem.copies.embedders import embedder_fingerprint
from cxrmem.copies.evidence import COPIES_SCHEMA, Threshold, pick_controls
from cxrmem.copies.find import evidence, search
from cxrmem.copies.images import read_image
from cxrmem.copies.settings import CopiesSettings
from cxrmem.judgement import halves_copying, judge_strategies
from cxrmem.mitigation_sizing import sample_record, stratified_sample
from cxrmem.runfiles import Run, RunLayout
from cxrmem.scoring.device import resolve_device
from cxrmem.stages import image_index
from cxrmem.stages.analyze import read_known_memorized
from cxrmem.stages.worker import (
    CopiesOfPrompts,
    LocalModel,
    SkippedStrategies,
    embedder_settings,
    map_with_progress,
    memorized_stage,
    stamped,
)
from cxrmem.stats import roc_auc
from cxrmem.storage import Store
from cxrmem.summary import CopiesSection

log = logging.getLogger(__name__)


def guidances(cfg) -> list[float]:
    first = cfg.copies.guidance if cfg.copies.guidance is not None else cfg.score.guidance_scale
    second = cfg.copies.second_guidance
    return [float(first)] + ([float(second)] if second is not None and float(second) != float(first) else [])


def checked_strategies(cfg, skipped=()) -> list[str]:
    """The mitigation strategies whose generations are checked for copies too (copies.strategies), `original` aside,
    and those the model cannot run (`skipped`, SkippedStrategies): text rewrites generate from the rewritten text,
    embedding-level ones from the changed embedding."""
    return [s for s in cfg.mitigation.strategies if s != "original" and s not in skipped] if cfg.copies.strategies else []


def unrunnable_strategies(models, cfg) -> dict[str, str]:
    """The copies.strategies the model's denoiser cannot run, with the reason, as a worker decides it."""
    if not checked_strategies(cfg):
        return {}
    no_prompts = pd.DataFrame({"prompt_id": [], "prompt": []})  # one empty chunk: one worker answers
    ((_, skipped),) = models.map(SkippedStrategies(), no_prompts, tuple(checked_strategies(cfg)))
    return skipped


def checked_prompts(cfg, out: Run, memorized: pd.DataFrame) -> pd.DataFrame:
    """The memorized prompts and the controls, with their source ids (and patients where the corpus has them)."""
    names = out.store.parquet_schema(out.layout.prompts).names
    columns = ["prompt_id", "prompt", "source_ids"] + (["subject_id"] if "subject_id" in names else [])
    prompts = out.store.read_table(out.layout.prompts, columns=columns).to_pandas().set_index("prompt_id")
    ids = [p for p in memorized["prompt_id"] if p in prompts.index]
    controls = pick_controls(prompts.index.tolist(), set(ids), cfg.copies.n_controls, cfg.copies.seed)
    groups = ["memorized"] * len(ids) + ["control"] * len(controls)
    return prompts.loc[ids + controls].reset_index().assign(group=groups)


def embed_and_search(models, frame: pd.DataFrame, what: str, cfg, index: torch.Tensor, *args) -> tuple:
    """(sims, rows [P, N, k], the texts generated from, kept generations, fidelity [P]) of `frame` through `models.copies`."""
    results, _ = map_with_progress(models, CopiesOfPrompts(), frame[["prompt_id", "prompt"]], what, cfg.ray.progress_every_s, *args)
    queries = torch.from_numpy(np.concatenate([r[0] for r in results]))
    sims, rows = search(queries, index, CopiesSettings.of(cfg.copies), resolve_device("auto"))
    kept = {pid: g for r in results for pid, g in r[2].items()}
    return sims, rows, [t for r in results for t in r[1]], kept, [f for r in results for f in r[3]]


def strategy_prompts(strategies: list[str], sample: pd.DataFrame, mitigation: Optional[pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Per checked strategy, the sampled memorized prompts its copies are checked on: those mitigation ran it on (its
    sample, cut where the sequential rule stopped it), else the whole sample (cxrmem/mitigation_sizing.py)."""
    ran = mitigation.groupby("strategy")["prompt_id"].agg(set) if mitigation is not None else {}
    return {s: sample[sample["prompt_id"].isin(ran[s])] if s in ran else sample for s in strategies}


def check_guidance(models, frame, images, index, cfg, guidance: float, fingerprint: str, keep_ids, checks: dict) -> tuple[list[pa.Table], Threshold, dict]:
    """copies.parquet rows at one guidance (the prompts, then each mitigation strategy on its `checks` prompts,
    strategy_prompts), its threshold, the kept generations."""
    settings = CopiesSettings.of(cfg.copies)
    sims, rows, _, kept, faithful = embed_and_search(models, frame, f"checked at w={guidance:g}", cfg, index, guidance, "none", keep_ids)
    table, threshold = evidence(frame, sims, rows, images, settings, guidance, fingerprint, fidelity=faithful)
    tables = [table]
    for strategy, memorized in checks.items():
        if not len(memorized):
            continue
        s_sims, s_rows, texts, _, s_faithful = embed_and_search(models, memorized, f"{strategy} at w={guidance:g}", cfg, index, guidance, strategy)
        rewritten = memorized.assign(prompt=texts)
        tables.append(evidence(rewritten, s_sims, s_rows, images, settings, guidance, fingerprint, threshold, strategy, s_faithful)[0])
    best = table.to_pandas().set_index("prompt_id")
    chosen = {pid: (g[int(best.loc[pid, "best_generation"])], best.loc[pid]) for pid, g in kept.items()}
    return tables, threshold, chosen


def guidance_summary(rows: pd.DataFrame, threshold: Threshold, known: Optional[set]) -> dict:
    """AUC of memorized vs controls, copies per group, re-identification, and precision/recall against known ids."""
    own = rows[rows["strategy"] == "none"]
    memorized, controls = own[own["group"] == "memorized"], own[own["group"] == "control"]
    out = {
        "threshold": threshold.value, "auc": roc_auc(memorized["max_similarity"], controls["max_similarity"]),
        "memorized": len(memorized), "memorized_copies": int(memorized["is_copy"].sum()),
        "controls": len(controls), "control_copies": int(controls["is_copy"].sum()),
        "nearest_own_study": int(memorized["same_study"].sum()), "nearest_own_patient": int(memorized["same_patient"].sum()),
        "copies_same_study": int((memorized["is_copy"] & memorized["same_study"]).sum()),
        "copies_same_patient": int((memorized["is_copy"] & memorized["same_patient"]).sum()),
        "strategies": {s: {"copies": int(g["is_copy"].sum()), "copy_share_mean": float(g["copy_share"].mean())}
                       for s, g in rows[rows["strategy"] != "none"].groupby("strategy")},
    }  # fmt: skip
    if known is not None:
        truth, flagged = own["prompt_id"].isin(known).to_numpy(), own["is_copy"].to_numpy()
        hits = int((truth & flagged).sum())
        out["known"] = {"checked_known": int(truth.sum()), "precision": hits / flagged.sum() if flagged.any() else None,
                        "recall": hits / truth.sum() if truth.any() else None}  # fmt: skip
    return out


def judgement(checked: pd.DataFrame, mitigation: Optional[pd.DataFrame], guidance: float, cfg, strategies: list[str]) -> dict:
    """Per strategy: copy rate (paired against original), fidelity, d_mem change and cost (cxrmem/judgement.py),
    and the strategies that halve the copy rate with fidelity within 10 points."""
    order = ["original"] + strategies
    rows = judge_strategies(checked, mitigation, guidance, order)
    return {"guidance": guidance, "strategies": [r.as_dict() for r in rows], "halve_copying": halves_copying(rows),
            "fidelity_measure": cfg.fidelity.measure}


def save_figures(out: Run, chosen: dict[float, dict]) -> list[str]:
    """figures/copies_<prompt_id>.npz: per guidance i the best generation, its nearest training image and their similarity."""
    arrays: dict[str, dict] = {}
    for i, (guidance, by_prompt) in enumerate(chosen.items()):
        for pid, (generation, row) in by_prompt.items():
            nearest = read_image(out.store.read_bytes(row["nearest_path"]), row["nearest_path"])
            arrays.setdefault(pid, {}).update({f"generation_{i}": generation, f"nearest_{i}": nearest,
                                               f"similarity_{i}": np.float32(row["max_similarity"]), f"guidance_{i}": np.float32(guidance)})  # fmt: skip
    uris = []
    for pid, named in arrays.items():
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **named)
        uris.append(out.layout.figure(f"copies_{pid}.npz"))
        out.store.write_bytes(uris[-1], buffer.getvalue())
    return uris


def build_image_index(cfg, store: Store, embed_rows: image_index.EmbedRows) -> dict:
    """The index job alone: the audit runs it on a Ray actor pool before the model actors hold the devices."""
    return image_index.build_index(cfg, store, embedder_fingerprint(embedder_settings(cfg)), embed_rows)[2]


def run(cfg, out: Optional[Run] = None, models: Optional[LocalModel] = None, embed_rows=image_index.local_rows) -> CopiesSection:
    """Check the run's memorized set for copies of training images with `models` (default: a model with its VAE in
    this process); the images not yet in the index are embedded by `embed_rows` first."""
    out = out or Run.of(cfg)
    store, layout = out.store, out.layout
    fingerprint = embedder_fingerprint(embedder_settings(cfg))  # from the files: the embedder loads on the workers
    with memorized_stage(cfg, out, "copies", None, models, need_vae=True) as (memorized, models, identity):
        images, index, built = image_index.build_index(cfg, store, fingerprint, embed_rows)
        # The harm is checked on mitigation's seeded, marker-stratified sample of the memorized set (mitigation.sample_size):
        # the copy rate is an estimate over it, and the strategies' copies are judged on the same prompts.
        c = cfg.mitigation
        sample = stratified_sample(memorized, cfg.corpus.marker_regex, c.sample_size, c.seed)
        frame = checked_prompts(cfg, out, sample)
        keep_ids = frozenset(frame["prompt_id"][frame["group"] == "memorized"].head(cfg.report.top_prompts))
        known = read_known_memorized(store, cfg.analyze.known_memorized) if cfg.analyze.known_memorized else None
        tables, per_guidance, chosen = [], {}, {}
        mitigation = store.read_table(layout.mitigation).to_pandas() if store.exists(layout.mitigation) else None
        skipped = unrunnable_strategies(models, cfg)
        strategies = checked_strategies(cfg, skipped)
        checks = strategy_prompts(strategies, frame[frame["group"] == "memorized"], mitigation)
        for guidance in guidances(cfg):
            rows, threshold, chosen[guidance] = check_guidance(models, frame, images, index, cfg, guidance, fingerprint, keep_ids, checks)
            tables += rows
            checked = pa.concat_tables(rows).to_pandas()
            per_guidance[f"w={guidance:g}"] = guidance_summary(checked, threshold, known)
            per_guidance[f"w={guidance:g}"]["judgement"] = judgement(checked, mitigation, guidance, cfg, strategies)
        store.write_table(stamped(pa.concat_tables(tables).cast(COPIES_SCHEMA), identity), layout.copies)
        section = copies_summary(cfg, len(frame), per_guidance, threshold, built, layout, save_figures(out, chosen), skipped)
        section.model = identity
        section.sample = sample_record(memorized, sample, cfg.corpus.marker_regex, c.sample_size, c.seed)
        out.write_sections(section)
    log.info("copies: %s", section.headline)
    return section


def copies_summary(cfg, n_prompts: int, per_guidance: dict, threshold: Threshold, built: dict, layout: RunLayout, figures: list[str],
                   skipped: dict) -> CopiesSection:  # fmt: skip
    headline = {
        name: f"{g['memorized_copies']}/{g['memorized']} memorized prompts copy a training image "
        f"({g['control_copies']}/{g['controls']} controls; AUC {'n/a' if g['auc'] is None else format(g['auc'], '.3f')})"
        for name, g in per_guidance.items()
    }
    return CopiesSection(
        headline=headline, prompts=n_prompts, guidances=per_guidance, rule=threshold.rule, threshold_quantile=threshold.quantile,
        generations=cfg.copies.generations, top_k=cfg.copies.top_k, embedder=cfg.copies.embedder,
        strategies_checked=checked_strategies(cfg, skipped), index=built, copies=layout.copies, figures=figures, skipped=skipped,
    )  # fmt: skip
