"""The testbed's training images (its phantoms) as PNG files plus an index table.

The images are re-rendered from the config the model was trained with (they are seeded, see
`evaluate.training_images`), one 16-bit grey PNG per training prompt, named by its prompt_id.
The table (`images.csv` beside them) has the image-table columns of `cxrmem.copies.images`
plus the prompt: image_id, path, source_id, subject_id, prompt, prompt_id, n_copies, planted.
A testbed prompt is its own "report", so source_id is the prompt_id: the re-identification join
then asks whether a generation's nearest image is the prompt's own training image.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
from PIL import Image

from cxrmem.copies.images import IMAGE_COLUMNS
from cxrmem.corpus.text import prompt_id
from cxrmem.testbed.dataset import MANIFEST
from cxrmem.testbed.evaluate import training_images

INDEX = "images.csv"


def export_training_images(model_dir: str, out_dir: str, corpus_cfg) -> pd.DataFrame:
    """Write every training image of the testbed in `model_dir` to `out_dir`; returns the index table."""
    manifest = pd.read_csv(os.path.join(model_dir, MANIFEST))
    images = training_images(model_dir, manifest, corpus_cfg)  # [P, 1, H, W] in [0, 1]
    os.makedirs(out_dir, exist_ok=True)
    ids = [prompt_id(p) for p in manifest.prompt]
    paths = []
    for pid, image in zip(ids, images):
        path = os.path.join(out_dir, f"{pid}.png")
        Image.fromarray(np.round(image[0] * 65535).astype(np.uint16)).save(path)
        paths.append(path)
    table = pd.DataFrame(
        {
            "image_id": ids,
            "path": paths,
            "source_id": ids,
            "subject_id": [None] * len(ids),
            "prompt": manifest.prompt,
            "prompt_id": ids,
            "n_copies": manifest.n_copies,
            "planted": manifest.planted,
        },
        columns=[*IMAGE_COLUMNS, "prompt", "prompt_id", "n_copies", "planted"],
    )
    table.to_csv(os.path.join(out_dir, INDEX), index=False)
    return table
