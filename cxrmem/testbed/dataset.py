"""Training pairs of the testbed, with planted memorized prompts.

Prompts are report impressions, whitespace-normalised, from one of two sources (`testbed.source`):

- synthetic: synthetic MIMIC-style reports (`cxrmem.corpus.synthetic`), deduplicated, so every
  unplanted prompt is seen once per epoch with its own patient's phantom (`n_unique` of them);
- iuxray: the IU X-ray reports torchxrayvision ships (`cxrmem.corpus.iuxray`), with their
  natural duplication kept: every report is one pair of its impression and its own patient's
  phantom, so "No acute cardiopulmonary abnormality." (302 reports) is trained with 302
  different images. Such a template is a shared phrase, not a memorized copy.

Planted prompts are the same for both sources: for every duplication level n in
`duplication_levels` and each marker condition (with de-identification markers, MIMIC `___` or
IU `XXXX`, and without), `planted_per_level` prompts repeated n times with ONE fixed patient
image, which is how a duplicated study gets memorized. They are drawn from impressions that
occur once in the source and so appear nowhere else in the training set.

`manifest.csv` lists every distinct training prompt with `prompt,n_copies,planted,n_images`:
n_copies pairs per epoch, n_images distinct images among them (planted: 1; a natural template:
n_images == n_copies > 1).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
import pandas as pd

from cxrmem.corpus.iuxray import iter_iuxray_reports
from cxrmem.corpus.surrogates import replace_with_surrogates
from cxrmem.corpus.synthetic import generate_reports
from cxrmem.corpus.text import compile_marker_regex, count_markers, delete_markers, normalise_whitespace
from cxrmem.settings import NON_NEGATIVE, OPTIONAL_NON_NEGATIVE, OPTIONAL_POSITIVE, POSITIVE, POSITIVE_LIST, UNIT_HALF_OPEN, Settings, knob
from cxrmem.testbed.phantoms import phantoms

TEXT_VARIANTS = ("none", "random_markers", "no_markers")


@dataclass(frozen=True)
class TestbedConfig(Settings):
    """The `testbed` config section: the planted-memorization model `cxrmem testbed train` builds."""

    out: str = "testbed/model"  # where `cxrmem testbed train` writes the model and manifest.csv
    source: str = knob("synthetic", choices=["synthetic", "iuxray"])  # synthetic (MIMIC-style, deduplicated) | iuxray (IU X-ray, duplicates kept)
    image_size: int = knob(32, (lambda v: v >= 16 and v % 8 == 0, "a multiple of 8, at least 16"))  # phantom side in pixels (testbed/train.py: why 32)
    n_unique: int = knob(1000, POSITIVE)  # unplanted distinct prompts (synthetic: exactly, each seen once; iuxray: at most, each with all its reports)
    planted_per_level: int = knob(4, POSITIVE)  # planted prompts per duplication level and marker condition
    duplication_levels: tuple[int, ...] = knob((32, 64, 128), POSITIVE_LIST)  # copies of each planted prompt per epoch
    train_steps: int = knob(3000, POSITIVE)  # optimiser steps
    train_batch_size: int = knob(32, POSITIVE)  # images per step
    learning_rate: float = knob(0.002, POSITIVE)  # AdamW peak learning rate
    seed: int = knob(0, NON_NEGATIVE)  # seed of data, initialisation and training
    max_minutes: float = knob(30.0, POSITIVE)  # stop training after this wall time (CPU budget)
    denoiser: str = knob("unet", choices=["unet", "sana"])  # unet (epsilon, DDIM, BERT) | sana (flow-matching transformer, Gemma-2): testbed/networks.py
    block_out_channels: tuple[int, ...] = knob((16, 32, 64), POSITIVE_LIST)  # UNet widths; cross-attention at the last
    transformer_layers: int = knob(4, POSITIVE)  # sana: transformer blocks
    transformer_width: int = knob(64, (lambda v: v > 0 and v % 16 == 0, "a positive multiple of 16"))  # sana: width (16 per head)
    patch_size: int = knob(2, POSITIVE)  # sana: pixels per patch side (32x32 at 2: 256 tokens)
    text_hidden_size: int = knob(64, POSITIVE)  # text encoder hidden size (= the UNet's cross-attention dim; sana: even)
    text_layers: int = knob(2, POSITIVE)  # text encoder layers (BERT; sana: Gemma-2)
    text_encoder_steps: Optional[int] = knob(None, OPTIONAL_NON_NEGATIVE)  # joint text encoder steps, then frozen, each text's conditioning cached (None: all)
    vocab_size: int = knob(1000, POSITIVE)  # WordPiece vocabulary trained on the training prompts
    max_tokens: int = knob(96, POSITIVE)  # tokenizer model_max_length (prompts pad and truncate to it)
    cond_drop: float = knob(0.1, UNIT_HALF_OPEN)  # share of training prompts replaced by "" (classifier-free guidance)
    warmup_steps: int = knob(25, NON_NEGATIVE)  # linear learning-rate warmup, then cosine decay to 10%
    num_threads: int = knob(1, POSITIVE)  # torch CPU threads for training and evaluation
    eval_unique: int = knob(200, POSITIVE)  # never-duplicated prompts scored by `testbed evaluate` (negatives)
    eval_steps: Optional[int] = knob(20, OPTIONAL_POSITIVE)  # DDIM steps of `testbed evaluate` (None: score.steps)
    results: str = "bench/RESULTS.md"  # where `testbed evaluate` writes its section
    heldout_share: float = knob(0.0, UNIT_HALF_OPEN)  # share of the distinct unplanted impressions kept out of training: <out>/reference.csv
    text_variant: str = knob("none", choices=TEXT_VARIANTS)  # none | random_markers (fresh surrogates per pair) | no_markers (markers deleted)

MANIFEST = "manifest.csv"
REFERENCE = "reference.csv"  # the held-out impressions, when testbed.heldout_share > 0


@dataclass
class TrainingSet:
    """Distinct prompts and the distinct (prompt, image) pairs they are trained with.

    Image i < len(prompts) is the first (for planted and never-duplicated prompts: the only)
    image of prompt i; the further images of naturally duplicated prompts follow.
    """

    prompts: list[str]  # one entry per distinct training prompt
    images: np.ndarray  # [I, 1, H, W] float32 in [0, 1], I >= P
    image_prompt: np.ndarray  # [I] int: the prompt each image is trained with
    image_copies: np.ndarray  # [I] int: times the (prompt, image) pair appears per epoch
    planted: np.ndarray  # [P] bool
    texts: Optional[list[str]] = None  # the texts trained with (None: the prompts; see with_text_variant)
    image_text: Optional[np.ndarray] = None  # [I] int: the text each image is trained with (None: image_prompt)
    image_origin: Optional[np.ndarray] = None  # [I] int: the distinct image an entry repeats (None: each is its own)
    heldout: tuple[str, ...] = ()  # distinct impressions kept out of training (testbed.heldout_share): a never-seen reference

    @property
    def training_texts(self) -> list[str]:
        return self.prompts if self.texts is None else self.texts

    @property
    def text_of_image(self) -> np.ndarray:
        return self.image_prompt if self.image_text is None else self.image_text

    @property
    def n_copies(self) -> np.ndarray:
        """[P] pairs per epoch of each prompt."""
        return np.bincount(self.image_prompt, weights=self.image_copies, minlength=len(self.prompts)).astype(np.int64)

    @property
    def n_images(self) -> np.ndarray:
        """[P] distinct images each prompt is trained with."""
        if self.image_origin is None:
            return np.bincount(self.image_prompt, minlength=len(self.prompts))
        distinct = np.unique(np.stack([self.image_prompt, self.image_origin]), axis=1)[0]
        return np.bincount(distinct, minlength=len(self.prompts))

    def epoch_indices(self, rng: np.random.Generator) -> np.ndarray:
        """One shuffled epoch of image indices: image i appears image_copies[i] times."""
        return rng.permutation(np.repeat(np.arange(len(self.image_prompt)), self.image_copies))

    def reference(self) -> pd.DataFrame:
        """The held-out impressions as a reference table (analyze.reference reads column `prompt`)."""
        return pd.DataFrame({"prompt": list(self.heldout)})

    def manifest(self) -> pd.DataFrame:
        return pd.DataFrame(
            {"prompt": self.prompts, "n_copies": self.n_copies, "planted": self.planted, "n_images": self.n_images}
        )


def patient_seed(seed: int, index: int) -> int:
    """A distinct, reproducible patient per training image."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def source_impressions(tb_cfg, corpus_cfg) -> list[str]:
    """Normalised non-empty impressions of the source's reports, one per report, duplicates kept."""
    if tb_cfg.source == "synthetic":
        needed = tb_cfg.n_unique + 2 * tb_cfg.planted_per_level * len(tb_cfg.duplication_levels)
        texts = (r["impression"] for r in generate_reports(4 * needed, seed=tb_cfg.seed))
    else:
        records = iter_iuxray_reports(corpus_cfg.path, list(corpus_cfg.sections), limit=corpus_cfg.max_reports)
        texts = (r.text for r in records if r.text is not None)
    return [t for t in map(normalise_whitespace, texts) if t]


