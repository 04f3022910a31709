"""Typed configuration: OmegaConf YAML from conf/, merged with command-line key=value overrides.

Every knob has a default and a one-line comment here; this schema is the reference for all
YAML files in conf/. Unknown keys, wrong types and out-of-range values fail fast with a
`ConfigError` that names the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cxrmem.scoring.device import Precision


class ConfigError(ValueError):
    """A configuration problem, with the offending key in the message."""


@dataclass
class RunConfig:
    output: str = "runs/demo"  # output prefix of this run: a local folder or s3://bucket/prefix
    overwrite: bool = False  # allow replacing an already published run at the same prefix
    force_lease: bool = False  # take over the one-writer lease on run.output even while its holder's heartbeat is fresh
    lease_timeout_s: float = 600.0  # a lease whose heartbeat is older than this is stale and taken over (its holder beats 5 times per period)
    allow_foreign_files: bool = False  # write into a run.output that holds files no cxrmem run wrote and no run's manifest (never published nor deleted)
    signing_key_file: Optional[str] = None  # a local file holding the operator's HMAC key: publishing then signs the manifest (manifest.sig); else $CXRMEM_SIGNING_KEY, if set


@dataclass
class SyntheticCorpusConfig:
    n_reports: int = 20000  # number of synthetic MIMIC-style reports to generate
    seed: int = 0  # generator seed: the same seed gives the same corpus
    marker_rate: float = 0.3  # share of abnormal reports that carry `___` de-identification markers
    normal_share: float = 0.35  # share of reports drawn from the few shared normal impressions


@dataclass
class CorpusConfig:
    source: str = "synthetic"  # synthetic | mimic_reports | table | iuxray
    path: Optional[str] = None  # folder, file or s3:// URI of the corpus (unused for synthetic, optional for iuxray)
    text_column: str = "text"  # text column of a table source
    id_columns: List[str] = field(default_factory=lambda: ["path", "subject_id", "study"])  # source id columns kept if present
    sections: List[str] = field(default_factory=lambda: ["IMPRESSION", "FINDINGS", "LAST_PARAGRAPH"])  # report sections to use, in order of preference
    marker_regex: str = "_{2,}|X{4,}"  # de-identification markers: MIMIC-CXR `___` and IU X-ray `XXXX` runs
    max_reports: Optional[int] = None  # read at most this many reports (None: all)
    progress_every: int = 100000  # reports between progress lines while reading
    read_workers: int = 16  # threads reading report files in parallel (S3 reads are latency-bound)
    synthetic: SyntheticCorpusConfig = field(default_factory=SyntheticCorpusConfig)


@dataclass
class RadEditConfig:
    unet_repo: str = "microsoft/radedit"  # Hugging Face repo id of the UNet (subfolder `unet`)
    vae_repo: str = "stabilityai/sdxl-vae"  # repo id of the VAE (needed only to decode images)
    text_repo: str = "microsoft/BiomedVLP-BioViL-T"  # repo id of the text encoder and tokenizer
    unet_revision: Optional[str] = None  # snapshot commit hash; None: the one `refs/main` names, else the only one
    vae_revision: Optional[str] = None  # as above, for the VAE
    text_revision: Optional[str] = None  # as above, for the text encoder; required with trust_remote_code
    vae_scaling_factor: float = 0.13025  # SDXL VAE latent scaling
    tokenizer_max_length: int = 128  # RadEdit's tokenizer model_max_length
    trust_remote_code: bool = False  # run the snapshot's own CXR-BERT code instead of transformers' BERT (opt-in)


@dataclass
class ModelConfig:
    kind: str = "diffusers"  # diffusers (a model_index.json folder) | radedit (assembled from a Hugging Face cache)
    path: str = "testbed/model"  # diffusers folder, or Hugging Face hub cache root for radedit; s3:// is copied to cache_dir
    cache_dir: str = "~/.cache/cxrmem/models"  # local copy of s3:// model stores
    dtype: str = "float32"  # float32 | bfloat16 | float16 (UNet and text encoder; norms are always float32)
    device: str = "auto"  # auto | cpu | cuda | cuda:N (a replica meant for CUDA that cannot use it refuses; never a silent CPU)
    tf32: bool = False  # CUDA float32 matmuls and convolutions in TF32: faster, about 1e-3 relative; enters the score key
    vae_decode_batch: int = 8  # images per VAE decode call (bf16 on CUDA): the SDXL VAE at 512x512 fits a 24 GB card at 8
    radedit: RadEditConfig = field(default_factory=RadEditConfig)


@dataclass
class ScoreConfig:
    generations: int = 4  # G: initial noises per prompt
    steps: int = 50  # T: DDIM steps
    guidance_scale: float = 7.5  # w: classifier-free guidance that drives the trajectory
    seed: int = 0  # base seed of the initial latents
    seed_mode: str = "shared"  # shared (every prompt sees the same G noises) | per_prompt
    screening_steps: Optional[int] = None  # score only the first k steps (None: all T)
    batch_size: int = 8  # prompts per UNet call (each call runs batch_size x G x 2 samples)
    use_attention_mask: bool = False  # pass the tokenizer's attention mask to the text encoder (RadEdit does not)
    cpu_half: bool = False  # keep a bfloat16/float16 model in that precision on the CPU (precision checks; else float32)
    detectors: List[str] = field(default_factory=list)  # extra detectors (cxrmem/detectors.py REGISTRY) whose columns scores.parquet gets beside d_mem


@dataclass
class DetectConfig:
    generations: int = 1  # G of the extra detectors: initial noises per prompt
    steps: int = 1  # k: DDIM steps of the `dmem` detector (1 = the first-step d_mem)
    anisotropy_weight: float = 1.0  # weight of anisotropy's alignment term added to its norm
    low_timestep: int = 41  # anisotropy's low-noise training timestep where x_T is fed for the alignment


@dataclass
class CascadeStage:
    screen: str = "dmem"  # the stage's detector (REGISTRY name)
    keep_percent: float = 10.0  # share of this stage's input (by its screen) that goes on to the next stage
    steps: int = 1  # k: DDIM steps of a dmem / latent_update screen (below score.steps)
    generations: Optional[int] = None  # G of the screen (None: score.generations, so the full score can share its noises)


def default_stages() -> list:
    """The cheapest cascade that held the whole top 1% on both committed testbeds at G=4, T=50 (bench/RESULTS.md,
    "Cascade frontier"): one noise's first step, then the full G's trajectories continued and pruned at steps 2, 10, 30."""
    return [CascadeStage("dmem", 10.0, 1, 1), CascadeStage("dmem", 25.0, 2), CascadeStage("dmem", 80.0, 10), CascadeStage("dmem", 70.0, 30)]


@dataclass
class CascadeConfig:
    enabled: bool = False  # screen every prompt through cascade.stages, then fully score only the last stage's survivors
    stages: List[CascadeStage] = field(default_factory=default_stages)  # screens in order, each scoring the previous one's survivors (default: measured at T=50, G=4)
    audit_sample: int = 200  # rejected prompts fully scored to check the cascade (seeded random sample; 0: no check; 0.8 evaluations per prompt at 100K)
    audit_seed: int = 0  # seed of the audit sample
    widen_factor: float = 2.0  # a stage that lost a memorized prompt keeps this many times its share on the rescreen
    max_rounds: int = 4  # screen-check-widen rounds at most (the last one's result stands, its misses reported)
    continue_trajectories: bool = True  # a later stage continues an earlier one's trajectories of the full score's seeds and schedule (in process and on Ray)


@dataclass
class AnalyzeConfig:
    top_percent: float = 1.0  # memorized set: prompts in the top q percent of d_mem (the paper: 1)
    zscore: float = 3.0  # second view: prompts with d_mem z-score above this
    n_reports_buckets: List[int] = field(default_factory=lambda: [1, 2, 5, 20, 100])  # lower edges of duplication buckets
    known_memorized: Optional[str] = None  # CSV of prompts known to be memorized (column `prompt`; rows with planted=false skipped), e.g. testbed/model/manifest.csv: checks detection against it
    covariates: List[str] = field(default_factory=lambda: ["log_n_tokens", "log_n_reports"])  # adjusted enrichment: what the marker's effect is adjusted for (cxrmem/analysis.py COVARIATES)
    length_bins: int = 10  # token-count quantile bins of the length view (figure) and the length-adjusted score
    length_adjusted: bool = False  # also rank by d_mem's percentile within its token-count bin (its own top share; raw d_mem stays the definition)
    reference: Optional[str] = None  # table (CSV, Parquet, JSONL) of prompts the model was NOT trained on (a held-out split): p-values, FDR and F0 (docs/design.md, Calibrated calls)
    reference_text_column: str = "prompt"  # the reference table's text column
    fdr: float = 0.05  # calibrated memorized set: prompts with Benjamini-Hochberg q-value at most this
    reference_length_bins: int = 4  # length-conditional (Mondrian) p-values: bins of log token count (1: none)
    reference_min_per_bin: int = 50  # fewest reference prompts per length bin (bins are merged below it)
    reference_tail: str = "gpd"  # gpd: a fitted upper tail (generalized Pareto) below the conformal floor 1/(n+1) | none
    reference_tail_quantile: float = 0.9  # where the fitted tail starts, as a quantile of each bin's reference scores
    reference_min: int = 100  # fewer reference prompts: F0 is inconclusive


@dataclass
class AttributionConfig:
    enabled: bool = True  # attribute the memorized set's d_mem to words
    generations: int = 2  # noises per prompt for the gradient
    steps: int = 10  # DDIM steps at which the gradient is taken (first steps of the trajectory)
    leave_one_out: bool = True  # also compute the leave-one-word-out change in d_mem
    max_prompts: Optional[int] = None  # attribute at most this many memorized prompts (None: all)
    null_model: bool = False  # also attribute on a seeded re-initialised copy of the model (the baseline of "the marker ranks first"; one more model per worker, attribution twice)
    null_seed: int = 0  # seed of the null model's weights
    top_units: int = 25  # units shown per prompt in the figure


@dataclass
class MitigationConfig:
    enabled: bool = True  # run the mitigation experiments on the memorized set
    strategies: List[str] = field(
        default_factory=lambda: [
            "original",
            "random_word",
            "random_number",
            "remove_marker",
            "surrogate",
            "random_insertion",
            "embedding_noise",
            "embedding_optimisation",
            "attention_rescaling",
            "delayed_guidance",
            "opposite_guidance",
            "noise_adjustment",
        ]
    )  # strategies to compare (cxrmem/strategies.py REGISTRY); `original` is the unmitigated baseline
    n_generations: int = 50  # decoded generations per prompt and strategy for the pairwise distance (paper: 50)
    steps: Optional[int] = None  # sampling steps for the generations (None: score.steps)
    insertion_words: int = 4  # words inserted by random_insertion
    noise_std: float = 0.1  # std of the Gaussian noise added to the text embedding
    optimisation_iters: int = 10  # gradient steps of the first-step embedding optimisation
    optimisation_lr: float = 0.05  # learning rate of the embedding optimisation
    optimisation_target: float = 0.0  # stop once the first-step noise norm falls below this (0: run all iters)
    max_prompts: Optional[int] = None  # mitigate at most this many memorized prompts (None: all)
    seed: int = 1234  # seed of the random rewrites (the same rewrite across runs)
    attention_scale: float = 0.0  # attention_rescaling: factor on the marker tokens' cross-attention (0: masked; Ren et al.)
    guidance_delay: float = 0.3  # delayed/opposite guidance: share of the steps before the transition point (Jain et al.)
    opposite_scale: float = 2.0  # opposite_guidance: s of eps_u - s (eps_c - eps_u) before the transition
    noise_iters: int = 5  # noise_adjustment: sharpness-aware steps on each initial latent (Han et al.)
    noise_lr: float = 0.05  # noise_adjustment: step length as a share of the latent's norm
    noise_rho: float = 0.05  # noise_adjustment: sharpness-aware perturbation radius as a share of the norm


@dataclass
class RayConfig:
    address: Optional[str] = None  # None: start Ray in-process; "auto" or ray://...: join a cluster
    num_workers: Optional[int] = None  # scoring actors (None: the cluster's GPUs, or 1 on a CPU-only cluster)
    num_gpus_per_worker: float = 1.0  # GPUs per scoring actor (fractions share a GPU; ignored without GPUs)
    num_cpus_per_worker: float = 1.0  # CPUs per scoring actor
    batch_size: int = 64  # prompts per map_batches call
    max_restarts: int = 3  # restarts of a lost scoring actor
    checkpoint_every: int = 512  # prompts per durable scores part file (the unit of resume)
    progress_every_s: float = 30.0  # seconds between the driver's progress lines (done/total, prompts/s, ETA)
    local_num_cpus: Optional[int] = None  # CPUs of the in-process Ray (None: the workers' share plus one, at least 2)
    resource_wait_s: float = 120.0  # fail if the scoring pool's CPUs/GPUs are not in the cluster within this time (autoscalers need minutes)
    stall_timeout_s: float = 1800.0  # fail, logging pending work and free resources, when no scored batch reaches the driver for this long


@dataclass
class StorageConfig:
    endpoint_url: Optional[str] = None  # S3 endpoint (None: AWS or $AWS_ENDPOINT_URL)
    region: Optional[str] = None  # S3 region (None: $AWS_REGION / $AWS_DEFAULT_REGION, else us-east-1)
    max_attempts: int = 5  # attempts per S3 request before giving up
    backoff_s: float = 0.5  # first retry delay, doubled each attempt
    connect_timeout_s: float = 5.0  # S3 connect timeout
    request_timeout_s: float = 60.0  # S3 socket read/write timeout of one request
    access_key_id: Optional[str] = None  # None: $AWS_ACCESS_KEY_ID or the AWS credential chain; never written to outputs
    secret_access_key: Optional[str] = None  # None: $AWS_SECRET_ACCESS_KEY or the AWS credential chain; never written to outputs
    transfer_threads: int = 8  # files checksummed or copied in parallel by publish and export


@dataclass
class ReportConfig:
    figures: bool = True  # write figures/*.png and embed them in report.html
    grid_generations: int = 4  # generations per strategy shown in the image grid
    top_prompts: int = 3  # memorized prompts shown with token bars and image grids
    memorized_rows: int = 50  # rows of the memorized list shown in report.html (the CSV has them all)


@dataclass
class TestbedConfig:
    out: str = "testbed/model"  # where `cxrmem testbed train` writes the model and manifest.csv
    source: str = "synthetic"  # synthetic (MIMIC-style, deduplicated) | iuxray (IU X-ray reports, natural duplicates kept)
    image_size: int = 32  # phantom size in pixels (32: see cxrmem/testbed/train.py for why)
    n_unique: int = 1000  # unplanted distinct prompts (synthetic: exactly, each seen once; iuxray: at most, each with all its reports)
    planted_per_level: int = 4  # planted prompts per duplication level and marker condition
    duplication_levels: List[int] = field(default_factory=lambda: [32, 64, 128])  # copies of each planted prompt per epoch
    train_steps: int = 3000  # optimiser steps
    train_batch_size: int = 32  # images per step
    learning_rate: float = 0.002  # AdamW peak learning rate
    seed: int = 0  # seed of data, initialisation and training
    max_minutes: float = 30.0  # stop training after this wall time (CPU budget)
    block_out_channels: List[int] = field(default_factory=lambda: [16, 32, 64])  # UNet widths; cross-attention at the last
    text_hidden_size: int = 64  # BERT hidden size (= the UNet's cross-attention dim)
    text_layers: int = 2  # BERT layers
    vocab_size: int = 1000  # WordPiece vocabulary trained on the training prompts
    max_tokens: int = 96  # tokenizer model_max_length (prompts pad and truncate to it)
    cond_drop: float = 0.1  # share of training prompts replaced by "" (classifier-free guidance)
    warmup_steps: int = 25  # linear learning-rate warmup, then cosine decay to 10%
    num_threads: int = 1  # torch CPU threads for training and evaluation
    eval_unique: int = 200  # never-duplicated prompts scored by `testbed evaluate` (negatives)
    eval_steps: Optional[int] = 20  # DDIM steps of `testbed evaluate` (None: score.steps)
    results: str = "bench/RESULTS.md"  # where `testbed evaluate` writes its section
    text_variant: str = "none"  # texts trained with: none | random_markers (fresh surrogates per training pair) | no_markers (markers deleted)


@dataclass
class ImagesConfig:
    source: Optional[str] = ""  # training images: a folder or s3:// prefix of PNG/JPG/DICOM, or a .csv/.parquet table of them; empty or null: no copies stage
    layout: str = "auto"  # folder source: mimic (files/pNN/pNNNNNNNN/sNNNNNNNN/*.jpg) | plain (no ids) | auto (mimic when every file is)
    path_column: str = "path"  # table source: the column of image paths
    study_column: str = "study_id"  # table source: the column of the report (study) id each image belongs to
    subject_column: Optional[str] = None  # table source: the column of patient ids (None: none)
    id_format: str = "as_is"  # table source: as_is (ids as the corpus spells them) | mimic (integer MIMIC ids -> pNN/pNNNNNNNN/sNNNNNNNN)
    root: str = ""  # table source: folder or prefix that relative paths are joined to
    index: Optional[str] = ""  # reusable index prefix; embeddings under <index>/<embedder fingerprint>/ (empty or null: the run's _parts/image_index)
    part_size: int = 1024  # images per stored embedding part (the unit of resume)


@dataclass
class CopiesConfig:
    embedder: str = "pixel"  # pixel | rad_dino (microsoft/rad-dino) | hf (any transformers vision model in the cache)
    pixel_size: int = 64  # pixel embedder: side of the resized image
    embedder_repo: str = "microsoft/rad-dino"  # hf embedder: the model's repo id in the cache
    embedder_cache: str = ""  # rad_dino / hf: the Hugging Face hub cache root (loaded offline)
    embedder_revision: Optional[str] = None  # rad_dino / hf: snapshot commit or ref (None: refs/main)
    generations: int = 8  # decoded generations per prompt and guidance
    guidance: Optional[float] = None  # first guidance (None: score.guidance_scale)
    second_guidance: Optional[float] = 1.0  # second guidance, where a model may reproduce its images (None: skip)
    top_k: int = 5  # nearest training images kept per generation
    n_controls: int = 200  # random non-memorized prompts that calibrate the copy threshold
    seed: int = 0  # seed of the control sample
    threshold_quantile: float = 0.99  # copy threshold: this quantile of the controls' max similarity
    batch_size: int = 16  # prompts per sampling run (each with its generations), and images per embedder pass
    query_chunk: int = 1024  # search: generation embeddings per matrix product
    index_chunk: int = 65536  # search: stored embeddings per matrix product (bounds memory)
    search_dtype: str = "float32"  # float32 | float16 (GPU) | bfloat16 (CPUs with AVX512-BF16)
    strategies: bool = True  # also check the memorized prompts rewritten by each text strategy of mitigation.strategies


@dataclass
class FidelityConfig:
    measure: str = "none"  # what a generation is read with for its prompt's findings (cxrmem/fidelity.py): none | phantom_reader (the testbed's)
    reader: str = "testbed/reader"  # phantom_reader: folder of reader.safetensors + reader.json (`cxrmem testbed reader` trains one)


@dataclass
class CxrmemConfig:
    run: RunConfig = field(default_factory=RunConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    cascade: CascadeConfig = field(default_factory=CascadeConfig)
    analyze: AnalyzeConfig = field(default_factory=AnalyzeConfig)
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    mitigation: MitigationConfig = field(default_factory=MitigationConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    testbed: TestbedConfig = field(default_factory=TestbedConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    copies: CopiesConfig = field(default_factory=CopiesConfig)
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)


CHOICES = {
    "corpus.source": ["synthetic", "mimic_reports", "table", "iuxray"],
    "model.kind": ["diffusers", "radedit"],
    "model.dtype": ["float32", "bfloat16", "float16"],
    "score.seed_mode": ["shared", "per_prompt"],
    "testbed.source": ["synthetic", "iuxray"],
    "testbed.text_variant": ["none", "random_markers", "no_markers"],
    "images.layout": ["auto", "mimic", "plain"],
    "images.id_format": ["as_is", "mimic"],
    "copies.embedder": ["pixel", "rad_dino", "hf"],
    "copies.search_dtype": ["float32", "float16", "bfloat16"],
    "analyze.reference_tail": ["gpd", "none"],
    "fidelity.measure": ["none", "phantom_reader"],
}
SECTIONS = ["IMPRESSION", "FINDINGS", "LAST_PARAGRAPH"]


def _positive(value: Any) -> bool:
    return value is not None and value > 0


def _non_negative(value: Any) -> bool:
    return value is not None and value >= 0


def _percent(value: Any) -> bool:
    return 0 < value <= 100


def _optional_positive(value: Any) -> bool:
    return value is None or value > 0


def _positive_list(value: Any) -> bool:
    return len(value) > 0 and all(v > 0 for v in value)


POSITIVE = (_positive, "positive")
NON_NEGATIVE = (_non_negative, "non-negative")
OPTIONAL_POSITIVE = (_optional_positive, "null or positive")

# key -> (predicate, what the value must be). Every int and float key of the schema has a rule
# (tests/test_config.py checks it): a count of 0 or -1 otherwise fails late, or silently.
RULES = {
    "run.lease_timeout_s": (lambda v: v is not None and v >= 1, "at least 1 (seconds)"),
    "corpus.synthetic.n_reports": POSITIVE,
    "corpus.synthetic.seed": NON_NEGATIVE,
    "corpus.synthetic.marker_rate": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "corpus.synthetic.normal_share": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "corpus.max_reports": OPTIONAL_POSITIVE,
    "corpus.progress_every": POSITIVE,
    "corpus.read_workers": POSITIVE,
    "model.radedit.vae_scaling_factor": POSITIVE,
    "model.vae_decode_batch": POSITIVE,
    "model.radedit.tokenizer_max_length": POSITIVE,
    "score.generations": POSITIVE,
    "score.steps": POSITIVE,
    "score.guidance_scale": NON_NEGATIVE,
    "score.seed": NON_NEGATIVE,
    "score.screening_steps": OPTIONAL_POSITIVE,
    "score.batch_size": POSITIVE,
    "detect.generations": POSITIVE,
    "detect.steps": POSITIVE,
    "detect.anisotropy_weight": NON_NEGATIVE,
    "detect.low_timestep": NON_NEGATIVE,
    "cascade.audit_sample": NON_NEGATIVE,
    "cascade.audit_seed": NON_NEGATIVE,
    "cascade.widen_factor": (lambda v: v > 1, "above 1"),
    "cascade.max_rounds": POSITIVE,
    "analyze.top_percent": (_percent, "in (0, 100]"),
    "analyze.zscore": POSITIVE,
    "analyze.n_reports_buckets": (lambda v: len(v) > 0 and v[0] >= 1 and all(a < b for a, b in zip(v, v[1:])), "increasing positive lower edges"),
    "analyze.length_bins": (lambda v: v >= 1, "at least 1"),
    "analyze.fdr": (lambda v: 0 < v < 1, "in (0, 1)"),
    "analyze.reference_length_bins": (lambda v: v >= 1, "at least 1"),
    "analyze.reference_min_per_bin": POSITIVE,
    "analyze.reference_tail_quantile": (lambda v: 0 < v < 1, "in (0, 1)"),
    "analyze.reference_min": POSITIVE,
    "attribution.null_seed": NON_NEGATIVE,
    "attribution.generations": POSITIVE,
    "attribution.steps": POSITIVE,
    "attribution.max_prompts": (_optional_positive, "null or positive (attribution.enabled=false attributes none)"),
    "attribution.top_units": POSITIVE,
    "mitigation.n_generations": (lambda v: v >= 2, "at least 2 (distances need pairs)"),
    "mitigation.steps": OPTIONAL_POSITIVE,
    "mitigation.insertion_words": POSITIVE,
    "mitigation.noise_std": NON_NEGATIVE,
    "mitigation.optimisation_iters": POSITIVE,
    "mitigation.optimisation_lr": POSITIVE,
    "mitigation.optimisation_target": NON_NEGATIVE,
    "mitigation.max_prompts": (_optional_positive, "null or positive (mitigation.enabled=false mitigates none)"),
    "mitigation.seed": NON_NEGATIVE,
    "mitigation.attention_scale": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "mitigation.guidance_delay": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "mitigation.opposite_scale": NON_NEGATIVE,
    "mitigation.noise_iters": NON_NEGATIVE,
    "mitigation.noise_lr": POSITIVE,
    "mitigation.noise_rho": NON_NEGATIVE,
    "ray.num_workers": OPTIONAL_POSITIVE,
    "ray.num_gpus_per_worker": NON_NEGATIVE,
    "ray.num_cpus_per_worker": POSITIVE,
    "ray.batch_size": POSITIVE,
    "ray.max_restarts": (lambda v: v >= -1, "-1 (no limit) or a count"),
    "ray.checkpoint_every": POSITIVE,
    "ray.progress_every_s": POSITIVE,
    "ray.local_num_cpus": OPTIONAL_POSITIVE,
    "ray.resource_wait_s": POSITIVE,
    "ray.stall_timeout_s": POSITIVE,
    "storage.max_attempts": POSITIVE,
    "storage.backoff_s": NON_NEGATIVE,
    "storage.connect_timeout_s": POSITIVE,
    "storage.request_timeout_s": POSITIVE,
    "storage.transfer_threads": POSITIVE,
    "report.grid_generations": NON_NEGATIVE,
    "report.top_prompts": NON_NEGATIVE,
    "report.memorized_rows": NON_NEGATIVE,
    "testbed.image_size": (lambda v: v >= 16 and v % 8 == 0, "a multiple of 8, at least 16"),
    "testbed.n_unique": POSITIVE,
    "testbed.planted_per_level": POSITIVE,
    "testbed.duplication_levels": (_positive_list, "a non-empty list of positive counts"),
    "testbed.train_steps": POSITIVE,
    "testbed.train_batch_size": POSITIVE,
    "testbed.learning_rate": POSITIVE,
    "testbed.seed": NON_NEGATIVE,
    "testbed.max_minutes": POSITIVE,
    "testbed.block_out_channels": (_positive_list, "a non-empty list of positive widths"),
    "testbed.text_hidden_size": POSITIVE,
    "testbed.text_layers": POSITIVE,
    "testbed.vocab_size": POSITIVE,
    "testbed.max_tokens": POSITIVE,
    "testbed.cond_drop": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "testbed.warmup_steps": NON_NEGATIVE,
    "testbed.num_threads": POSITIVE,
    "testbed.eval_unique": POSITIVE,
    "testbed.eval_steps": OPTIONAL_POSITIVE,
    "images.part_size": POSITIVE,
    "copies.pixel_size": (lambda v: v >= 4, "an integer of at least 4"),
    "copies.generations": POSITIVE,
    "copies.guidance": (lambda v: v is None or v >= 0, "null or non-negative"),
    "copies.second_guidance": (lambda v: v is None or v >= 0, "null or non-negative"),
    "copies.top_k": POSITIVE,
    "copies.seed": NON_NEGATIVE,
    "copies.n_controls": (lambda v: v >= 2, "at least 2 (the copy threshold is calibrated on them)"),
    "copies.threshold_quantile": (lambda v: 0.5 <= v < 1, "in [0.5, 1)"),
    "copies.batch_size": POSITIVE,
    "copies.query_chunk": POSITIVE,
    "copies.index_chunk": POSITIVE,
}


def default_config() -> DictConfig:
    return OmegaConf.structured(CxrmemConfig)


def _key_error(err: OmegaConfBaseException, origin: str) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    message = str(getattr(err, "msg", None) or err).splitlines()[0]  # OmegaConf appends its own key dump
    return ConfigError(f"config key {key!r} {origin}: {message}")


def _read_yaml(path: Path) -> DictConfig:
    """The YAML file as a config; a syntax error names the file and the line it is on."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; the shipped ones are in conf/")
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path} line {mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        context = getattr(err, "context_mark", None)
        if context is not None and mark is not None and context.line != mark.line:
            problem += f", {getattr(err, 'context', None) or 'opened'} at line {context.line + 1}"
        raise ConfigError(f"{where}: not valid YAML ({problem}); fix the syntax there") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: the file must be a mapping of sections (run:, score:, ...), not a {type(loaded).__name__}")
    return loaded


def load_config(path: Optional[str | Path] = None, overrides: Optional[List[str]] = None) -> DictConfig:
    """Schema defaults <- YAML file <- `key=value` overrides, then validation."""
    cfg = default_config()
    if path is not None:
        path = Path(path)
        try:
            cfg = OmegaConf.merge(cfg, _read_yaml(path))
        except OmegaConfBaseException as err:
            raise _key_error(err, f"in {path}") from None
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (example: score.steps=10)")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise _key_error(err, f"in override {item!r}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({getattr(err, 'problem', err)})") from None
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def with_overrides(cfg, **dotted):
    """A read-only copy of `cfg` with dot-keys replaced (keyword `a__b` is the key `a.b`)."""
    items = [f"{key.replace('__', '.')}={value}" for key, value in dotted.items()]
    merged = OmegaConf.merge(cfg, OmegaConf.from_dotlist(items))
    OmegaConf.set_readonly(merged, True)
    return merged


def validate(cfg: DictConfig) -> None:
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"config key {key!r}: {value!r} is not one of {allowed}")
    for key, (ok, what) in RULES.items():
        value = OmegaConf.select(cfg, key)
        if not ok(value):
            raise ConfigError(f"config key {key!r}: {value!r} must be {what}")
    for section in cfg.corpus.sections:
        if section not in SECTIONS:
            raise ConfigError(f"config key 'corpus.sections': {section!r} is not one of {SECTIONS}")
    from cxrmem.strategies import REGISTRY as STRATEGIES  # the names live with the strategies (no torch there)

    for strategy in cfg.mitigation.strategies:
        if strategy not in STRATEGIES:
            raise ConfigError(f"config key 'mitigation.strategies': {strategy!r} is not one of {list(STRATEGIES)}")
    _validate_detectors(cfg)
    _validate_covariates(cfg)
    if cfg.score.screening_steps is not None and cfg.score.screening_steps > cfg.score.steps:
        raise ConfigError("config key 'score.screening_steps' must not exceed score.steps")
    if cfg.corpus.source in ("mimic_reports", "table") and not cfg.corpus.path:
        raise ConfigError(f"config key 'corpus.path' is required when corpus.source={cfg.corpus.source}")
    if cfg.model.radedit.trust_remote_code and not cfg.model.radedit.text_revision:
        raise ConfigError(
            "config key 'model.radedit.text_revision' must pin a snapshot hash when trust_remote_code is on"
        )


