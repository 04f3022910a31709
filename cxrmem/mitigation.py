"""Mitigation experiments on the memorized set (paper section 4.3 and beyond; docs/design.md).

Prompt rewrites, each a pure function `(prompt, rng, ...) -> str` seeded per (prompt, strategy)
that changes only what its name says:

- random_word: every marker -> a random whole word of the model's own tokenizer vocabulary;
- random_number: every marker -> a random number;
- remove_marker: every marker deleted, with the spaces and punctuation around it tidied;
- surrogate: every marker -> a realistic surrogate chosen by context (corpus/surrogates.py);
- random_insertion: Somepalli et al.'s random word addition at random word boundaries.

Embedding-level strategies keep the text: embedding_noise adds Gaussian noise scaled by the
embedding's std; embedding_optimisation (Wen et al.) runs Adam on the prompt embedding to
minimise the first-step text-conditional noise norm, on noises of its own seed (not the ones it
is evaluated on), then generates with the optimised embedding.

Sampling-level strategies keep the text and its embedding (each a row of cxrmem/strategies.py, its hooks here):

- attention_rescaling (Ren et al., ECCV 2024): in every cross-attention layer of the conditional
  pass, at every step, the attention to the marker's tokens is multiplied by `attention_scale`
  and the mass taken goes to the first token (attention.rescale_attention says why). Ren et al.
  find the trigger tokens from the attention itself; here the targets are the marker's tokens
  (the paper's own suspect, found by the corpus regex, as attribution groups them). A prompt
  without a marker is left unchanged (`changed` false), like remove_marker.
- delayed_guidance / opposite_guidance (Jain et al., CVPR 2025): over the first
  `guidance_delay` share of the T steps (a static transition point; the paper also offers a
  dynamic one, not implemented) the guidance weight is 0 (no guidance: the unconditional
  prediction; the paper says only "not applying classifier-free guidance", and 1, the
  conditional prediction alone, is what copies on the testbed) or -`opposite_scale` (opposite
  guidance, eps_u - s (eps_c - eps_u)); from the transition on, plain guidance at w. Both
  halves are still computed before the transition (the norms d_mem needs), so the cost is 2T.
- noise_adjustment (Han et al., NeurIPS 2025, the per-sample variant): each initial latent x_T
  takes `noise_iters` sharpness-aware steps down the first-step guidance norm
  ||eps(x_T, e_p) - eps(x_T, e_0)||: the gradient is taken at x_T + rho ||x_T|| g / ||g||, the
  step is `noise_lr` ||x_T|| in the normalised gradient's direction, and x_T is scaled back to
  its norm after every step (choices where the paper leaves the scale open: a norm-relative
  step keeps x_T on the Gaussian shell of its dimension). Sampling from it is plain guidance.

For every prompt x strategy: d_mem under the score config (every strategy sees the same G
noises), and the mean pairwise RMS distance between N decoded generations, again from the same
N noises for every strategy, so that the comparison is paired.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import zlib
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from cxrmem import strategies as registry
from cxrmem.attribution import word_units
from cxrmem.corpus.surrogates import replace_with_surrogates
from cxrmem.corpus.text import compile_marker_regex, delete_markers
from cxrmem.scoring.dmem import d_mem
from cxrmem.strategies import MitigationSettings

log = logging.getLogger(__name__)

MITIGATION_COLUMNS = {
    "prompt_id": pa.string(),
    "prompt": pa.string(),
    "strategy": pa.string(),
    "mitigated_prompt": pa.string(),
    "d_mem": pa.float64(),
    "pairwise_distance": pa.float64(),
    "n_generations": pa.int32(),
    "changed": pa.bool_(),  # the strategy changed something for this prompt (a rewrite without a marker may not)
    "evaluations": pa.int64(),  # UNet evaluations the strategy spends on the prompt (cxrmem/strategies.py)
    "fidelity": pa.float64(),  # share of the generations showing the original prompt's findings (NaN: no measure set)
}
EMBEDDING = "embedding"  # a row's generations embedded by the copies embedder [N, D]: the copies stage reuses them


# -- prompt rewrites (pure, seeded): the `rewrite` hooks of cxrmem/strategies.py ---------------
@dataclass(frozen=True)
class Rewriting:
    """What a rewrite hook draws on besides the prompt and its generator."""

    pattern: re.Pattern  # the de-identification markers
    vocab: Sequence[str]  # whole words of the model's tokenizer (vocabulary_words)
    settings: MitigationSettings


# How vocabularies mark where a word starts or ends: SentencePiece's "▁lobe" (T5, Gemma), byte-level BPE's "Ġlobe",
# CLIP's "lobe</w>". WordPiece marks the continuation instead ("##lidation"), which the alphabetic check drops.
WORD_START_MARKS = "▁Ġ"
WORD_END_MARK = "</w>"


@functools.lru_cache(maxsize=4)  # per tokenizer: every strategy call and copies chunk asks again, and the answer is fixed
def vocabulary_words(tokenizer) -> tuple[str, ...]:
    """Whole words of the tokenizer's vocabulary: English words of 3+ letters that it reads as one token alone.

    Entries are read without their word marks (WORD_START_MARKS, WORD_END_MARK). A vocabulary also holds pieces of
    words that look like words: a WordPiece word-start fragment ("conso" of "conso ##lidation"), which the dictionary
    (Webster's 2nd, from english-words) tells apart, and a SentencePiece or BPE piece from inside a word ("ati",
    "hest"), which the one-token check does: standing alone it is read as a word start and something more.
    """
    from english_words import get_english_words_set

    english = get_english_words_set(["web2"], lower=True, alpha=True)
    special = set(tokenizer.all_special_tokens)
    unmarked = {entry.lstrip(WORD_START_MARKS).removesuffix(WORD_END_MARK) for entry in tokenizer.get_vocab()}
    candidates = sorted(w for w in unmarked if w.isascii() and w.isalpha() and len(w) >= 3 and w not in special and w.lower() in english)
    pieces = tokenizer(candidates, add_special_tokens=False)["input_ids"] if candidates else []
    words = tuple(word for word, ids in zip(candidates, pieces) if len(ids) == 1)
    if not words:
        raise ValueError("the tokenizer's vocabulary has no whole English words of 3+ letters to draw from")
    return words


def _draw(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def random_word(prompt: str, rng: np.random.Generator, rewriting: Rewriting) -> str:
    return rewriting.pattern.sub(lambda _: _draw(rng, rewriting.vocab), prompt)


def random_number(prompt: str, rng: np.random.Generator, rewriting: Rewriting) -> str:
    return rewriting.pattern.sub(lambda _: str(int(rng.integers(1, 1000))), prompt)


def remove_marker(prompt: str, rng: np.random.Generator, rewriting: Rewriting) -> str:
    """Every marker deleted; `rng` unused: nothing is drawn."""
    return delete_markers(prompt, rewriting.pattern)


def surrogate(prompt: str, rng: np.random.Generator, rewriting: Rewriting) -> str:
    return replace_with_surrogates(prompt, rewriting.pattern, rng)[0]


def random_insertion(prompt: str, rng: np.random.Generator, rewriting: Rewriting) -> str:
    """`insertion_words` vocabulary words inserted at random word boundaries (prompts are whitespace-normalised)."""
    words = prompt.split(" ") if prompt else []
    for _ in range(rewriting.settings.insertion_words):
        words.insert(int(rng.integers(len(words) + 1)), _draw(rng, rewriting.vocab))
    return " ".join(words)


def strategy_rng(seed: int, prompt_id: str, strategy: str) -> np.random.Generator:
    """A generator that depends only on (seed, prompt, strategy): not on order, batch or worker."""
    return np.random.default_rng([seed, int(prompt_id, 16), zlib.crc32(strategy.encode())])


def mitigated_prompt(strategy: str, prompt: str, prompt_id: str, vocab: Sequence[str], settings: MitigationSettings) -> str:
    """The prompt text a strategy generates with: its rewrite's, or the prompt itself when it has none."""
    rewrite = registry.row(strategy).rewrite
    if rewrite is None:
        return prompt
    rewriting = Rewriting(compile_marker_regex(settings.marker_regex), vocab, settings)
    return registry.hook(rewrite)(prompt, strategy_rng(settings.seed, prompt_id, strategy), rewriting)


