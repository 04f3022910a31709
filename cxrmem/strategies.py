"""The mitigation strategies as data: one row per strategy, its kind and its cost (cxrmem/mitigation.py runs them).

A strategy changes one thing about how a memorized prompt is generated:

- `baseline`: nothing (`original`);
- `text`: the prompt's words (random_word, random_number, remove_marker, surrogate, random_insertion);
- `embedding`: the text embedding (embedding_noise, embedding_optimisation);
- `attention`: the cross-attention to some tokens (attention_rescaling, Ren et al., ECCV 2024);
- `guidance`: the guidance weight over the first steps (delayed_guidance, opposite_guidance, Jain et al., CVPR 2025);
- `noise`: the initial noise (noise_adjustment, Han et al., NeurIPS 2025).

Cost is declared in UNet sample evaluations per prompt (one latent through the UNet = 1; a backward
pass counted as 2, the usual rule of thumb): d_mem over G noises and the N generations, each step of
plain classifier-free guidance 2 samples, plus what the strategy does before sampling. The Scorer
counts the same work as it happens (`Scorer.work`); tests/test_cost.py holds the two equal. No torch
here, so that the config can validate names without loading it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from cxrmem.settings import check_names as check_listed

KINDS = ("baseline", "text", "embedding", "attention", "guidance", "noise")
BACKWARD = 2  # evaluations one backward pass through the UNet costs


# The initial noises a kind prepares, of (G scored, N generated): Wen et al. optimise the embedding on G noises
# of their own seed, Han et al. adjust every initial noise the prompt is scored and generated from.
PREPARED = {"embedding": lambda g, n: g, "noise": lambda g, n: g + n}


@dataclass(frozen=True)
class Strategy:
    kind: str  # one of KINDS
    summary: str  # one line for the report
    extra: Callable[[object], int] = lambda settings: 0  # evaluations per prepared initial noise (PREPARED) before sampling

    def evaluations(self, settings, scored: tuple[int, int], generated: tuple[int, int]) -> int:
        """UNet evaluations of one prompt: d_mem over `scored` = (G noises, T_s steps), the `generated` = (N generations,
        T steps) and the preparation (settings: MitigationSettings or the config section)."""
        (g, t_s), (n, t) = scored, generated
        prepared = PREPARED[self.kind](g, n) if self.kind in PREPARED else 0
        return 2 * g * t_s + 2 * n * t + prepared * self.extra(settings)


REGISTRY: dict[str, Strategy] = {
    "original": Strategy("baseline", "the prompt as it is"),
    "random_word": Strategy("text", "every marker -> a random vocabulary word"),
    "random_number": Strategy("text", "every marker -> a random number"),
    "remove_marker": Strategy("text", "every marker deleted"),
    "surrogate": Strategy("text", "every marker -> a realistic surrogate"),
    "random_insertion": Strategy("text", "random words inserted (Somepalli et al.)"),
    "embedding_noise": Strategy("embedding", "Gaussian noise on the text embedding"),
    # Wen et al., per noise: one unconditional pass, then per iteration a conditional pass and its backward.
    "embedding_optimisation": Strategy(
        "embedding", "first-step embedding optimisation (Wen et al.)", lambda s: 1 + s.optimisation_iters * (1 + BACKWARD)
    ),
    "attention_rescaling": Strategy("attention", "cross-attention to the marker tokens re-scaled (Ren et al.)"),
    "delayed_guidance": Strategy("guidance", "no guidance (w=0) over the first steps, then w (Jain et al.)"),
    "opposite_guidance": Strategy("guidance", "opposite guidance (-s) over the first steps, then w (Jain et al.)"),
    # Han et al., per noise: per iteration two gradients (sharpness-aware), each both halves forward and backward.
    "noise_adjustment": Strategy(
        "noise", "initial noise moved to a lower guidance norm (Han et al.)", lambda s: s.noise_iters * 2 * 2 * (1 + BACKWARD)
    ),
}


def check_names(key: str, names) -> None:
    """Config check: every name at `key` is a strategy of REGISTRY, none twice."""
    check_listed(key, names, REGISTRY, "strategy")


def names_of(kind: str) -> tuple[str, ...]:
    return tuple(name for name, row in REGISTRY.items() if row.kind == kind)


def kind_of(name: str) -> str:
    if name not in REGISTRY:
        raise ValueError(f"unknown mitigation strategy {name!r}: choose from {', '.join(REGISTRY)}")
    return REGISTRY[name].kind
