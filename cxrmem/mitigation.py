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

For every prompt x strategy: d_mem under the score config (every strategy sees the same G
noises), and the mean pairwise RMS distance between N decoded generations, again from the same
N noises for every strategy, so that the comparison is paired.
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from cxrmem.corpus.surrogates import replace_with_surrogates
from cxrmem.corpus.text import compile_marker_regex, delete_span
from cxrmem.scoring.dmem import d_mem
from cxrmem.settings import Settings

# Strategies that keep the prompt's text and change its embedding (the rest rewrite the text).
EMBEDDING_STRATEGIES = ("embedding_noise", "embedding_optimisation")
# Strategies that rewrite only the de-identification markers (the paper's finding 3 is about them).
MARKER_STRATEGIES = ("random_word", "random_number", "remove_marker", "surrogate")

MITIGATION_COLUMNS = {
    "prompt_id": pa.string(),
    "prompt": pa.string(),
    "strategy": pa.string(),
    "mitigated_prompt": pa.string(),
    "d_mem": pa.float64(),
    "pairwise_distance": pa.float64(),
    "n_generations": pa.int32(),
}


@dataclass(frozen=True)
class MitigationSettings(Settings):
    strategies: tuple[str, ...]  # strategies to compare; `original` is the unmitigated baseline
    n_generations: int = 50  # decoded generations per prompt and strategy for the pairwise distance
    steps: int | None = None  # sampling steps of the generations (None: the scorer's)
    insertion_words: int = 4  # words inserted by random_insertion
    noise_std: float = 0.1  # std of the Gaussian noise added to the text embedding
    optimisation_iters: int = 10  # gradient steps of the first-step embedding optimisation
    optimisation_lr: float = 0.05  # learning rate of the embedding optimisation
    optimisation_target: float = 0.0  # stop once the first-step noise norm falls below this (0: all iters)
    seed: int = 1234  # seed of the random rewrites and of the optimisation's own noises
    marker_regex: str = "_{2,}|X{4,}"  # what counts as a de-identification marker
    samples_per_call: int = 32  # UNet samples per generation call (all strategies share a call)
    grid_generations: int = 4  # generations kept per strategy for the report's image grid


# -- prompt rewrites (pure, seeded) -----------------------------------------------------------
def vocabulary_words(tokenizer) -> list[str]:
    """Whole words of the tokenizer's vocabulary: alphabetic entries of 3+ letters that are English words.

    A WordPiece vocabulary also holds word-start fragments ("conso" of "conso ##lidation"), which
    look like words but are not; the dictionary (Webster's 2nd, from english-words) tells them apart.
    """
    from english_words import get_english_words_set

    english = get_english_words_set(["web2"], lower=True, alpha=True)
    special = set(tokenizer.all_special_tokens)
    words = sorted(w for w in tokenizer.get_vocab()
                   if w.isascii() and w.isalpha() and len(w) >= 3 and w not in special and w.lower() in english)
    if not words:
        raise ValueError("the tokenizer's vocabulary has no whole English words of 3+ letters to draw from")
    return words


