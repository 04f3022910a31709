"""The GPU benchmark (issue 30, Deliver 7): one prepared run on a lent H100 / H200 that fits one 8-minute device call.

    on the device:  run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=480)   (gpu.sh installs the wheels)
    dry run here:   PYTHONPATH=$PWD .venv/bin/python bench/gpu_bench.py --dry-run --out /tmp/gpu_dry
    a rerun of some steps:  ... bench/gpu_bench.py --out $OUT --only scorer,cascade --budget cascade=80

Steps, in this order, each with a time budget (`STEPS`; printed at the start and written into the table):

- flops: the FLOP count per UNet sample, attention included (bench/unet_cost.py), of the model benchmarked;
- unet_eager: the RadEdit-shaped UNet (random weights) in bf16: samples/s, TFLOP/s and MFU per batch size,
  doubling from 8 until a batch does not fit (torch.cuda.OutOfMemoryError: the largest that fit is recorded)
  or the step's time runs out (said so); also a large bf16 matmul, the most a dense kernel reaches;
- unet_channels_last: the same in channels_last memory format, up to the largest batch that fit eager;
- scorer: `Scorer.score` at G=4 on the RadEdit-shaped model (UNet and BERT-base, bf16): prompts/s per GPU
  and MFU at T=50, extrapolated from calls over T=50's first k1 and k2 steps (said so in the table);
- parity: 128 prompts of the committed testbed (testbed/model, conf/demo.yaml's G=4, T=20, w=7.5):
  the device's CPU in fp32 (a background process started with the run) against the GPU in fp32 with TF32
  off and on (`Scorer(..., tf32=...)`) and in bf16: largest and median relative d_mem difference, top-1%
  (and top-10%) overlap, Spearman;
- cascade: the default `cascade.stages` (cxrmem.stages.cascade.DEFAULT_STAGES) on the RadEdit-shaped model at
  G=4, T=50, in prompts of conf/radedit.yaml's score.batch_size per call: a faithful cost-proportional
  measurement, not `run_cascade` itself: the same Scorer work (each stage's screen over the survivors of
  the one before, chosen by `detectors.screen_top`, later stages continuing the earlier ones'
  trajectories as cxrmem/stages/continuation.py does, then the full d_mem of the last survivors),
  without the parquet files, the model loads per stage and the audit sample, whose cost is added
  from the measured rate for a 100,000-prompt corpus;
- vae: GPU memory per decoded 512x512 image: torch.cuda.max_memory_allocated around `Scorer.decode`
  (bf16 on CUDA, as it decodes) of an SDXL-VAE-shaped AutoencoderKL (RadEdit's VAE), and the VAE in
  fp32 called directly for comparison;
- unet_compile: `torch.compile` (default mode) of the UNet at the best eager batch (at most 256): compile
  seconds, then samples/s; last, since its compile time is the least certain.

Each step runs in its own process (forked from a server that imported torch, diffusers and cxrmem once,
before any CUDA call) that stops starting measurements its deadline could not hold, and the driver kills
it (its process group: inductor's compile workers too) at the budget plus a grace. A step gets at most what
is left of the run's total (the sum of the budgets); the last one whatever the others left. Every measurement is
appended to $OUT/bench.jsonl the moment it exists, and $OUT/bench.md (the tables) is rewritten after each
one, so a run cut at any point returns what it measured.

`--dry-run` runs every step on the CPU at tiny sizes (a tiny UNet and BERT, the tiny testbed VAE, 4
prompts, batches 1 to 8 with an out-of-memory error simulated above 4, torch.compile with the eager
backend): tests/test_gpu_bench.py runs it, so the script cannot rot.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository root: cxrmem, and bench.unet_cost

from cxrmem.results_page import cpu_name  # noqa: E402

DEVICE_RUN_S = 480  # one device call of 8 minutes
SETUP_S = 15  # gpu.sh: wheels into /tmp/site, the import check, the fork server's imports
GRACE_S = 10  # a step that overruns its budget is killed this much later


@dataclass(frozen=True)
class Step:
    name: str
    budget_s: float
    title: str


STEPS = (
    Step("flops", 10, "FLOP count per UNet sample (bench/unet_cost.py)"),
    Step("unet_eager", 70, "UNet throughput, eager"),
    Step("unet_channels_last", 30, "UNet throughput, channels_last"),
    Step("scorer", 45, "Scorer.score at G=4, prompts/s per GPU (T=50 extrapolated)"),
    Step("parity", 30, "Parity on the testbed: GPU against the device's CPU in fp32"),
    Step("cascade", 55, "The default cascade's prompts/s"),
    Step("vae", 20, "VAE memory per decoded 512x512 image"),
    Step("unet_compile", 85, "UNet throughput, torch.compile"),
)
# Runs beside the steps from the start (the CPU is idle while the GPU works); parity waits for it.
BACKGROUND = Step("parity_cpu", 0, "Parity reference: the testbed on the device's CPU in fp32 (background)")
STARTS_WITH = {"forkserver": "forkserver", "spawn": "spawn"}


@dataclass(frozen=True)
class Sizes:
    """What a run measures on: the device's sizes, or the dry run's tiny ones."""

    device: str
    dtype: str  # of the UNet steps, the scorer and the cascade
    unet: str  # radedit | tiny
    text_tokens: int
    first_batch: int
    max_batch: int
    oom_above: Optional[int]  # simulate torch.cuda.OutOfMemoryError above this batch (the dry run)
    min_timed_s: float  # time each UNet batch over at least this long
    matmul_n: int
    scorer_prompts: tuple
    scorer_steps: tuple  # (k1, k2): each scorer call timed over T=50's first k1 and k2 steps
    parity_prompts: int
    parity_steps: Optional[int]  # None: conf/demo.yaml's score.steps
    parity_batch: int
    cascade_prompts: int
    cascade_batch: Optional[int]  # None: conf/radedit.yaml's score.batch_size
    vae: str  # sdxl | tiny
    vae_images: tuple
    compile_backend: str
    compile_batch_cap: int
    cpu_threads: int  # of the CPU reference
    step_threads: Optional[int]  # torch threads of each step (None: torch's default)


GPU = Sizes(
    device="cuda", dtype="bfloat16", unet="radedit", text_tokens=128, first_batch=8, max_batch=8192, oom_above=None,
    min_timed_s=1.0, matmul_n=8192, scorer_prompts=(8, 32, 128), scorer_steps=(2, 4), parity_prompts=128,
    parity_steps=None, parity_batch=64, cascade_prompts=1024, cascade_batch=None, vae="sdxl", vae_images=(1, 2, 4, 8),
    compile_backend="inductor", compile_batch_cap=256, cpu_threads=max(1, (os.cpu_count() or 2) // 2), step_threads=None,
)
DRY = Sizes(
    device="cpu", dtype="float32", unet="tiny", text_tokens=16, first_batch=1, max_batch=8, oom_above=4,
    min_timed_s=0.02, matmul_n=128, scorer_prompts=(2, 4), scorer_steps=(1, 2), parity_prompts=4, parity_steps=2,
    parity_batch=4, cascade_prompts=24, cascade_batch=4, vae="tiny", vae_images=(1, 2), compile_backend="eager",
    compile_batch_cap=4, cpu_threads=1, step_threads=1,
)


# == results: one JSON line per measurement, the markdown rewritten after each ================================
class Results:
    def __init__(self, out: Path):
        self.out = Path(out)
        self.jsonl, self.md = self.out / "bench.jsonl", self.out / "bench.md"

    def add(self, record: dict) -> None:
        line = json.dumps({"time": round(time.time(), 3), **record}, default=_jsonable)
        with open(self.jsonl, "a", encoding="utf-8") as stream:  # one write per line, appended
            stream.write(line + "\n")
        self.render()

    def records(self) -> list[dict]:
        if not self.jsonl.exists():
            return []
        out = []
        for line in self.jsonl.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill
                continue
        return out

    def rows(self, step: str, table: Optional[str] = None) -> list[dict]:
        return [r["row"] for r in self.records() if r.get("kind") == "row" and r["step"] == step and (table is None or r["table"] == table)]

    def render(self) -> None:
        tmp = self.md.with_name(f".bench.md.{os.getpid()}")
        tmp.write_text(render_markdown(self.records()), encoding="utf-8")
        os.replace(tmp, self.md)


def _jsonable(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:
            return "nan"
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value).replace("|", "/")


def _table(rows: list[dict]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return lines


def plan_rows(steps, statuses: Optional[dict] = None) -> list[dict]:
    statuses = statuses or {}
    setup = statuses.get("setup", {})
    rows = [{"step": "setup (gpu.sh: wheels, imports)", "budget_s": SETUP_S, "took_s": setup.get("seconds"),
             "status": setup.get("status", "pending")}]
    for step in steps:
        done = statuses.get(step.name, {})
        rows.append({"step": step.name, "budget_s": step.budget_s, "took_s": done.get("seconds"), "status": done.get("status", "pending")})
    background = statuses.get(BACKGROUND.name)
    if background:
        rows.append({"step": BACKGROUND.name + " (beside the others)", "budget_s": 0, "took_s": background.get("seconds"),
                     "status": background.get("status")})
    total = SETUP_S + sum(s.budget_s for s in steps)
    took = [r["took_s"] for r in rows if r["took_s"] is not None and "beside" not in r["step"]]
    rows.append({"step": f"total (device call: {DEVICE_RUN_S} s)", "budget_s": total, "took_s": sum(took) if took else None,
                 "status": f"margin {DEVICE_RUN_S - total:.0f} s"})
    return rows


def render_markdown(records: list[dict]) -> str:
    plan = next((r for r in records if r.get("kind") == "plan"), None)
    titles = {s.name: s.title for s in (*STEPS, BACKGROUND)}
    lines = ["# GPU benchmark (bench/gpu_bench.py)", ""]
    if plan is None:
        return "\n".join(lines + ["(no plan recorded)"]) + "\n"
    if plan.get("dry_run"):
        lines += ["**Dry run**: tiny sizes on the CPU; the numbers say nothing of a GPU.", ""]
    lines += [f"Device: {plan['device']}. CPU: {plan['cpu']} ({plan['cores']} cores). torch {plan.get('torch', '?')}. "
              f"Started {plan['started']}.", ""]
    steps = [Step(**s) for s in plan["steps"]]
    statuses = {r["step"]: r for r in records if r.get("kind") == "status"}
    lines += ["## Plan and time taken", ""] + _table(plan_rows(steps, statuses)) + [""]
    end = next((r for r in records if r.get("kind") == "end"), None)
    if end:
        lines += [f"Driver wall time: {end['seconds']:.1f} s (its setup included, gpu.sh's wheels not).", ""]
    for name in [s.name for s in steps] + [BACKGROUND.name]:
        mine = [r for r in records if r.get("step") == name and r.get("kind") in ("row", "note")]
        status = statuses.get(name)
        if not mine and not status:
            continue
        lines += [f"## {name}: {titles.get(name, name)}", ""]
        tables: dict[str, list[dict]] = {}
        for r in mine:
            if r["kind"] == "row":
                tables.setdefault(r["table"], []).append(r["row"])
        for table, rows in tables.items():
            lines += [f"{table}:", ""] + _table(rows) + [""]
        lines += [f"- {r['text']}" for r in mine if r["kind"] == "note"]
        if status and status["status"] != "done":
            lines.append(f"- **{status['status']}** after {status.get('seconds', 0):.1f} s: {status.get('detail', '')}")
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


# == the steps' common parts =====================================================================================
class Context:
    """What a step sees: its sizes, its deadline, where its results go."""

    def __init__(self, name: str, sizes: Sizes, out: Path, work: Path, deadline: float):
        self.name, self.sizes, self.work, self.deadline = name, sizes, Path(work), deadline
        self.results = Results(out)

    def left(self) -> float:
        return self.deadline - time.time()

    def fits(self, seconds: float) -> bool:
        return time.time() + seconds <= self.deadline

    def row(self, table: str, **row) -> None:
        self.results.add({"kind": "row", "step": self.name, "table": table, "row": row})
        print(f"[{self.name}] {table}: {json.dumps(row, default=_jsonable)}", flush=True)

    def note(self, text: str) -> None:
        self.results.add({"kind": "note", "step": self.name, "text": text})
        print(f"[{self.name}] {text}", flush=True)


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def free(device) -> None:
    import gc

    import torch

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def peak_memory(device) -> Optional[float]:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.device(device).type == "cuda" else None


def reset_peak(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def simulated_oom(sizes: Sizes, batch: int) -> None:
    import torch

    if sizes.oom_above is not None and batch > sizes.oom_above:
        raise torch.cuda.OutOfMemoryError(f"simulated (--oom-above {sizes.oom_above}): batch {batch}")


def build_unet(sizes: Sizes):
    """The benchmarked UNet with random weights, made on the device (fast there) in the step's dtype."""
    import torch

    from cxrmem.models.tiny import radedit_shaped_unet, tiny_unet

    torch.manual_seed(0)
    with torch.device(sizes.device):
        unet = radedit_shaped_unet() if sizes.unet == "radedit" else tiny_unet(cross_attention_dim=32)
    return unet.eval().requires_grad_(False).to(getattr(torch, sizes.dtype))


