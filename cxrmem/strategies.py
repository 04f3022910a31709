"""The mitigation strategies: one row per strategy, carrying its behaviour hooks and its cost (cxrmem/mitigation.py runs them).

A strategy changes one thing about how a memorized prompt is generated, through the hooks its row sets:

- `rewrite(prompt, rng, rewriting) -> text`: the prompt's words (random_word, random_number, remove_marker,
  surrogate, random_insertion); `rewriting` is mitigation.Rewriting (marker pattern, vocabulary, settings);
- `embedding(scorer, embedding [1, L, D], prompt_id, rng, settings) -> embedding`: the text embedding
  (embedding_noise, embedding_optimisation);
- `sampling(scorer, inputs, texts, settings) -> inputs`: Scorer.sample's keyword arguments for the prompts
  (cond_embeddings, latents, guidance w), changed: the cross-attention to some tokens (attention_rescaling,
  Ren et al., ECCV 2024), the guidance weight over the first steps (delayed_guidance, opposite_guidance,
  Jain et al., CVPR 2025) or the initial noise (noise_adjustment, Han et al., NeurIPS 2025);
- `changed(scorer, prompt, text, settings) -> bool`: did it change anything for this prompt; unset, a strategy
  changed the prompt when its rewrite changed the text, or when it has an embedding or sampling hook.

`original` sets no hook: the prompt as it is. A new strategy is one row here, its hook functions, and its test.

A hook is the function itself, or "module:function" resolved on first use. The rows name the torch-using hooks
of cxrmem/mitigation.py by reference so that this module stays importable without torch: the config checks
strategy names and `cxrmem enrich` judges F1 with this table loaded, and neither should pay torch's import.

Cost is declared in UNet sample evaluations per prompt (one latent through the UNet = 1; a backward
pass counted as 2, the usual rule of thumb): d_mem over G noises and the N generations, each step of
plain classifier-free guidance 2 samples, plus what the strategy does before sampling (`preparation`).
The Scorer counts the same work as it happens (`Scorer.work`); tests/test_cost.py holds the two equal.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Optional, Union

from cxrmem.capabilities import CROSS_ATTENTION, PLAIN_TEXT
from cxrmem.corpus.text import MARKER_REGEX
from cxrmem.settings import NON_NEGATIVE, OPTIONAL_POSITIVE, POSITIVE, UNIT_CLOSED, UNIT_HALF_OPEN, UNIT_OPEN, Settings, at_least, check_names, knob

BACKWARD = 2  # evaluations one backward pass through the UNet costs
Hook = Union[str, Callable]  # a function, or "module:function" resolved on first use


def no_preparation(settings, g: int, n: int) -> int:
    return 0


@dataclass(frozen=True)
class Strategy:
    summary: str  # one line for the report
    rewrite: Optional[Hook] = None
    embedding: Optional[Hook] = None
    sampling: Optional[Hook] = None
    changed: Optional[Hook] = None
    # (settings, G scored noises, N generations) -> evaluations spent before sampling
    preparation: Callable[[object, int, int], int] = no_preparation
    marker_rewrite: bool = False  # rewrites only the de-identification markers: what the paper's finding 3 is about
    needs: tuple[str, ...] = ()  # denoiser capabilities (cxrmem/capabilities.py); skipped with the reason on a model without one
    guidance_schedule: bool = False  # its sampling replaces w by a per-step schedule: both passes at every step, w = 1 too

    def evaluations(self, settings, scored: tuple[int, int], generated: tuple[int, int], guidance: Optional[float] = None) -> int:
        """UNet evaluations of one prompt: d_mem over `scored` = (G noises, T_s steps), the `generated` = (N generations,
        T steps) at `guidance` (None: the scoring guidance) and the preparation (settings: MitigationSettings or the
        config section). Generations at w = 1 without a schedule are one conditional pass a step (copies/generation.py)."""
        (g, t_s), (n, t) = scored, generated
        passes = 1 if guidance == 1.0 and not self.guidance_schedule else 2
        return 2 * g * t_s + passes * n * t + self.preparation(settings, g, n)


def hook(reference: Hook) -> Callable:
    """The function a row's hook names."""
    return _resolve(reference) if isinstance(reference, str) else reference


@lru_cache(maxsize=None)
def _resolve(reference: str) -> Callable:
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


M = "cxrmem.mitigation:"  # where the hooks that need torch live
BASELINE = "original"  # the unmitigated prompt: the other half of every strategy's paired comparison

