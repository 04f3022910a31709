"""`cxrmem copies`: do the memorized prompts' generations copy training images? copies.parquet, summary["copies"].

    images.source -> the image index (stages/image_index.py, built once, resumable)
    memorized set + a seeded random sample of other prompts (controls)
      -> per guidance (the scoring one, and copies.second_guidance): N generations per prompt,
         embedded on the model workers (ModelWorker.copies) -> exact top-k search here; at the guidance
         whose settings are mitigation's, the pairs it generated are taken from it (copies_reuse.py)
      -> copy threshold calibrated on the controls -> per-prompt evidence rows
      -> each mitigation strategy on the memorized prompts mitigation ran it on (its stratified sample,
         cut where its sequential rule stopped it), against that threshold
      -> the copy-rate rule: a strategy whose paired copy-rate change is still undecided goes on over the
         rest of the memorized set, a look at a time, until decided (continue_undecided)
    -> copies.parquet, figures/copies_<prompt_id>.npz (generation, nearest image), summary["copies"]

Off when images.source is empty. The workers return embeddings, not images (except the few the
figures need), so the search and the index stay in this process.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from cxrmem.copies.embedders import embedder_fingerprint
from cxrmem.copies.evidence import COPIES_SCHEMA, Threshold, pick_controls
from cxrmem.copies.find import evidence, search
from cxrmem.copies.images import read_image
from cxrmem.copies.settings import CopiesSettings, guidances
from cxrmem.findings import MIN_PAIRED_PROMPTS
from cxrmem.judgement import halves_copying, judge_strategies
from cxrmem.mitigation_sizing import copy_rate_change, decision, sample_record, stratified_sample
from cxrmem.runfiles import Run, RunLayout
from cxrmem.scoring.device import resolve_device
from cxrmem.stages import copies_reuse, image_index
from cxrmem.stages.analyze import read_known_memorized
from cxrmem.stages.copies_reuse import UNMITIGATED
from cxrmem.stages.worker import (
    ChangedPrompts,
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
from cxrmem.strategies import BASELINE
from cxrmem.summary import CopiesSection

log = logging.getLogger(__name__)


def checked_strategies(cfg, skipped=()) -> list[str]:
    """The mitigation strategies whose generations are checked for copies too (copies.strategies), `original` aside,
    and those the model cannot run (`skipped`, SkippedStrategies): text rewrites generate from the rewritten text,
    embedding-level ones from the changed embedding."""
    return [s for s in cfg.mitigation.strategies if s != BASELINE and s not in skipped] if cfg.copies.strategies else []


def unrunnable_strategies(models, cfg) -> dict[str, str]:
    """The copies.strategies the model's denoiser cannot run, with the reason, as a worker decides it."""
    asked = checked_strategies(cfg)
    if not asked:
        return {}
    no_prompts = pd.DataFrame({"prompt_id": [], "prompt": []})  # one empty chunk: one worker answers
    ((_, skipped),) = models.map(SkippedStrategies(), no_prompts, tuple(asked))
    return skipped


def prompt_rows(out: Run) -> pd.DataFrame:
    """The run's prompts by id, with their source ids (and patients where the corpus has them)."""
    names = out.store.parquet_schema(out.layout.prompts).names
    columns = ["prompt_id", "prompt", "source_ids"] + (["subject_id"] if "subject_id" in names else [])
    return out.store.read_table(out.layout.prompts, columns=columns).to_pandas().set_index("prompt_id")


def checked_prompts(cfg, prompts: pd.DataFrame, memorized: pd.DataFrame) -> pd.DataFrame:
    """The memorized prompts and the controls, in `prompts`' columns (prompt_rows) and a `group`."""
    ids = [p for p in memorized["prompt_id"] if p in prompts.index]
    controls = pick_controls(prompts.index.tolist(), set(ids), cfg.copies.n_controls, cfg.copies.seed)
    groups = ["memorized"] * len(ids) + ["control"] * len(controls)
    return prompts.loc[ids + controls].reset_index().assign(group=groups)


