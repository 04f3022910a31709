"""Train the testbed: a small text-to-image chest X-ray diffusion model with planted memorized prompts.

Choices, and why:

- Pixel space, one channel, no VAE. A VAE would need its own training and would blur the
  line between what the UNet memorized and what the decoder smooths; at this size the UNet
  can denoise pixels directly, `Components.vae` is None and decoding is the identity
  (images live in [-1, 1]).
- 32x32 images (`testbed.image_size`), not 64x64: on the shared 2-core development machine one
  optimiser step of this UNet at 64x64 cost 2-8x more than at 32x32 (the 64x64 variant needs
  attention at 16x16), which left too few steps inside the 10-15 minute budget for the planted
  prompts to be memorized. The phantoms draw at any size; set image_size=64 where CPU allows.
- UNet2DConditionModel with plain ResNet blocks at the high resolutions and cross-attention
  at the lowest resolution and in the mid block, plus the attention-pooled prompt added to the
  timestep embedding (`addition_embed_type="text"`, still driven by `encoder_hidden_states`
  alone, so the scorer calls it like any text-to-image UNet): the text reaches every block at
  a fraction of the cost of attention over every pixel.
- The BERT text encoder is trained jointly from random initialisation (no pretrained
  weights may be downloaded). A random frozen encoder maps all prompts to nearly the same
  embedding; training it lets the model tell prompts apart, which memorization needs.
  `testbed.text_encoder_steps` freezes it after that many steps and caches every training
  text's conditioning (`CachedConditioning`): the transformer testbed freezes its random
  Gemma-2 from the start, whose per-token states still tell prompts apart (bench/RESULTS.md).
- Noise schedule and sampler: the DDIM scheduler docs/design.md fixes for RadEdit (linear betas,
  trailing spacing, epsilon prediction), so the audit scores the testbed with the schedule it
  uses for RadEdit, except one pixel-space setting: `clip_sample=True`, the predicted clean
  image is clipped to the pixel range [-1, 1] as pixel-space DDPM/DDIM samplers do. Without it,
  guidance at w=7.5 drove the trajectories of prompts the model has not memorized out of the
  pixel range, where the conditional and unconditional predictions disagree most, and the
  full-trajectory d_mem ranked planted prompts *below* the others (AUC 0.36; 0.74 with
  clipping on the same weights). RadEdit denoises VAE latents, which have no such range.
- Classifier-free guidance training: each prompt becomes "" with probability
  `testbed.cond_drop`, so the empty-prompt embedding is a trained unconditional model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from cxrmem.models.tiny import train_wordpiece_tokenizer
from cxrmem.scoring.prediction import FLOW_PREDICTION, prediction_type
from cxrmem.testbed.dataset import MANIFEST, REFERENCE, TrainingSet, build_training_set, with_text_variant
from cxrmem.testbed.networks import NETWORKS

log = logging.getLogger(__name__)

SUMMARY = "train_summary.json"


def epsilon_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, generator: torch.Generator):
    """DDPM noising at uniformly drawn timesteps; the model predicts the noise."""
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator)
    return scheduler.add_noise(x0, noise, timesteps), timesteps, noise


def flow_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, generator: torch.Generator):
    """Rectified flow: x_s = (1 - s) x0 + s eps, the model predicts the velocity eps - x0. s is drawn as diffusers'
    flow-matching training scripts draw it (uniform weighting): a uniform index into the scheduler's own training
    sigmas (shifted as it shifts them), with the matching timestep s * num_train_timesteps."""
    index = torch.randint(0, len(scheduler.timesteps), (x0.shape[0],), generator=generator)
    sigma = scheduler.sigmas[index].reshape(-1, *[1] * (x0.dim() - 1))
    return (1 - sigma) * x0 + sigma * noise, scheduler.timesteps[index], noise - x0


# The noising and regression target of each prediction type a testbed scheduler declares (prediction.py names them).
TRAINING_TARGETS = {"epsilon": epsilon_target, FLOW_PREDICTION: flow_target}


def diffusion_loss(network, x0, text: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """MSE of the network's prediction against its scheduler's target. x0: [B, 1, H, W] in [-1, 1]."""
    noise = torch.randn(x0.shape, generator=generator)
    # A scheduler built in memory has no _class_name in its config yet; a saved one (what the Scorer reads) has.
    target_of = TRAINING_TARGETS[prediction_type({"_class_name": type(network.scheduler).__name__, **network.scheduler.config})]
    noisy, timesteps, target = target_of(network.scheduler, x0, noise, generator)
    return F.mse_loss(network.predict(noisy, timesteps, text), target)


def learning_rate_factor(step: int, total: int, warmup: int, time_share: float = 0.0) -> float:
    """Linear warmup, then cosine decay to 10% of the peak.

    Progress is the larger of the steps' and the wall-time budget's share (`time_share`), so a
    run that `max_minutes` stops early on a busy machine still ends its decay, not mid-schedule.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = max((step - warmup) / max(1, total - warmup), time_share)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress)))