# -- embedding-level strategies and the distance (pure tensor math) ---------------------------
def noisy_embedding(embedding: torch.Tensor, noise_std: float, generator: torch.Generator) -> torch.Tensor:
    """embedding + noise_std * std(embedding) * N(0, 1), noise drawn on the CPU from `generator`."""
    noise = torch.randn(embedding.shape, generator=generator, dtype=torch.float32).to(embedding.device)
    values = embedding.float()
    return (values + noise_std * values.std() * noise).to(embedding.dtype)


def optimise_embedding(
    scorer, latents: torch.Tensor, timestep: torch.Tensor, cond_emb: torch.Tensor, iters: int, lr: float, target: float = 0.0
) -> torch.Tensor:
    """Wen et al.: Adam on e_p [1, L, D] minimising the first-step ||eps(x_T, e_p) - eps(x_T, e_0)||.

    The loss is the mean over the UNet inputs x_T [G, C, H, W] at `timestep`, through the scorer's
    `conditional_noise_norms`. Stops early once it falls below `target` (0: run all `iters`). The
    embedding is optimised in float32 and returned in its own dtype.
    """
    timesteps = timestep.expand(len(latents))
    eps_uncond = scorer.unconditional_noise(latents, timesteps)
    embedding = cond_emb.detach().float().clone().requires_grad_(True)
    optimiser = torch.optim.Adam([embedding], lr=lr)
    with torch.enable_grad():
        for _ in range(iters):
            loss = scorer.conditional_noise_norms(latents, timesteps, embedding.to(cond_emb.dtype), eps_uncond).mean()
            if target > 0 and loss.item() < target:
                break
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return embedding.detach().to(cond_emb.dtype)


