"""A miniature replica of RadEdit's three published snapshots, laid out as a Hugging Face hub cache.

Same repo folders, file names, config fields and checkpoint key names as the published
snapshots (microsoft/radedit, stabilityai/sdxl-vae, microsoft/BiomedVLP-BioViL-T), at tiny
sizes and with random weights; snapshot files are relative symlinks into `blobs/`, and
`refs/main` names the snapshot, as `huggingface_hub` writes them. The loader runs on it exactly
as it would on the real cache.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import BertConfig, BertForMaskedLM

from bench.hub_cache import fake_commit, place_file, place_folder, set_ref
from cxrmem.models.tiny import SPECIAL_TOKENS

UNET_REPO = "microsoft/radedit"
VAE_REPO = "stabilityai/sdxl-vae"
TEXT_REPO = "microsoft/BiomedVLP-BioViL-T"
HIDDEN_SIZE = 32
PROJECTION_SIZE = 16
WORDS = (
    "no acute cardiopulmonary process . , _ small left right pleural effusion effusions "
    "pneumothorax lung lungs clear heart size normal stable mild moderate atelectasis "
    "opacity opacities base bases consolidation edema since prior study comparison tube line "
    "in place unchanged of the and with is are there"
).split()
SUBWORDS = ["##s", "##al", "##ed", "##ly", "##ing"]
BERT_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "max_position_embeddings",
    "type_vocab_size",
    "vocab_size",
    "layer_norm_eps",
    "pad_token_id",
)


def text_config() -> dict:
    """BioViL-T's config.json fields (CXR-BERT: remote-code class, projection size, BERT fields)."""
    return {
        "architectures": ["CXRBertModel"],
        "auto_map": {
            "AutoConfig": "configuration_cxrbert.CXRBertConfig",
            "AutoModel": "modeling_cxrbert.CXRBertModel",
        },
        "model_type": "cxr-bert",
        "projection_size": PROJECTION_SIZE,
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": HIDDEN_SIZE,
        "initializer_range": 0.02,
        "intermediate_size": 37,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 512,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
        "type_vocab_size": 2,
        "vocab_size": len(SPECIAL_TOKENS) + len(WORDS) + len(SUBWORDS),
        "torch_dtype": "float32",
        "transformers_version": "4.17.0",
    }


def cxr_bert_checkpoint(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """State dict with CXR-BERT's key names: `bert.*` (no pooler), `cls.*` MLM head, `cls_projection_head.*`."""
    torch.manual_seed(seed)
    masked_lm = BertForMaskedLM(BertConfig(**{key: config[key] for key in BERT_FIELDS}))
    checkpoint = {key: tensor.clone() for key, tensor in masked_lm.state_dict().items()}
    # Older transformers (which saved the published file) also stored the position-id buffer.
    checkpoint["bert.embeddings.position_ids"] = torch.arange(config["max_position_embeddings"]).unsqueeze(0)
    hidden, projection = config["hidden_size"], config["projection_size"]
    checkpoint["cls_projection_head.dense_to_hidden.weight"] = torch.randn(hidden, hidden)
    checkpoint["cls_projection_head.dense_to_hidden.bias"] = torch.randn(hidden)
    checkpoint["cls_projection_head.LayerNorm.weight"] = torch.ones(hidden)
    checkpoint["cls_projection_head.LayerNorm.bias"] = torch.zeros(hidden)
    checkpoint["cls_projection_head.dense_to_output.weight"] = torch.randn(projection, hidden)
    checkpoint["cls_projection_head.dense_to_output.bias"] = torch.randn(projection)
    return checkpoint


def tiny_radedit_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=HIDDEN_SIZE,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def tiny_sdxl_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
        scaling_factor=0.13025,
    )


