"""A random-weight replica of microsoft/rad-dino laid out as a Hugging Face hub cache.

Same repo folder, file names and config fields as the published snapshot (a `dinov2`
Dinov2Model, `model.safetensors`, a BitImageProcessor `preprocessor_config.json` with
rad-dino's mean and std, `refs/main`), at the sizes asked for: tiny for tests (tests/test_copies.py),
DINOv2-base shapes (hidden 768, 12 layers) for the throughput bench (bench/copies.py).
"""

from __future__ import annotations

import json
import os
import tempfile

import torch
from safetensors.torch import save_model
from transformers import Dinov2Config, Dinov2Model

from bench.hub_cache import fake_commit, place_folder, set_ref

REPO = "microsoft/rad-dino"
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 56}
BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "image_size": 518}


def processor_config(crop: int) -> dict:
    return {
        "crop_size": {"height": crop, "width": crop},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5307, 0.5307, 0.5307],
        "image_processor_type": "BitImageProcessor",
        "image_std": [0.2583, 0.2583, 0.2583],
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": crop},
    }


def build_rad_dino_replica(cache_root: str, sizes: dict = TINY, seed: int = 0, crop: int | None = None) -> str:
    """Write the replica into `cache_root`; returns the snapshot commit. `crop`: processor size (default image_size)."""
    torch.manual_seed(seed)
    config = Dinov2Config(patch_size=14, mlp_ratio=4, layerscale_value=1.0, architectures=["Dinov2Model"], **sizes)
    model = Dinov2Model(config).eval()
    commit = fake_commit(REPO, seed)
    with tempfile.TemporaryDirectory() as folder:
        config.to_json_file(os.path.join(folder, "config.json"))
        save_model(model, os.path.join(folder, "model.safetensors"))
        with open(os.path.join(folder, "preprocessor_config.json"), "w", encoding="utf-8") as stream:
            json.dump(processor_config(crop or sizes["image_size"]), stream, indent=2)
        place_folder(cache_root, REPO, commit, folder)
    set_ref(cache_root, REPO, commit)
    return commit