@dataclass
class Checked:
    """One set of prompts generated (or taken from mitigation) and searched at one guidance, in the frame's order."""

    sims: np.ndarray  # [P, N, k]
    rows: np.ndarray  # [P, N, k] index rows
    texts: list  # the texts generated from
    kept: dict  # prompt_id -> grey generations [N, H, W] of those in keep_ids
    fidelity: list  # [P]
    reused: int  # prompts taken from mitigation's generations (the others were generated here)


def embed_and_search(models, frame: pd.DataFrame, what: str, cfg, index: torch.Tensor, reused: dict, *args) -> Checked:
    """`frame`'s prompts searched: those in `reused` ({prompt_id: (embeddings [N, D], text, fidelity)}, mitigation's:
    cxrmem/stages/copies_reuse.py) as they are, the others generated and embedded through `models` (CopiesOfPrompts)."""
    fresh = frame[~frame["prompt_id"].isin(reused)][["prompt_id", "prompt"]]
    results = map_with_progress(models, CopiesOfPrompts(), fresh, what, cfg.ray.progress_every_s, *args)[0] if len(fresh) else []
    made = zip([q for r in results for q in r[0]], [t for r in results for t in r[1]], [f for r in results for f in r[3]])
    found = {**dict(zip(fresh["prompt_id"], made)), **reused}
    ordered = [found[pid] for pid in frame["prompt_id"]]
    queries = torch.from_numpy(np.stack([q for q, _, _ in ordered]))
    sims, rows = search(queries, index, CopiesSettings.of(cfg.copies), resolve_device("auto"))
    kept = {pid: g for r in results for pid, g in r[2].items()}
    return Checked(sims, rows, [t for _, t, _ in ordered], kept, [f for _, _, f in ordered], len(frame) - len(fresh))


def strategy_prompts(strategies: list[str], sample: pd.DataFrame, mitigation: Optional[pd.DataFrame]) -> tuple[dict, dict]:
    """Per checked strategy, from mitigation.parquet (cxrmem/mitigation_sizing.py):
    - the sampled memorized prompts its copies are checked on: those mitigation ran it on (its sample, cut where the
      sequential rule stopped it) and it changed (an unchanged prompt generates what the unmitigated one does, and
      the judgement leaves it out);
    - the ids of the memorized prompts tried before the copy-rate rule: those mitigation ran it on, changed or not.
    A strategy mitigation did not run (or no mitigation.parquet) gets the whole sample in both."""
    # iter(): a GroupBy has a `keys` attribute, which dict() would take for a mapping's
    ran = {} if mitigation is None else dict(iter(mitigation.groupby("strategy")))
    checks = {s: sample[sample["prompt_id"].isin(ran[s].loc[ran[s]["changed"].astype(bool), "prompt_id"])] if s in ran else sample
              for s in strategies}  # fmt: skip
    tried = {s: set(ran[s]["prompt_id"]) if s in ran else set(sample["prompt_id"]) for s in strategies}
    return checks, tried


def rule_order(prompts: pd.DataFrame, memorized: pd.DataFrame, sample: pd.DataFrame, cfg) -> pd.DataFrame:
    """The memorized prompts in the order the copy-rate rule takes them: mitigation's sample, then the rest of the
    memorized set in its own stratified order (the same seed: mitigation_sizing.stratified_sample)."""
    everyone = stratified_sample(memorized, cfg.corpus.marker_regex, None, cfg.mitigation.seed)
    rest = everyone[~everyone["prompt_id"].isin(sample["prompt_id"])]
    ids = [p for p in pd.concat([sample, rest])["prompt_id"] if p in prompts.index]
    return prompts.loc[ids].reset_index().assign(group="memorized")