def pick_planted(specific: list[str], tb_cfg, marker_regex: str) -> tuple[list[str], list[int]]:
    """Planted prompts, marked condition first, each level's `planted_per_level` in turn, and their copies."""
    per_condition = tb_cfg.planted_per_level * len(tb_cfg.duplication_levels)
    with_marker = [p for p in specific if count_markers(p, marker_regex) > 0][:per_condition]
    without_marker = [p for p in specific if count_markers(p, marker_regex) == 0][:per_condition]
    if len(with_marker) < per_condition or len(without_marker) < per_condition:
        raise ValueError(
            f"the {tb_cfg.source} corpus gave {len(with_marker)} marked and {len(without_marker)} unmarked specific "
            f"impressions, fewer than the {per_condition} per condition that testbed.planted_per_level x "
            "testbed.duplication_levels ask for; lower testbed.planted_per_level"
        )
    prompts, copies = [], []
    for condition in (with_marker, without_marker):
        for level_index, level in enumerate(tb_cfg.duplication_levels):
            chunk = condition[level_index * tb_cfg.planted_per_level : (level_index + 1) * tb_cfg.planted_per_level]
            prompts += chunk
            copies += [level] * len(chunk)
    return prompts, copies


def choose_prompts(tb_cfg, corpus_cfg) -> tuple[list[str], list[int], list[bool], list[int], list[str]]:
    """Planted prompts first, then the unplanted ones (a seeded shuffle of the distinct impressions).

    Returns the prompts, their copies per epoch, whether each is planted, their distinct images (1,
    except naturally duplicated iuxray impressions: one image per report), and the held-out impressions:
    the last `testbed.heldout_share` of the unplanted ones in the seeded order, never trained on.
    """
    counts = Counter(source_impressions(tb_cfg, corpus_cfg))
    rng = np.random.default_rng(tb_cfg.seed)
    distinct = list(counts)
    order = [distinct[i] for i in rng.permutation(len(distinct))]
    planted, planted_copies = pick_planted([p for p in order if counts[p] == 1], tb_cfg, corpus_cfg.marker_regex)
    chosen = set(planted)
    candidates = [p for p in order if p not in chosen]
    n_heldout = int(round(tb_cfg.heldout_share * len(candidates)))
    heldout = candidates[len(candidates) - n_heldout :]
    natural = candidates[: len(candidates) - n_heldout][: tb_cfg.n_unique]
    if tb_cfg.source == "synthetic" and len(natural) < tb_cfg.n_unique:
        raise ValueError(f"only {len(natural)} distinct impressions for testbed.n_unique={tb_cfg.n_unique}; lower it")
    natural_images = [counts[p] if tb_cfg.source == "iuxray" else 1 for p in natural]
    return (
        planted + natural,
        planted_copies + natural_images,
        [True] * len(planted) + [False] * len(natural),
        [1] * len(planted) + natural_images,
        heldout,
    )


