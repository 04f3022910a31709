"""Image embedders: grey images in, L2-normalised float32 embeddings out (cosine = dot product).

- `pixel`: the image resized to `size` x `size` (area-averaged), centred and scaled to unit norm,
  so that the cosine of two embeddings is the Pearson correlation of their pixels;
- `rad_dino`: microsoft/rad-dino (a DINOv2 ViT-B/14 in transformers), the CLS token of its last
  layer, with the repo's own image processor;
- `hf`: any transformers vision model in the cache (`repo` names it), by the same code path:
  the first token of `last_hidden_state` (ViT-style CLS), else `pooler_output` (CNNs).

Models load offline from a Hugging Face hub cache folder (models--org--name/snapshots/<rev>/).
Every embedder has a `fingerprint` (16 hex chars) that keys a stored index: a content hash of
the model's files and the pooling rule, or of the settings for `pixel`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import import_module
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from cxrmem.copies.settings import EMBEDDERS, RAD_DINO_REPO
from cxrmem.models.fingerprint import model_fingerprint
from cxrmem.models.loading import ModelLoadError, guarded, load_checked
from cxrmem.models.radedit import resolve_snapshot


@dataclass(frozen=True)
class EmbedderSettings:
    name: str = "pixel"  # pixel | rad_dino | hf
    size: int = 64  # pixel: side of the resized image (embedding dim = size * size)
    repo: str = RAD_DINO_REPO  # hf: the model's repo id in the cache (rad_dino always uses microsoft/rad-dino)
    cache_dir: str = ""  # rad_dino / hf: the Hugging Face hub cache root (e.g. ~/.cache/huggingface/hub)
    revision: Optional[str] = None  # rad_dino / hf: a commit or ref name; None: refs/main
    batch_size: int = 16  # images per forward pass


def grey_list(images) -> list[torch.Tensor]:
    """[H, W] float32 tensors from grey arrays or a [B, C, H, W] tensor (channels averaged)."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"an image batch must be [B, C, H, W], not {tuple(images.shape)}")
        return list(images.float().mean(dim=1).cpu())
    return [torch.as_tensor(np.asarray(image, dtype=np.float32)) for image in images]


def embedder_snapshot(settings: EmbedderSettings) -> str:
    """The hub-cache snapshot folder of a transformers embedder (rad_dino, hf); a clear error when it is missing."""
    if not settings.cache_dir:
        raise ModelLoadError(f"image embedder {settings.name} needs the Hugging Face cache folder (copies.embedder_cache)")
    repo = RAD_DINO_REPO if settings.name == "rad_dino" else settings.repo
    snapshot, problem = resolve_snapshot(settings.cache_dir, repo, settings.revision, "copies.embedder_revision")
    if problem:
        raise ModelLoadError(f"image embedder {settings.name}: {problem}")
    return snapshot


class PixelEmbedder:
    def __init__(self, settings: EmbedderSettings, device: torch.device | str = "cpu"):  # the CPU serves: no model
        self.size = settings.size
        self.dim = settings.size * settings.size
        self.fingerprint = self.fingerprint_of(settings)

    @staticmethod
    def fingerprint_of(settings: EmbedderSettings) -> str:
        """A hash of the settings: the pixels are the embedding."""
        payload = json.dumps({"embedder": "pixel", "size": settings.size, "rule": "area-resize,centre,unit-norm"})
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def __call__(self, images) -> torch.Tensor:
        rows = [
            F.interpolate(image[None, None], size=(self.size, self.size), mode="area").flatten()
            for image in grey_list(images)
        ]
        if not rows:
            return torch.zeros(0, self.dim)
        flat = torch.stack(rows)
        return F.normalize(flat - flat.mean(dim=1, keepdim=True), dim=1)


class TransformersEmbedder:
    """A transformers vision model and its image processor from one snapshot of the hub cache."""

    def __init__(self, settings: EmbedderSettings, device: torch.device | str = "cpu"):
        from transformers import AutoImageProcessor, AutoModel

        snapshot = embedder_snapshot(settings)
        self.device = torch.device(device)
        self.batch_size = settings.batch_size
        self.processor = guarded(
            "image processor", snapshot, lambda: AutoImageProcessor.from_pretrained(snapshot, local_files_only=True)
        )
        self.model = load_checked(
            "image embedder",
            snapshot,
            lambda: AutoModel.from_pretrained(snapshot, local_files_only=True, output_loading_info=True),
        ).to(self.device)
        self.dim = int(getattr(self.model.config, "hidden_size", 0) or self.model.config.hidden_sizes[-1])
        self.fingerprint = self.fingerprint_of(settings)

    @staticmethod
    def fingerprint_of(settings: EmbedderSettings) -> str:
        """A hash of the snapshot's files and the pooling rule. Loads nothing."""
        return model_fingerprint({"model": embedder_snapshot(settings)}, {"embedder": "transformers", "pooling": "cls"})

    @torch.no_grad()
    def __call__(self, images) -> torch.Tensor:
        greys = grey_list(images)
        out = []
        for start in range(0, len(greys), self.batch_size):
            # The processor wants RGB; floats in [0, 1] are already rescaled.
            rgb = [g.numpy()[:, :, None].repeat(3, axis=2) for g in greys[start : start + self.batch_size]]
            inputs = self.processor(images=rgb, do_rescale=False, input_data_format="channels_last", return_tensors="pt")
            output = self.model(pixel_values=inputs["pixel_values"].to(self.device, self.model.dtype))
            hidden = getattr(output, "last_hidden_state", None)
            pooled = hidden[:, 0] if hidden is not None and hidden.dim() == 3 else output.pooler_output.flatten(1)
            out.append(F.normalize(pooled.float(), dim=1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)


def embedder_class(settings: EmbedderSettings):
    """The class that copies/settings.py's EMBEDDERS names for `settings.name`."""
    if settings.name not in EMBEDDERS:
        raise ValueError(f"image embedder {settings.name!r}: use one of {', '.join(EMBEDDERS)} (copies.embedder)")
    module, name = EMBEDDERS[settings.name].split(":")
    return getattr(import_module(module), name)


def embedder_fingerprint(settings: EmbedderSettings) -> str:
    """What keys a stored index (the embedder's `fingerprint_of`). Loads nothing."""
    return embedder_class(settings).fingerprint_of(settings)


def make_embedder(settings: EmbedderSettings, device: torch.device | str = "cpu"):
    """The embedder the settings name; call it on images, read `.fingerprint` and `.dim`."""
    return embedder_class(settings)(settings, device)