def _validate_detectors(cfg: DictConfig) -> None:
    if cfg.detect.steps > cfg.score.steps:
        raise ConfigError("config key 'detect.steps' must not exceed score.steps (the detectors share its schedule)")
    # The names live with the detectors; imported here so that a config load pulls in scipy only now.
    from cxrmem.detectors import REGISTRY

    names = list(cfg.score.detectors)
    for name in names:
        if name not in REGISTRY:
            raise ConfigError(f"config key 'score.detectors': {name!r} is not one of {list(REGISTRY)}")
    if len(set(names)) < len(names):
        raise ConfigError(f"config key 'score.detectors': {names} names a detector twice")
    if cfg.cascade.enabled and not cfg.cascade.stages:
        raise ConfigError("config key 'cascade.stages' is empty: list at least one screen, or set cascade.enabled=false")
    for i, stage in enumerate(cfg.cascade.stages):
        key = f"cascade.stages[{i}]"
        if stage.screen not in REGISTRY:
            raise ConfigError(f"config key '{key}.screen': {stage.screen!r} is not one of {list(REGISTRY)}")
        if not _percent(stage.keep_percent):
            raise ConfigError(f"config key '{key}.keep_percent': {stage.keep_percent!r} must be in (0, 100]")
        if stage.steps < 1:
            raise ConfigError(f"config key '{key}.steps': {stage.steps!r} must be positive")
        if cfg.cascade.enabled and stage.steps >= cfg.score.steps:  # the defaults are for T=50: a shorter schedule sets its own stages
            raise ConfigError(f"config key '{key}.steps': {stage.steps!r} must be below score.steps ({cfg.score.steps}); set cascade.stages for this schedule")
        if not _optional_positive(stage.generations):
            raise ConfigError(f"config key '{key}.generations': {stage.generations!r} must be null or positive")


