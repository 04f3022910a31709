"""The cascade: screens in stages, the full d_mem on the last survivors, and a check of what it rejected.

    prompts.parquet -> stage 1 screen (all prompts) -> keep its top share -> stage 2 screen (those) -> ...
        -> the full d_mem on the last stage's survivors: the run's scores.parquet
        -> the audit: a seeded random sample of the rejected prompts, fully scored (`cascade.audit_sample`)
        -> any sampled prompt at or above the memorized threshold is a miss: the stage that rejected it
           keeps `cascade.widen_factor` times its share and the cascade runs again (`cascade.max_rounds`);
           so does a stage whose screen model expects more than `cascade.widen_above_expected_missed`
           memorized prompts among its rejected (the model sees a loss a small audit sample does not)

`cascade.stages` lists the screens as (screen, keep_percent, steps, generations); the default is the
cheapest cascade that recovered the full top 1% on both committed testbeds at G=4, T=50
(bench/cascade_frontier.py; bench/RESULTS.md, "Cascade frontier"). Stage i
writes `<output>/_cascade/screening` (i = 0) or `screening<i>`, the audit `_cascade/audit`; each is
an ordinary resumable scoring, so a rescreen after widening scores only the prompts new to a stage.

The memorized threshold the audit is judged by is the analyze stage's rule (`stats.top_k` of the
whole corpus) applied to every prompt fully scored so far: the survivors and the audit sample.
With fewer fully scored prompts than the memorized set's size, the smallest full score is the
threshold (the cascade then kept too few: any sampled prompt above its weakest survivor is a miss).

The miss rate is the share of misses in the last round's sample with its 95% Clopper-Pearson upper
bound (`stats.miss_rate`); times the rejected count it bounds the memorized prompts the cascade could
have lost. Compute is counted, not declared: the denoiser evaluations the Scorer counted for each scoring
(cxrmem/scoring/scorer.py `UNetWork`: forward samples, a backward sample as 2), per prompt of the corpus,
with the audit's share apart; tests/test_cost.py holds them equal to what cxrmem/detectors.py declares.

A later stage continues the trajectories of an earlier one that ran the first k steps
of the full score's (same T, G, seeds and guidance: cxrmem/stages/continuation.py): it starts from the
latents after step k and the k norms already computed, so the full d_mem of a survivor costs its
remaining steps only and is the from-scratch score; the evaluations counted are those actually spent
(summary.json["cascade"]["continuation"] gives the saving, as the declared cost of the shared steps).
`cascade.continue_trajectories` = false restarts every stage. On Ray the same: the carry stays in the
driver and its states travel with the blocks to the actors and back (cxrmem/stages/continuation.py).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cxrmem import stats, storage
from cxrmem.cascade_bounds import AuditBounds, StageScores, audit_bounds
from cxrmem.detectors import REGISTRY, Cost, screen_top
from cxrmem.formatting import fmt
from cxrmem.runfiles import Run, RunLayout
from cxrmem.scoring.scorer import UNetWork
from cxrmem.scoring.settings import ScoreSettings
from cxrmem.settings import with_overrides
from cxrmem.stages import score
from cxrmem.stages.continuation import TrajectoryCarry
from cxrmem.stages.results import CascadeResult, ScoreResult
from cxrmem.storage import Store
from cxrmem.summary import CascadeSection

log = logging.getLogger(__name__)

CASCADE_DIR = "_cascade"


@dataclass
class Stage:
    screen: str
    keep_percent: float
    steps: int
    generations: int


@dataclass
class StageRun:
    """One stage of one round: what it screened, kept and cost."""

    screen: str
    keep_percent: float
    screened: int
    kept: int
    evaluations: int  # denoiser evaluations counted in this round (prompts resumed from a round before cost none)
    continued: int = 0  # prompts that continued an earlier stage's trajectories (none with the carry off or on Ray)
    saved: int = 0  # evaluations those prompts did not spend again
    expected_missed: Optional[float] = None  # memorized prompts among its rejected under its screen model (cxrmem/cascade_bounds.py)
    needed_keep: Optional[int] = None  # the fewest inputs its screen model says to keep for cascade.expected_missed_target


@dataclass(frozen=True)
class Screened:
    """One stage's screen of one round, in memory: every input's id and screen score, and which it passed on."""

    ids: np.ndarray
    scores: np.ndarray
    kept: np.ndarray  # bool


@dataclass
class Round:
    stages: list[StageRun]
    fully_scored: int
    rejected: int
    sample: int
    misses: int
    # Misses per stage, in stage order: a list, which JSON keeps as it is (a dict's int keys come back as strings).
    missed_by_stage: list[int] = field(default_factory=list)


def plan(cfg, blind: int = 0) -> list[Stage]:
    """The configured screens, in order; a d_mem screen reads at least one step past the model's `blind` ones
    (cxrmem/models/loading.py blind_steps: on a flow-matching model the first step's norm is 0 for every prompt,
    so the default first screen, k = 1, would keep every prompt as a tie and prune nothing)."""
    return [Stage(s.screen, s.keep_percent, max(s.steps, blind + 1) if s.screen == "dmem" else s.steps, s.generations or cfg.score.generations)
            for s in cfg.cascade.stages]  # fmt: skip


def stage_config(cfg, output: str, stage: Stage):
    """A stage's scoring config: a dmem screen is d_mem's first `steps` steps; another detector is its
    column beside a first-step d_mem (which the score stage always writes, counted in the cost)."""
    # As many samples per UNet call as a full-score call: a G=1 screen at the full score's batch size would
    # leave a GPU launch-bound (about 33 samples a call for RadEdit's defaults). Not part of the score key.
    batch_size = cfg.score.batch_size * max(1, cfg.score.generations // stage.generations)
    if stage.screen == "dmem":
        return with_overrides(
            cfg, run__output=output, score__screening_steps=stage.steps, score__generations=stage.generations, score__detectors=[],
            score__batch_size=batch_size,
        )  # fmt: skip
    return with_overrides(
        cfg, run__output=output, score__screening_steps=1, score__generations=stage.generations, score__batch_size=batch_size,
        score__detectors=[stage.screen], detect__generations=stage.generations, detect__steps=stage.steps,
    )


def stage_column(screen: str) -> str:
    return "d_mem" if screen == "dmem" else REGISTRY[screen].columns[0]


def dmem_cost(score_cfg, steps: int) -> Cost:
    return REGISTRY["dmem"].cost(score_cfg.generations, steps, score_cfg.seed_mode == "shared")


def screening_cost(screen_cfg) -> Cost:
    """UNet work of a stage per batch, as cxrmem/detectors.py declares it: its d_mem over score.screening_steps plus
    its detectors (the cascade records what the Scorer counted; tests/test_cost.py holds the two equal)."""
    shared = screen_cfg.score.seed_mode == "shared"
    cost = dmem_cost(screen_cfg.score, screen_cfg.score.screening_steps)
    for name in screen_cfg.score.detectors:
        spec = REGISTRY[name]
        cost = cost + spec.cost_of(screen_cfg.detect.generations, screen_cfg.detect.steps, shared, screen_cfg.score.steps)
    return cost


def evaluations(cost: Cost, n: int, batch_size: int) -> int:
    """UNet sample evaluations of n prompts in batches of batch_size (the shared passes once per batch)."""
    return n * cost.per_prompt + math.ceil(n / batch_size) * cost.per_batch


def cascade_cost(n_prompts: int, n_selected: int, screen: Cost, full: Cost, batch_size: int) -> dict:
    """Denoiser evaluations (and derivative samples) of a one-stage cascade against the full score of every prompt."""
    everything = evaluations(full, n_prompts, batch_size)
    cascade = evaluations(screen, n_prompts, batch_size) + evaluations(full, n_selected, batch_size)
    return {
        "unet_evaluations_full": everything,
        "unet_evaluations_cascade": cascade,
        "jvps_cascade": screen.jvps(n_prompts),
        "vjps_cascade": screen.vjps(n_prompts),
        "compute_saved": 1.0 - cascade / everything if everything else 0.0,
    }


def _ids(store: Store, uri: str) -> pa.Array:
    return store.read_table(uri, columns=["prompt_id"])["prompt_id"]


def _stage_dir(layout: RunLayout, index: int) -> str:
    return storage.join(layout.prefix, CASCADE_DIR, "screening" if index == 0 else f"screening{index}")


def _executor(batches, carry: TrajectoryCarry | None):
    return batches if carry is None else functools.partial(batches, carry=carry)


def run_stages(
    cfg, out: Run, batches, stages: list[Stage], work: UNetWork, carry: TrajectoryCarry | None = None
) -> tuple[str, list[StageRun], list[Screened]]:
    """Every stage on the survivors of the one before: (the last survivors' file, the stage runs, each stage's
    screen); their model work is added to `work`. `carry`: the trajectories carried between stages (None: every
    stage restarts)."""
    store, layout = out.store, out.layout
    input_uri, runs, screened = layout.prompts, [], []
    for i, stage in enumerate(stages):
        stage_dir = _stage_dir(layout, i)
        stage_cfg = stage_config(cfg, stage_dir, stage)
        inputs = _ids(store, input_uri)
        column = stage_column(stage.screen)
        if carry is not None:
            carry.begin_stage(stats.top_k(len(inputs), stage.keep_percent), stage.screen, column)
        what = f"screened (stage {i + 1}, {stage.screen})"
        scored = score.run(stage_cfg, out.at(stage_dir), _executor(batches, carry), prompts_uri=input_uri, what=what, cost=None)
        work += UNetWork.from_json(scored.work)
        table = store.read_table(RunLayout(stage_dir).scores, columns=["prompt_id", column], filters=pc.field("prompt_id").isin(inputs))
        ids = table["prompt_id"].to_numpy(zero_copy_only=False)
        values = table[column].to_numpy(zero_copy_only=False).astype(np.float64)
        chosen = screen_top(ids, values, stage.keep_percent, stage.screen)
        screened.append(Screened(ids, values, np.isin(ids, chosen)))
        kept_uri = storage.join(layout.prefix, CASCADE_DIR, f"kept{i}.parquet")
        kept = store.read_table(input_uri, columns=["prompt_id", "prompt"], filters=pc.field("prompt_id").isin(chosen.tolist() or [""]))
        store.write_table(kept, kept_uri)
        continued, saved = (0, 0) if carry is None else (carry.continued, carry.saved)
        runs.append(StageRun(stage.screen, stage.keep_percent, table.num_rows, kept.num_rows, scored.work["evaluations"], continued, saved))
        if carry is not None:
            carry.end_stage(chosen.tolist())
        log.info("cascade stage %d (%s, keep %.3g%%): %d of %d prompts pass", i + 1, stage.screen, stage.keep_percent, kept.num_rows, table.num_rows)
        input_uri = kept_uri
    return input_uri, runs, screened


def audit_sample_ids(all_ids: np.ndarray, rejected: np.ndarray, n: int, seed: int) -> np.ndarray:
    """The first n rejected ids of one seeded order of all ids: a simple random sample of the rejected
    that changes little when a rescreen rejects fewer (its prompts are then scored already)."""
    order = np.random.default_rng(seed).permutation(np.sort(all_ids))
    return order[np.isin(order, rejected)][:n]


def memorized_threshold(full_scores: np.ndarray, n_corpus: int, top_percent: float) -> float | None:
    """The analyze rule's threshold over the corpus, from the finite full scores known so far (module notes)."""
    finite = full_scores[np.isfinite(full_scores)]
    if finite.size == 0:
        return None
    k = stats.top_k(n_corpus, top_percent)
    return float(np.sort(finite)[::-1][min(k, finite.size) - 1])