def testbed_components(dtype: str = "float32"):
    from omegaconf import OmegaConf

    from cxrmem.models.loading import load_components
    from cxrmem.models.settings import ModelConfig

    return load_components(OmegaConf.merge(OmegaConf.structured(ModelConfig), {"path": str(ROOT / "testbed/model"), "dtype": dtype}))


def shaped_components(sizes: Sizes, vae=None):
    """RadEdit's parts in shape (SD-1.x UNet, BERT-base, the RadEdit DDIM scheduler; random weights), or tiny
    ones for the dry run, with the testbed's WordPiece tokenizer (the vocabulary does not change the cost)."""
    import torch
    from transformers import BertConfig, BertModel

    from cxrmem.models.components import Components, freeze
    from cxrmem.models.tiny import radedit_scheduler, radedit_shaped_unet, tiny_unet

    tokenizer = testbed_components().tokenizer
    torch.manual_seed(0)
    with torch.device(sizes.device):
        if sizes.unet == "radedit":
            text = BertModel(BertConfig(vocab_size=len(tokenizer), max_position_embeddings=512), add_pooling_layer=False)
            unet = radedit_shaped_unet()
        else:
            text = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64, max_position_embeddings=128), add_pooling_layer=False)
            unet = tiny_unet(cross_attention_dim=32)
    dtype = getattr(torch, sizes.dtype)
    return Components(tokenizer, freeze(text.to(dtype)), freeze(unet.to(dtype)), radedit_scheduler(), vae, 0.13025,
                      max_length=sizes.text_tokens, source=f"{sizes.unet}-shaped, random weights")