def pairwise_rms_distance(images: torch.Tensor, device: Optional[torch.device] = None) -> float:
    """Mean over all pairs i < j of ||a_i - a_j||_2 / sqrt(numel): images [N, ...] in [0, 1], N >= 2.

    One `pdist` on `device` (the scorer's: the GPU does it while it would otherwise wait) in float64,
    whose sum over N(N-1)/2 pairs loses nothing at the paper's N = 50; one host sync for the result."""
    flat = images.flatten(1).to(device or images.device, torch.float64)
    n, numel = flat.shape
    if n < 2:
        raise ValueError(f"a pairwise distance needs at least 2 images, got {n}")
    return float(torch.pdist(flat).mean()) / math.sqrt(numel)


# -- the `embedding` hooks of cxrmem/strategies.py --------------------------------------------
def embedding_noise(scorer, embedding: torch.Tensor, prompt_id: str, rng: np.random.Generator, settings: MitigationSettings) -> torch.Tensor:
    generator = torch.Generator("cpu").manual_seed(int(rng.integers(2**63)))
    return noisy_embedding(embedding, settings.noise_std, generator)


def embedding_optimisation(scorer, embedding: torch.Tensor, prompt_id: str, rng, settings: MitigationSettings) -> torch.Tensor:
    # Its own noises (mitigation.seed): optimising on the evaluation noises would flatter it.
    noise = scorer.initial_latents([prompt_id], seed=settings.seed)[0]
    latents, timestep = scorer.first_step_inputs(noise)
    return optimise_embedding(
        scorer, latents, timestep, embedding, settings.optimisation_iters, settings.optimisation_lr, settings.optimisation_target
    )


# -- sampling-level strategies (pure tensor math, through the scorer): the `sampling` hooks ----
def guidance_schedule(early: float, w: float, steps: int, delay: float) -> torch.Tensor:
    """The guidance weight at each of `steps` steps [steps] float32: `early` over the first `delay` share, then w."""
    schedule = torch.full((steps,), float(w))
    schedule[: int(round(delay * steps))] = early
    return schedule


def _early_guidance(early: float, scorer, inputs: dict, settings: MitigationSettings) -> dict:
    schedule = guidance_schedule(early, inputs["guidance"], scorer.settings.steps, settings.guidance_delay)
    return {**inputs, "guidance": schedule.expand(len(inputs["latents"]), -1)}


def delayed_guidance(scorer, inputs: dict, texts: Sequence[str], settings: MitigationSettings) -> dict:
    return _early_guidance(0.0, scorer, inputs, settings)


def opposite_guidance(scorer, inputs: dict, texts: Sequence[str], settings: MitigationSettings) -> dict:
    return _early_guidance(-settings.opposite_scale, scorer, inputs, settings)