def _full_scores(store: Store, uri: str) -> tuple[np.ndarray, np.ndarray]:
    if not store.exists(uri):
        return np.zeros(0, dtype=object), np.zeros(0)
    table = store.read_table(uri, columns=["prompt_id", "d_mem"])
    return table["prompt_id"].to_numpy(zero_copy_only=False), table["d_mem"].to_numpy(zero_copy_only=False).astype(np.float64)


def _step_norms(store: Store, uri: str, ids: np.ndarray | None = None) -> dict:
    """prompt_id -> [G, T] step norms of a full scoring (of `ids` only, if given)."""
    if not store.exists(uri):
        return {}
    where = None if ids is None else pc.field("prompt_id").isin(ids.tolist() or [""])
    table = store.read_table(uri, columns=["prompt_id", "step_norms"], filters=where)
    return {i: np.asarray(n, dtype=np.float64) for i, n in zip(table["prompt_id"].to_pylist(), table["step_norms"].to_pylist())}


def check_round(cfg, out: Run, batches, all_ids: np.ndarray, screened: list[Screened], stages: list[Stage],
                work: UNetWork) -> tuple[Round, dict]:  # fmt: skip
    """Fully score the audit sample of this round's rejected prompts, count its misses and bound the loss; its
    model work is added to `work`."""
    store, layout = out.store, out.layout
    scored_ids, scored = _full_scores(store, layout.scores)
    rejected = np.setdiff1d(all_ids, scored_ids)
    sample = audit_sample_ids(all_ids, rejected, cfg.cascade.audit_sample, cfg.cascade.audit_seed)
    audit_dir = storage.join(layout.prefix, CASCADE_DIR, "audit")
    audited = UNetWork()
    if sample.size:
        sample_uri = storage.join(layout.prefix, CASCADE_DIR, "audit_sample.parquet")
        store.write_table(store.read_table(layout.prompts, columns=["prompt_id", "prompt"], filters=pc.field("prompt_id").isin(sample.tolist())), sample_uri)
        audit_cfg = with_overrides(cfg, run__output=audit_dir)
        audited = UNetWork.from_json(score.run(audit_cfg, out.at(audit_dir), batches, prompts_uri=sample_uri, what="audited", cost=None).work)
        work += audited
    audit_ids, audit_scores = _full_scores(store, RunLayout(audit_dir).scores)
    in_sample = np.isin(audit_ids, sample)
    audit_ids, audit_scores = audit_ids[in_sample], audit_scores[in_sample]
    threshold = memorized_threshold(np.concatenate([scored, audit_scores]), len(all_ids), cfg.analyze.top_percent)
    missed = audit_ids[np.isfinite(audit_scores) & (audit_scores >= threshold)] if threshold is not None else audit_ids[:0]
    by_stage = [int(np.isin(missed, s.ids[~s.kept]).sum()) for s in screened]
    full_cost = dmem_cost(cfg.score, cfg.score.steps)
    checked = Round([], int(scored_ids.size), int(rejected.size), int(sample.size), int(missed.size), by_stage)
    kept_members = int(np.sum(np.isfinite(scored) & (scored >= threshold))) if threshold is not None else 0
    target = cfg.cascade.expected_missed_target
    bounds = audit_bounds(
        checked.rejected, checked.sample, checked.misses, kept_members,
        stage_scores(stages, screened, (scored_ids, scored), (audit_ids, audit_scores),
                     {**_step_norms(store, layout.scores), **_step_norms(store, RunLayout(audit_dir).scores, audit_ids)},
                     checked.sample / checked.rejected if checked.rejected else None), threshold,
        full_cost.per_prompt + full_cost.per_batch / cfg.score.batch_size, None if target is None else target / len(stages),
    )  # fmt: skip
    return checked, {"threshold": threshold, "evaluations": audited.evaluations, "missed_ids": sorted(missed.tolist()), "bounds": bounds}