def testbed_prompts(n: int) -> tuple[list[str], list[str]]:
    """The first n prompts of the committed testbed (its 24 planted prompts first), normalised, and their ids."""
    import pandas as pd

    from cxrmem.corpus.text import normalise_whitespace, prompt_id

    prompts = [normalise_whitespace(p) for p in pd.read_csv(ROOT / "testbed/model/manifest.csv")["prompt"]]
    while len(prompts) < n:  # the dry run never asks for more; a GPU run at most the 1,024 there are
        prompts += [f"{p} (copy {len(prompts)})" for p in prompts[: n - len(prompts)]]
    prompts = prompts[:n]
    return prompts, [prompt_id(p) for p in prompts]


def timed(device, work) -> tuple[float, object]:
    sync(device)
    started = time.perf_counter()
    result = work()
    sync(device)
    return time.perf_counter() - started, result


def peak_of(sizes: Sizes, dtype: str, tf32: bool = False):
    import torch

    from bench import unet_cost

    return unet_cost.peak_tflops(sizes.device, dtype, tf32, threads=torch.get_num_threads())


# == flops =========================================================================================================
def step_flops(ctx: Context) -> None:
    from bench import unet_cost
    from cxrmem.models.tiny import RADEDIT_UNET

    configs = [("RadEdit-shaped", dict(RADEDIT_UNET), unet_cost.RADEDIT_TEXT_TOKENS)]
    if ctx.sizes.unet != "radedit":
        configs.append(("tiny (this dry run's)", dict(build_unet(ctx.sizes).config), ctx.sizes.text_tokens))
    for name, config, tokens in configs:
        count = unet_cost.unet_flops(config, tokens)
        ctx.row("per UNet sample", unet=name, text_tokens=tokens, tflop_total=count.total / 1e12,
                tflop_without_attention=count.without_attention / 1e12, tflop_attention_analytic=count.attention_analytic / 1e12,
                tflop_attention_math_kernel=count.attention_counted / 1e12, attention_calls=count.attention_calls, agree=count.agree)
    ctx.note("counted on the meta device with torch's FlopCounterMode (2 FLOP per multiply-add); attention twice: "
             "analytically (4 B heads Lq Lk d per call) and by the counter with the math kernel forced; MFU below uses tflop_total")


