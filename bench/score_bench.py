"""Benchmark (not a test): the batched scorer against a per-prompt loop like the paper's code.

The loop makes one StableDiffusionPipeline call per prompt (G images, T steps, VAE decode at
the end) and reads the text-conditional noise norms from a UNet forward hook. Both run on the
same model and prompts; the script checks they agree and prints prompts/s for each and the ratio.

    .venv/bin/python bench/score_bench.py --prompts 256 --generations 4 --steps 50 --batch-sizes 32,64,128
    .venv/bin/python bench/score_bench.py --radedit-shaped --device cuda --dtype bfloat16 --batch-sizes 8,32,128,256 --rounds 1
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from omegaconf import OmegaConf

from cxrmem.corpus.synthetic import generate_reports, tokenizer_texts
from cxrmem.corpus.text import normalise_whitespace, prompt_id
from cxrmem.models.loading import load_components
from cxrmem.models.settings import ModelConfig
from cxrmem.models.tiny import build_tiny_model
from cxrmem.scoring.scorer import Scorer
from cxrmem.scoring.settings import ScoreConfig, ScoreSettings


class PaperLoop:
    """One pipeline call per prompt, norms captured from the UNet's [uncond; cond] output."""

    def __init__(self, components):
        def own_scheduler():  # the pipeline's constructor resets clip_sample on the scheduler it gets
            return type(components.scheduler).from_config(components.scheduler.config)

        self.pipe = StableDiffusionPipeline(
            vae=components.vae,
            text_encoder=components.text_encoder,
            tokenizer=components.tokenizer,
            unet=components.denoiser,
            scheduler=own_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        self.pipe.scheduler = own_scheduler()  # the model's own settings, as the scorer uses them
        self.pipe.set_progress_bar_config(disable=True)
        self.outputs: list[torch.Tensor] = []
        components.denoiser.register_forward_hook(lambda _m, _a, out: self.outputs.append(out[0].float()))

    def d_mem(self, prompt: str, latents: torch.Tensor, steps: int, guidance: float) -> float:
        self.outputs.clear()
        self.pipe(prompt, latents=latents, num_images_per_prompt=latents.shape[0], num_inference_steps=steps,
                  guidance_scale=guidance, output_type="np")
        diffs = [(c - u).flatten(1).norm(dim=1) for u, c in (out.chunk(2) for out in self.outputs)]
        return torch.stack(diffs).mean().item()


def unique_prompts(n: int) -> list[str]:
    seen: dict[str, None] = {}
    for report in generate_reports(n * 4, seed=1):
        seen.setdefault(normalise_whitespace(report["impression"]), None)
    return list(seen)[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="diffusers model folder (default: build a tiny one)")
    parser.add_argument("--radedit-shaped", action="store_true", help="build a RadEdit-shaped random model")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-sizes", default="8", help="scorer batch sizes to time, comma-separated")
    parser.add_argument("--loop-prompts", type=int, default=None, help="prompts for the per-prompt loop (default: all)")
    parser.add_argument("--rounds", type=int, default=3, help="times to repeat the comparison; the median counts")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    model_dir = args.model or build_tiny_model(tempfile.mkdtemp(), tokenizer_texts(), radedit_shaped=args.radedit_shaped)
    model_cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), {"path": model_dir, "dtype": args.dtype})
    components = load_components(model_cfg, need_vae=True)
    prompts = unique_prompts(args.prompts)
    ids = [prompt_id(p) for p in prompts]
    print(f"model {model_dir}  prompts {len(prompts)}  G={args.generations} T={args.steps}  device {args.device} {args.dtype}")

    score_cfg = OmegaConf.merge(OmegaConf.structured(ScoreConfig), {"generations": args.generations, "steps": args.steps})
    n_loop = args.loop_prompts or len(prompts)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    scorers = {b: Scorer(components, ScoreSettings.of(score_cfg), device=args.device) for b in batch_sizes}
    loop = PaperLoop(load_components(model_cfg, need_vae=True))  # its own copy: the scorer changes its UNet's attention
    loop_latents = scorers[batch_sizes[0]].initial_latents(ids[:n_loop])  # the same for every batch size
    loop.d_mem(prompts[0], loop_latents[0].clone(), 1, 7.5)  # warm-up, as each scorer timing gets one

    def time_loop(indices: range) -> tuple[float, list[float]]:
        start = time.perf_counter()
        scores = [loop.d_mem(prompts[i], loop_latents[i].clone(), args.steps, 7.5) for i in indices]
        return time.perf_counter() - start, scores

    # The machine's speed drifts by tens of percent over minutes, so each scorer timing is
    # bracketed by half the loop's prompts before and half after and compared with those, and
    # the whole comparison is repeated: the median ratio over rounds is the result.
    half = n_loop // 2
    ratios: dict[int, list[float]] = {b: [] for b in batch_sizes}
    for round_index in range(args.rounds):
        for batch_size, scorer in scorers.items():
            scorer.score(prompts[:batch_size], ids[:batch_size], steps=1)  # warm-up
            loop_before, scores_before = time_loop(range(half))
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            scores = np.concatenate([scorer.score(prompts[i:i + batch_size], ids[i:i + batch_size]).d_mem
                                     for i in range(0, len(prompts), batch_size)])
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            rate = len(prompts) / (time.perf_counter() - start)
            loop_after, scores_after = time_loop(range(half, n_loop))
            loop_rate = n_loop / (loop_before + loop_after)
            loop_scores = np.array(scores_before + scores_after)
            max_rel = float(np.max(np.abs(scores[:n_loop] - loop_scores) / np.abs(loop_scores)))
            ratios[batch_size].append(rate / loop_rate)
            print(f"round {round_index + 1} batch {batch_size:4d}: scorer {rate:8.3f} prompts/s, loop {loop_rate:7.3f} "
                  f"prompts/s, speed-up {rate / loop_rate:.2f}x, max relative d_mem difference {max_rel:.2e}", flush=True)
    for batch_size, values in ratios.items():
        print(f"batch {batch_size:4d}: median speed-up {np.median(values):.2f}x over {len(values)} rounds "
              f"(min {min(values):.2f}x, max {max(values):.2f}x)")

if __name__ == "__main__":
    main()
