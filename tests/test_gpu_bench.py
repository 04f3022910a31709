"""The GPU benchmark cannot rot: bench/gpu_bench.py dry-runs every step on the CPU at tiny sizes, a step that
hangs is killed while the others still run and what it measured stays, and the one FLOP count per UNet
sample (bench/unet_cost.py) counts attention, both ways, and is the number the docs cite."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_bench, unet_cost

ROOT = Path(__file__).resolve().parents[1]


def run_bench(out: Path, *extra: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """The dry run in its own process (its speed is not asserted: it varies with the machine's load)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "bench/gpu_bench.py"), "--dry-run", "--out", str(out), *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]


def test_radedit_flop_count_includes_attention_counted_both_ways():
    count = unet_cost.radedit_flops()
    assert count.agree and count.attention_calls == 32  # 16 transformer blocks: self- and cross-attention
    assert count.total == pytest.approx(0.8076e12, rel=1e-3)
    assert count.without_attention == pytest.approx(0.6792e12, rel=1e-3)  # what the README cited before issue 30
    assert count.attention_analytic / count.total == pytest.approx(0.159, abs=0.002)


def test_on_the_cpu_the_default_attention_kernel_is_not_counted_and_the_math_kernel_is():
    from cxrmem.models.tiny import tiny_unet

    torch.manual_seed(0)
    unet = tiny_unet(cross_attention_dim=32).eval()
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([999, 999]), torch.randn(2, 16, 32)
    default, analytic, calls = unet_cost.count_call(unet, x, t, text, "default")
    math, _, _ = unet_cost.count_call(unet, x, t, text, "math")
    none, _, _ = unet_cost.count_call(unet, x, t, text, "none")
    assert calls == 8 and analytic > 0  # 4 transformer blocks: self- and cross-attention
    assert default == none  # FlopCounterMode sees no FLOP in the CPU's fused attention kernel
    assert math == pytest.approx(none + analytic, rel=1e-12)
    meta = unet_cost.unet_flops(dict(unet.config), text_tokens=16)
    assert meta.total * 2 == pytest.approx(math, rel=1e-12) and meta.agree


def test_the_docs_cite_the_one_flop_count():
    count = unet_cost.radedit_flops()
    cited = f"{count.total / 1e12:.3f} TFLOP"
    per_prompt = f"{unet_cost.scoring_flop_per_prompt(count.total) / 1e12:.0f} TFLOP"
    for doc in ("README.md", "bench/RESULTS.md"):
        text = (ROOT / doc).read_text()
        assert cited in text and per_prompt in text, f"{doc} does not cite {cited} per UNet sample and {per_prompt} per prompt"


def test_plan_fits_the_device_call_with_margin():
    planned = gpu_bench.SETUP_S + sum(step.budget_s for step in gpu_bench.STEPS)
    assert planned <= 6 * 60 < gpu_bench.DEVICE_RUN_S
    assert planned + gpu_bench.GRACE_S <= gpu_bench.DEVICE_RUN_S - 60


def test_dry_run_writes_every_step_as_it_goes(tmp_path):
    out = tmp_path / "out"
    done = run_bench(out)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    found = records(out)
    statuses = {r["step"]: r["status"] for r in found if r["kind"] == "status"}
    assert statuses == {**{step.name: "done" for step in gpu_bench.STEPS}, "setup": "done", "parity_cpu": "done"}
    rows = {}
    for r in found:
        if r["kind"] == "row":
            rows.setdefault((r["step"], r["table"]), []).append(r["row"])
    for step in gpu_bench.STEPS:
        assert any(key[0] == step.name for key in rows), f"{step.name} wrote no row"
    # the UNet grew its batch until the (simulated) out-of-memory error, and recorded the largest that fit
    assert rows[("unet_eager", "fit")] == [{"variant": "eager", "largest_fit": 4, "stopped_by": "out of memory at batch 8"}]
    assert [r["batch"] for r in rows[("unet_eager", "batches")] if not r["fits"]] == [8]
    assert all(r["mfu"] > 0 for r in rows[("unet_eager", "batches")] if r["fits"])
    assert rows[("unet_channels_last", "fit")][0]["largest_fit"] == 4
    assert {r["mode"] for r in rows[("parity", "against the CPU in fp32")]} == {"fp32, TF32 off", "fp32, TF32 on", "bf16"}
    fp32 = next(r for r in rows[("parity", "against the CPU in fp32")] if r["mode"] == "fp32, TF32 off")
    assert fp32["prompts"] == 4 and fp32["max_rel_diff"] < 1e-5  # the same CPU arithmetic
    assert [r["stage"].split(" ")[0] for r in rows[("cascade", "stages")]] == ["1", "2", "3", "4", "full"]
    assert rows[("cascade", "cascade")][0]["prompts_s"] > 0
    assert rows[("scorer", "scorer")][-1]["prompts_s_T50"] > 0
    assert len(rows[("vae", "decode")]) == 4
    assert rows[("flops", "per UNet sample")][0]["agree"] is True
    table = (out / "bench.md").read_text()
    for step in gpu_bench.STEPS:
        assert f"## {step.name}: {step.title}" in table
    assert "| total (device call: 480 s) | 360 |" in table


def test_a_step_that_hangs_is_killed_keeps_its_rows_and_the_next_steps_run(tmp_path):
    out = tmp_path / "out"
    done = run_bench(out, "--only", "unet_eager,vae", "--stall", "unet_eager", "--budget", "unet_eager=6", "--grace", "1")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    found = records(out)
    statuses = {r["step"]: r["status"] for r in found if r["kind"] == "status"}
    assert statuses == {"setup": "done", "unet_eager": "timeout", "vae": "done"}
    assert any(r["kind"] == "row" and r["step"] == "unet_eager" and r["table"] == "fit" for r in found)
    assert "**timeout**" in (out / "bench.md").read_text()