# Stand-ins for the snapshot's remote code (written for these tests, same class names and
# outputs as described in cxrmem/models/radedit.py): a BertForMaskedLM with a projection head
# whose output [0] is the encoder's last hidden state. Only trust_remote_code runs them.
REMOTE_CONFIG_CODE = """
from transformers import BertConfig


class CXRBertConfig(BertConfig):
    model_type = "cxr-bert"

    def __init__(self, projection_size=128, **kwargs):
        super().__init__(**kwargs)
        self.projection_size = projection_size
"""
REMOTE_MODEL_CODE = """
import torch
from transformers import BertForMaskedLM

from .configuration_cxrbert import CXRBertConfig


class ProjectionHead(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense_to_hidden = torch.nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = torch.nn.LayerNorm(config.hidden_size)
        self.dense_to_output = torch.nn.Linear(config.hidden_size, config.projection_size)


class CXRBertModel(BertForMaskedLM):
    config_class = CXRBertConfig

    def __init__(self, config):
        super().__init__(config)
        self.cls_projection_head = ProjectionHead(config)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        output = super().forward(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, return_dict=True)
        return (output.hidden_states[-1], output.logits)
"""


def write_text_snapshot(cache_root: str, commit: str, seed: int) -> None:
    config = text_config()
    place_file(cache_root, TEXT_REPO, commit, "config.json", json.dumps(config, indent=2).encode())
    with tempfile.TemporaryDirectory() as scratch:
        weights = os.path.join(scratch, "pytorch_model.bin")
        torch.save(cxr_bert_checkpoint(config, seed), weights)
        place_folder(cache_root, TEXT_REPO, commit, scratch)
    vocab = "\n".join(SPECIAL_TOKENS + WORDS + SUBWORDS) + "\n"
    place_file(cache_root, TEXT_REPO, commit, "vocab.txt", vocab.encode())
    tokenizer_config = {"do_lower_case": True, "model_max_length": 512, "tokenizer_class": "BertTokenizer"}
    place_file(cache_root, TEXT_REPO, commit, "tokenizer_config.json", json.dumps(tokenizer_config).encode())
    special = {"cls_token": "[CLS]", "mask_token": "[MASK]", "pad_token": "[PAD]", "sep_token": "[SEP]", "unk_token": "[UNK]"}
    place_file(cache_root, TEXT_REPO, commit, "special_tokens_map.json", json.dumps(special).encode())
    place_file(cache_root, TEXT_REPO, commit, "README.md", b"# BioViL-T (miniature replica for tests)\n")
    place_file(cache_root, TEXT_REPO, commit, "configuration_cxrbert.py", REMOTE_CONFIG_CODE.encode())
    place_file(cache_root, TEXT_REPO, commit, "modeling_cxrbert.py", REMOTE_MODEL_CODE.encode())


def write_diffusers_snapshot(cache_root: str, repo_id: str, commit: str, model, prefix: str = "") -> None:
    with tempfile.TemporaryDirectory() as scratch:
        model.save_pretrained(scratch, safe_serialization=True)
        place_folder(cache_root, repo_id, commit, scratch, prefix)


def build_radedit_replica(cache_root: str, seed: int = 0, with_scheduler: bool = False) -> dict[str, str]:
    """Write the three snapshots under `cache_root`; returns repo id -> snapshot commit.

    `with_scheduler` adds a `scheduler/scheduler_config.json` to the RadEdit snapshot (with
    non-default betas, so a test can see they are taken from it).
    """
    commits = {repo: fake_commit(repo, seed) for repo in (UNET_REPO, VAE_REPO, TEXT_REPO)}
    torch.manual_seed(seed)
    write_diffusers_snapshot(cache_root, UNET_REPO, commits[UNET_REPO], tiny_radedit_unet(), prefix="unet/")
    if with_scheduler:
        scheduler = DDIMScheduler(beta_start=0.001, beta_end=0.02, num_train_timesteps=500, beta_schedule="scaled_linear")
        with tempfile.TemporaryDirectory() as scratch:
            scheduler.save_pretrained(scratch)
            place_folder(cache_root, UNET_REPO, commits[UNET_REPO], scratch, prefix="scheduler/")
    place_file(cache_root, UNET_REPO, commits[UNET_REPO], "README.md", b"# RadEdit (miniature replica for tests)\n")
    write_diffusers_snapshot(cache_root, VAE_REPO, commits[VAE_REPO], tiny_sdxl_vae())
    write_text_snapshot(cache_root, commits[TEXT_REPO], seed)
    for repo, commit in commits.items():
        set_ref(cache_root, repo, commit)
    return commits