def _check_names(key: str, names: list, allowed, what: str) -> None:
    """Every name of the list at `key` is one of `allowed`, and none twice."""
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise ConfigError(f"config key {key!r}: {unknown[0]!r} is not one of {list(allowed)}")
    if len(set(names)) < len(names):
        raise ConfigError(f"config key {key!r}: {names} names a {what} twice")


def _validate_covariates(cfg: DictConfig) -> None:
    from cxrmem.analysis import COVARIATES  # the names live with the analysis

    _check_names("analyze.covariates", list(cfg.analyze.covariates), COVARIATES, "covariate")


def score_config(cfg: DictConfig) -> dict:
    """The settings a score depends on (batch size and placement excluded: they must not change it)."""
    score = OmegaConf.to_container(cfg.score, resolve=True)
    score.pop("batch_size")
    # score.detectors and the detect section add columns, not a different d_mem, but they enter the key
    # when set: rows of one key then always have the same columns, so a resumed run never mixes parts with
    # and without them (rows of another key are rescored), and consolidation keeps one schema. Left out
    # when empty, so that the key of a d_mem-only run is what it was before detectors existed.
    detectors = score.pop("detectors")
    extra = {"detectors": detectors, "detect": OmegaConf.to_container(cfg.detect, resolve=True)} if detectors else {}
    return {"score": score, "precision": dataclasses.asdict(effective_precision(cfg)), **extra}


