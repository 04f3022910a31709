"""The `model` config section: which model, its parts, its adapters, and where and in what precision it runs
(no torch here, so that loading a configuration stays light; cxrmem/models/loading.py uses it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from cxrmem.settings import NON_NEGATIVE, POSITIVE, ConfigError, Settings, knob


@dataclass(frozen=True)
class RadEditConfig(Settings):
    """The `model.radedit` config section: where RadEdit's parts are in a Hugging Face cache."""

    unet_repo: str = "microsoft/radedit"  # Hugging Face repo id of the UNet (subfolder `unet`)
    vae_repo: str = "stabilityai/sdxl-vae"  # repo id of the VAE (needed only to decode images)
    text_repo: str = "microsoft/BiomedVLP-BioViL-T"  # repo id of the text encoder and tokenizer
    unet_revision: Optional[str] = None  # snapshot commit hash; None: the one `refs/main` names, else the only one
    vae_revision: Optional[str] = None  # as above, for the VAE
    text_revision: Optional[str] = None  # as above, for the text encoder; required with trust_remote_code
    vae_scaling_factor: float = knob(0.13025, POSITIVE)  # SDXL VAE latent scaling
    tokenizer_max_length: int = knob(128, POSITIVE)  # RadEdit's tokenizer model_max_length
    trust_remote_code: bool = False  # run the snapshot's own CXR-BERT code instead of transformers' BERT (opt-in)

    @staticmethod
    def check(section, key: str) -> None:
        if section.trust_remote_code and not section.text_revision:
            raise ConfigError(f"config key '{key}.text_revision' must pin a snapshot hash when trust_remote_code is on")

# DDIMScheduler's defaults, which RadEdit's scheduler call keeps (see the module docstring);
# replaced by the snapshot's scheduler config when it has one.


@dataclass(frozen=True)
class AdapterConfig(Settings):
    """One of `model.adapters`: a LoRA folder and how strongly it applies."""

    path: str = ""  # folder holding the LoRA's .safetensors file; s3:// is copied to model.cache_dir like model.path
    scale: float = knob(1.0, NON_NEGATIVE)  # weight of the adapter's update, as pipe.set_adapters(..., adapter_weights): 0 is the base, 1 as trained

    @staticmethod
    def check(section, key: str) -> None:
        if not section.path:
            raise ConfigError(f"config key '{key}.path' is empty: name the LoRA adapter's folder (local or s3://)")


@dataclass(frozen=True)
class ModelConfig(Settings):
    """The `model` config section: which model, and where and in what precision it runs."""

    kind: str = knob("diffusers", choices=["diffusers", "radedit"])  # diffusers (a model_index.json folder) | radedit (assembled from a Hugging Face cache)
    path: str = "testbed/model"  # diffusers folder, or Hugging Face hub cache root for radedit; s3:// is copied to cache_dir
    cache_dir: str = "~/.cache/cxrmem/models"  # local copy of s3:// model stores
    dtype: str = knob("float32", choices=["float32", "bfloat16", "float16"])  # float32 | bfloat16 | float16 (UNet and text encoder; norms are always float32)
    device: str = "auto"  # auto | cpu | cuda | cuda:N (a replica meant for CUDA that cannot use it refuses; never a silent CPU)
    tf32: bool = False  # CUDA float32 matmuls and convolutions in TF32: faster, about 1e-3 relative; enters the score key
    vae_decode_batch: int = knob(8, POSITIVE)  # images per VAE decode call (bf16 on CUDA): the SDXL VAE at 512x512 fits a 24 GB card at 8
    radedit: RadEditConfig = knob(RadEditConfig())
    adapters: List[AdapterConfig] = knob([])  # LoRA adapters ({path, scale}) fused into the denoiser in order; each enters the fingerprint