def stage_scores(stages: list[Stage], screened: list[Screened], kept: tuple[np.ndarray, np.ndarray],
                 audited: tuple[np.ndarray, np.ndarray], step_norms: dict, share: Optional[float] = None) -> list[StageScores | None]:  # fmt: skip
    """Each stage's inputs for its screen model (cxrmem/cascade_bounds.py): screen scores, the full scores known
    (`kept`: the cascade's scores.parquet, `audited`: the audit sample's) and what it passed on, a prompt the
    cascade fully scored in an earlier round counting as passed (it is not lost). A dmem stage's screen is the mean
    of the full score's first k steps of its first G' generations (same seeds and schedule: the continuation's
    premise), so the fully scored prompts it never screened (`step_norms`: id -> [G, T]) add points to its model.
    `share`: the audit sample over the rejected prompts, which weights the audited points in the fit (None: unweighted).
    None for a screen whose higher scores do not mean memorized: it gets no model."""
    full = dict(zip(np.concatenate([kept[0], audited[0]]).tolist(), np.concatenate([kept[1], audited[1]]).tolist()))
    out = []
    for stage, screen in zip(stages, screened):
        if not REGISTRY[stage.screen].higher_is_memorized:
            out.append(None)
            continue
        scores = np.array([full.get(i, np.nan) for i in screen.ids.tolist()], dtype=np.float64)
        inputs = set(screen.ids.tolist())
        others = [i for i in full if i in step_norms and i not in inputs] if stage.screen == "dmem" else []
        also = (np.array([np.mean(step_norms[i][: stage.generations, : stage.steps]) for i in others]),
                np.array([full[i] for i in others], dtype=np.float64))  # fmt: skip
        audit = (share, np.isin(screen.ids, audited[0]), np.isin(np.array(others, dtype=object), audited[0])) if share else None
        out.append(StageScores(screen.scores, scores, screen.kept | np.isin(screen.ids, kept[0]), also, audit))
    return out


