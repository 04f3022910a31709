"""Memorization detectors side by side: pure functions of what the UNet computes -> one score per prompt.

Every detector here reads tensors the Scorer produced (noise predictions, a Jacobian-vector
product, cross-attention probabilities; `Scorer.detect` runs them) and returns a float32 [N]
array. `REGISTRY` names each one with its direction and its cost, as data.

Definitions, and what was chosen where a paper leaves a detail open:

- `dmem` (Wen et al., ICLR 2024): the mean over G generations and the first k DDIM steps of
  ||eps_c - eps_u||, i.e. `cxrmem.scoring.dmem.d_mem` over the first k steps. k = 1 is the
  paper's "first step" detector; k = T is the full score.
- `sharpness` (Jeon et al., ICML 2025): ||H_delta(x_T) s_delta(x_T)||, the Hessian of the
  log-density difference (conditional minus unconditional) applied to the score difference at
  the initial latent x_T and the first timestep, averaged over G. With s = -eps / sigma_t,
  H_delta s_delta = J(eps_c - eps_u) (eps_c - eps_u) / sigma_t^2; the factor 1 / sigma_t^2 is the
  same for every prompt (one timestep), so it is dropped: the score is
  ||J_x(eps_c - eps_u)(x_T) . (eps_c - eps_u)(x_T)||, one forward-mode JVP (torch.func.jvp) of
  both guidance halves, exact rather than the paper's finite-difference proxy.
- `anisotropy` (Asthana et al., ICLR 2026): norm + weight * alignment, both on the pure-noise
  latent x_T without denoising. norm = ||eps_c - eps_u|| at the first timestep (the first-step
  d_mem); alignment = cos(eps_u, eps_c - eps_u) with x_T fed at a LOW-noise timestep (the
  paper's anisotropic regime): training timestep `low_timestep` = 41, the one the authors'
  setting reaches (the third-last of a 50-step schedule of 1000 training steps). It is fixed as a
  training timestep, not a schedule index, so the detector does not change with T (index -3 of a
  4-step schedule would be t = 501, not low noise). Choices: the cosine is taken over the
  whole flattened latent (the authors' code takes it per pixel across channels, which is +-1 for
  a one-channel model such as the testbed); weight = 1 (the authors tune it per model, 2 for
  SD 1.4 and 0.1 for SD 2; tuning it here on the ground truth would fit the test set). The
  columns `anisotropy_norm` and `anisotropy_alignment` come with it.
- `attention_entropy` (Ren et al., ECCV 2024, their detector "E"): at the first step, for the
  conditional pass, each cross-attention layer's probabilities averaged over heads and query
  positions give a distribution over the L text tokens (padding included, as the paper's 77);
  the score is its Shannon entropy (nats), averaged over layers and generations. Memorized
  prompts spread attention over their trigger tokens instead of the first token: higher entropy
  means memorized. The paper picks one layer of Stable Diffusion's 16; a layer index means
  nothing across architectures, so all layers are averaged.

Cost is counted in UNet sample evaluations (one latent through the UNet = 1), as the cascade
does. With `shared` initial latents (score.seed_mode = shared) every prompt starts from the same
G noises, so an unconditional pass on x_T serves a whole batch: `Cost.per_batch`. A JVP sample
(forward-mode, primal and tangent together) is counted apart, in `jvps_per_prompt`; it costs
about two to three evaluations of compute.
Newer detectors (issue 21), each from its paper's text as far as it could be reached; every choice
the text leaves open is written down here:

- `latent_update` (Broken Memories, Chen C. et al., KDD 2026, arXiv 2605.22050): memorization shows
  as numerical instability of the sampler, read from the norms of the latent updates. Only the
  abstract and summaries were reachable (the search tool holds no method section), so the
  paper's "empirical stability region" (a per-step band learned from non-memorized generations)
  is not reproduced. Choices: the update of DDIM step i is x_{i+1} - x_i of the guided trajectory
  (float32, whole latent); the score is its L2 norm averaged over the first k = detect.steps steps
  and the G generations, higher = memorized (a step outside the stable band is a large update).
  It is free beside any sampling: the Scorer records it in the same loop as d_mem.
- `hessian_difference` (anonymous ICML 2026 submission, "Early Detection of Memorization in
  Diffusion Models", repository randomnameforicml/icml-2026; from its README, no code read or
  copied): Metric2 = ||grad_x(1/2 ||s_c||^2) - grad_x(1/2 ||s_u||^2)||^2 at the first step. With
  s = -eps / sigma_t it is ||grad_x (1/2 ||eps_c||^2 - 1/2 ||eps_u||^2)||^2 / sigma_t^4; the factor is
  the same for every prompt (one timestep) and dropped. The gradient is taken with respect to the
  UNet input x_T (one reverse-mode pass through both guidance halves, `Scorer.noise_energy_gradient`),
  averaged over G. The README reports AUC 0.976 on SD 1.5 against Jeon's 0.964 and Wen's 0.962.
- `bright_ending` (Chen, Liu, Shah, Xu, ICLR 2025, "Exploring Local Memorization in Diffusion Models
  via Bright Ending Attention"; abstract and summaries reached, not the method section): at the
  LAST inference step, memorized patches attend more to the end token. The mask m is the end token's
  cross-attention map at the last step of the full T-step trajectory (conditional pass, mean over heads,
  each layer's map upsampled bilinearly to the latent grid, mean over layers), scaled to max 1 per
  sample. The score integrates it into Wen's magnitude as the paper proposes: the mean over steps and
  G of ||m * (eps_c - eps_u)||_2 / mean(m), which is exactly d_mem where m is uniform (the division
  keeps prompts with small masks comparable; that normalisation is this project's choice). The end
  token is the last token the tokenizer kept (the EOS/SEP of min(n_tokens, L)). Column
  `bright_ending_attention` is the raw BE strength, the mean of the unscaled map. It needs the whole
  trajectory, so it costs a full d_mem plus one conditional pass: a column of the final stage, not
  a screen.

Each `Detector` carries its `compute` function: it reads a `Probe` (cxrmem/scoring/scorer.py), which
holds one batch's embeddings and initial latents and hands out the Scorer's predictions on them,
each computed once however many detectors ask. `Scorer.detect` only builds the probe and calls
them, so a new detector is one REGISTRY row, its compute function and its test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np

from cxrmem.capabilities import CROSS_ATTENTION
from cxrmem.settings import NON_NEGATIVE, POSITIVE, Settings, knob

if TYPE_CHECKING:  # torch is imported where tensors are computed: the registry and screening are numpy,
    import torch  # and the config and analyze stage read them without loading torch


@dataclass(frozen=True)
class DetectorSettings(Settings):
    """What a detector run varies: the `detect` config section."""

    generations: int = knob(1, POSITIVE)  # G of the extra detectors: initial noises per prompt
    steps: int = knob(1, POSITIVE)  # k: DDIM steps of the `dmem` detector (1 = the first-step d_mem)
    anisotropy_weight: float = knob(1.0, NON_NEGATIVE)  # weight of anisotropy's alignment term added to its norm
    low_timestep: int = knob(41, NON_NEGATIVE)  # anisotropy's low-noise training timestep (of 1000), where x_T is fed for the alignment


@dataclass(frozen=True)
class Cost:
    """UNet work of one batch: n * per_prompt + per_batch sample evaluations, n * jvps_per_prompt JVPs,
    n * vjps_per_prompt VJPs (forward-mode and reverse-mode derivative samples, counted apart)."""

    per_prompt: int
    per_batch: int = 0
    jvps_per_prompt: int = 0
    vjps_per_prompt: int = 0

    def evaluations(self, n_prompts: int) -> int:
        return n_prompts * self.per_prompt + self.per_batch

    def jvps(self, n_prompts: int) -> int:
        return n_prompts * self.jvps_per_prompt

    def vjps(self, n_prompts: int) -> int:
        return n_prompts * self.vjps_per_prompt

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(
            self.per_prompt + other.per_prompt,
            self.per_batch + other.per_batch,
            self.jvps_per_prompt + other.jvps_per_prompt,
            self.vjps_per_prompt + other.vjps_per_prompt,
        )


def _pair_cost(g: int, shared: bool) -> Cost:
    """One guidance pair on x_T: G conditional per prompt; the G unconditional ones shared or not."""
    return Cost(g, g) if shared else Cost(2 * g)


def _dmem_cost(g: int, k: int, shared: bool) -> Cost:
    first = _pair_cost(g, shared)
    return Cost(first.per_prompt + 2 * g * (k - 1), first.per_batch)


def _anisotropy_cost(g: int, k: int, shared: bool) -> Cost:
    pair = _pair_cost(g, shared)  # two pairs: the first timestep and the low-noise one
    return Cost(2 * pair.per_prompt, 2 * pair.per_batch)


def _sharpness_cost(g: int, k: int, shared: bool) -> Cost:
    pair = _pair_cost(g, shared)
    return Cost(pair.per_prompt, pair.per_batch, jvps_per_prompt=2 * g)  # the JVP runs both halves per prompt


def _hessian_difference_cost(g: int, k: int, shared: bool) -> Cost:
    return Cost(0, vjps_per_prompt=2 * g)  # one forward of both halves per prompt, with its backward


def _bright_ending_cost(g: int, steps: int, shared: bool) -> Cost:
    return _dmem_cost(g, steps, shared) + Cost(g)  # the whole trajectory, then the last step's conditional pass again


# compute(probe, settings) -> {column: [N] float32}; probe: cxrmem.scoring.scorer.Probe
Compute = Callable[[Any, DetectorSettings], dict]


@dataclass(frozen=True)
class Detector:
    name: str
    columns: tuple[str, ...]  # what it writes; the first is the score
    higher_is_memorized: bool
    cost: Callable[[int, int, bool], Cost]  # (generations, steps k, shared initial latents) -> Cost
    paper: str
    compute: Optional[Compute] = None  # what the Scorer runs for it (see the module notes)
    full_schedule: bool = False  # runs the whole T-step trajectory: its cost's k is score.steps, not detect.steps
    needs: tuple[str, ...] = ()  # denoiser capabilities (cxrmem/capabilities.py); without one its columns are NaN, with a warning

    def cost_of(self, generations: int, steps: int, shared: bool, total_steps: int) -> Cost:
        """The declared cost with detect.steps = `steps` and score.steps = `total_steps`."""
        return self.cost(generations, total_steps if self.full_schedule else steps, shared)


# -- the compute functions: what each detector asks of the probe ------------------------------
def _compute_dmem(probe, settings: DetectorSettings) -> dict:
    return {"dmem": probe.dmem(settings.steps)}


def _compute_sharpness(probe, settings: DetectorSettings) -> dict:
    t = probe.first_timestep
    eps_uncond, eps_cond = probe.noise_pair(t)
    return {"sharpness": sharpness_score(probe.noise_difference_jvp(t, eps_cond - eps_uncond).cpu())}


def _compute_anisotropy(probe, settings: DetectorSettings) -> dict:
    eps_uncond, eps_cond = probe.noise_pair(probe.first_timestep)
    low_uncond, low_cond = probe.noise_pair(settings.low_timestep)
    norm = mean_norm(eps_cond - eps_uncond).cpu()
    return anisotropy_scores(norm, alignment(low_uncond, low_cond).cpu(), settings.anisotropy_weight)


def _compute_attention_entropy(probe, settings: DetectorSettings) -> dict:
    return {"attention_entropy": attention_entropy(probe.token_attention(probe.first_timestep))}


def _compute_latent_update(probe, settings: DetectorSettings) -> dict:
    return {"latent_update": mean_over_steps(probe.trajectory(settings.steps).update_norms)}


def _compute_hessian_difference(probe, settings: DetectorSettings) -> dict:
    gradient = probe.noise_energy_gradient(probe.first_timestep)
    return {"hessian_difference": squared_norm(gradient.cpu())}


def _compute_bright_ending(probe, settings: DetectorSettings) -> dict:
    trajectory = probe.trajectory(None, keep=True)  # the whole schedule: BE is read at its last step
    maps = probe.end_token_maps(trajectory.model_inputs[-1], trajectory.timesteps[-1])
    return bright_ending_scores(maps, trajectory.differences)


REGISTRY: dict[str, Detector] = {
    d.name: d
    for d in (
        Detector("dmem", ("dmem",), True, _dmem_cost, "Wen et al., ICLR 2024", _compute_dmem),
        Detector("sharpness", ("sharpness",), True, _sharpness_cost, "Jeon et al., ICML 2025", _compute_sharpness),
        Detector(
            "anisotropy",
            ("anisotropy", "anisotropy_norm", "anisotropy_alignment"),
            True,
            _anisotropy_cost,
            "Asthana et al., ICLR 2026",
            _compute_anisotropy,
        ),
        Detector(
            "attention_entropy", ("attention_entropy",), True, lambda g, k, shared: Cost(g), "Ren et al., ECCV 2024",
            _compute_attention_entropy, needs=(CROSS_ATTENTION,),
        ),
        Detector(
            "latent_update", ("latent_update",), True, _dmem_cost, "Chen C. et al. (Broken Memories), KDD 2026",
            _compute_latent_update,
        ),
        Detector(
            "hessian_difference", ("hessian_difference",), True, _hessian_difference_cost,
            "anonymous ICML 2026 submission (randomnameforicml/icml-2026)", _compute_hessian_difference,
        ),
        Detector(
            "bright_ending", ("bright_ending", "bright_ending_attention"), True, _bright_ending_cost,
            "Chen, Liu, Shah, Xu, ICLR 2025", _compute_bright_ending, full_schedule=True,
            needs=(CROSS_ATTENTION,),
        ),
    )
}


def detector(name: str) -> Detector:
    if name not in REGISTRY:
        raise ValueError(f"unknown detector {name!r}: choose from {', '.join(REGISTRY)}")
    return REGISTRY[name]


# -- the scores -------------------------------------------------------------------------------
def mean_norm(x: torch.Tensor) -> torch.Tensor:
    """[N, G, ...] -> [N]: the L2 norm of each sample over its latent, averaged over generations."""
    return x.float().flatten(2).norm(dim=2).mean(dim=1)


def sharpness_score(jvp_delta: torch.Tensor) -> np.ndarray:
    """||J(eps_c - eps_u) (eps_c - eps_u)|| of [N, G, ...], averaged over generations."""
    return mean_norm(jvp_delta).numpy().astype(np.float32)


def alignment(eps_uncond: torch.Tensor, eps_cond: torch.Tensor) -> torch.Tensor:
    """cos(eps_u, eps_c - eps_u) over the flattened latent of [N, G, ...], averaged over G -> [N]."""
    import torch

    u = eps_uncond.float().flatten(2)
    return torch.nn.functional.cosine_similarity(u, eps_cond.float().flatten(2) - u, dim=2).mean(dim=1)


def anisotropy_scores(norm: torch.Tensor, align: torch.Tensor, weight: float) -> dict[str, np.ndarray]:
    """The combined score and its two parts, each [N] float32."""
    as_np = lambda t: t.numpy().astype(np.float32)  # noqa: E731
    return {"anisotropy": as_np(norm + weight * align), "anisotropy_norm": as_np(norm), "anisotropy_alignment": as_np(align)}


def attention_entropy(token_probs: torch.Tensor) -> np.ndarray:
    """Token distributions [N, G, layers, L] (each sums to 1 over L) -> mean Shannon entropy [N], nats."""
    p = token_probs.double().clamp_min(1e-30)
    return (-(p * p.log()).sum(dim=-1)).flatten(1).mean(dim=1).numpy().astype(np.float32)


def mean_over_steps(step_values: torch.Tensor) -> np.ndarray:
    """[N, G, k] per-step values -> their mean [N] float32; NaN where any is non-finite (as d_mem)."""
    values = step_values.float().flatten(1)
    mean = values.mean(dim=1)
    return mean.masked_fill(~values.isfinite().all(dim=1), float("nan")).numpy().astype(np.float32)


def squared_norm(x: torch.Tensor) -> np.ndarray:
    """||x||^2 over the latent of each sample of [N, G, ...], averaged over generations -> [N] float32."""
    return x.double().flatten(2).pow(2).sum(dim=2).mean(dim=1).numpy().astype(np.float32)


def bright_ending_scores(maps: torch.Tensor, differences: list[torch.Tensor]) -> dict[str, np.ndarray]:
    """End-token maps [N, G, H, W] and per-step eps_c - eps_u [N, G, C, H, W] -> the two BE columns.

    bright_ending = mean over steps and G of ||m * delta||_2 / mean(m), m = the map scaled to max 1;
    bright_ending_attention = the mean of the unscaled map (see the module notes).
    """
    import torch

    maps = maps.float()
    mask = maps / maps.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-30)
    weight = mask.mean(dim=(-2, -1)).clamp_min(1e-30)  # [N, G]
    norms = [(mask[:, :, None] * d.float()).flatten(2).norm(dim=2) / weight for d in differences]
    masked = torch.stack(norms, dim=-1)  # [N, G, T]
    return {
        "bright_ending": mean_over_steps(masked),
        "bright_ending_attention": maps.flatten(1).mean(dim=1).numpy().astype(np.float32),
    }


# -- screening (the cascade with any detector) ----------------------------------------------
def oriented(scores: np.ndarray, name: str) -> np.ndarray:
    """Scores turned so that larger means more likely memorized, whatever the detector."""
    scores = np.asarray(scores, dtype=np.float64)
    return scores if detector(name).higher_is_memorized else -scores


def screen_top(ids: np.ndarray, screen_scores: np.ndarray, top_percent: float, screen: str = "dmem") -> np.ndarray:
    """Ids of the top `top_percent` by the `screen` detector's scores (non-finite never selected).

    The memorized-set rule of `cxrmem.stats.top_percent_mask` (k = ceil(q n / 100), ties kept).
    """
    from cxrmem import stats  # scipy, imported when ranking: validating a config (REGISTRY's names) stays light

    scores = oriented(screen_scores, screen)
    finite = np.isfinite(scores)
    mask, _ = stats.top_percent_mask(scores[finite], top_percent)
    return np.asarray(ids)[finite][mask]


def screen_recall(
    full_scores: np.ndarray, screen_scores: np.ndarray, screen: str, top_percent: float, screen_percent: float
) -> float:
    """Share of the full d_mem's top `top_percent` inside the screen's top `screen_percent`."""
    ids = np.arange(len(full_scores))
    target = set(screen_top(ids, full_scores, top_percent).tolist())
    kept = set(screen_top(ids, screen_scores, screen_percent, screen).tolist())
    return len(target & kept) / len(target) if target else float("nan")
