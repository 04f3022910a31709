"""Token attribution of the memorized set: which words drive a prompt's d_mem (docs/design.md).

Two methods, both reported per word-level unit of each memorized prompt:

- gradient (Wen et al.): the gradient of the text-conditional noise norm
  ||eps(x_t, e_p) - eps(x_t, e_0)||_2 with respect to the prompt embedding e_p (e_0 carries
  none), per token position the L2 norm over the hidden dimension, averaged over the first
  `attribution.steps` steps of `attribution.generations` guided trajectories (the scorer's own);
- leave-one-out: d_mem(prompt) - d_mem(prompt without the unit), with the same seeds, over the first
  `attribution.steps` steps of the score's T-step schedule at its G (d_mem as a screen computes it).

Both run on the first k = `attribution.steps` steps only (at most T). Wen et al. find most of d_mem's signal in
the first step, and the gradient ranks words there as it does over all T (Spearman 0.9 at k = 1 on both committed
testbeds), but leave-one-out does not: on strongly memorized prompts every word is essential and the full deltas
are near-ties that only the late steps order (bench/RESULTS.md, "Attribution at early steps"; docs/design.md).
A prompt of U units costs `declared_evaluations`: the gradient's (4 + BACKWARD) x generations x k and the
U + 1 leave-one-out variants' d_mem over k steps, about 2 x G x k x (U + 1).

Units: WordPieces grouped into the tokenizer's words (`##` pieces join their word), and every
de-identification marker one unit however many pieces it tokenises into (`___` is three `_`
tokens for BERT). Special tokens and padding are left out.

A unit's gradient score is the SUM of its pieces' norms, not the mean: the first-order change of
the noise norm when a unit's embeddings move is additive over its positions, so the sum is the
unit's share of the sensitivity and is the quantity comparable with leave-one-out, which deletes
all pieces at once. A sum favours units with many pieces (a marker is three), so tokens.parquet
keeps `n_pieces` and the summary also reports the marker's rank under the per-piece mean.

Read "the marker ranks first" against a baseline: on the random-weight tiny model (nothing
memorized) the three-piece `___` ranked first in all 5 top-1% prompts of a 600-report synthetic
run, under both the sum and leave-one-out (deleting three tokens moves the embedding more than
deleting one), and far down under the per-piece mean. So the stage can attribute the same
prompts, with the same seeds, on a copy of the audited model whose weights are re-initialised
(`attribution.null_model`; same architecture and tokenizer, weights drawn from `null_seed`):
tokens.parquet then holds the null scores beside the real ones (`null_*` columns) and the
summary compares, per method, the marker's top-1 rate and mean best rank observed against
null over the same marker-bearing prompts (`null_comparison`). The test is the exact one-sided
sign test on the paired prompts (stats.sign_test, alternative "greater": the claim is that the
marker matters MORE on the audited model than with nothing learned): for top-1, prompts where
the marker is first on the audited model but not the null against the reverse; for the rank,
prompts where its best rank is better on the audited model against worse (ties dropped). Its cost is one
more model per worker and the attribution work again.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import pandas as pd
import pyarrow as pa

from cxrmem import detectors, stats
from cxrmem.corpus.text import MARKER_REGEX, compile_marker_regex, delete_span
from cxrmem.settings import NON_NEGATIVE, OPTIONAL_NON_NEGATIVE, OPTIONAL_POSITIVE, POSITIVE, Settings, knob
from cxrmem.strategies import BACKWARD

if TYPE_CHECKING:  # torch is imported where used: the config reads AttributionConfig without loading it
    import torch

TOKEN_COLUMNS = {
    "prompt_id": pa.string(),
    "prompt": pa.string(),
    "unit": pa.string(),
    "unit_index": pa.int32(),
    "is_marker": pa.bool_(),
    "n_pieces": pa.int32(),
    "grad_score": pa.float64(),
    "grad_rank": pa.float64(),
    "loo_delta": pa.float64(),
    "loo_rank": pa.float64(),
}

# The null model's scores beside the real ones (attribution.null_model): same units, same seeds.
NULL_COLUMNS = {
    "null_grad_score": pa.float64(),
    "null_grad_rank": pa.float64(),
    "null_loo_delta": pa.float64(),
    "null_loo_rank": pa.float64(),
}
SIGN_TEST = "greater"  # the alternative of the paired test against the null (module notes)
# summary key -> (rank column on the audited model, on the null model)
RANK_METHODS = {
    "gradient": ("grad_rank", "null_grad_rank"),
    "gradient_per_piece_mean": ("per_piece_rank", "null_per_piece_rank"),
    "leave_one_out": ("loo_rank", "null_loo_rank"),
}


@dataclass(frozen=True)
class AttributionConfig(Settings):
    """The `attribution` config section."""

    enabled: bool = True  # attribute the memorized set's d_mem to words
    generations: int = knob(2, POSITIVE)  # noises per prompt for the gradient
    steps: int = knob(40, POSITIVE)  # k: the gradient and leave-one-out run the first k of the T DDIM steps (fewer: looser LOO ranks)
    leave_one_out: bool = True  # also compute the leave-one-word-out change in d_mem
    # the most memorized attributed prompts that also get leave-one-out (None: all). No verdict reads it (F2 reads the
    # gradient, the paper's measure): it describes which words drive d_mem, at ~20x the gradient's cost per prompt
    leave_one_out_prompts: Optional[int] = knob(10, OPTIONAL_NON_NEGATIVE)
    null_leave_one_out: bool = False  # also leave-one-out on the null model (F2's baseline is the gradient's)
    # the most memorized prompts attributed (None: all): F2's paired sign test needs a few dozen, as F3 does (mitigation.sample_size)
    max_prompts: Optional[int] = knob(40, (OPTIONAL_POSITIVE[0], "null or positive (enabled=false attributes none)"))
    null_model: bool = False  # also attribute on a seeded re-initialised copy (F2's baseline; one more model per worker)
    null_seed: int = knob(0, NON_NEGATIVE)  # seed of the null model's weights
    top_units: int = knob(25, POSITIVE)  # units shown per prompt in the figure


@dataclass(frozen=True)
class AttributionSettings(AttributionConfig):
    """The section with what attribution takes from the rest of the run."""

    marker_regex: str = MARKER_REGEX  # what counts as a de-identification marker (corpus.marker_regex)
    batch_size: int = 8  # prompts per scoring call of the leave-one-out variants (score.batch_size)


# -- the gradient (pure tensor math) --------------------------------------------------------
def token_gradient_norms(
    noise_norms: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    latents_t: torch.Tensor,
    timesteps: torch.Tensor,
    cond_emb: torch.Tensor,
) -> torch.Tensor:
    """Per token position, the mean over the K samples of || d n_k / d e_p ||_2 over the hidden dim: [L].

    `noise_norms(x_t, t, e_p)` gives n_k = ||eps(x_k, e_p) - eps(x_k, e_0)||_2 per sample,
    differentiable in e_p only (the Scorer's `conditional_noise_norms`). latents_t: [K, C, H, W]
    UNet inputs; timesteps: [K]; cond_emb e_p: [L, D] or [1, L, D]. When the caller passes e_p
    as a leaf that requires grad, the summed gradient also lands in its `.grad`, as autograd does.
    """
    if not cond_emb.requires_grad:
        cond_emb = cond_emb.detach().requires_grad_(True)
    import torch

    with torch.enable_grad():
        # One row of e_p per sample, so that each sample's gradient can be read separately: sample
        # k's norm depends only on row k (the UNet does not mix a batch).
        cond = cond_emb.reshape(1, *cond_emb.shape[-2:]).expand(len(latents_t), -1, -1)
        cond.retain_grad()
        noise_norms(latents_t, timesteps, cond).sum().backward()
    return cond.grad.float().norm(dim=-1).mean(dim=0)


# -- units ------------------------------------------------------------------------------------
@dataclass
class Unit:
    text: str
    start: int  # character span of the unit in the prompt
    end: int
    positions: list[int]  # its token positions in the padded sequence the text encoder sees
    is_marker: bool


def word_units(tokenizer, prompt: str, marker_pattern: re.Pattern, max_length: int) -> list[Unit]:
    """The prompt's word-level units in order: tokenizer words, each marker run one unit."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"attribution needs a fast tokenizer (offset mapping); {type(tokenizer).__name__} is not")
    encoding = tokenizer(
        prompt,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
    )
    markers = [(m.start(), m.end()) for m in marker_pattern.finditer(prompt)]
    groups: dict[tuple[str, int], list[tuple[int, int, int]]] = {}
    for position, (word, (start, end), special) in enumerate(
        zip(encoding.word_ids(), encoding["offset_mapping"], encoding["special_tokens_mask"])
    ):
        if special or word is None or start == end:
            continue
        marker = next((i for i, (m_start, m_end) in enumerate(markers) if start < m_end and end > m_start), None)
        key = ("marker", marker) if marker is not None else ("word", word)
        groups.setdefault(key, []).append((position, start, end))
    units = []
    for (kind, _), pieces in groups.items():  # insertion order: by first token
        start, end = min(p[1] for p in pieces), max(p[2] for p in pieces)
        units.append(Unit(prompt[start:end], start, end, [p[0] for p in pieces], kind == "marker"))
    return units


# -- one prompt -------------------------------------------------------------------------------
def early_steps(settings: AttributionConfig, score_steps: int) -> int:
    """k: the steps the gradient and leave-one-out run, the first `attribution.steps` of the T-step schedule (at most T)."""
    return min(settings.steps, score_steps)


def declared_evaluations(n_units: int, settings: AttributionSettings, score) -> int:
    """UNet evaluations `attribute_prompt` spends on a prompt of `n_units` units under `score` (ScoreSettings), as
    the Scorer counts them (tests/test_cost.py): k guided steps of `generations` trajectories and, per step, one
    unconditional and one conditional sample with its backward; then leave-one-out's U + 1 variants scored as d_mem
    over k steps, `batch_size` per call (a shared first step's unconditional pass once per call)."""
    k = early_steps(settings, score.steps)
    gradient = (2 + 2 + BACKWARD) * settings.generations * k
    if not settings.leave_one_out or n_units == 0:
        return gradient
    dmem = detectors.REGISTRY["dmem"].cost(score.generations, k, score.seed_mode == "shared")
    variants = n_units + 1
    return gradient + variants * dmem.per_prompt + math.ceil(variants / settings.batch_size) * dmem.per_batch


def trajectory_token_norms(scorer, cond_emb: torch.Tensor, prompt_id: str, generations: int, steps: int) -> torch.Tensor:
    """token_gradient_norms along the scorer's guided trajectories (first `steps` steps, `generations` noises): [L]."""
    import torch

    latents = scorer.initial_latents([prompt_id], generations)
    trajectory = scorer.sample(cond_emb, latents, steps=steps, keep_inputs=True)
    timesteps = trajectory.timesteps.to(scorer.device)
    per_generation = []
    for g in range(generations):
        x_t = torch.stack([x[0, g] for x in trajectory.model_inputs]).to(scorer.device, scorer.dtype)
        per_generation.append(token_gradient_norms(scorer.conditional_noise_norms, x_t, timesteps, cond_emb[0]))
    return torch.stack(per_generation).mean(dim=0).cpu()


def batched_d_mem(scorer, prompts: Sequence[str], prompt_ids: Sequence[str], batch_size: int, steps: Optional[int] = None) -> list[float]:
    """d_mem of the prompts, `batch_size` per scoring call, over the first `steps` steps (None: the scorer's own)."""
    return [
        float(d)
        for lo in range(0, len(prompts), batch_size)
        for d in scorer.score(prompts[lo : lo + batch_size], prompt_ids[lo : lo + batch_size], steps=steps).d_mem
    ]


def descending_rank(values: pd.Series) -> pd.Series:
    """1 = largest; ties share the best rank; NaN stays NaN."""
    return values.rank(ascending=False, method="min")


def attribute_prompt(scorer, prompt: str, prompt_id: str, settings: AttributionSettings) -> pd.DataFrame:
    """tokens.parquet rows of one prompt: every unit with its gradient and leave-one-out scores."""
    units = word_units(scorer.tokenizer, prompt, compile_marker_regex(settings.marker_regex), scorer.max_length)
    cond_emb = scorer.encode([prompt]).embeddings
    per_token = trajectory_token_norms(scorer, cond_emb, prompt_id, settings.generations, early_steps(settings, scorer.settings.steps))
    frame = pd.DataFrame(
        {
            "prompt_id": prompt_id,
            "prompt": prompt,
            "unit": [u.text for u in units],
            "unit_index": range(len(units)),
            "is_marker": [u.is_marker for u in units],
            "n_pieces": [len(u.positions) for u in units],
            "grad_score": [float(per_token[u.positions].sum()) for u in units],
        }
    )
    frame["grad_rank"] = descending_rank(frame["grad_score"])
    if settings.leave_one_out and units:
        # The original is rescored beside its variants, so both sides of the difference share seeds and settings.
        variants = [prompt] + [delete_span(prompt, u.start, u.end) for u in units]
        steps = early_steps(settings, scorer.settings.steps)
        scores = batched_d_mem(scorer, variants, [prompt_id] * len(variants), settings.batch_size, steps)
        frame["loo_delta"] = [scores[0] - s for s in scores[1:]]
    else:
        frame["loo_delta"] = math.nan
    frame["loo_rank"] = descending_rank(frame["loo_delta"])
    return frame


def attribute_prompts(
    scorer, prompts: Sequence[str], prompt_ids: Sequence[str], settings: AttributionSettings, loo_ids: Optional[frozenset] = None
) -> pd.DataFrame:
    """tokens.parquet rows for a batch of prompts; leave-one-out (when on) only for those in `loo_ids` (None: all)."""
    without_loo = settings.replace(leave_one_out=False)
    frames = [attribute_prompt(scorer, prompt, pid, settings if loo_ids is None or pid in loo_ids else without_loo)
              for prompt, pid in zip(prompts, prompt_ids)]  # fmt: skip
    if not frames:
        return pd.DataFrame({name: pd.Series(dtype=dtype.to_pandas_dtype()) for name, dtype in TOKEN_COLUMNS.items()})
    return pd.concat(frames, ignore_index=True)[list(TOKEN_COLUMNS)]


# -- across the memorized set ---------------------------------------------------------------
def with_null(tokens: pd.DataFrame, null_tokens: pd.DataFrame) -> pd.DataFrame:
    """tokens.parquet rows with the null model's scores of the same units beside them (NULL_COLUMNS)."""
    null = null_tokens[["prompt_id", "unit_index", "grad_score", "grad_rank", "loo_delta", "loo_rank"]]
    null = null.rename(columns={c: f"null_{c}" for c in ("grad_score", "grad_rank", "loo_delta", "loo_rank")})
    return tokens.merge(null, on=["prompt_id", "unit_index"], how="left", validate="one_to_one")


def with_per_piece_ranks(tokens: pd.DataFrame) -> pd.DataFrame:
    """Ranks of the gradient's mean per piece (and the null's, when present): sums favour many-piece units."""
    out = tokens.copy()
    for score, rank in (("grad_score", "per_piece_rank"), ("null_grad_score", "null_per_piece_rank")):
        if score in out:
            out[rank] = (out[score] / out["n_pieces"]).groupby(out["prompt_id"]).rank(ascending=False, method="min")
    return out


def best_marker_ranks(tokens: pd.DataFrame, rank_column: str) -> pd.Series:
    """Per prompt that has a marker: the best rank of its markers (NaN ranks dropped)."""
    markers = tokens[tokens["is_marker"]]
    return markers.groupby("prompt_id")[rank_column].min().dropna()


def marker_rank_stats(tokens: pd.DataFrame, rank_column: str) -> dict:
    """Among the prompts with a marker that the method ranked (leave-one-out ranks only the top
    `leave_one_out_prompts`): how many, how often a marker ranks first, its mean (best) rank, and the chance rate."""
    ranked = tokens.groupby("prompt_id")[rank_column].transform(lambda r: r.notna().any())
    with_marker = tokens[tokens.groupby("prompt_id")["is_marker"].transform("any") & ranked]
    if with_marker.empty:
        return {"prompts": 0, "marker_top1": None, "marker_mean_rank": None, "chance_top1": None}
    best_marker_rank = best_marker_ranks(with_marker, rank_column)
    return {
        "prompts": int(with_marker["prompt_id"].nunique()),
        "marker_top1": float((best_marker_rank == 1).mean()),
        "marker_mean_rank": float(best_marker_rank.mean()),
        # A random ranking puts a marker first this often.
        "chance_top1": float(with_marker.groupby("prompt_id")["is_marker"].mean().mean()),
    }


def paired_marker_test(observed: pd.Series, null: pd.Series) -> dict:
    """Observed against null best marker ranks over the same prompts, with exact sign tests (module notes)."""
    pairs = pd.concat([observed.rename("observed"), null.rename("null")], axis=1, join="inner").dropna()
    first_obs, first_null = pairs["observed"] == 1, pairs["null"] == 1
    only_obs, only_null = int((first_obs & ~first_null).sum()), int((~first_obs & first_null).sum())
    better, worse = int((pairs["observed"] < pairs["null"]).sum()), int((pairs["observed"] > pairs["null"]).sum())
    n = len(pairs)
    return {
        "pairs": n,
        "observed_top1": float(first_obs.mean()) if n else None,
        "null_top1": float(first_null.mean()) if n else None,
        "top1_only_observed": only_obs,
        "top1_only_null": only_null,
        "top1_p": stats.sign_test(only_obs, only_obs + only_null, SIGN_TEST),
        "observed_mean_rank": float(pairs["observed"].mean()) if n else None,
        "null_mean_rank": float(pairs["null"].mean()) if n else None,
        "rank_better": better,
        "rank_worse": worse,
        "rank_p": stats.sign_test(better, better + worse, SIGN_TEST),
    }


def null_comparison(tokens: pd.DataFrame) -> dict:
    """Per method of RANK_METHODS: `paired_marker_test` of the audited model against the null model."""
    ranked = with_per_piece_ranks(tokens)
    out = {}
    for key, (observed, null) in RANK_METHODS.items():
        if ranked[observed].isna().all() or ranked[null].isna().all():
            out[key] = None  # e.g. leave-one-out off
            continue
        out[key] = paired_marker_test(best_marker_ranks(ranked, observed), best_marker_ranks(ranked, null))
    out["test"] = "exact one-sided sign test (audited better than null) over the paired marker-bearing prompts, ties dropped"
    out["min_pairs"] = stats.min_sign_test_pairs(SIGN_TEST)
    return out


def attribution_summary(tokens: pd.DataFrame) -> dict:
    ranked = with_per_piece_ranks(tokens)
    summary = {
        "prompts": int(tokens["prompt_id"].nunique()),
        "prompts_with_marker": int(tokens.groupby("prompt_id")["is_marker"].any().sum()),
        "mean_units_per_prompt": float(tokens.groupby("prompt_id").size().mean()) if len(tokens) else None,
        **{key: marker_rank_stats(ranked, observed) for key, (observed, _) in RANK_METHODS.items()},
    }
    if "null_grad_score" in tokens:
        summary["null"] = null_comparison(tokens)
    return summary