def marker_token_scales(tokenizer, prompts: Sequence[str], max_length: int, settings: MitigationSettings):
    """([N, L] float32 factors: attention_scale on each marker token, 1 elsewhere; [N] bool: the prompt has one)."""
    pattern = compile_marker_regex(settings.marker_regex)
    scales = torch.ones(len(prompts), max_length)
    for i, prompt in enumerate(prompts):
        for unit in word_units(tokenizer, prompt, pattern, max_length):
            if unit.is_marker:
                scales[i, unit.positions] = settings.attention_scale
    return scales, (scales != 1).any(dim=1).numpy()


def attention_rescaling(scorer, inputs: dict, texts: Sequence[str], settings: MitigationSettings) -> dict:
    return {**inputs, "token_scales": marker_token_scales(scorer.tokenizer, texts, scorer.max_length, settings)[0]}


def has_marker_tokens(scorer, prompt: str, text: str, settings: MitigationSettings) -> bool:
    """attention_rescaling's `changed`: a prompt without marker tokens has nothing to re-scale."""
    return bool(marker_token_scales(scorer.tokenizer, [prompt], scorer.max_length, settings)[1][0])


def adjust_initial_noise(scorer, latents: torch.Tensor, cond_emb: torch.Tensor, settings: MitigationSettings) -> torch.Tensor:
    """Han et al.'s per-sample adjustment (module docstring) of initial latents [M, C, H, W] for e_p [1, L, D]."""
    x = latents.detach().float().clone()
    radius = x.flatten(1).norm(dim=1).view(-1, *[1] * (x.ndim - 1))

    def direction(point: torch.Tensor) -> torch.Tensor:
        point = point.detach().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(scorer.first_step_noise_norms(point, cond_emb).sum(), point)
        grad = grad.float().cpu()
        return grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view_as(radius)

    for _ in range(settings.noise_iters):
        sharp = direction(x + settings.noise_rho * radius * direction(x))
        x = x - settings.noise_lr * radius * sharp
        x = x * radius / x.flatten(1).norm(dim=1).view_as(radius)
    return x


def noise_adjustment(scorer, inputs: dict, texts: Sequence[str], settings: MitigationSettings) -> dict:
    latents, embeddings = inputs["latents"], inputs["cond_embeddings"]
    adjusted = [adjust_initial_noise(scorer, latents[i], embeddings[i : i + 1], settings) for i in range(len(texts))]
    return {**inputs, "latents": torch.stack(adjusted)}


# -- a strategy's hooks, applied ----------------------------------------------------------------
def strategy_embedding(scorer, strategy: str, embedding: torch.Tensor, prompt_id: str, settings: MitigationSettings) -> torch.Tensor:
    """The conditional embedding [1, L, D] a strategy generates with: its hook's, or the text's when it has none."""
    hook = registry.row(strategy).embedding
    if hook is None:
        return embedding
    return registry.hook(hook)(scorer, embedding, prompt_id, strategy_rng(settings.seed, prompt_id, strategy), settings)


def strategy_sampling(
    scorer, strategy: str, texts: Sequence[str], embeddings: torch.Tensor, latents: torch.Tensor, guidance, settings: MitigationSettings
) -> dict:
    """Scorer.sample's keyword arguments for N prompts under a strategy (embeddings [N, L, D] already the
    strategy's, latents [N, G, ...], guidance w: None for the scorer's): plain guidance unless its hook changes them."""
    w = scorer.settings.guidance_scale if guidance is None else float(guidance)
    inputs = {"cond_embeddings": embeddings, "latents": latents, "guidance": w}
    hook = registry.row(strategy).sampling
    return registry.hook(hook)(scorer, inputs, texts, settings) if hook is not None else inputs


def stack_sampling(inputs: list[dict], steps: int) -> dict:
    """One Scorer.sample call's arguments for several strategies' (each for one prompt): rows in order."""
    def schedule(w):
        return w.reshape(1, -1) if torch.is_tensor(w) else torch.full((1, steps), float(w))

    stacked = {
        "cond_embeddings": torch.cat([i["cond_embeddings"] for i in inputs]),
        "latents": torch.cat([i["latents"] for i in inputs]),
        "guidance": torch.cat([schedule(i["guidance"]) for i in inputs]),
    }
    if any("token_scales" in i for i in inputs):
        length = inputs[0]["cond_embeddings"].shape[1]
        stacked["token_scales"] = torch.cat([i.get("token_scales", torch.ones(1, length)) for i in inputs])
    return stacked