def check_guidance(models, frame, images, index, cfg, guidance: float, fingerprint: str, keep_ids, checks: dict, reused: dict,
                   order: pd.DataFrame, tried: dict) -> tuple:  # fmt: skip
    """copies.parquet rows at one guidance (the prompts, then each mitigation strategy on its `checks` prompts,
    strategy_prompts, then the copy-rate rule's further prompts of `order`: continue_undecided), its threshold, the
    kept generations, the prompt-strategy pairs taken from `reused` (per strategy, mitigation's generations at this
    guidance: copies_reuse.reusable) and generated here, and the copy-rate rule's record."""
    settings = CopiesSettings.of(cfg.copies)
    own = {pid: v for pid, v in reused.get(UNMITIGATED, {}).items() if pid not in keep_ids}  # the figures' prompts: fresh
    done = embed_and_search(models, frame, f"checked at w={guidance:g}", cfg, index, own, guidance, UNMITIGATED, keep_ids)
    table, threshold = evidence(frame, done.sims, done.rows, images, settings, guidance, fingerprint, fidelity=done.fidelity)
    tables, pairs = [table], {"reused": done.reused, "generated": len(frame) - done.reused}
    for strategy, memorized in checks.items():
        if not len(memorized):
            continue
        got = embed_and_search(models, memorized, f"{strategy} at w={guidance:g}", cfg, index, reused.get(strategy, {}), guidance, strategy)
        rewritten = memorized.assign(prompt=got.texts)
        tables.append(evidence(rewritten, got.sims, got.rows, images, settings, guidance, fingerprint, threshold, strategy, got.fidelity)[0])
        pairs = {"reused": pairs["reused"] + got.reused, "generated": pairs["generated"] + len(memorized) - got.reused}
    more, rule = continue_undecided(models, cfg, order, tables, threshold, images, index, guidance, fingerprint, dict(tried))
    tables += more
    pairs["generated"] += sum(t.num_rows for t in more)
    best = table.to_pandas().set_index("prompt_id")
    chosen = {pid: (g[int(best.loc[pid, "best_generation"])], best.loc[pid]) for pid, g in done.kept.items()}
    return tables, threshold, chosen, pairs, rule