def wider_shares(cfg, stages: list[Stage], checked: Round, margins: list[dict], screened: list[Screened]) -> list[float]:
    """Each stage's keep share for the next round: `cascade.widen_factor` times its share where the audit found a
    memorized prompt it rejected or its screen model expects more than `cascade.widen_above_expected_missed` there,
    at least the share its screen model needs for its rejected to hold at most its part of
    `cascade.expected_missed_target` (margins' `needed_keep`, None without a target or a model); never less than it
    kept, at most 100."""
    shares = []
    above = cfg.cascade.widen_above_expected_missed
    for stage, misses, margin, screen in zip(stages, checked.missed_by_stage, margins, screened):
        expected = margin.get("expected_missed")
        losing = misses or (above is not None and expected is not None and expected > above)
        share = stage.keep_percent * (cfg.cascade.widen_factor if losing else 1.0)
        needed = margin["needed_keep"]
        if needed is not None and needed > int(screen.kept.sum()):
            share = max(share, 100.0 * needed / screen.ids.size)
        shares.append(min(100.0, share))
    return shares


def run_cascade(cfg, out: Run, batches: score.ScoredBatches = score.local_batches) -> CascadeResult:
    """Screen in stages, fully score the survivors, audit the rejected; widen and rescreen on a miss.
    `batches` is the executor, which takes the stages' `carry`: in this process by default, Ray's actor
    pool from cxrmem/distributed/cascade.py. The model work of every scoring is the score stage's cost; `out`
    names the model's fingerprint."""
    from cxrmem.models.loading import blind_steps

    store, layout = out.store, out.layout
    blind = blind_steps(cfg.model, store)
    stages = plan(cfg, blind)
    if blind:
        log.info("cascade: the model's first %d step(s) carry no text-conditional difference (flow matching): d_mem screens read "
                 "at least %d steps", blind, blind + 1)  # fmt: skip
    all_ids = _ids(store, layout.prompts).to_numpy(zero_copy_only=False)
    full_cost = dmem_cost(cfg.score, cfg.score.steps)
    rounds, spent, work = [], {"screens": 0, "full": 0, "audit": 0}, UNetWork()
    carrying = cfg.cascade.continue_trajectories
    why_not = None if carrying else "cascade.continue_trajectories = false"
    continuation = {"enabled": carrying, "off_because": why_not, "continued": 0, "evaluations_saved": 0}
    for number in range(1, cfg.cascade.max_rounds + 1):
        carry = TrajectoryCarry(ScoreSettings.of(cfg.score)) if carrying else None  # a round's own survivors
        final_uri, stage_runs, screened = run_stages(cfg, out, batches, stages, work, carry)
        if carry is not None:
            carry.begin_stage()
        full = score.run(cfg, out, _executor(batches, carry), prompts_uri=final_uri, what="fully scored", cost=None)
        work += UNetWork.from_json(full.work)
        full_saved = 0 if carry is None else carry.saved
        checked, check = check_round(cfg, out, batches, all_ids, screened, stages, work)
        checked.stages = stage_runs
        rounds.append(checked)
        spent["screens"] += sum(s.evaluations for s in stage_runs)
        spent["full"] += full.work["evaluations"]
        spent["audit"] += check["evaluations"]
        continuation["continued"] += sum(s.continued for s in stage_runs) + (0 if carry is None else carry.continued)
        continuation["evaluations_saved"] += sum(s.saved for s in stage_runs) + full_saved
        for run, margin in zip(stage_runs, check["bounds"].stages):
            run.expected_missed, run.needed_keep = margin["expected_missed"], margin["needed_keep"]
        shares = wider_shares(cfg, stages, checked, check["bounds"].stages, screened)
        short = [i for i, share in enumerate(shares) if share > stages[i].keep_percent]
        if not short:
            break
        log.warning(
            "cascade round %d: %d of %d audited rejected prompts reach the memorized threshold, %s expected under the "
            "screen models; stages %s need a wider share%s",
            number, checked.misses, checked.sample, fmt(check["bounds"].expected_missed), [i + 1 for i in short],
            "; widening and rescreening" if number < cfg.cascade.max_rounds else "; cascade.max_rounds reached",
        )
        if number < cfg.cascade.max_rounds:
            for i in short:
                stages[i].keep_percent = shares[i]
            short = []
    section = cascade_summary(cfg, stages, rounds, spent, len(all_ids), full_cost, check["threshold"], check["bounds"], short)
    section.continuation = continuation  # prompts (over all stages and rounds) that continued a trajectory
    out.write_sections(section)
    out.record_cost("score", work.to_json())
    first = stage_config(cfg, _stage_dir(layout, 0), stages[0])
    return CascadeResult(
        **{**asdict(full), "work": work.to_json()},
        screen=stages[0].screen,
        screening={"scores": RunLayout(first.run.output).scores},
        selected=rounds[-1].stages[-1].kept,
        unet_evaluations_full=evaluations(full_cost, len(all_ids), cfg.score.batch_size),
        unet_evaluations_cascade=spent["screens"] + spent["full"],
        analysis_top_percent=section.analysis_top_percent,
        cascade=section.to_json(),
    )


