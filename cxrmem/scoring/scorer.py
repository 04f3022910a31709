"""The batched scorer: text-conditional noise norms for B prompts x G generations per denoiser call.

The sampling loop in `Scorer.sample` is the whole trajectory in one place, for every model layout: both halves
of classifier-free guidance in one denoiser call (cxrmem/scoring/denoisers.py: a UNet, an SDXL-style UNet or a
diffusion transformer), the text-conditional difference converted to epsilon and its norm recorded at every
step (cxrmem/scoring/prediction.py), and the scheduler's step driven by the guided prediction (DDIM,
cxrmem/scoring/ddim.py, or flow-matching Euler, cxrmem/scoring/flow.py: diffusers' arithmetic without host
syncs). Everything else (encoding, seeding, decoding) stays outside it.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import astuple, dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from cxrmem import detectors
from cxrmem.capabilities import missing
from cxrmem.scoring.attention import SharedText, TextLayout, capture_token_attention
from cxrmem.scoring.ddim import DDIMUpdate
from cxrmem.scoring.denoisers import denoiser
from cxrmem.scoring.device import DeviceOutOfMemory, output_layers_in_float32, resolve_device, set_tf32
from cxrmem.scoring.dmem import d_mem, difference_norm, guided_noise, noise_norm
from cxrmem.scoring.flow import FlowEulerUpdate
from cxrmem.scoring.prediction import FLOW_PREDICTION, prediction, prediction_type
from cxrmem.scoring.seeds import initial_latents
from cxrmem.scoring.settings import ScoreSettings
from cxrmem.strategies import BACKWARD

log = logging.getLogger(__name__)


@dataclass
class UNetWork:
    """The model work a Scorer did, counted where it happens (the Scorer is the only caller of the UNet and the VAE):
    plain ints from tensor shapes, so counting adds no device sync. Docs: docs/design.md, "Cost"."""

    unet_samples: int = 0  # rows of every UNet forward: a classifier-free guidance pair is 2, a JVP call its rows once
    backward_samples: int = 0  # rows of the UNet forwards that a backward pass went through
    vae_decodes: int = 0  # images the VAE decoded

    @property
    def evaluations(self) -> int:
        """UNet evaluations as the declared costs count them (cxrmem/strategies.py): a forward sample is 1, its backward BACKWARD."""
        return self.unet_samples + BACKWARD * self.backward_samples

    def __add__(self, other: "UNetWork") -> "UNetWork":
        return UNetWork(*(a + b for a, b in zip(astuple(self), astuple(other))))

    def __iadd__(self, other: "UNetWork") -> "UNetWork":
        """In place: a tally that several executors add to stays the caller's object."""
        self.unet_samples += other.unet_samples
        self.backward_samples += other.backward_samples
        self.vae_decodes += other.vae_decodes
        return self

    def __sub__(self, other: "UNetWork") -> "UNetWork":
        return UNetWork(*(a - b for a, b in zip(astuple(self), astuple(other))))

    def to_json(self) -> dict:
        return {"unet_samples": self.unet_samples, "backward_samples": self.backward_samples, "vae_decodes": self.vae_decodes,
                "evaluations": self.evaluations}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict) -> "UNetWork":
        return cls(data["unet_samples"], data["backward_samples"], data["vae_decodes"])


@dataclass
class Encoded:
    embeddings: torch.Tensor  # [N, L, D] on the scorer's device, in the text encoder's dtype
    n_tokens: np.ndarray  # [N] tokens with special tokens, before truncation
    truncated: np.ndarray  # [N] bool: the tokenizer cut the prompt


@dataclass
class Trajectory:
    step_norms: torch.Tensor  # [N, G, T] float32 on the CPU
    final_latents: torch.Tensor  # [N, G, C, H, W] float32 on the CPU
    model_inputs: Optional[list[torch.Tensor]]  # scaled x_t fed to the UNet at each step, each [N, G, C, H, W] float32 CPU
    timesteps: torch.Tensor  # [T] the timesteps actually run
    update_norms: Optional[torch.Tensor] = None  # [N, G, T] ||x_{i+1} - x_i|| of each DDIM step, float32 CPU
    differences: Optional[list[torch.Tensor]] = None  # eps_c - eps_u at each step, each [N, G, C, H, W] float32 CPU


@dataclass
class Continuation:
    """Where a batch's d_mem trajectories stand after the first k steps of the T-step schedule: enough to
    run steps k..T instead of 1..T (the cascade, cxrmem/stages/continuation.py). d_mem over all T steps
    is the mean of `step_norms` and the norms of the remaining steps, so nothing else is needed."""

    latents: torch.Tensor  # [N, G, C, H, W] float32 CPU: x after k DDIM steps (the next step's input before scaling)
    step_norms: torch.Tensor  # [N, G, k] float32 CPU: ||eps_c - eps_u|| of those k steps

    @property
    def steps(self) -> int:
        return int(self.step_norms.shape[2])

    def rows(self, lo: int, hi: int) -> "Continuation":
        return Continuation(self.latents[lo:hi], self.step_norms[lo:hi])