def continue_undecided(models, cfg, order: pd.DataFrame, tables: list, threshold: Threshold, images, index, guidance: float,
                       fingerprint: str, tried: dict[str, set]) -> tuple[list, dict]:  # fmt: skip
    """The copy-rate rule at one guidance. Mitigation's sequential rule stops a strategy on its d_mem change, and the
    copy rate of the prompts it ran may then rest on too few pairs to say whether it lowers copying (bench/RESULTS.md,
    "Sized against exhaustive audits"). So a strategy whose paired copy-rate change against the unmitigated prompts
    (`is_copy` 0/1 per prompt) is undecided at mitigation.stop_level (mitigation_sizing.decision: it excludes 0, or
    lies within +-copies.equivalence_margin) goes on through `order` (the memorized set in its stratified order,
    mitigation's sample first), mitigation.look_every prompts it has not tried at a time (`tried`), the changed ones
    only, until decided or copies.max_prompts are tried; the unmitigated prompts are generated where they were not.
    Not at a guidance where no unmitigated memorized prompt copies: F3 reads only those where some do (findings.py
    F3_RULE), and a strategy there can only raise the rate. New copies.parquet tables, and per strategy the record."""
    c, m = cfg.copies, cfg.mitigation
    settings = CopiesSettings.of(c)
    rows = pa.concat_tables(tables).to_pandas()
    rows = rows[rows["group"] == "memorized"]
    found = {s: rows.loc[rows["strategy"] == s].set_index("prompt_id")["is_copy"] for s in [UNMITIGATED, *tried]}
    limit = order.head(c.max_prompts) if c.max_prompts else order
    new, record, active = [], {}, list(tried)
    margin = f"+-{c.equivalence_margin:g} of copy rate"
    idle = None if found[UNMITIGATED].any() else "not continued: no unmitigated memorized prompt copies at this guidance"
    while active:
        looks = {}
        for strategy in list(active):
            change = copy_rate_change(found[strategy], found[UNMITIGATED], m.stop_level)
            why = decision(change, m.stop_level, c.equivalence_margin, MIN_PAIRED_PROMPTS, "the copy-rate change", margin)
            ahead = limit[~limit["prompt_id"].isin(tried[strategy])].head(m.look_every)
            if why is None and c.sequential and len(ahead) and idle is None:
                looks[strategy] = ahead
                continue
            why = why or idle or ("undecided, not continued (copies.sequential=false)" if not c.sequential else
                                  "the memorized set (or copies.max_prompts) ran out, undecided")  # fmt: skip
            record[strategy] = {"prompts": len(found[strategy]), "tried": len(tried[strategy]), "level": m.stop_level,
                                "copy_rate_change": change, "stopped": why}  # fmt: skip
            active.remove(strategy)
        for strategy, ahead in looks.items():  # only the prompts a strategy changes are judged (cxrmem/judgement.py)
            flags = [flag for _, chunk in models.map(ChangedPrompts(), ahead, strategy) for flag in chunk]
            tried[strategy] = tried[strategy] | set(ahead["prompt_id"])
            looks[strategy] = ahead[np.asarray(flags, dtype=bool)]
        wanted = pd.concat(looks.values()).drop_duplicates("prompt_id") if looks else order.head(0)
        for strategy, ahead in [(UNMITIGATED, wanted[~wanted["prompt_id"].isin(found[UNMITIGATED].index)]), *looks.items()]:
            if not len(ahead):
                continue
            got = embed_and_search(models, ahead, f"{strategy} (copy-rate rule) at w={guidance:g}", cfg, index, {}, guidance, strategy)
            table = evidence(ahead.assign(prompt=got.texts), got.sims, got.rows, images, settings, guidance, fingerprint, threshold,
                             strategy, got.fidelity)[0]  # fmt: skip
            new.append(table)
            found[strategy] = pd.concat([found[strategy], table.to_pandas().set_index("prompt_id")["is_copy"]])
    return new, record


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
        prompts = prompt_rows(out)
        frame = checked_prompts(cfg, prompts, sample)
        keep_ids = frozenset(frame["prompt_id"][frame["group"] == "memorized"].head(cfg.report.top_prompts))
        known = read_known_memorized(store, cfg.analyze.known_memorized) if cfg.analyze.known_memorized else None
        tables, per_guidance, chosen = [], {}, {}
        mitigation = store.read_table(layout.mitigation).to_pandas() if store.exists(layout.mitigation) else None
        skipped = unrunnable_strategies(models, cfg)
        strategies = checked_strategies(cfg, skipped)
        checks, tried = strategy_prompts(strategies, frame[frame["group"] == "memorized"], mitigation)
        order = rule_order(prompts, memorized, sample, cfg)
        served, reused, why = copies_reuse.reusable(cfg, out, identity, guidances(cfg))
        log.info("copies: %s", why)
        reuse: dict = {"why": why}
        for guidance in guidances(cfg):
            at = reused if guidance == served else {}
            rows, threshold, chosen[guidance], reuse[f"w={guidance:g}"], rule = check_guidance(
                models, frame, images, index, cfg, guidance, fingerprint, keep_ids, checks, at, order, tried)
            tables += rows
            checked = pa.concat_tables(rows).to_pandas()
            per_guidance[f"w={guidance:g}"] = guidance_summary(checked, threshold, known)
            per_guidance[f"w={guidance:g}"]["judgement"] = judgement(checked, mitigation, guidance, cfg, strategies)
            per_guidance[f"w={guidance:g}"]["copy_rate_rule"] = rule
        store.write_table(stamped(pa.concat_tables(tables).cast(COPIES_SCHEMA), identity), layout.copies)
        section = copies_summary(cfg, len(frame), per_guidance, threshold, built, layout, save_figures(out, chosen), strategies, skipped)
        section.model, section.reuse = identity, reuse
        section.sample = sample_record(memorized, sample, cfg.corpus.marker_regex, c.sample_size, c.seed)
        out.write_sections(section)
    log.info("copies: %s", section.headline)
    return section


def copies_summary(cfg, n_prompts: int, per_guidance: dict, threshold: Threshold, built: dict, layout: RunLayout, figures: list[str],
                   strategies: list[str], skipped: dict) -> CopiesSection:  # fmt: skip
    headline = {
        name: f"{g['memorized_copies']}/{g['memorized']} memorized prompts copy a training image "
        f"({g['control_copies']}/{g['controls']} controls; AUC {'n/a' if g['auc'] is None else format(g['auc'], '.3f')})"
        for name, g in per_guidance.items()
    }
    return CopiesSection(
        headline=headline, prompts=n_prompts, guidances=per_guidance, rule=threshold.rule, threshold_quantile=threshold.quantile,
        generations=cfg.copies.generations, top_k=cfg.copies.top_k, embedder=cfg.copies.embedder,
        strategies_checked=strategies, index=built, copies=layout.copies, figures=figures, skipped=skipped,
    )  # fmt: skip