def cascade_summary(cfg, stages: list[Stage], rounds: list[Round], spent: dict, n_corpus: int, full_cost: Cost, threshold,
                    bounds: AuditBounds, short: list[int]) -> CascadeSection:  # fmt: skip
    """summary.json["cascade"]: the stages as they ended, every round, the compute and the self-check; `short`: the
    stages cascade.max_rounds left narrower than the audit or their screen model asked."""
    last = rounds[-1]
    total = sum(spent.values())
    rate = stats.miss_rate(last.misses, last.sample)
    upper = None if rate["upper"] is None else rate["upper"] * last.rejected
    if last.sample == 0:
        verdict = "not checked: cascade.audit_sample = 0, nothing tells whether the screens lost memorized prompts"
    elif last.misses:
        verdict = f"MISSED: {last.misses} of {last.sample} audited rejected prompts are memorized after {len(rounds)} rounds; widen the stages"
    else:
        verdict = (f"no audited rejected prompt is memorized{' after widening' if len(rounds) > 1 else ''}: at most "
                   f"{upper:.1f} of the {last.rejected} rejected prompts (95% upper bound)")
    if short:
        verdict += (f"; stages {', '.join(str(i + 1) for i in short)} still keep less than their audit or screen model "
                    f"asks (cascade.max_rounds = {cfg.cascade.max_rounds} reached)")
    return CascadeSection(
        stages=[asdict(s) for s in stages],
        rounds=[asdict(r) for r in rounds],
        widened=len(rounds) > 1,
        corpus=n_corpus,
        fully_scored=last.fully_scored,
        # scores.parquet holds the fully scored share only: analyze takes the same top share of the whole corpus
        analysis_top_percent=min(100.0, cfg.analyze.top_percent * n_corpus / max(last.fully_scored, 1)),
        evaluations={
            **spent,
            "total": total,
            "per_prompt": total / n_corpus if n_corpus else 0.0,
            "audit_per_prompt": spent["audit"] / n_corpus if n_corpus else 0.0,
            "full_score_per_prompt": full_cost.per_prompt + full_cost.per_batch / cfg.score.batch_size,
        },
        audit={
            "threshold": threshold,
            "rejected": last.rejected,
            **rate,
            "missed_prompts_upper": upper,
            "evaluations": spent["audit"],
        },
        verdict=verdict,
        bounds=asdict(bounds),
    )


def score_or_cascade(cfg, out: Optional[Run] = None, scored_batches: score.ScoredBatches = score.local_batches) -> ScoreResult:
    """The score stage: the cascade with cascade.enabled, else the full score of every prompt; `scored_batches`
    is the executor (this process by default, the audit's actor pool)."""
    if not cfg.cascade.enabled:
        return score.run(cfg, out, scored_batches)
    return run_cascade(cfg, score.fingerprinted(cfg, out), scored_batches)