@dataclass
class ScoreBatch:
    d_mem: np.ndarray  # [N] float32, NaN where nonfinite
    step_norms: np.ndarray  # [N, G, T] float32
    nonfinite: np.ndarray  # [N] bool
    n_tokens: np.ndarray  # [N] int
    truncated: np.ndarray  # [N] bool
    latents: Optional[torch.Tensor] = None  # [N, G, C, H, W] float32 CPU after the scored steps (to continue from)

    @classmethod
    def empty(cls) -> "ScoreBatch":
        return cls(np.zeros(0, np.float32), np.zeros((0, 0, 0), np.float32), np.zeros(0, bool), np.zeros(0, int), np.zeros(0, bool))

    @classmethod
    def concat(cls, parts: list["ScoreBatch"]) -> "ScoreBatch":
        """The rows of `parts` in order (a batch scored in chunks)."""
        if len(parts) == 1:
            return parts[0]
        joined = {name: np.concatenate([getattr(p, name) for p in parts]) for name in ("d_mem", "step_norms", "nonfinite", "n_tokens", "truncated")}
        latents = None if parts[0].latents is None else torch.cat([p.latents for p in parts])
        return cls(**joined, latents=latents)


class Chunks:
    """Runs a batch's work in chunks that fit the device: on a CUDA out-of-memory error the cache is freed,
    the chunk halved and the same rows retried; the size that fit is kept for the next batches and logged.
    Results do not depend on the chunking: every row's noises and trajectory are its own."""

    def __init__(self, what: str, key: str):
        self.what, self.key = what, key  # what a row is, and the config key that sets how many run at once
        self.fits: Optional[int] = None  # the largest chunk known to fit (None: none failed yet)

    def run(self, n: int, work):
        """[work(lo, hi) for consecutive chunks covering [0, n)]."""
        out, lo = [], 0
        size = min(n, self.fits or n)
        while lo < n:
            hi = min(n, lo + size)
            try:
                out.append(work(lo, hi))
            except torch.cuda.OutOfMemoryError:
                if size == 1:
                    raise DeviceOutOfMemory(
                        f"one {self.what} alone does not fit the device's memory: lower {self.key} (or use a larger GPU)"
                    ) from None
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                size = max(1, size // 2)
                self.fits = size
                log.warning("CUDA out of memory: retrying with %d %ss per call (%s asks for more)", size, self.what, self.key)
                continue
            lo = hi
        return out


class Scorer:
    """Scores prompts with d_mem on one model replica (one device); the only code that calls the UNet.

    Attribution, mitigation and the detectors ask it for what they need (an encoding, a noise
    prediction with or without gradients, first-step inputs, k-step trajectories, decoded images)
    and never reach into the model's parts.
    """

    def __init__(
        self,
        components,
        settings: ScoreSettings,
        device: Optional[str | torch.device] = None,
        gpu_assigned: bool = False,
        tf32: bool = False,
        decode_batch: int = 8,
        float32_output: bool = True,
        work: Optional[UNetWork] = None,
    ):
        """`device`: model.device (a replica meant for CUDA that cannot use it raises DeviceUnavailable);
        `gpu_assigned`: Ray gave this process a GPU; `tf32`: model.tf32; `decode_batch`: model.vae_decode_batch;
        `float32_output`: a half-precision UNet's output layers in float32 (off only to measure the gain);
        `work`: the tally this scorer counts into (`on` passes its own: one device, one count)."""
        self.work = work if work is not None else UNetWork()
        self._components = components
        self.settings = settings
        self.device = device if isinstance(device, torch.device) else resolve_device(device, gpu_assigned)
        self.tf32, self.decode_batch, self.float32_output = tf32, decode_batch, float32_output
        set_tf32(self.device, tf32)
        self._chunks = {"score": Chunks("prompt", "score.batch_size"), "detect": Chunks("prompt", "score.batch_size"),
                        "decode": Chunks("image", "model.vae_decode_batch")}  # fmt: skip
        self._warned_skipped: set[str] = set()  # detectors whose skip was logged: once per model, not once per batch
        modules = [components.denoiser, components.text_encoder, *[p for p in components.extras.values() if isinstance(p, torch.nn.Module)]]
        if self.device.type == "cpu" and components.denoiser.dtype != torch.float32 and not settings.cpu_half:
            # Half precision on the CPU is slow and inexact: the CPU path is float32 only.
            log.warning("model dtype %s on the CPU: using float32", components.denoiser.dtype)
            for module in modules:
                module.float()
        for module in modules:
            module.to(self.device)
        self.dtype = components.denoiser.dtype
        if float32_output:
            output_layers_in_float32(components.denoiser)
        # A private scheduler: set_timesteps mutates it, and workers must not share that state.
        self._scheduler = copy.deepcopy(components.scheduler)
        # What the model predicts (the scheduler config's prediction_type): its text-conditional difference is
        # converted to epsilon before every norm, and the scheduler steps on the guided raw prediction.
        self.prediction = prediction(self._scheduler, self.device)
        self.prediction_type = prediction_type(self._scheduler.config)
        # How this layout conditions and calls its network (cxrmem/scoring/denoisers.py).
        self.denoiser = denoiser(components, self.device, settings.use_attention_mask)
        self.shares_text = self.denoiser.shares_text
        self.empty_embedding = self.denoiser.unconditional()  # [1, L, D], the pipeline's own, once per worker
        # The empty prompt as the denoiser sees it; its projections last as long as the worker.
        self.empty_text = SharedText(self.empty_embedding.to(self.dtype))
        self._shared_latents: Optional[torch.Tensor] = None

    @property
    def tokenizer(self):
        return self._components.tokenizer

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one initial latent."""
        return self._components.latent_shape

    @property
    def max_length(self) -> int:
        """Tokens per prompt the text encoder sees (padded and truncated to this)."""
        return self._components.max_length

    def with_steps(self, steps: Optional[int]) -> "Scorer":
        """This scorer, or one on the same model over a `steps`-step schedule (whole trajectories)."""
        if steps is None or steps == self.settings.steps:
            return self
        return self.on(self._components, self.settings.replace(steps=steps, screening_steps=None))

    def on(self, components, settings: Optional[ScoreSettings] = None) -> "Scorer":
        """A scorer of `components` (another model: the attribution null) on this one's device and precision, counting
        into this one's `work`: views of one worker's device (other settings, the null model) are one tally."""
        return Scorer(components, settings or self.settings, self.device, tf32=self.tf32, decode_batch=self.decode_batch,
                      float32_output=self.float32_output, work=self.work)

    def cannot_run(self, needs: Sequence[str]) -> str:
        """Why what `needs` these denoiser capabilities cannot run on this model ("" when it can)."""
        return missing(needs, self.denoiser.capabilities, self._components.layout)

    def skipped(self, needs: dict[str, Sequence[str]]) -> dict[str, str]:
        """name -> why it cannot run on this model, for those of the named tools (name -> the capabilities it needs)
        that cannot: what a stage records of its skipped detectors or strategies."""
        reasons = {name: self.cannot_run(need) for name, need in needs.items()}
        return {name: reason for name, reason in reasons.items() if reason}

    # -- text -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Encoded:
        """The prompts' text conditioning as the denoiser takes it, and their token counts."""
        tokenizer, max_length = self._components.tokenizer, self._components.max_length
        full_lengths = np.array(
            [len(ids) for ids in tokenizer(list(prompts), truncation=False, verbose=False)["input_ids"]], dtype=np.int64
        )
        return Encoded(self.denoiser.encode(list(prompts)), full_lengths, full_lengths > max_length)

    # -- noise ----------------------------------------------------------------------------
    def initial_latents(
        self, prompt_ids: Sequence[str], generations: Optional[int] = None, seed: Optional[int] = None
    ) -> torch.Tensor:
        """[N, G, C, H, W] float32 CPU latents for these prompts under the configured seed mode.

        `seed` draws other noises than the scoring ones (e.g. for an optimisation that must not
        see the noises it is evaluated on).
        """
        generations = generations or self.settings.generations
        shape = self.latent_shape
        sigma = float(getattr(self._scheduler, "init_noise_sigma", 1.0))  # flow matching starts from unit noise
        if seed is not None:
            ids = prompt_ids if self.settings.seed_mode == "per_prompt" else None
            noise = initial_latents(shape, seed, generations, ids, sigma)
            return noise.expand(len(prompt_ids), *noise.shape[1:]) if ids is None else noise
        if self.settings.seed_mode == "per_prompt":
            return initial_latents(shape, self.settings.seed, generations, prompt_ids, sigma)
        if self._shared_latents is None or self._shared_latents.shape[1] != generations:
            self._shared_latents = initial_latents(shape, self.settings.seed, generations, None, sigma)
        return self._shared_latents.expand(len(prompt_ids), *self._shared_latents.shape[1:])

    def timesteps(self, steps: Optional[int] = None) -> torch.Tensor:
        """The T-step schedule (DDIM or flow matching), cut to its first `steps` entries in screening mode."""
        self._scheduler.set_timesteps(self.settings.steps, device=self.device)
        return self._scheduler.timesteps[: steps or self.settings.steps]

    def first_step_inputs(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(UNet inputs x_T [M, C, H, W] on the device in the model dtype, t_T) for initial latents [M, C, H, W]."""
        t = self.timesteps()[0]
        return self._model_input(latents.to(self.device), t), t

    def _model_input(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t as the denoiser takes it: the scheduler's input scaling (identity for DDIM; a flow-matching
        scheduler has none), in the model dtype."""
        scale = getattr(self._scheduler, "scale_model_input", None)
        return (x if scale is None else scale(x, t)).to(self.dtype)

    def _update(self, timesteps: torch.Tensor):
        """The scheduler's step over these timesteps, on the guided raw prediction: DDIM in the model's own
        parameterisation, or the flow-matching Euler step on the velocity."""
        if self.prediction_type == FLOW_PREDICTION:
            return FlowEulerUpdate(self._scheduler, timesteps)
        return DDIMUpdate(self._scheduler, timesteps)

    # -- the sampling loop ----------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        cond_embeddings: torch.Tensor,
        latents: torch.Tensor,
        steps: Optional[int] = None,
        guidance: Optional[float] = None,
        keep_inputs: bool = False,
        shared_first_step: bool = False,
        token_scales: Optional[torch.Tensor] = None,
        keep_differences: bool = False,
        start_step: int = 0,
        record_norms: bool = True,
    ) -> Trajectory:
        """Run G guided DDIM trajectories per prompt and record ||eps_c - eps_u|| at every step.

        cond_embeddings: [N, L, D]; latents: [N, G, C, H, W]. With `shared_first_step` the caller
        promises every prompt starts from the same G latents, so the first step's unconditional
        pass runs once for G samples instead of N x G. `guidance`: one w, or a weight per prompt
        and step [N, >= steps] (a guidance schedule). `token_scales` [N, L]: the conditional pass's
        cross-attention to each token re-scaled (cxrmem/scoring/attention.py, `rescale_attention`).
        The norm of each latent update is recorded too (the latent_update detector: free beside any
        sampling). `start_step` k: `latents` are x after the schedule's first k steps, and only steps
        k..`steps` run (a continued trajectory: DDIM with eta 0 needs nothing but x and the schedule).
        `record_norms=False`: the caller reads only the images, so at w = 1 (one number, not a schedule), where the
        guided prediction is the conditional one, the unconditional pass is not run; `step_norms` are then NaN.
        """
        n, g = latents.shape[:2]
        timesteps = self.timesteps(steps)[start_step:]
        w = self._guidance_weights(guidance, n, g, start_step + len(timesteps))
        x = latents.reshape(n * g, *latents.shape[2:]).to(self.device, torch.float32)
        if token_scales is not None and not self.shares_text:
            raise ValueError("attention re-scaling needs plain cross-attention layers; this UNet's are not")
        scales = None if token_scales is None else token_scales.to(self.device, torch.float32)
        prompts_text = SharedText(cond_embeddings.to(self.device, self.dtype), token_scales=scales)
        cond = prompts_text.embeddings.repeat_interleave(g, dim=0)
        uncond = self.empty_text.embeddings.expand_as(cond)
        uncond_and_cond = torch.cat([uncond, cond])  # built once: every step reuses it
        update = self._update(timesteps)  # the schedule read once
        # w = 1 without norms: u + 1 (c - u) is c, so the copies check's generations at w = 1 cost one pass, not two
        conditional_only = not record_norms and not torch.is_tensor(w) and w == 1.0
        norms, kept, updates, differences = [], [], [], []
        for i, t in enumerate(timesteps):
            x_in = self._model_input(x, t)
            if keep_inputs:
                kept.append(x_in.float().reshape(latents.shape).cpu())
            if conditional_only:
                guided = self._predict(x_in, t, cond, [(prompts_text, g)]).float()
                norms.append(torch.full((n * g,), float("nan"), device=x.device))
            else:
                # The denoiser's raw predictions (epsilon, v or velocity): guidance is linear, so it guides them as they are.
                if i == 0 and shared_first_step and start_step == 0:
                    out_cond = self._predict(x_in, t, cond, [(prompts_text, g)])
                    out_uncond = self._predict(x_in[:g], t, uncond[:g], [(self.empty_text, g)]).repeat(n, 1, 1, 1)
                else:
                    both = [(self.empty_text, n * g), (prompts_text, g)]
                    out_uncond, out_cond = self._predict(torch.cat([x_in, x_in]), t, uncond_and_cond, both).chunk(2)
                difference = self._noise_difference(out_cond, out_uncond, t)
                norms.append(difference_norm(difference))
                if keep_differences:
                    differences.append(difference.reshape(latents.shape).cpu())
                w_i = w[:, start_step + i].view(-1, 1, 1, 1) if torch.is_tensor(w) else w
                guided = guided_noise(out_uncond.float(), out_cond.float(), w_i)
            x_next = update(i, guided, x)
            updates.append((x_next - x).flatten(1).norm(dim=1))
            x = x_next
        per_step = lambda values: torch.stack(values, dim=1).reshape(n, g, len(timesteps)).cpu()  # noqa: E731
        return Trajectory(
            per_step(norms), x.reshape(latents.shape).cpu(), kept if keep_inputs else None, timesteps.cpu(),
            per_step(updates), differences if keep_differences else None,
        )

    def _guidance_weights(self, guidance, n: int, g: int, steps: int):
        """A float w, or [N G, steps] float32 on the device from a per-prompt schedule [N, >= steps]."""
        if guidance is None:
            return self.settings.guidance_scale
        if not torch.is_tensor(guidance):
            return guidance
        if guidance.shape[0] != n or guidance.shape[1] < steps:
            raise ValueError(f"guidance schedule {tuple(guidance.shape)} for {n} prompts and {steps} steps")
        return guidance[:, :steps].to(self.device, torch.float32).repeat_interleave(g, dim=0)

    def predict_noise(
        self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor, layout: Optional[TextLayout] = None
    ) -> torch.Tensor:
        """The denoiser's prediction as the noise epsilon it implies at (x, t) (cxrmem/scoring/prediction.py);
        `layout` names the distinct texts behind encoder_hidden_states.

        Without a layout it is the plain denoiser call, differentiable when called under grad mode
        (attribution and mitigation take gradients through it).
        """
        return self.prediction.noise(self._predict(x, t, encoder_hidden_states, layout), x, t)

    def _predict(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, layout: Optional[TextLayout] = None) -> torch.Tensor:
        """The denoiser's raw output, counted: the only call of the network."""
        output = self.denoiser(x, t, text, layout)
        rows = int(x.shape[0])
        self.work.unet_samples += rows  # after the call: a forward that ran out of memory did no work
        if output.requires_grad:  # a backward pass through this call reaches its output once: counted there
            output.register_hook(lambda grad: self._count_backward(rows))
        return output

    def _count_backward(self, rows: int) -> None:
        self.work.backward_samples += rows

    def _noise_difference(self, out_cond: torch.Tensor, out_uncond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps_c - eps_u in float32 from two raw predictions: their difference times the conversion's factor
        (none for an epsilon model, whose difference is taken exactly as before)."""
        difference = out_cond.float() - out_uncond.float()
        scale = self.prediction.difference_scale(t, difference)
        return difference if scale is None else scale * difference

    # -- text-conditional noise with gradients (attribution, embedding optimisation) -----------
    @torch.no_grad()
    def unconditional_noise(self, x_in: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """eps(x_t, e_0) for K UNet inputs [K, C, H, W] at timesteps [K] (or one shared)."""
        return self.predict_noise(x_in, timesteps, self.empty_text.embeddings.expand(len(x_in), -1, -1))

    def conditional_noise_norms(
        self,
        x_in: torch.Tensor,
        timesteps: torch.Tensor,
        cond_emb: torch.Tensor,
        eps_uncond: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """||eps(x_t, e_p) - eps(x_t, e_0)||_2 per sample [K], differentiable in cond_emb ([K, L, D] or [1, L, D]).

        `eps_uncond` (from `unconditional_noise`) saves a UNet call where the inputs repeat.
        """
        if eps_uncond is None:
            eps_uncond = self.unconditional_noise(x_in, timesteps)
        eps_cond = self.predict_noise(x_in, timesteps, cond_emb.to(self.dtype).expand(len(x_in), -1, -1))
        return noise_norm(eps_cond, eps_uncond)

    def first_step_noise_norms(self, latents: torch.Tensor, cond_emb: torch.Tensor) -> torch.Tensor:
        """||eps(x_T, e_p) - eps(x_T, e_0)||_2 at the first timestep per initial latent [M, C, H, W] -> [M],
        differentiable in the latents through both halves (the initial-noise adjustment)."""
        t = self.timesteps()[0]
        x_in = self._model_input(latents.to(self.device), t)
        m = len(x_in)
        context = torch.cat([self.empty_text.embeddings.expand(m, -1, -1), cond_emb.to(self.dtype).expand(m, -1, -1)])
        eps_uncond, eps_cond = self.predict_noise(torch.cat([x_in, x_in]), t, context).chunk(2)
        return noise_norm(eps_cond, eps_uncond)

    # -- scoring --------------------------------------------------------------------------
    def score(
        self, prompts: Sequence[str], prompt_ids: Sequence[str], steps: Optional[int] = None, start: Optional[Continuation] = None
    ) -> ScoreBatch:
        """d_mem and the [N, G, T] norms of a batch; `steps` (default: score.screening_steps) screens.

        `start`: these prompts' trajectories after their first k <= steps steps under these settings'
        seeds and schedule (a Continuation of an earlier `score`'s `latents` and norms); only the
        remaining steps run and the result is the from-scratch one (to floating-point tolerance).
        Runs in chunks that fit the device (`Chunks`: halved on a CUDA out-of-memory error)."""
        prompts, prompt_ids = list(prompts), list(prompt_ids)

        def chunk(lo: int, hi: int) -> ScoreBatch:
            return self._score(prompts[lo:hi], prompt_ids[lo:hi], steps, None if start is None else start.rows(lo, hi))

        return ScoreBatch.concat(self._chunks["score"].run(len(prompts), chunk)) if prompts else self._score(prompts, prompt_ids, steps, start)

    def _score(self, prompts: list[str], prompt_ids: list[str], steps: Optional[int], start: Optional[Continuation]) -> ScoreBatch:
        steps = steps or self.settings.scored_steps
        encoded = self.encode(prompts)
        if start is not None and start.steps > steps:
            raise ValueError(f"a trajectory continued from step {start.steps} cannot be scored over {steps} steps")
        if start is None:
            latents, done, k = self.initial_latents(prompt_ids), None, 0
        else:
            latents, done, k = start.latents, start.step_norms, start.steps
        if k < steps:
            trajectory = self.sample(
                encoded.embeddings, latents, steps=steps, shared_first_step=self.settings.seed_mode == "shared", start_step=k
            )
            norms, latents = trajectory.step_norms, trajectory.final_latents
            norms = norms if done is None else torch.cat([done, norms], dim=2)
        else:
            norms = done  # the earlier stage ran every step asked for
        score, nonfinite = d_mem(norms)
        return ScoreBatch(
            score.numpy().astype(np.float32),
            norms.numpy().astype(np.float32),
            nonfinite.numpy(),
            encoded.n_tokens,
            encoded.truncated,
            latents.float(),
        )

    # -- images ---------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [M, C, H, W] -> images in [0, 1] on the CPU; pixel-space models decode by identity.

        At most `decode_batch` images per VAE call (the SDXL VAE needs about a gigabyte per 512x512 image
        in float32), halved on a CUDA out-of-memory error; in bfloat16 on CUDA (float16 overflows in the
        SDXL VAE), float32 elsewhere. Each image's decode is its own: slices give the images of one call."""
        vae = self._components.vae
        if vae is None:
            return (latents.float() / 2 + 0.5).clamp(0, 1).cpu()
        self.work.vae_decodes += len(latents)  # images, not calls: a slice retried after an out-of-memory error counts once
        vae.to(self.device, torch.bfloat16 if self.device.type == "cuda" else torch.float32)

        def decode_slice(lo: int, hi: int) -> torch.Tensor:
            scaled = latents[lo:hi].to(self.device, vae.dtype) / self._components.vae_scaling_factor
            return (vae.decode(scaled).sample.float() / 2 + 0.5).clamp(0, 1).cpu()

        slices = self._chunks["decode"]
        slices.fits = min(slices.fits or self.decode_batch, self.decode_batch)
        return torch.cat(slices.run(len(latents), decode_slice)) if len(latents) else decode_slice(0, 0)

    # == detectors (issue 15): the UNet work behind cxrmem/detectors.py =======================
    def _first_inputs(self, cond_embeddings: torch.Tensor, latents: torch.Tensor, t: torch.Tensor):
        """x_T as the UNet takes it [N G, C, H, W], the prompts' SharedText, and their per-sample embeddings."""
        g = latents.shape[1]
        # contiguous: shared latents are an expanded view, which forward-mode AD refuses as a primal.
        x = latents.reshape(-1, *latents.shape[2:]).to(self.device, torch.float32).contiguous()
        text = SharedText(cond_embeddings.to(self.device, self.dtype))
        return self._model_input(x, t), text, text.embeddings.repeat_interleave(g, dim=0)

    @torch.no_grad()
    def noise_pair(self, cond_embeddings: torch.Tensor, latents: torch.Tensor, t: torch.Tensor, shared: bool):
        """(eps_u, eps_c), each [N, G, C, H, W] float32 on the device, at timestep t on `latents` unchanged.

        `shared`: every prompt starts from the same G latents, so the unconditional pass runs on G samples.
        """
        n, g = latents.shape[:2]
        x_in, text, cond = self._first_inputs(cond_embeddings, latents, t)
        eps_cond = self.predict_noise(x_in, t, cond, [(text, g)])
        rows = g if shared else n * g
        uncond = self.empty_text.embeddings.expand(rows, *cond.shape[1:])
        eps_uncond = self.predict_noise(x_in[:rows], t, uncond, [(self.empty_text, rows)])
        if shared:
            eps_uncond = eps_uncond.repeat(n, 1, 1, 1)
        return eps_uncond.float().reshape(latents.shape), eps_cond.float().reshape(latents.shape)

    @torch.no_grad()
    def noise_difference_jvp(
        self, cond_embeddings: torch.Tensor, latents: torch.Tensor, t: torch.Tensor, tangent: torch.Tensor
    ) -> torch.Tensor:
        """J_x(eps_c - eps_u)(x) . tangent [N, G, C, H, W] float32: one forward-mode JVP of both guidance halves."""
        n, g = latents.shape[:2]
        x_in, text, cond = self._first_inputs(cond_embeddings, latents, t)
        context = torch.cat([self.empty_text.embeddings.expand_as(cond), cond])
        layout = [(self.empty_text, n * g), (text, g)]

        def difference(z):
            eps_uncond, eps_cond = self.predict_noise(torch.cat([z, z]), t, context, layout).chunk(2)
            return eps_cond - eps_uncond

        direction = tangent.reshape(x_in.shape).to(self.device, x_in.dtype)
        # Fused attention kernels have no forward-mode derivative: the JVP runs the math kernel.
        with sdpa_kernel(SDPBackend.MATH):
            _, product = torch.func.jvp(difference, (x_in,), (direction,))
        return product.float().reshape(latents.shape)

    @torch.no_grad()
    def token_attention(self, cond_embeddings: torch.Tensor, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """[N, G, layers, L] float32 on the CPU: each cross-attention layer's attention per text token
        (mean over heads and query positions) in the conditional pass at timestep t."""
        n, g = latents.shape[:2]
        x_in, text, cond = self._first_inputs(cond_embeddings, latents, t)
        records: list[torch.Tensor] = []
        processors = capture_token_attention(self.denoiser.module, records)
        try:
            self.predict_noise(x_in, t, cond, [(text, g)])
        finally:
            self.denoiser.module.set_attn_processor(processors)
        return torch.stack(records, dim=1).reshape(n, g, len(records), -1).cpu()

    def noise_energy_gradient(self, cond_embeddings: torch.Tensor, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """grad_x (1/2 ||eps_c(x)||^2 - 1/2 ||eps_u(x)||^2) at the UNet input x of `latents` [N, G, C, H, W],
        float32: one forward of both guidance halves with one backward, with respect to x only."""
        n, g = latents.shape[:2]
        x_in, text, cond = self._first_inputs(cond_embeddings, latents, t)
        context = torch.cat([self.empty_text.embeddings.expand_as(cond), cond])
        layout = [(self.empty_text, n * g), (text, g)]
        with torch.enable_grad():
            x = x_in.detach().requires_grad_(True)
            eps_uncond, eps_cond = self.predict_noise(torch.cat([x, x]), t, context, layout).float().chunk(2)
            energy = 0.5 * (eps_cond.pow(2).sum() - eps_uncond.pow(2).sum())  # samples are independent: one sum
            (gradient,) = torch.autograd.grad(energy, x)
        text.projections.clear()  # keys and values built under grad mode hold the graph
        return gradient.detach().float().reshape(latents.shape)

    @torch.no_grad()
    def end_token_maps(self, cond_embeddings: torch.Tensor, x_in: torch.Tensor, t: torch.Tensor, end_index: torch.Tensor) -> torch.Tensor:
        """[N, G, H, W] float32 CPU: the end token's cross-attention map in the conditional pass on UNet inputs
        x_in [N, G, C, H, W] at timestep t (mean over heads; each layer upsampled to the latent grid; mean over layers).

        end_index [N]: the position of each prompt's end token."""
        n, g = x_in.shape[:2]
        h, w = x_in.shape[-2:]
        rows = end_index.to(self.device).repeat_interleave(g)
        samples = torch.arange(n * g, device=self.device)
        records: list[torch.Tensor] = []
        end_token = lambda probs: probs.mean(dim=1)[samples, :, rows]  # noqa: E731 [S, heads, Q, L] -> [S, Q]
        text = SharedText(cond_embeddings.to(self.device, self.dtype))
        flat = x_in.reshape(n * g, *x_in.shape[2:]).to(self.device, self.dtype)
        processors = capture_token_attention(self.denoiser.module, records, end_token)
        try:
            self.predict_noise(flat, t.to(self.device), text.embeddings.repeat_interleave(g, dim=0), [(text, g)])
        finally:
            self.denoiser.module.set_attn_processor(processors)
        maps = []
        for record in records:  # a layer's queries are its h' x w' grid, h' / w' = h / w
            scale = (h * w / record.shape[1]) ** 0.5
            grid = record.reshape(n * g, 1, round(h / scale), round(w / scale))
            maps.append(torch.nn.functional.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False))
        return torch.stack(maps).mean(dim=0).reshape(n, g, h, w).cpu()

    def detect(
        self,
        prompts: Sequence[str],
        prompt_ids: Sequence[str],
        names: Sequence[str],
        settings: detectors.DetectorSettings = detectors.DetectorSettings(),
    ) -> dict[str, np.ndarray]:
        """The columns of the named detectors (cxrmem/detectors.py REGISTRY) for one batch, each [N] float32:
        each registry entry's compute function runs on one Probe of the batch."""
        unknown = [name for name in names if name not in detectors.REGISTRY]
        if unknown:
            raise ValueError(f"unknown detectors {unknown}: choose from {', '.join(detectors.REGISTRY)}")
        prompts, prompt_ids = list(prompts), list(prompt_ids)
        skipped = self.skipped({name: detectors.REGISTRY[name].needs for name in names})
        for name in skipped.keys() - self._warned_skipped:
            log.warning("detector %s skipped (its columns are NaN): it %s", name, skipped[name])
        self._warned_skipped.update(skipped)

        def chunk(lo: int, hi: int) -> dict[str, np.ndarray]:
            probe = Probe(self, self.encode(prompts[lo:hi]), self.initial_latents(prompt_ids[lo:hi], settings.generations))
            out: dict[str, np.ndarray] = {}
            for name in names:
                if name in skipped:
                    out.update({column: np.full(hi - lo, np.nan, np.float32) for column in detectors.REGISTRY[name].columns})
                else:
                    out.update(detectors.REGISTRY[name].compute(probe, settings))
            return out

        parts = self._chunks["detect"].run(len(prompts), chunk) if prompts else [chunk(0, 0)]
        return {column: np.concatenate([part[column] for part in parts]) for column in parts[0]}


class Probe:
    """One batch as the detectors' compute functions see it: its prompts' encoding and initial latents,
    and the Scorer's predictions on them, each made once however many detectors ask for it."""

    def __init__(self, scorer: Scorer, encoded: Encoded, latents: torch.Tensor):
        self.scorer, self.encoded, self.latents = scorer, encoded, latents
        self.shared = scorer.settings.seed_mode == "shared"
        self._made: dict = {}

    def _once(self, key, make):
        if key not in self._made:
            self._made[key] = make()
        return self._made[key]

    @property
    def embeddings(self) -> torch.Tensor:
        return self.encoded.embeddings

    @property
    def first_timestep(self) -> torch.Tensor:
        return self.scorer.timesteps()[0]

    def _timestep(self, t) -> torch.Tensor:
        return t if isinstance(t, torch.Tensor) else torch.tensor(t, device=self.scorer.device)

    def trajectory(self, steps: Optional[int], keep: bool = False) -> Trajectory:
        """The guided trajectories over the first `steps` steps (None: all T); `keep`: with the UNet inputs
        and eps_c - eps_u of every step. A kept trajectory serves an unkept request of the same steps."""
        if not keep and (steps, True) in self._made:
            return self._made[(steps, True)]
        return self._once((steps, keep), lambda: self.scorer.sample(
            self.embeddings, self.latents, steps=steps, shared_first_step=self.shared, keep_inputs=keep, keep_differences=keep,
        ))

    def dmem(self, steps: Optional[int]) -> np.ndarray:
        return d_mem(self.trajectory(steps).step_norms)[0].numpy().astype(np.float32)

    def noise_pair(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        t = self._timestep(t)
        return self._once(("pair", int(t)), lambda: self.scorer.noise_pair(self.embeddings, self.latents, t, self.shared))

    def noise_difference_jvp(self, t, tangent: torch.Tensor) -> torch.Tensor:
        return self.scorer.noise_difference_jvp(self.embeddings, self.latents, self._timestep(t), tangent)

    def noise_energy_gradient(self, t) -> torch.Tensor:
        return self.scorer.noise_energy_gradient(self.embeddings, self.latents, self._timestep(t))

    def token_attention(self, t) -> torch.Tensor:
        return self.scorer.token_attention(self.embeddings, self.latents, self._timestep(t))

    def end_token_maps(self, x_in: torch.Tensor, t) -> torch.Tensor:
        """The end token's attention map [N, G, H, W] on UNet inputs x_in at t; the end token is the last one
        the tokenizer kept (EOS / SEP)."""
        kept = np.minimum(self.encoded.n_tokens, self.scorer.max_length)
        return self.scorer.end_token_maps(self.embeddings, x_in, self._timestep(t), torch.as_tensor(kept - 1))