def build_training_set(tb_cfg, corpus_cfg) -> TrainingSet:
    """The seeded training set: `corpus_cfg` gives marker_regex and, for iuxray, path, sections, max_reports."""
    prompts, copies, planted, n_images, heldout = choose_prompts(tb_cfg, corpus_cfg)
    # First image of every prompt, then the extra images of natural duplicates (see TrainingSet).
    extra = np.repeat(np.arange(len(prompts)), np.asarray(n_images) - 1)
    image_prompt = np.concatenate([np.arange(len(prompts)), extra])
    image_copies = np.where(np.asarray(n_images) == 1, copies, 1)
    image_copies = np.concatenate([image_copies, np.ones(len(extra), dtype=np.int64)])
    seeds = [patient_seed(tb_cfg.seed, i) for i in range(len(image_prompt))]
    images = phantoms([prompts[p] for p in image_prompt], seeds, tb_cfg.image_size)
    return TrainingSet(prompts, images, image_prompt, image_copies.astype(np.int64), np.asarray(planted, dtype=bool), heldout=tuple(heldout))


# The paper's training-time advice, as variants of the training texts (testbed.text_variant): the
# manifest keeps the prompts as the audit sees them (with markers), the model trains on the variant.


def with_text_variant(ts: TrainingSet, variant: str, seed: int, marker_regex: str) -> TrainingSet:
    """The training set trained on another text: `random_markers` gives every training pair of a prompt
    with markers its own fresh surrogates (the curator's advice: a pair repeated n times per epoch becomes
    n pairs of the same image, each with its own text, one copy each); `no_markers` deletes the markers."""
    if variant == "none":
        return ts
    pattern = compile_marker_regex(marker_regex)
    if variant == "no_markers":
        return replace(ts, texts=[delete_markers(p, pattern) for p in ts.prompts], image_text=ts.image_prompt.copy())
    if variant != "random_markers":
        raise ValueError(f"testbed.text_variant {variant!r}: choose from {', '.join(TEXT_VARIANTS)}")
    rng = np.random.default_rng([seed, 22])
    texts, images, image_prompt, copies, image_text = [], [], [], [], []
    for i, p in enumerate(ts.image_prompt):
        prompt, marked = ts.prompts[p], pattern.search(ts.prompts[p]) is not None
        for _ in range(int(ts.image_copies[i]) if marked else 1):
            texts.append(replace_with_surrogates(prompt, pattern, rng)[0] if marked else prompt)
            images.append(i)
            image_prompt.append(p)
            copies.append(1 if marked else int(ts.image_copies[i]))
            image_text.append(len(texts) - 1)
    return TrainingSet(ts.prompts, ts.images[images], np.asarray(image_prompt), np.asarray(copies, dtype=np.int64), ts.planted,
                       texts, np.asarray(image_text), np.asarray(images), ts.heldout)  # fmt: skip
