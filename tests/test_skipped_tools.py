"""Detectors and mitigation strategies a model's denoiser cannot run: skipped, and the run says which and why in
summary.json (the detectors and mitigation sections' `skipped`) and in the report, one line per tool."""

import html
import json
from pathlib import Path

import pytest

from cxrmem.config import load_config
from cxrmem.runfiles import RunLayout
from cxrmem.stages import analyze, mitigate, prepare, report, score
from cxrmem.summary import RunSummary

STAGES = ["corpus.synthetic.n_reports=40", "score.steps=2", "score.generations=1", "model.device=cpu",
          "score.detectors=[attention_entropy,latent_update]", "analyze.top_percent=5", "mitigation.sample_size=1",
          "mitigation.strategies=[original,attention_rescaling,delayed_guidance]", "mitigation.n_generations=2",
          "mitigation.steps=2", "attribution.enabled=false", "report.grid_generations=0"]  # fmt: skip
CROSS_ATTENTION = "needs plain cross-attention layers of a UNet (token attention is read or re-scaled there)"


@pytest.fixture(scope="module")
def sdxl_replica(tmp_path_factory):
    from cxrmem.corpus.synthetic import tokenizer_texts
    from cxrmem.models.tiny_layouts import build_tiny_sdxl

    return build_tiny_sdxl(str(tmp_path_factory.mktemp("sdxl")), tokenizer_texts())


def audited(model: str, output: Path) -> tuple[RunSummary, str]:
    """The run's summary and report page (its text, unescaped) after prepare, score, analyze, mitigate and report on `model`."""
    cfg = load_config(None, [f"model.path={model}", f"run.output={output}", *STAGES])
    for stage in (prepare, score, analyze, mitigate):
        stage.run(cfg)
    written = report.run(cfg)
    page = html.unescape(Path(written.report).read_text())
    return RunSummary.from_json(json.loads(Path(RunLayout(str(output)).summary).read_text())), page


def test_a_replica_without_cross_attention_records_its_skipped_tools_and_the_report_names_them(sdxl_replica, tmp_path):
    summary, page = audited(sdxl_replica, tmp_path)
    reason = f"{CROSS_ATTENTION}, which the sdxl layout's denoiser lacks"
    assert summary.detectors.skipped == {"attention_entropy": reason}
    assert list(summary.detectors.detectors) == ["latent_update"]  # the NaN column gets no agreement row
    assert summary.mitigation.skipped == {"attention_rescaling": reason}
    assert set(summary.mitigation.strategies) == {"original", "delayed_guidance"}
    assert f"Detector <code>attention_entropy</code> skipped: it {reason}." in page
    assert f"Strategy <code>attention_rescaling</code> skipped: it {reason}." in page


def test_a_plain_sd_unet_skips_nothing(tiny_model_dir, tmp_path):
    summary, page = audited(tiny_model_dir, tmp_path)
    assert summary.detectors.skipped == {} and summary.mitigation.skipped == {}
    assert set(summary.detectors.detectors) == {"attention_entropy", "latent_update"}
    assert set(summary.mitigation.strategies) == {"original", "attention_rescaling", "delayed_guidance"}
    assert "skipped: it needs" not in page