def effective_precision(cfg: DictConfig) -> Precision:
    """The precision scores are computed in, not the one configured: the CPU runs a bfloat16 model in
    float32, and CUDA float32 differs with TF32. `model.device` is concrete here (score.run plans it)."""
    device_type = str(cfg.model.device).split(":")[0]
    return Precision.of(cfg.model.dtype, device_type, cfg.model.tf32, cfg.score.cpu_half)


def config_hash(cfg: DictConfig) -> str:
    """Hash of the score-determining settings; with the model fingerprint it keys resumable rows."""
    canonical = json.dumps(score_config(cfg), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


# Credential keys, matched on the whole key name: `model.radedit.tokenizer_max_length` and
# `testbed.max_tokens` are settings, not secrets, and must reach manifests and summaries.
CREDENTIAL_KEY = re.compile(
    r"(aws_)?(access_key_id|secret_access_key|secret_key|session_token|security_token|auth_token|api_key|token|password|secret)",
    re.IGNORECASE,
)


def redact(obj):
    """A copy of a nested dict/list without its credential keys (CREDENTIAL_KEY, whole names only)."""
    if isinstance(obj, dict):
        return {k: redact(v) for k, v in obj.items() if not CREDENTIAL_KEY.fullmatch(str(k))}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    return obj


def public_config(cfg) -> dict:
    """The resolved configuration as a plain dict without credentials: what manifests and summaries record."""
    container = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    return redact(container)