def _draw(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def random_word(prompt: str, rng: np.random.Generator, pattern: re.Pattern, vocab: Sequence[str]) -> str:
    return pattern.sub(lambda _: _draw(rng, vocab), prompt)


def random_number(prompt: str, rng: np.random.Generator, pattern: re.Pattern) -> str:
    return pattern.sub(lambda _: str(int(rng.integers(1, 1000))), prompt)


def remove_marker(prompt: str, rng: np.random.Generator, pattern: re.Pattern) -> str:
    """Every marker deleted (right to left, so earlier spans stay valid); `rng` unused: nothing is drawn."""
    for match in reversed(list(pattern.finditer(prompt))):
        prompt = delete_span(prompt, match.start(), match.end())
    return prompt


def surrogate(prompt: str, rng: np.random.Generator, pattern: re.Pattern) -> str:
    return replace_with_surrogates(prompt, pattern, rng)[0]


def random_insertion(prompt: str, rng: np.random.Generator, vocab: Sequence[str], n_words: int) -> str:
    """`n_words` vocabulary words inserted at random word boundaries (prompts are whitespace-normalised)."""
    words = prompt.split(" ") if prompt else []
    for _ in range(n_words):
        words.insert(int(rng.integers(len(words) + 1)), _draw(rng, vocab))
    return " ".join(words)


def strategy_rng(seed: int, prompt_id: str, strategy: str) -> np.random.Generator:
    """A generator that depends only on (seed, prompt, strategy): not on order, batch or worker."""
    return np.random.default_rng([seed, int(prompt_id, 16), zlib.crc32(strategy.encode())])


def mitigated_prompt(strategy: str, prompt: str, prompt_id: str, vocab: Sequence[str], settings: MitigationSettings) -> str:
    """The prompt text a strategy generates with (unchanged for the baseline and embedding-level ones)."""
    rng = strategy_rng(settings.seed, prompt_id, strategy)
    pattern = compile_marker_regex(settings.marker_regex)
    if strategy == "random_word":
        return random_word(prompt, rng, pattern, vocab)
    if strategy == "random_number":
        return random_number(prompt, rng, pattern)
    if strategy == "remove_marker":
        return remove_marker(prompt, rng, pattern)
    if strategy == "surrogate":
        return surrogate(prompt, rng, pattern)
    if strategy == "random_insertion":
        return random_insertion(prompt, rng, vocab, settings.insertion_words)
    return prompt


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


def pairwise_rms_distance(images: torch.Tensor) -> float:
    """Mean over all pairs i < j of ||a_i - a_j||_2 / sqrt(numel): images [N, ...] in [0, 1], N >= 2."""
    flat = images.flatten(1).double()
    n, numel = flat.shape
    if n < 2:
        raise ValueError(f"a pairwise distance needs at least 2 images, got {n}")
    total = sum(float((flat[i + 1 :] - flat[i]).pow(2).sum(dim=1).sqrt().sum()) for i in range(n - 1))
    return total / math.sqrt(numel) / (n * (n - 1) / 2)


# -- one prompt -------------------------------------------------------------------------------
def strategy_embedding(scorer, strategy: str, embedding: torch.Tensor, prompt_id: str, settings: MitigationSettings) -> torch.Tensor:
    """The conditional embedding [1, L, D] a strategy generates with."""
    if strategy == "embedding_noise":
        seed = int(strategy_rng(settings.seed, prompt_id, strategy).integers(2**63))
        generator = torch.Generator("cpu").manual_seed(seed)
        return noisy_embedding(embedding, settings.noise_std, generator)
    if strategy == "embedding_optimisation":
        # Its own noises (mitigation.seed): optimising on the evaluation noises would flatter it.
        noise = scorer.initial_latents([prompt_id], seed=settings.seed)[0]
        latents, timestep = scorer.first_step_inputs(noise)
        return optimise_embedding(
            scorer, latents, timestep, embedding, settings.optimisation_iters, settings.optimisation_lr, settings.optimisation_target
        )
    return embedding


def generate_images(scorer, embeddings: torch.Tensor, latents: torch.Tensor, chunk: int) -> torch.Tensor:
    """Decoded generations [S, M, C, H, W] in [0, 1] of S embeddings [S, L, D], each from the M latents [1, M, ...].

    Every UNet call carries all S strategies for a slice of the generations (about `chunk`
    samples): few large calls instead of one small call per strategy.
    """
    n_strategies, n_generations = embeddings.shape[0], latents.shape[1]
    per_call = max(1, chunk // n_strategies)
    images = []
    for lo in range(0, n_generations, per_call):
        part = latents[:, lo : lo + per_call]
        final = scorer.sample(embeddings, part.expand(n_strategies, *part.shape[1:])).final_latents
        decoded = scorer.decode(final.flatten(0, 1))
        images.append(decoded.reshape(*final.shape[:2], *decoded.shape[1:]))
    return torch.cat(images, dim=1)


def mitigate_prompt(
    scorer, sampler, prompt: str, prompt_id: str, settings: MitigationSettings, vocab: Sequence[str], keep: int = 0
) -> tuple[list[dict], dict[str, np.ndarray]]:
    """mitigation.parquet rows of one prompt, and its first `keep` generations per strategy as grey [k, H, W].

    `scorer` scores (d_mem, every strategy from the same G noises: paired by construction);
    `sampler` (`scorer.with_steps(settings.steps)`) draws the N generations.
    """
    strategies = list(settings.strategies)
    texts = [mitigated_prompt(s, prompt, prompt_id, vocab, settings) for s in strategies]
    encoded = scorer.encode(texts).embeddings
    embeddings = torch.cat(
        [strategy_embedding(scorer, s, encoded[i : i + 1], prompt_id, settings) for i, s in enumerate(strategies)]
    )
    same_noises = scorer.initial_latents([prompt_id] * len(strategies))
    trajectory = scorer.sample(embeddings, same_noises, steps=scorer.settings.screening_steps)
    scores, _ = d_mem(trajectory.step_norms)
    latents = sampler.initial_latents([prompt_id], settings.n_generations)
    generations = generate_images(sampler, embeddings, latents, settings.samples_per_call)
    rows, grids = [], {}
    for i, strategy in enumerate(strategies):
        images = generations[i]
        rows.append(
            {
                "prompt_id": prompt_id,
                "prompt": prompt,
                "strategy": strategy,
                "mitigated_prompt": texts[i],
                "d_mem": float(scores[i]),
                "pairwise_distance": pairwise_rms_distance(images),
                "n_generations": settings.n_generations,
            }
        )
        if keep:
            grids[strategy] = images[:keep].mean(dim=1).numpy().astype(np.float32)
    return rows, grids


def mitigate_prompts(
    scorer, prompts: Sequence[str], prompt_ids: Sequence[str], settings: MitigationSettings, grid_ids=frozenset()
) -> tuple[pd.DataFrame, dict[str, dict[str, np.ndarray]]]:
    """mitigation.parquet rows of these prompts, and the image grids ({prompt_id: {strategy: [k, H, W]}})
    of those in `grid_ids`."""
    vocab = vocabulary_words(scorer.tokenizer)
    sampler = scorer.with_steps(settings.steps)
    rows, grids = [], {}
    for prompt, pid in zip(prompts, prompt_ids):
        keep = settings.grid_generations if pid in grid_ids else 0
        prompt_rows, prompt_grids = mitigate_prompt(scorer, sampler, prompt, pid, settings, vocab, keep)
        rows += prompt_rows
        if prompt_grids:
            grids[pid] = prompt_grids
    return mitigation_frame(rows), grids


def mitigation_frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(MITIGATION_COLUMNS))


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
