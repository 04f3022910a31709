"""Benchmark (not a test): is a reference's heavy tail made of prompts the model half saw? (issue 34)

For each reference prompt of an audited run: the word Jaccard overlap with its nearest training (corpus) prompt, and
whether the reference's highest length-standardized d_mem (its top 10%, the tail the p-values rest on) are closer to the
training set than the rest. No model work: it reads the run's scores.parquet and reference/scores.parquet.

    PYTHONPATH=$PWD .venv/bin/python bench/reference_leakage.py [--run runs/calibration/iuxray_heldout] [--bins 4]
"""

from __future__ import annotations

import argparse
import re

import pandas as pd
from scipy.stats import mannwhitneyu, spearmanr


def words(text: str) -> frozenset:
    return frozenset(re.sub(r"[^a-z ]", " ", text.lower()).split())


def nearest_overlap(reference: list[str], corpus: list[str]) -> list[float]:
    """Each reference prompt's largest word Jaccard with a corpus prompt."""
    corpus_words = [words(t) for t in corpus]
    return [max(len(w & c) / max(1, len(w | c)) for c in corpus_words) for w in map(words, reference)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/calibration/iuxray_heldout")
    parser.add_argument("--bins", type=int, default=4, help="length bins (token-count quantiles), as analyze.reference_length_bins")
    args = parser.parse_args()
    ref = pd.read_parquet(f"{args.run}/reference/scores.parquet")
    corpus = pd.read_parquet(f"{args.run}/scores.parquet", columns=["prompt"])
    ref["jaccard"] = nearest_overlap(ref.prompt.tolist(), corpus.prompt.tolist())
    ref["bin"] = pd.qcut(ref.n_tokens, args.bins, labels=False, duplicates="drop")
    # the same robust standardization as the calibration's bins: (d_mem - median) / IQR within a length bin
    ref["z"] = ref.groupby("bin").d_mem.transform(lambda x: (x - x.median()) / (x.quantile(0.75) - x.quantile(0.25)))
    top = ref.z >= ref.z.quantile(0.9)
    print(f"{args.run}: {len(ref)} reference prompts against {len(corpus)} corpus prompts")
    print(f"Spearman(d_mem, nearest Jaccard) {spearmanr(ref.d_mem, ref.jaccard)[0]:+.2f}; "
          f"within length bins Spearman(z, Jaccard) {spearmanr(ref.z, ref.jaccard)[0]:+.2f} (p {spearmanr(ref.z, ref.jaccard)[1]:.2g})")
    print(f"top 10% by z: median Jaccard {ref.jaccard[top].median():.2f} against {ref.jaccard[~top].median():.2f} "
          f"(Mann-Whitney p {mannwhitneyu(ref.jaccard[top], ref.jaccard[~top])[1]:.2g}); share >= 0.5: "
          f"{(ref.jaccard[top] >= 0.5).mean():.0%} against {(ref.jaccard[~top] >= 0.5).mean():.0%}")
    print(ref.sort_values("z", ascending=False)[["z", "n_tokens", "jaccard", "prompt"]].head(8).to_string(max_colwidth=60))


if __name__ == "__main__":
    main()