def batches(training_set: TrainingSet, batch_size: int, rng: np.random.Generator):
    """Endless shuffled epochs, cut into batches of image indices."""
    while True:
        epoch = training_set.epoch_indices(rng)
        for start in range(0, len(epoch) - batch_size + 1, batch_size):
            yield epoch[start : start + batch_size]


def loss_curve_summary(losses: list[float], points: int = 10) -> list[dict]:
    """Mean loss over `points` equal stretches of training."""
    chunks = np.array_split(np.asarray(losses), min(points, len(losses)))
    edges = np.cumsum([0] + [len(c) for c in chunks])
    return [{"steps": [int(edges[i]), int(edges[i + 1])], "loss": float(c.mean())} for i, c in enumerate(chunks)]


def save_model(out: str, network, training_set: TrainingSet, summary: dict) -> None:
    """The network's diffusers folder, manifest.csv and train_summary.json."""
    network.save(out)
    training_set.manifest().to_csv(os.path.join(out, MANIFEST), index=False)
    if training_set.heldout:
        training_set.reference().to_csv(os.path.join(out, REFERENCE), index=False)
    with open(os.path.join(out, SUMMARY), "w", encoding="utf-8") as stream:
        json.dump(summary, stream, indent=2)


class CachedConditioning:
    """The conditioning of every training text and the unconditional input, computed once by the network's own
    `condition` with its text encoder frozen in eval mode, as the Scorer runs the saved encoder: the training then
    conditions exactly as the audit will, and a step costs the denoiser alone. On the transformer testbed the text
    encoder (Gemma-2 reading Sana's ~200-token instruction prefix before every prompt) was most of a step's CPU."""

    def __init__(self, network, n_texts: int, batch: int):
        network.text_encoder.eval().requires_grad_(False)
        with torch.no_grad():
            parts = [network.condition(np.arange(lo, min(lo + batch, n_texts)), torch.zeros(min(batch, n_texts - lo), dtype=torch.bool))
                     for lo in range(0, n_texts, batch)]  # fmt: skip
            self.table = torch.cat(parts)
            self.empty = network.condition(np.zeros(1, dtype=np.int64), torch.ones(1, dtype=torch.bool))

    def __call__(self, text_index: np.ndarray, dropped: torch.Tensor) -> torch.Tensor:
        return torch.where(dropped[:, None, None], self.empty, self.table[text_index])


