"""Benchmark (not a test): do testbed/dit's planted prompts reproduce their training image at w = 1?

    OMP_NUM_THREADS=2 PYTHONPATH=$PWD .venv/bin/python bench/dit_copies.py

`cxrmem testbed evaluate`'s copy distance (the smallest RMS distance of a prompt's G conditional generations to its
training image, images in [0, 1]) on every planted prompt and 24 of the never-duplicated ones (the evaluation
sample's rule with 24), at G=4, T=20: a quicker check than the whole evaluation of whether the model memorized
what was planted at all. Prints the means per kind, then each prompt's distance by copies.
"""

import os

import pandas as pd
import torch
from omegaconf import OmegaConf

from cxrmem.config import load_config
from cxrmem.models.loading import load_components
from cxrmem.scoring.scorer import Scorer
from cxrmem.scoring.settings import ScoreSettings
from cxrmem.testbed.evaluate import MANIFEST, evaluation_prompts, nearest_distances, rms_distance, score_and_generate, training_images

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))  # 1 on busy shared cores: 2 threads spin
cfg = load_config("conf/testbed_dit.yaml")
tb = cfg.testbed
manifest = pd.read_csv(f"{tb.out}/{MANIFEST}")
frame = evaluation_prompts(manifest, 24, tb.seed)
own = torch.from_numpy(training_images(tb.out, manifest, cfg.corpus))[list(frame.index)][:, None]
settings = ScoreSettings.of(OmegaConf.merge(cfg.score, {"steps": tb.eval_steps}))
scorer = Scorer(load_components(OmegaConf.merge(cfg.model, {"path": tb.out})), settings, device="cpu")
_, images = score_and_generate(scorer, frame.prompt.tolist(), 16, True, guidance=1.0)
print(nearest_distances(images, own, frame, list(tb.duplication_levels)))
# Per prompt, ascending, by copies (0: never duplicated): whether a level's mean is a few copies or all of them.
nearest = rms_distance(images, own).min(dim=1).values.numpy()
for copies, rows in frame.assign(nearest=nearest, copies=frame.n_copies.where(frame.planted, 0)).groupby("copies"):
    print(copies, " ".join(f"{v:.3f}" for v in sorted(rows.nearest)))