# == UNet throughput ================================================================================================
def time_unet(ctx: Context, model, config, batch: int, channels_last: bool = False) -> dict:
    """One call (the warm-up: the compile of a compiled model, the out-of-memory probe), then enough calls to
    fill sizes.min_timed_s (within the deadline)."""
    import torch

    sizes = ctx.sizes
    simulated_oom(sizes, batch)
    device, dtype = torch.device(sizes.device), getattr(torch, sizes.dtype)
    size = config.sample_size
    x = torch.randn(batch, config.in_channels, size, size, device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.full((batch,), 999, device=device)
    text = torch.randn(batch, sizes.text_tokens, config.cross_attention_dim, device=device, dtype=dtype)
    reset_peak(device)
    spent = time.perf_counter()
    with torch.no_grad():
        first, _ = timed(device, lambda: model(x, t, encoder_hidden_states=text))
        repeats = max(1, min(20, math.ceil(sizes.min_timed_s / max(first, 1e-6))))
        while repeats > 1 and not ctx.fits(repeats * first):
            repeats //= 2
        seconds, _ = timed(device, lambda: [model(x, t, encoder_hidden_states=text) for _ in range(repeats)])
    return {"batch": batch, "first_call_s": first, "repeats": repeats, "s_per_call": seconds / repeats,
            "samples_s": batch * repeats / seconds, "peak_mem_gib": peak_memory(device),
            "spent_s": time.perf_counter() - spent}


def with_rates(row: dict, flop: float, peak: Optional[float]) -> dict:
    from bench import unet_cost

    row["tflop_s"] = row["samples_s"] * flop / 1e12
    row["mfu"] = unet_cost.mfu(row["samples_s"], flop, peak)
    return row


def step_unet(ctx: Context, variant: str) -> None:
    import torch

    from bench import unet_cost

    sizes = ctx.sizes
    unet = build_unet(sizes)
    channels_last = variant == "channels_last"
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    flop = unet_cost.unet_flops(dict(unet.config), sizes.text_tokens).total
    peak, source = peak_of(sizes, sizes.dtype)
    if variant == "eager":
        ctx.note(f"{sizes.unet}-shaped UNet, random weights, {sizes.dtype}, {sizes.text_tokens} text tokens: "
                 f"{flop / 1e12:.4g} TFLOP per sample (attention included); MFU against {_fmt(peak)} TFLOP/s ({source})")
        n = sizes.matmul_n
        a = torch.randn(n, n, device=sizes.device, dtype=getattr(torch, sizes.dtype))
        a @ a
        seconds, _ = timed(sizes.device, lambda: [a @ a for _ in range(10)])
        ctx.row("matmul", n=n, dtype=sizes.dtype, tflop_s=2 * n**3 * 10 / seconds / 1e12,
                of_peak=unet_cost.mfu(2 * n**3 * 10 / seconds, 1.0, peak))
        del a
    max_batch = sizes.max_batch
    if variant != "eager":
        fits = [r.get("largest_fit") for r in ctx.results.rows("unet_eager", "fit")]
        max_batch = fits[-1] if fits and fits[-1] else max_batch
    time_unet(ctx, unet, unet.config, sizes.first_batch, channels_last)  # lazy initialisation, kernels loaded: untimed
    batch, last, largest, stop, fitted = sizes.first_batch, None, None, None, []
    while batch <= max_batch:
        need = 2.2 * last if last else 0.0
        if not ctx.fits(need):
            stop = f"the step's time: batch {batch} would need about {need:.0f} s more"
            break
        failed = None
        try:
            row = time_unet(ctx, unet, unet.config, batch, channels_last)
        except RuntimeError as err:  # torch.cuda.OutOfMemoryError, or a kernel's limit (32-bit indexing past 2^31 elements)
            kind = "out of memory" if isinstance(err, torch.cuda.OutOfMemoryError) else f"{type(err).__name__} (not memory)"
            failed = (kind, str(err).strip().split("\n")[0][:200])
        if failed is not None:
            free(sizes.device)
            ctx.row("batches", variant=variant, batch=batch, fits=False, detail=f"{failed[0]}: {failed[1]}")
            stop = f"{failed[0]} at batch {batch}"
            break
        ctx.row("batches", variant=variant, fits=True, **with_rates(row, flop, peak))
        largest, last = batch, row["spent_s"]
        fitted.append(row)
        batch *= 2
    else:
        stop = f"the largest batch asked for ({max_batch}) fit"
    try:
        memory = memory_line(sizes, fitted)
    except RuntimeError as err:  # a kernel's error can leave CUDA unusable in this process
        memory = {"memory_estimate": f"unavailable: {str(err)[:100]}"}
    ctx.row("fit", variant=variant, largest_fit=largest, stopped_by=stop, **memory)


def memory_line(sizes: Sizes, rows: list[dict]) -> dict:
    """GiB per sample and the batch the card's memory would hold, from the peaks of the two largest batches that fit
    (a straight line through them): what a run stopped by its time says of the batch that would not fit."""
    import torch

    peaks = [(r["batch"], r["peak_mem_gib"]) for r in rows if r.get("peak_mem_gib") is not None]
    if torch.device(sizes.device).type != "cuda" or len(peaks) < 2 or peaks[-1][0] == peaks[-2][0]:
        return {}
    (b1, m1), (b2, m2) = peaks[-2], peaks[-1]
    per_sample = (m2 - m1) / (b2 - b1)
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    estimate = math.floor((total - (m2 - per_sample * b2)) / per_sample) if per_sample > 0 else None
    return {"gib_per_sample": per_sample, "card_gib": total, "estimated_largest_batch": estimate}


def step_compile(ctx: Context) -> None:
    import torch

    from bench import unet_cost

    sizes = ctx.sizes
    eager = [r for r in ctx.results.rows("unet_eager", "batches") if r.get("fits")]
    best = max(eager, key=lambda r: r["samples_s"]) if eager else None
    batch = min(best["batch"], sizes.compile_batch_cap) if best else min(sizes.first_batch * 8, sizes.compile_batch_cap)
    unet = build_unet(sizes)
    flop = unet_cost.unet_flops(dict(unet.config), sizes.text_tokens).total
    peak, _ = peak_of(sizes, sizes.dtype)
    ctx.note(f"torch.compile(backend={sizes.compile_backend!r}, default mode, dynamic=False) at batch {batch}; "
             f"the driver kills it at the step's budget ({ctx.left():.0f} s left)")
    compiled = torch.compile(unet, backend=sizes.compile_backend, dynamic=False)
    row = time_unet(ctx, compiled, unet.config, batch)
    ctx.note(f"compiled and ran its first call in {row['first_call_s']:.1f} s")
    same = [r for r in eager if r["batch"] == batch]
    row = with_rates(row, flop, peak)
    row["speedup_vs_eager"] = row["samples_s"] / same[-1]["samples_s"] if same else None
    ctx.row("batches", variant=f"compile ({sizes.compile_backend})", fits=True, **row)


# == the scorer =====================================================================================================
def step_scorer(ctx: Context) -> None:
    from bench import unet_cost
    from cxrmem.scoring.scorer import Scorer
    from cxrmem.scoring.settings import ScoreSettings

    sizes = ctx.sizes
    components = shaped_components(sizes)
    settings = ScoreSettings(generations=4, steps=50)
    g, steps = settings.generations, settings.steps
    scorer = Scorer(components, settings, device=sizes.device)
    flop = unet_cost.unet_flops(dict(components.denoiser.config), sizes.text_tokens).total
    peak, source = peak_of(sizes, sizes.dtype)
    k1, k2 = sizes.scorer_steps
    prompts, ids = testbed_prompts(max(sizes.scorer_prompts))
    ctx.note(f"{sizes.unet}-shaped UNet and text encoder in {sizes.dtype}, G={g}, w=7.5; each batch timed over the "
             f"first {k1} and {k2} of T={steps} steps (after a 1-step warm-up): s/step = the difference / {k2 - k1}, "
             f"s per call at T={steps} = t({k1}) + {steps - k1} x s/step (extrapolated, not run); "
             f"MFU = prompts/s x G x T x 2 x {flop / 1e12:.4g} TFLOP / {_fmt(peak)} TFLOP/s ({source})")
    last = None
    for n in sizes.scorer_prompts:
        need = 0.0 if last is None else last * 4.4
        if not ctx.fits(need):
            ctx.note(f"stopped before {n} prompts per call: about {need:.0f} s would pass the step's deadline")
            break
        started = time.perf_counter()
        p, i = prompts[:n], ids[:n]
        scorer.score(p, i, steps=1)
        t1, _ = timed(sizes.device, lambda: scorer.score(p, i, steps=k1))
        t2, _ = timed(sizes.device, lambda: scorer.score(p, i, steps=k2))
        per_step, basis = (t2 - t1) / (k2 - k1), "difference"
        if per_step <= 0:  # timing noise (a shared or throttled machine) made the longer call no slower: bound it
            per_step, basis = t2 / k2, f"t({k2}) / {k2}: the difference was not positive"
        call = t1 + (steps - k1) * per_step
        rate = n / call
        chunks = getattr(scorer, "_chunks", {}).get("score")
        ctx.row("scorer", prompts_per_call=n, unet_batch=2 * n * g, s_per_step=per_step, s_per_step_from=basis, unet_samples_s=2 * n * g / per_step,
                s_per_call_T50=call, prompts_s_T50=rate, tflop_s=rate * unet_cost.scoring_flop_per_prompt(flop, g, steps) / 1e12,
                mfu=unet_cost.mfu(rate, unet_cost.scoring_flop_per_prompt(flop, g, steps), peak),
                chunk_after_oom=getattr(chunks, "fits", None))
        last = time.perf_counter() - started


# == parity =========================================================================================================
def parity_setup(sizes: Sizes):
    from cxrmem.config import load_config
    from cxrmem.scoring.settings import ScoreSettings

    cfg = load_config(ROOT / "conf/demo.yaml")
    settings = ScoreSettings.of(cfg.score)
    if sizes.parity_steps:
        settings = settings.replace(steps=sizes.parity_steps)
    return settings


def score_all(scorer, prompts, ids, batch: int, every=None):
    import numpy as np

    parts = []
    for lo in range(0, len(prompts), batch):
        parts.append(scorer.score(prompts[lo : lo + batch], ids[lo : lo + batch]).d_mem)
        if every:
            every(ids[lo : lo + batch], parts[-1])
    return np.concatenate(parts)


def step_parity_cpu(ctx: Context) -> None:
    """The reference: the testbed scored on the device's CPU in fp32, chunk by chunk into work/parity_cpu.jsonl."""
    import torch

    from cxrmem.scoring.scorer import Scorer

    sizes = ctx.sizes
    torch.set_num_threads(sizes.cpu_threads)
    settings = parity_setup(sizes)
    prompts, ids = testbed_prompts(sizes.parity_prompts)
    path = ctx.work / "parity_cpu.jsonl"
    started = time.perf_counter()
    scorer = Scorer(testbed_components("float32"), settings, device="cpu")

    def keep(chunk_ids, d_mem):
        with open(path, "a", encoding="utf-8") as stream:
            stream.write(json.dumps({"ids": list(chunk_ids), "d_mem": [float(v) for v in d_mem]}) + "\n")

    score_all(scorer, prompts, ids, sizes.parity_batch, keep)
    ctx.row("reference", prompts=len(prompts), G=settings.generations, T=settings.steps, threads=sizes.cpu_threads,
            seconds=time.perf_counter() - started, cpu=cpu_name())


def read_reference(path: Path) -> dict:
    found = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                chunk = json.loads(line)
            except json.JSONDecodeError:
                continue
            found.update(zip(chunk["ids"], chunk["d_mem"]))
    return found


def compare(reference: dict, ids: list[str], scores) -> dict:
    import numpy as np
    from scipy.stats import spearmanr

    from cxrmem.stats import top_percent_mask

    common = [j for j, pid in enumerate(ids) if pid in reference]
    ref = np.array([reference[ids[j]] for j in common], dtype=np.float64)
    got = np.asarray(scores, dtype=np.float64)[common]
    rel = np.abs(got - ref) / np.abs(ref)

    def overlap(percent: float) -> str:
        a, b = top_percent_mask(ref, percent)[0], top_percent_mask(got, percent)[0]
        return f"{int(np.sum(a & b))}/{int(np.sum(a))}"

    return {"prompts": len(common), "max_rel_diff": float(np.max(rel)) if len(rel) else None,
            "median_rel_diff": float(np.median(rel)) if len(rel) else None, "top1pct_overlap": overlap(1.0),
            "top10pct_overlap": overlap(10.0), "spearman": float(spearmanr(ref, got)[0]) if len(rel) > 2 else None}


def step_parity(ctx: Context) -> None:
    import torch

    from cxrmem.scoring.scorer import Scorer

    sizes = ctx.sizes
    settings = parity_setup(sizes)
    prompts, ids = testbed_prompts(sizes.parity_prompts)
    on_gpu = torch.device(sizes.device).type == "cuda"
    modes = [("fp32, TF32 off", "float32", False), ("fp32, TF32 on", "float32", True), ("bf16", "bfloat16", False)]
    ctx.note(f"the committed testbed (testbed/model), its first {len(prompts)} prompts (the 24 planted first), "
             f"conf/demo.yaml's G={settings.generations}, T={settings.steps}, w={settings.guidance_scale}; relative "
             f"difference |d - d_cpu| / d_cpu per prompt; overlap: the CPU's top set held by the other's"
             + ("" if on_gpu else "; dry run: the 'GPU' modes run on the CPU too (bf16 kept as bf16, score.cpu_half)"))
    scores = {}
    for label, dtype, tf32 in modes:
        if not ctx.fits(3):
            ctx.note(f"no time left for {label}")
            break
        mode_settings = settings if on_gpu or dtype == "float32" else settings.replace(cpu_half=True)
        scorer = Scorer(testbed_components(dtype), mode_settings, device=sizes.device, tf32=tf32)
        score_all(scorer, prompts[:1], ids[:1], 1)  # warm-up
        seconds, scores[label] = timed(sizes.device, lambda: score_all(scorer, prompts, ids, sizes.parity_batch))
        ctx.note(f"{label}: {len(prompts)} prompts in {seconds:.2f} s")
    path = ctx.work / "parity_cpu.jsonl"
    reference = read_reference(path)
    while len(reference) < len(ids) and ctx.fits(2):
        time.sleep(1)
        reference = read_reference(path)
    if len(reference) < len(ids):
        ctx.note(f"the CPU reference had {len(reference)} of {len(ids)} prompts at the deadline: compared on those")
    for label, got in scores.items():
        ctx.row("against the CPU in fp32", mode=label, **compare(reference, ids, got))
    if "fp32, TF32 off" in scores and "bf16" in scores:
        own = dict(zip(ids, (float(v) for v in scores["fp32, TF32 off"])))
        ctx.row("bf16 against the GPU's fp32", mode="bf16", **compare(own, ids, scores["bf16"]))


# == cascade ========================================================================================================
def evaluations(n: int, g: int, done: int, steps: int, shared: bool = True) -> int:
    """UNet sample evaluations of `Scorer.sample` over n prompts x g noises from step `done` to `steps`: both guidance
    halves every step, but the first step's unconditional pass once for the g shared noises."""
    if steps <= done:
        return 0
    first = n * g + g if done == 0 and shared else 2 * n * g
    return first + 2 * n * g * (steps - done - 1)


def step_cascade(ctx: Context) -> None:
    import numpy as np
    import torch
    from omegaconf import OmegaConf

    from cxrmem.detectors import screen_top
    from cxrmem.scoring.scorer import Continuation, Scorer
    from cxrmem.scoring.settings import ScoreSettings
    from cxrmem.stages.settings import DEFAULT_STAGES

    sizes = ctx.sizes
    batch = sizes.cascade_batch or int(OmegaConf.load(ROOT / "conf/radedit.yaml").score.batch_size)
    components = shaped_components(sizes)
    settings = ScoreSettings(generations=4, steps=50)
    g_full, steps_full = settings.generations, settings.steps
    scorer = Scorer(components, settings, device=sizes.device)
    stages = list(DEFAULT_STAGES)
    prompts, ids = testbed_prompts(sizes.cascade_prompts)
    n = len(prompts)
    ctx.note(f"default cascade.stages {[(s.screen, s.keep_percent, s.steps, s.generations) for s in stages]} "
             f"(screen, keep %, steps, G; G None = {g_full}) on {n} testbed prompts, {sizes.unet}-shaped model in "
             f"{sizes.dtype}, T={steps_full}, {batch} prompts per call; a cost-proportional measurement of the Scorer "
             "work (no parquet files, no model load per stage, no audit sample: see the module notes)")
    scorers = {g_full: scorer}
    for g in {s.generations or g_full for s in stages}:
        scorers.setdefault(g, scorer.on(components, settings.replace(generations=g)))
    for g, s in scorers.items():  # warm-up of each shape of call
        s.score(prompts[:batch], ids[:batch], steps=1)
    alive = np.arange(n)
    states: dict[int, tuple] = {}  # prompt index -> (latents [G, C, H, W], norms [G, k]) of the full-G trajectories
    total_s, total_eval, rows = 0.0, 0, []

    def run(stage_name: str, g: int, steps: int, keep_percent: Optional[float]):
        nonlocal alive, states, total_s, total_eval
        s = scorers[g]
        values, made, spent, done_from = [], {}, 0, set()
        started = time.perf_counter()
        for lo in range(0, len(alive), batch):
            chunk = alive[lo : lo + batch]
            carried = [states.get(int(j)) for j in chunk] if g == g_full else [None] * len(chunk)
            start = None
            if all(c is not None and c[1].shape[-1] <= steps for c in carried):
                start = Continuation(torch.stack([c[0] for c in carried]), torch.stack([c[1] for c in carried]))
            done = start.steps if start is not None else 0
            done_from.add(done)
            result = s.score([prompts[j] for j in chunk], [ids[j] for j in chunk], steps=steps, start=start)
            values.append(result.d_mem)
            spent += evaluations(len(chunk), g, done, steps)
            if g == g_full and result.latents is not None:
                for row, j in enumerate(chunk):
                    made[int(j)] = (result.latents[row], torch.as_tensor(result.step_norms[row]))
        seconds = time.perf_counter() - started
        values = np.concatenate(values) if values else np.zeros(0)
        kept = alive if keep_percent is None else np.sort(screen_top(alive, values, keep_percent, "dmem"))
        rows.append({"stage": stage_name, "G": g, "steps": f"{'/'.join(str(d) for d in sorted(done_from))}->{steps}",
                     "prompts": len(alive), "kept": len(kept), "unet_evaluations": spent, "seconds": seconds,
                     "unet_samples_s": spent / seconds if seconds else None})
        ctx.row("stages", **rows[-1])
        total_s += seconds
        total_eval += spent
        if g == g_full:
            states = {j: made[j] for j in kept.tolist() if j in made}
        alive = kept

    for number, stage in enumerate(stages, 1):
        if stage.screen != "dmem":
            ctx.note(f"stage {number} screens with {stage.screen}: this measurement covers dmem screens only")
            return
        run(f"{number} (dmem, keep {stage.keep_percent:g}%)", stage.generations or g_full, stage.steps, stage.keep_percent)
        if not ctx.fits(2 * rows[-1]["seconds"] + 1):
            ctx.note("stopped: the step's time ran out before the full score")
            return
    run("full d_mem of the survivors", g_full, steps_full, None)
    per_prompt = total_eval / n
    full_rate = [r for r in ctx.results.rows("scorer", "scorer") if r.get("prompts_per_call") == batch]
    rate = full_rate[-1]["unet_samples_s"] if full_rate else rows[1]["unet_samples_s"]
    corpus, audit = 100_000, 200
    # at 100,000 prompts every stage runs full batches: a stage at the full G at the rate of full G=4 batches, one
    # at another G (the first, G=1) at its own rate here (it ran full batches already), the audit at the full G's
    projected = sum(corpus / n * r["unet_evaluations"] / (rate if r["G"] == g_full else r["unet_samples_s"]) for r in rows)
    projected += audit * evaluations(1, g_full, 0, steps_full) / rate
    ctx.row("cascade", prompts=n, seconds=total_s, prompts_s=n / total_s, evaluations_per_prompt=per_prompt,
            full_score_evaluations=evaluations(1, g_full, 0, steps_full), projected_prompts_s_100k=corpus / projected)
    ctx.note(f"projected_prompts_s_100k: {corpus:,} prompts, each stage's evaluations per prompt as counted here, the "
             f"stages at G={g_full} and the default audit sample ({audit} rejected prompts fully scored) at {rate:.4g} UNet "
             f"samples/s ({'the scorer step at ' + str(batch) + ' prompts per call' if full_rate else 'stage 2 here'}), "
             f"a stage at another G at its own rate here; the measured prompts_s is at {n} prompts, where the late "
             "stages run part-filled batches")


# == VAE ============================================================================================================
SDXL_VAE = {  # stabilityai/sdxl-vae's config.json: RadEdit's VAE
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4, "norm_num_groups": 32,
    "sample_size": 1024, "scaling_factor": 0.13025, "act_fn": "silu",
}


def step_vae(ctx: Context) -> None:
    import torch
    from diffusers import AutoencoderKL

    from cxrmem.models.components import Components
    from cxrmem.models.tiny import tiny_vae
    from cxrmem.scoring.scorer import Scorer
    from cxrmem.scoring.settings import ScoreSettings

    sizes = ctx.sizes
    device = torch.device(sizes.device)
    torch.manual_seed(0)
    with torch.device(device):
        vae = AutoencoderKL(**SDXL_VAE) if sizes.vae == "sdxl" else tiny_vae()
    vae = vae.eval().requires_grad_(False)
    side = 64 if sizes.vae == "sdxl" else 8  # latents of a 512x512 image (the dry run's tiny VAE: 16x16)
    pixels = side * 2 ** (len(vae.config.block_out_channels) - 1)
    base = testbed_components()
    parts = Components(base.tokenizer, base.text_encoder, base.denoiser, base.scheduler, vae, 0.13025, base.max_length, "testbed + VAE")
    scorer = Scorer(parts, ScoreSettings(), device=sizes.device, decode_batch=max(sizes.vae_images))
    latents = torch.randn(max(sizes.vae_images), 4, side, side)
    scorer.decode(latents[:1])  # moves the VAE to the device, in the dtype it decodes in
    on_gpu = device.type == "cuda"
    ctx.note(f"{'SDXL-VAE-shaped' if sizes.vae == 'sdxl' else 'tiny'} AutoencoderKL, random weights, {side}x{side} latents "
             f"-> {pixels}x{pixels} images; Scorer.decode (model.vae_decode_batch >= images: one VAE call) in "
             f"{str(vae.dtype).replace('torch.', '')}; memory: torch.cuda.max_memory_allocated during the call less what was allocated before it "
             "(the VAE's weights), per image" + ("" if on_gpu else "; dry run: no CUDA memory to read on the CPU"))

    def measure(label, work, images):
        free(device)
        reset_peak(device)
        before = torch.cuda.memory_allocated() / 2**20 if on_gpu else None
        seconds, _ = timed(device, work)
        peak = torch.cuda.max_memory_allocated() / 2**20 if on_gpu else None
        above = None if peak is None else peak - before
        ctx.row("decode", path=label, images=images, peak_above_base_mib=above,
                mib_per_image=None if above is None else above / images, seconds=seconds)

    for m in sizes.vae_images:
        if not ctx.fits(3):
            break
        measure(f"Scorer.decode ({str(vae.dtype).replace('torch.', '')})", lambda m=m: scorer.decode(latents[:m]), m)
    vae.float()
    for m in sizes.vae_images[:2]:
        if not ctx.fits(3):
            break
        with torch.no_grad():
            measure("vae.decode (float32)", lambda m=m: vae.decode(latents[:m].to(device) / 0.13025).sample, m)


STEP_FUNCS = {
    "flops": step_flops,
    "unet_eager": lambda ctx: step_unet(ctx, "eager"),
    "unet_channels_last": lambda ctx: step_unet(ctx, "channels_last"),
    "scorer": step_scorer,
    "parity": step_parity,
    "cascade": step_cascade,
    "vae": step_vae,
    "unet_compile": step_compile,
    "parity_cpu": step_parity_cpu,
}


# == processes ======================================================================================================
FORKED_CUDA = 3  # a step's exit code when CUDA refused to start in a forked process: rerun it spawned


def run_step(name: str, sizes: dict, out: str, work: str, deadline: float) -> None:
    """A step's process: its own process group (the driver kills the group), results appended as they come."""
    os.setsid()
    sizes = Sizes(**sizes)
    ctx = Context(name, sizes, Path(out), Path(work), deadline)
    try:
        import torch

        if sizes.step_threads:
            torch.set_num_threads(sizes.step_threads)
        STEP_FUNCS[name](ctx)
        if name == os.environ.get("GPU_BENCH_STALL"):  # --stall: a step that hangs after its work (the kill path's test)
            ctx.note("stalling on purpose (--stall)")
            time.sleep(3600)
    except BaseException as err:  # noqa: BLE001 - recorded, then the process ends with an error code
        text = "".join(traceback.format_exception_only(type(err), err)).strip()
        if "forked subprocess" in text or "CUDA error: initialization error" in text:
            sys.exit(FORKED_CUDA)
        ctx.results.add({"kind": "note", "step": name, "text": f"error: {text[:600]}"})
        traceback.print_exc()
        sys.exit(1)


def kill(process) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)  # the step and whatever it started (inductor's compile workers)
    except (ProcessLookupError, PermissionError):
        process.kill()
    process.join(5)