def optimise(network, training_set: TrainingSet, images, tb) -> tuple[list[float], str, float]:
    """The training loop: AdamW, warmup then decay, until testbed.train_steps or testbed.max_minutes. The text
    encoder trains jointly for testbed.text_encoder_steps (None: throughout), then is frozen and cached.

    Returns the losses, what stopped it ("steps" or "max_minutes") and its minutes.
    """
    # A frozen encoder's parameters get no gradients, so AdamW (weight decay included) leaves them as they are.
    params = list(network.denoiser.parameters()) + list(network.text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=tb.learning_rate, weight_decay=0.01)
    generator = torch.Generator().manual_seed(tb.seed)
    rng = np.random.default_rng(tb.seed)
    network.denoiser.train()
    network.text_encoder.train()
    losses: list[float] = []
    started = time.time()
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: learning_rate_factor(step, tb.train_steps, tb.warmup_steps, (time.time() - started) / (60 * tb.max_minutes)),
    )
    stopped_by, condition = "steps", network.condition
    for step, index in enumerate(batches(training_set, tb.train_batch_size, rng)):
        if step >= tb.train_steps:
            break
        if time.time() - started > 60 * tb.max_minutes:
            stopped_by = "max_minutes"
            break
        if step == tb.text_encoder_steps:
            condition = CachedConditioning(network, len(training_set.training_texts), tb.train_batch_size)
            log.info("step %d: text encoder frozen, %d texts' conditioning cached (%.1f min)", step, len(condition.table), (time.time() - started) / 60)
        dropped = torch.rand(len(index), generator=generator) < tb.cond_drop
        text = condition(training_set.text_of_image[index], dropped)
        loss = diffusion_loss(network, images[index], text, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_schedule.step()
        losses.append(loss.item())
        if step % 50 == 0:
            log.info("step %d loss %.4f (%.1f min)", step, np.mean(losses[-50:]), (time.time() - started) / 60)
    return losses, stopped_by, (time.time() - started) / 60


def prepare(cfg) -> tuple[TrainingSet, object, torch.Tensor]:
    """The training set, the untrained network (`testbed.denoiser`) with its tokenizer, and the images in [-1, 1]."""
    tb = cfg.testbed
    training_set = with_text_variant(build_training_set(tb, cfg.corpus), tb.text_variant, tb.seed, cfg.corpus.marker_regex)
    # The vocabulary also covers the manifest's prompts, so that the audited texts (with markers) tokenise
    # under a variant that trained without them.
    vocab_texts = training_set.training_texts + (training_set.prompts if training_set.texts is not None else [])
    network_class = NETWORKS[tb.denoiser]
    tokenizer = train_wordpiece_tokenizer(vocab_texts + network_class.vocabulary_texts(), vocab_size=tb.vocab_size,
                                          max_length=tb.max_tokens)  # fmt: skip
    return training_set, network_class(tb, tokenizer, training_set.training_texts), torch.from_numpy(training_set.images) * 2 - 1


def train(cfg) -> dict:
    """Build the training set, train the denoiser (`testbed.denoiser`) and text encoder, save to `testbed.out`; returns the summary."""
    tb = cfg.testbed
    torch.set_num_threads(tb.num_threads)
    torch.manual_seed(tb.seed)
    started = time.time()
    training_set, network, images = prepare(cfg)
    n_pairs = int(training_set.n_copies.sum())
    log.info(
        "testbed: %d prompts (%d planted), %d images, %d pairs per epoch, %s %.2fM, text encoder %.2fM parameters",
        len(training_set.prompts), int(training_set.planted.sum()), len(training_set.images), n_pairs, type(network.denoiser).__name__,
        sum(p.numel() for p in network.denoiser.parameters()) / 1e6, sum(p.numel() for p in network.text_encoder.parameters()) / 1e6,
    )  # fmt: skip
    losses, stopped_by, minutes = optimise(network, training_set, images, tb)
    summary = {
        "steps": len(losses),
        "stopped_by": stopped_by,
        "final_loss": float(np.mean(losses[-50:])) if losses else None,
        "loss_curve": loss_curve_summary(losses) if losses else [],
        "train_minutes": round(minutes, 2),
        "total_minutes": round((time.time() - started) / 60, 2),
        "n_prompts": len(training_set.prompts),
        "n_planted": int(training_set.planted.sum()),
        "n_images": len(training_set.images),
        "pairs_per_epoch": n_pairs,
        "epochs": round(len(losses) * tb.train_batch_size / n_pairs, 2),
        "threads": tb.num_threads,
        "testbed": OmegaConf.to_container(tb, resolve=True),
    }
    network.denoiser.eval(), network.text_encoder.eval()
    save_model(tb.out, network, training_set, summary)
    summary["out"] = tb.out
    return summary
