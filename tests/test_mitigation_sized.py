"""The sampled, sequential mitigation reaches the exhaustive run's conclusions for less counted work, on the
committed testbed model with planted memorization (testbed/model: 24 planted prompts, half with markers)."""

from pathlib import Path

import pandas as pd
import pytest

from cxrmem.config import load_config
from cxrmem.findings import FindingInputs, f3_rewrites
from cxrmem.models.loading import fingerprint_model
from cxrmem.report import strategy_rows
from cxrmem.runfiles import RunLayout
from cxrmem.stages import mitigate
from cxrmem.storage import Store
from cxrmem.summary import AnalysisSection
from tests.test_attribution import write_scores_key

pytestmark = pytest.mark.slow  # a few minutes on 2 cores: 24 + at most 16 prompts through the testbed model

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "testbed" / "model"
STRATEGIES = ("original", "remove_marker", "random_insertion")  # a marker rewrite, and one that changes every prompt


def mitigated(out: Path, *overrides: str) -> tuple[pd.DataFrame, dict]:
    """mitigation.parquet and summary.json of the stage run on the testbed's planted prompts as the memorized set."""
    cfg = load_config(ROOT / "conf" / "testbed.yaml", [
        f"model.path={MODEL}", f"run.output={out}", "score.steps=2", "score.generations=1", "mitigation.n_generations=2",
        "mitigation.steps=1", f"mitigation.strategies=[{','.join(STRATEGIES)}]", "report.top_prompts=1", *overrides,
    ])  # fmt: skip
    planted = pd.read_csv(MODEL / "manifest.csv").query("planted")
    memorized = pd.DataFrame({"prompt": planted["prompt"].tolist(), "prompt_id": [f"{i:016x}" for i in range(len(planted))]})
    layout = RunLayout(str(out))
    Store().write_text(layout.memorized, memorized.to_csv(index=False))
    write_scores_key(layout, memorized["prompt_id"], fingerprint_model(cfg.model))
    mitigate.run(cfg)
    return Store().read_table(layout.mitigation).to_pandas(), Store().read_json(layout.summary)


def conclusions(frame: pd.DataFrame, threshold: float) -> tuple[str, str, dict]:
    """F3's verdict and reason (which rewrites remove memorization), and per strategy the side of 0 its 95%
    interval on the paired d_mem change lies (or `undecided`)."""
    rows = strategy_rows(frame, list(STRATEGIES))
    verdict = f3_rewrites(FindingInputs(analysis=AnalysisSection.from_json({"threshold": threshold}), mitigation_rows=rows))

    def side(change: dict) -> str:
        return "lower" if change["ci_high"] < 0 else "higher" if change["ci_low"] > 0 else "undecided"

    return verdict.verdict, verdict.reason, {r["strategy"]: side(r["d_mem_change"]) for r in rows if r["strategy"] != "original"}


def test_the_sampled_sequential_mitigation_concludes_as_the_exhaustive_one_for_less_work(tmp_path):
    exhaustive, full = mitigated(tmp_path / "exhaustive", "mitigation.sample_size=null", "mitigation.sequential=false")
    sized, summary = mitigated(tmp_path / "sized", "mitigation.sample_size=16", "mitigation.look_every=4")
    threshold = float(exhaustive.loc[exhaustive["strategy"] == "original", "d_mem"].min())  # the memorized set's smallest
    assert conclusions(sized, threshold) == conclusions(exhaustive, threshold)

    sample, stopping = summary["mitigation"]["sample"], summary["mitigation"]["stopping"]
    assert sample["sampled"] == 16 and sample["strata"] == {"marker": {"memorized": 12, "sampled": 8},
                                                          "no_marker": {"memorized": 12, "sampled": 8}}  # fmt: skip
    assert set(sized["prompt_id"]) <= set(sample["prompt_ids"]) and full["mitigation"]["sample"]["sampled"] == 24
    assert any(s["stopped"].startswith("decided") and s["prompts"] < 16 for s in stopping.values())  # some strategy stopped early
    for name, record in stopping.items():
        assert record["prompts"] == (sized["strategy"] == name).sum()

    counted = {run: s["cost"]["stages"]["mitigate"]["evaluations"] for run, s in (("exhaustive", full), ("sized", summary))}
    assert counted["exhaustive"] == exhaustive["evaluations"].sum() and counted["sized"] == sized["evaluations"].sum()
    assert counted["sized"] < 0.75 * counted["exhaustive"], counted
    print(f"counted UNet evaluations: exhaustive {counted['exhaustive']}, sampled and sequential {counted['sized']}")