def device_line(sizes: Sizes) -> str:
    if sizes.device == "cpu":
        return f"CPU only ({platform.machine()})"
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
        return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else "nvidia-smi: no answer"
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"nvidia-smi: {err}"


def torch_version() -> str:
    try:
        from importlib.metadata import version

        return version("torch")
    except Exception:  # noqa: BLE001
        return "?"


def _noop() -> None:
    pass


def drive(args, sizes: Sizes) -> int:
    driver_started = time.time()
    out, work = Path(args.out), Path(tempfile.mkdtemp(prefix="gpu_bench_"))
    out.mkdir(parents=True, exist_ok=True)
    results = Results(out)
    budgets = dict(item.split("=") for item in args.budget)
    wanted = args.only.split(",") if args.only else [s.name for s in STEPS]
    unknown = set(wanted) - {s.name for s in STEPS} | set(budgets) - {s.name for s in STEPS}
    if unknown:
        raise SystemExit(f"unknown steps {sorted(unknown)}: choose from {', '.join(s.name for s in STEPS)}")
    steps = [replace(s, budget_s=float(budgets.get(s.name, s.budget_s))) for s in STEPS if s.name in wanted]
    total = args.total_budget or sum(s.budget_s for s in steps)
    results.add({"kind": "plan", "dry_run": args.dry_run, "device": device_line(sizes), "cpu": cpu_name(),
                 "cores": os.cpu_count(), "torch": torch_version(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                 "steps": [asdict(s) for s in steps], "total_budget_s": total, "sizes": asdict(sizes)})
    print("plan (s):", flush=True)
    for row in plan_rows(steps):
        print(f"  {row['step']:<45} {row['budget_s']:>5}  {row['status'] if row['status'] != 'pending' else ''}", flush=True)
    start_method = args.start
    context = multiprocessing.get_context(start_method)
    if start_method == "forkserver":  # import once, before any CUDA call, and fork each step from there
        context.set_forkserver_preload(["torch", "diffusers", "transformers", "scipy.stats", "pandas", "omegaconf",
                                        "cxrmem.scoring.scorer", "cxrmem.models.loading", "cxrmem.models.tiny", "cxrmem.config",
                                        "cxrmem.detectors", "cxrmem.stats", "torch.utils.flop_counter", "bench.unet_cost"])
    if start_method == "forkserver":  # wait for its imports here: they are setup, not the first step's time
        warm = context.Process(target=_noop, name="warm-up")
        warm.start()
        warm.join()
    started = time.time()
    end = started + total
    since = float(os.environ.get("GPU_BENCH_T0", 0) or 0) or driver_started  # gpu.sh's start, else this driver's
    results.add({"kind": "status", "step": "setup", "status": "done", "seconds": round(started - since, 2), "budget_s": SETUP_S,
                 "detail": "gpu.sh's wheels and import check, and the fork server's imports" if "GPU_BENCH_T0" in os.environ
                 else "the fork server's imports"})

    def launch(name: str, deadline: float):
        process = context.Process(target=run_step, args=(name, asdict(sizes), str(out), str(work), deadline), name=name)
        process.start()
        return process

    background = launch(BACKGROUND.name, end) if "parity" in wanted else None
    background_started = time.time()
    failures = 0
    for step in steps:
        left = end - time.time()
        if left < 3:
            results.add({"kind": "status", "step": step.name, "status": "skipped", "seconds": 0.0, "budget_s": step.budget_s,
                         "detail": "no time left in the run's budget"})
            continue
        budget = left if step is steps[-1] else min(step.budget_s, left)  # the last step may use what the others left
        for attempt in (1, 2):
            began = time.time()
            print(f"== {step.name} (budget {budget:.0f} s, {time.strftime('%H:%M:%S')})", flush=True)
            process = launch(step.name, began + budget)
            process.join(budget + args.grace)
            seconds = time.time() - began
            if process.is_alive():
                kill(process)
                status, detail = "timeout", f"killed at its budget ({budget:.0f} s) plus {args.grace:.0f} s; what it measured is above"
            elif process.exitcode == FORKED_CUDA and attempt == 1 and start_method != "spawn":
                results.add({"kind": "note", "step": step.name, "text": "CUDA refused a forked process: the steps start spawned from here on"})
                start_method, context = "spawn", multiprocessing.get_context("spawn")
                budget = min(budget, end - time.time())
                continue
            elif process.exitcode == 0:
                status, detail = "done", ""
            else:
                status, detail = "error", f"exit code {process.exitcode} (the error is in the notes above and the log)"
            break
        failures += status != "done"
        results.add({"kind": "status", "step": step.name, "status": status, "seconds": round(seconds, 2), "budget_s": step.budget_s,
                     "detail": detail})
    if background is not None:
        background.join(max(0.0, min(5.0, end - time.time())))
        if background.is_alive():
            kill(background)
            status = "timeout"
        else:
            status = "done" if background.exitcode == 0 else "error"
        own = results.rows(BACKGROUND.name, "reference")  # its own time: the driver looks only after the steps
        seconds = own[-1]["seconds"] if own else time.time() - background_started
        results.add({"kind": "status", "step": BACKGROUND.name, "status": status, "seconds": round(seconds, 2),
                     "budget_s": 0, "detail": "" if status == "done" else "the reference did not finish"})
    results.add({"kind": "end", "seconds": round(time.time() - driver_started, 2)})
    for stray in out.glob(".bench.md.*"):  # a table half-written by a killed step
        stray.unlink(missing_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    print(results.md.read_text(encoding="utf-8"), flush=True)
    return 1 if failures and args.strict else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_bench"), help="where bench.jsonl and bench.md go ($OUT)")
    parser.add_argument("--dry-run", action="store_true", help="every step on the CPU at tiny sizes (tests/test_gpu_bench.py)")
    parser.add_argument("--device", help="override the device (cuda, cpu): --dry-run --device cuda is a tiny smoke run on a GPU")
    parser.add_argument("--only", help="comma-separated steps to run (default: all)")
    parser.add_argument("--budget", action="append", default=[], metavar="STEP=SECONDS", help="a step's budget (repeatable)")
    parser.add_argument("--total-budget", type=float, help="seconds for all the steps (default: the sum of their budgets)")
    parser.add_argument("--grace", type=float, default=GRACE_S, help="seconds past its budget before a step is killed")
    parser.add_argument("--start", choices=sorted(STARTS_WITH), default="forkserver", help="how step processes start")
    parser.add_argument("--strict", action="store_true", help="exit 1 if any step did not finish")
    parser.add_argument("--render", metavar="JSONL", help="print the markdown of a bench.jsonl and exit")
    parser.add_argument("--stall", help=argparse.SUPPRESS)  # this step hangs after its work: tests the kill path
    args = parser.parse_args(argv)
    if args.render:
        print(render_markdown(Results(Path(args.render).parent).records()), end="")
        return 0
    sizes = DRY if args.dry_run else GPU
    if args.device:
        sizes = replace(sizes, device=args.device)
    if args.stall:
        os.environ["GPU_BENCH_STALL"] = args.stall
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # torch.cuda.is_available() without starting CUDA
    return drive(args, sizes)


if __name__ == "__main__":
    sys.exit(main())