def changed(strategy: str, prompt: str, text: str, scorer, settings: MitigationSettings) -> bool:
    """Did the strategy change anything for this prompt (a rewrite without a marker may leave it as it was)?
    Its `changed` hook says; without one, a rewrite changed the text, and any other strategy with a hook changed something."""
    row = registry.row(strategy)
    if row.changed is not None:
        return bool(registry.hook(row.changed)(scorer, prompt, text, settings))
    if row.rewrite is not None:
        return text != prompt
    return row.embedding is not None or row.sampling is not None


# -- one prompt -------------------------------------------------------------------------------
def generate_images(scorer, inputs: dict, chunk: int) -> torch.Tensor:
    """Decoded generations [S, M, C, H, W] in [0, 1] of S strategies' sampling `inputs` (stack_sampling), latents [S, M, ...].

    Every UNet call carries all S strategies for a slice of the generations (about `chunk`
    samples): few large calls instead of one small call per strategy.
    """
    latents = inputs["latents"]
    n_strategies, n_generations = latents.shape[:2]
    per_call = max(1, chunk // n_strategies)
    images = []
    for lo in range(0, n_generations, per_call):
        part = {**inputs, "latents": latents[:, lo : lo + per_call]}
        final = scorer.sample(**part).final_latents
        decoded = scorer.decode(final.flatten(0, 1))
        images.append(decoded.reshape(*final.shape[:2], *decoded.shape[1:]))
    return torch.cat(images, dim=1)


def sampling_for(scorer, strategies: Sequence[str], texts: Sequence[str], embeddings: torch.Tensor, latents: torch.Tensor, settings) -> dict:
    """stack_sampling of every strategy for one prompt, each from the same latents [1, M, ...] at the scorer's w."""
    inputs = [
        strategy_sampling(scorer, s, [texts[i]], embeddings[i : i + 1], latents, None, settings) for i, s in enumerate(strategies)
    ]
    return stack_sampling(inputs, scorer.settings.steps)


def mitigate_prompt(
    scorer, sampler, prompt: str, prompt_id: str, settings: MitigationSettings, vocab: Sequence[str], keep: int = 0, fidelity=None,
    embedder=None,
) -> tuple[list[dict], dict[str, np.ndarray]]:
    """mitigation.parquet rows of one prompt, and its first `keep` generations per strategy as grey [k, H, W].

    `scorer` scores (d_mem, every strategy from the same G noises: paired by construction);
    `sampler` (`scorer.with_steps(settings.steps)`) draws the N generations; `fidelity`
    (cxrmem/fidelity.py, None: not measured) reads them for the original prompt's findings; `embedder` (the
    copies check's, None: not embedded) adds each row's generations embedded, [N, D] under `EMBEDDING`, for
    the copies stage to reuse (cxrmem/stages/copies_reuse.py).
    A strategy that changes nothing for this prompt (a marker rewrite of a prompt without a marker) would sample
    exactly what `original` samples: with `original` among the strategies, its row takes original's results and
    costs nothing.
    """
    strategies = list(settings.strategies)
    texts = [mitigated_prompt(s, prompt, prompt_id, vocab, settings) for s in strategies]
    changes = [changed(s, prompt, texts[i], scorer, settings) for i, s in enumerate(strategies)]
    same_as = {i: strategies.index(registry.BASELINE) for i, c in enumerate(changes)
               if not c and strategies[i] != registry.BASELINE and registry.BASELINE in strategies}  # fmt: skip
    run = [i for i in range(len(strategies)) if i not in same_as]  # the strategies sampled, original among them
    encoded = scorer.encode([texts[i] for i in run]).embeddings
    embeddings = torch.cat(
        [strategy_embedding(scorer, strategies[i], encoded[j : j + 1], prompt_id, settings) for j, i in enumerate(run)]
    )
    sampled, sampled_texts = [strategies[i] for i in run], [texts[i] for i in run]
    scoring = sampling_for(scorer, sampled, sampled_texts, embeddings, scorer.initial_latents([prompt_id]), settings)
    scores, _ = d_mem(scorer.sample(**scoring, steps=scorer.settings.screening_steps).step_norms)
    latents = sampler.initial_latents([prompt_id], settings.n_generations)
    generations = generate_images(sampler, sampling_for(sampler, sampled, sampled_texts, embeddings, latents, settings), settings.samples_per_call)
    faithful = fidelity(generations, [prompt] * len(run)) if fidelity is not None else np.full(len(run), np.nan)
    embedded = embedder(generations.flatten(0, 1)).reshape(*generations.shape[:2], -1).numpy() if embedder is not None else None
    spreads = [pairwise_rms_distance(images, scorer.device) for images in generations]  # per sampled row, once
    scored = (scorer.settings.generations, scorer.settings.scored_steps)
    rows, grids = [], {}
    for i, strategy in enumerate(strategies):
        j = run.index(same_as.get(i, i))  # the sampled row whose results this strategy's are
        images = generations[j]
        rows.append(
            {
                "prompt_id": prompt_id,
                "prompt": prompt,
                "strategy": strategy,
                "mitigated_prompt": texts[i],
                "d_mem": float(scores[j]),
                "pairwise_distance": spreads[j],
                "n_generations": settings.n_generations,
                "changed": changes[i],
                "evaluations": 0 if i in same_as else registry.row(strategy).evaluations(settings, scored, (settings.n_generations, sampler.settings.steps)),
                "fidelity": float(faithful[j]),
                **({EMBEDDING: embedded[j]} if embedded is not None else {}),
            }
        )
        if keep:
            grids[strategy] = images[:keep].mean(dim=1).numpy().astype(np.float32)
    return rows, grids


def mitigate_prompts(
    scorer, prompts: Sequence[str], prompt_ids: Sequence[str], settings: MitigationSettings, grid_ids=frozenset(), fidelity=None,
    embedder=None,
) -> tuple[pd.DataFrame, dict[str, dict[str, np.ndarray]], dict[str, str]]:
    """mitigation.parquet rows of these prompts (with `EMBEDDING` given an `embedder`: mitigate_prompt), the image
    grids ({prompt_id: {strategy: [k, H, W]}}) of those in `grid_ids`, and the strategies skipped on this model
    with their reasons."""
    vocab = vocabulary_words(scorer.tokenizer)
    settings, skipped = runnable_strategies(scorer, settings)
    sampler = scorer.with_steps(settings.steps)
    rows, grids = [], {}
    for prompt, pid in zip(prompts, prompt_ids):
        keep = settings.grid_generations if pid in grid_ids else 0
        prompt_rows, prompt_grids = mitigate_prompt(scorer, sampler, prompt, pid, settings, vocab, keep, fidelity, embedder)
        rows += prompt_rows
        if prompt_grids:
            grids[pid] = prompt_grids
    return mitigation_frame(rows), grids, skipped


def runnable_strategies(scorer, settings: MitigationSettings) -> tuple[MitigationSettings, dict[str, str]]:
    """The settings without the strategies this model's denoiser cannot run, and those strategies with the reason
    (each also in the log)."""
    skipped = scorer.skipped({strategy: registry.row(strategy).needs for strategy in settings.strategies})
    for strategy, reason in skipped.items():
        log.warning("mitigation strategy %s skipped: it %s", strategy, reason)
    kept = tuple(strategy for strategy in settings.strategies if strategy not in skipped)
    return (settings if not skipped else settings.replace(strategies=kept)), skipped


def mitigation_frame(rows: list[dict]) -> pd.DataFrame:
    """The rows in MITIGATION_COLUMNS' order, and `EMBEDDING` after them where they have it (not a mitigation.parquet column)."""
    return pd.DataFrame(rows, columns=list(MITIGATION_COLUMNS) + ([EMBEDDING] if any(EMBEDDING in r for r in rows) else []))


def mitigation_summary(frame: pd.DataFrame) -> dict:
    """Mean d_mem and mean pairwise distance per strategy, in the configured order."""
    per_strategy = frame.groupby("strategy", sort=False).agg(
        d_mem=("d_mem", "mean"), pairwise_distance=("pairwise_distance", "mean"), prompts=("prompt_id", "nunique")
    )
    return {
        strategy: {
            "mean_d_mem": float(row.d_mem),
            "mean_pairwise_distance": float(row.pairwise_distance),
            "prompts": int(row.prompts),
        }
        for strategy, row in per_strategy.iterrows()
    }
