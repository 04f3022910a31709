"""Benchmark (not a test): how many decoded generations per prompt and strategy the mitigation verdicts need.

The paper's spread measure is the mean pairwise RMS distance between N generations of a prompt (N = 50).
What a verdict reads is not one prompt's spread but the paired change of the spread, strategy against
`original`, across the mitigated prompts (their mean and its 95% t interval). Within-prompt noise from
drawing N generations widens that interval; past some N the between-prompt spread dominates and more
generations buy nothing. This measures where, on a testbed's planted prompts with markers:

- every strategy of `--strategies` generates `--max-n` generations from the same seeded noises
  (cxrmem/mitigation.py: `sampling_for`, `generate_images`), so the first n of them are the generations
  a run with mitigation.n_generations = n would draw (nested, paired across strategies);
- per n: the within-prompt error of the spread (median over prompts and strategies of |spread_n -
  spread_max| / spread_max), and per strategy the paired change's mean, its 95% interval half-width and
  its sign verdict (decided up / down, or undecided), beside those at n = max.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python bench/mitigation_generations.py --prompts 12
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import pandas as pd
import torch
from scipy import stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cxrmem.config import load_config  # noqa: E402
from cxrmem.corpus.text import prompt_id  # noqa: E402
from cxrmem.mitigation import generate_images, mitigated_prompt, pairwise_rms_distance, sampling_for, strategy_embedding, vocabulary_words  # noqa: E402
from cxrmem.models.loading import load_components  # noqa: E402
from cxrmem.results_page import cpu_name, write_results  # noqa: E402
from cxrmem.scoring.scorer import Scorer  # noqa: E402
from cxrmem.scoring.settings import ScoreSettings  # noqa: E402
from cxrmem.stages.worker import mitigation_settings  # noqa: E402

HEADING = "## Mitigation: generations per prompt"


def spreads(scorer, sampler, prompt: str, strategies: list[str], settings, vocab, ns: list[int]) -> np.ndarray:
    """[strategy, n] mean pairwise RMS distance of the first n generations, every strategy from the same noises."""
    pid = prompt_id(prompt)
    texts = [mitigated_prompt(s, prompt, pid, vocab, settings) for s in strategies]
    encoded = scorer.encode(texts).embeddings
    embeddings = torch.cat([strategy_embedding(scorer, s, encoded[i : i + 1], pid, settings) for i, s in enumerate(strategies)])
    latents = sampler.initial_latents([pid], max(ns))
    images = generate_images(sampler, sampling_for(sampler, strategies, texts, embeddings, latents, settings), settings.samples_per_call)
    return np.array([[pairwise_rms_distance(images[i, :n]) for n in ns] for i in range(len(strategies))])


def paired(changes: np.ndarray) -> tuple[float, float, str]:
    """Mean paired change, its 95% t half-width, and the sign it decides ('down', 'up' or 'undecided')."""
    mean, half = float(changes.mean()), float(stats.t.ppf(0.975, len(changes) - 1) * changes.std(ddof=1) / np.sqrt(len(changes)))
    return mean, half, "down" if mean + half < 0 else "up" if mean - half > 0 else "undecided"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "conf", "testbed.yaml"))
    parser.add_argument("--prompts", type=int, default=12, help="planted prompts with markers (the most duplicated first)")
    parser.add_argument("--strategies", default="original,remove_marker,random_word,random_insertion")
    parser.add_argument("--ns", default="4,8,16,24,32,50", help="generations per prompt compared; the last is the reference")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps of the generations (mitigation.steps)")
    parser.add_argument("--results", default=os.path.join(ROOT, "bench", "RESULTS.md"))
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    ns, strategies = [int(n) for n in args.ns.split(",")], args.strategies.split(",")
    cfg = load_config(args.config, [f"mitigation.strategies=[{args.strategies}]", f"mitigation.n_generations={max(ns)}",
                                    f"mitigation.steps={args.steps}"])  # fmt: skip
    settings = mitigation_settings(cfg)
    scorer = Scorer(load_components(cfg.model, need_vae=True), ScoreSettings.of(cfg.score), device="cpu")
    sampler, vocab = scorer.with_steps(args.steps), vocabulary_words(scorer.tokenizer)
    manifest = pd.read_csv(os.path.join(ROOT, cfg.model.path, "manifest.csv"))
    chosen = manifest[manifest.planted & manifest.prompt.str.contains("___")].sort_values("n_copies", ascending=False).head(args.prompts)
    start = time.perf_counter()
    table = np.stack([spreads(scorer, sampler, p, strategies, settings, vocab, ns) for p in chosen.prompt])  # [P, S, n]
    seconds = time.perf_counter() - start
    error = np.median(np.abs(table - table[..., -1:]) / table[..., -1:], axis=(0, 1))
    lines = [HEADING, "",
             f"{cpu_name()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}; {cfg.model.path}, {len(chosen)} planted prompts "
             f"with markers, T={args.steps}, w={cfg.score.guidance_scale}; {seconds:.0f} s. Command: `OMP_NUM_THREADS=1 PYTHONPATH=$PWD "
             f".venv/bin/python bench/mitigation_generations.py --prompts {args.prompts}`.", "",
             "Within-prompt error of the spread (median |spread_n - spread_max| / spread_max over prompts and strategies), and "
             "per strategy the paired change of the spread against `original` across the prompts: mean ± 95% t half-width, "
             "and the sign it decides.", "",
             "| n | spread error | " + " | ".join(strategies[1:]) + " |", "|---|---|" + "---|" * (len(strategies) - 1)]  # fmt: skip
    for j, n in enumerate(ns):
        cells = []
        for s in range(1, len(strategies)):
            mean, half, verdict = paired(table[:, s, j] - table[:, 0, j])
            cells.append(f"{mean:+.4f} ± {half:.4f} ({verdict})")
        lines.append(f"| {n} | {error[j]:.3f} | " + " | ".join(cells) + " |")
    section = "\n".join(lines) + "\n"
    print(section)
    write_results(args.results, HEADING, section)


if __name__ == "__main__":
    main()