REGISTRY: dict[str, Strategy] = {
    BASELINE: Strategy("the prompt as it is"),
    "random_word": Strategy("every marker -> a random vocabulary word", rewrite=M + "random_word", marker_rewrite=True),
    "random_number": Strategy("every marker -> a random number", rewrite=M + "random_number", marker_rewrite=True),
    "remove_marker": Strategy("every marker deleted", rewrite=M + "remove_marker", marker_rewrite=True),
    "surrogate": Strategy("every marker -> a realistic surrogate", rewrite=M + "surrogate", marker_rewrite=True),
    "random_insertion": Strategy("random words inserted (Somepalli et al.)", rewrite=M + "random_insertion"),
    "embedding_noise": Strategy("Gaussian noise on the text embedding", embedding=M + "embedding_noise", needs=(PLAIN_TEXT,)),
    # Wen et al., per noise of its own G: one unconditional pass, then per iteration a conditional pass and its backward.
    "embedding_optimisation": Strategy(
        "first-step embedding optimisation (Wen et al.)", embedding=M + "embedding_optimisation",
        preparation=lambda s, g, n: g * (1 + s.optimisation_iters * (1 + BACKWARD)), needs=(PLAIN_TEXT,),
    ),
    "attention_rescaling": Strategy(
        "cross-attention to the marker tokens re-scaled (Ren et al.)", sampling=M + "attention_rescaling", changed=M + "has_marker_tokens",
        needs=(CROSS_ATTENTION,),
    ),
    "delayed_guidance": Strategy("no guidance (w=0) over the first steps, then w (Jain et al.)", sampling=M + "delayed_guidance",
                                 guidance_schedule=True),
    "opposite_guidance": Strategy("opposite guidance (-s) over the first steps, then w (Jain et al.)", sampling=M + "opposite_guidance",
                                  guidance_schedule=True),
    # Han et al., on every initial noise scored and generated from (G + N): per iteration two gradients
    # (sharpness-aware), each both halves forward and backward.
    "noise_adjustment": Strategy(
        "initial noise moved to a lower guidance norm (Han et al.)", sampling=M + "noise_adjustment",
        preparation=lambda s, g, n: (g + n) * s.noise_iters * 2 * 2 * (1 + BACKWARD),
    ),
}  # fmt: skip


def row(name: str) -> Strategy:
    if name not in REGISTRY:
        raise ValueError(f"unknown mitigation strategy {name!r}: choose from {', '.join(REGISTRY)} (cxrmem/strategies.py REGISTRY)")
    return REGISTRY[name]


def marker_rewrites() -> tuple[str, ...]:
    """The strategies that rewrite only the markers (finding 3's subject)."""
    return tuple(name for name, strategy in REGISTRY.items() if strategy.marker_rewrite)


def rewrites() -> tuple[str, ...]:
    """The strategies that change the prompt's text."""
    return tuple(name for name, strategy in REGISTRY.items() if strategy.rewrite is not None)


@dataclass(frozen=True)
class MitigationConfig(Settings):
    """The `mitigation` config section: which strategies, on which prompts, at what size (cxrmem/mitigation.py runs them)."""

    enabled: bool = True  # run the mitigation experiments on the memorized set
    strategies: tuple[str, ...] = tuple(REGISTRY)  # strategies to compare (cxrmem/strategies.py REGISTRY); `original` is the unmitigated baseline
    # decoded generations per prompt and strategy (paper: 50); 8 decide the paired spread change as 32 do (bench/RESULTS.md)
    n_generations: int = knob(8, at_least(2, "distances need pairs"))
    steps: Optional[int] = knob(None, OPTIONAL_POSITIVE)  # sampling steps for the generations (None: score.steps)
    insertion_words: int = knob(4, POSITIVE)  # words inserted by random_insertion
    noise_std: float = knob(0.1, NON_NEGATIVE)  # std of the Gaussian noise added to the text embedding
    optimisation_iters: int = knob(10, POSITIVE)  # gradient steps of the first-step embedding optimisation
    optimisation_lr: float = knob(0.05, POSITIVE)  # learning rate of the embedding optimisation
    optimisation_target: float = knob(0.0, NON_NEGATIVE)  # stop once the first-step noise norm falls below this (0: run all iters)
    # memorized prompts mitigated: a seeded sample stratified by marker presence (None: all; cxrmem/mitigation_sizing.py)
    sample_size: Optional[int] = knob(40, (OPTIONAL_POSITIVE[0], "null or positive (enabled=false mitigates none)"))
    sequential: bool = True  # stop running a strategy once its paired d_mem change against original is decided (mitigation_sizing.py)
    stop_level: float = knob(0.99, UNIT_OPEN)  # the sequential rule's interval level: above F3's 95%, since it looks more than once
    look_every: int = knob(5, POSITIVE)  # prompts between two looks of the sequential rule
    # the sequential rule also stops a strategy whose interval lies within +- this share of original's mean d_mem
    # (no practical change, decided either way; 0: only a change that excludes 0 stops it)
    equivalence_margin: float = knob(0.1, NON_NEGATIVE)
    seed: int = knob(1234, NON_NEGATIVE)  # seed of the sample, the random rewrites and the optimisation's own noises (the same across runs)
    attention_scale: float = knob(0.0, UNIT_CLOSED)  # attention_rescaling: factor on the marker tokens' cross-attention (0: masked; Ren et al.)
    guidance_delay: float = knob(0.3, UNIT_HALF_OPEN)  # delayed/opposite guidance: share of the steps before the transition point (Jain et al.)
    opposite_scale: float = knob(2.0, NON_NEGATIVE)  # opposite_guidance: s of eps_u - s (eps_c - eps_u) before the transition
    noise_iters: int = knob(5, NON_NEGATIVE)  # noise_adjustment: sharpness-aware steps on each initial latent (Han et al.)
    noise_lr: float = knob(0.05, POSITIVE)  # noise_adjustment: step length as a share of the latent's norm
    noise_rho: float = knob(0.05, NON_NEGATIVE)  # noise_adjustment: sharpness-aware perturbation radius as a share of the norm

    @staticmethod
    def check(section, key: str) -> None:
        check_names(f"{key}.strategies", section.strategies, REGISTRY, "strategy")


@dataclass(frozen=True)
class MitigationSettings(MitigationConfig):
    """The section with what mitigation takes from the rest of the run."""

    marker_regex: str = MARKER_REGEX  # what counts as a de-identification marker (corpus.marker_regex)
    samples_per_call: int = 32  # UNet samples per generation call, all strategies sharing it (score.batch_size x G)
    grid_generations: int = 4  # generations kept per strategy for the report's image grid (report.grid_generations)
