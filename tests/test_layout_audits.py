"""A full audit on the SD-2 v-prediction, SDXL, PixArt-Sigma and Sana replicas with every stage on: the copies check against training
images (images.source) and a reference of non-members (analyze.reference). PixArt's replica decodes through an
AutoencoderKL as a real PixArt-Sigma's does, and only the first half of its learned-variance output is a latent.
Strategies a layout's denoiser cannot run are left out of the copies check with their reason, as mitigation leaves
them out (attention re-scaling on SDXL used to stop the audit there). The Sana audit runs a LoRA adapter on its base
(model.adapters), the fifth layout of issue 35: every stage's workers load the base with the adapter fused, and the
run's fingerprint is the adapted model's. The four audits share one in-process Ray session (ray_session leaves a
session it finds running), so each pays for its own work and not for starting Ray."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrmem.config import load_config
from cxrmem.corpus.synthetic import generate_reports, tokenizer_texts
from cxrmem.distributed.audit import run_audit
from cxrmem.distributed.session import ray_session
from cxrmem.models.loading import fingerprint_model
from cxrmem.models.tiny_layouts import BUILDERS
from cxrmem.runfiles import RunLayout
from cxrmem.storage import Store
from tests.test_adapters import save_replica_lora

pytestmark = pytest.mark.slow  # four audits on Ray in process, about 25 s each on 2 cores

STRATEGY_NAMES = ["original", "remove_marker", "attention_rescaling", "embedding_noise", "delayed_guidance"]
STRATEGIES = f"mitigation.strategies=[{','.join(STRATEGY_NAMES)}]"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[str, str]:
    """A table of grey 16 x 16 training images (one per study) and a reference of synthetic reports."""
    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        paths.append(str(root / f"{i}.png"))
        Image.fromarray((rng.random((16, 16)) * 255).astype(np.uint8)).save(paths[-1])
    pd.DataFrame({"path": paths, "study_id": [f"s{i}" for i in range(6)]}).to_csv(root / "images.csv", index=False)
    pd.DataFrame({"prompt": [r["impression"] for r in generate_reports(40, seed=99)]}).to_csv(root / "reference.csv", index=False)
    return str(root / "images.csv"), str(root / "reference.csv")


@pytest.fixture(scope="module")
def ray_in_process():
    """One in-process Ray session for the module's audits (conf/test.yaml's ray section: ray.address null)."""
    with ray_session(load_config("conf/test.yaml").ray, "cpu"):
        yield


# what each layout's denoiser cannot run (an SD UNet, v-prediction or not, runs every strategy)
SKIPPED = {"sd2_v": set(), "sdxl": {"attention_rescaling", "embedding_noise"}, "pixart": {"attention_rescaling", "embedding_noise"},
           "sana": {"attention_rescaling", "embedding_noise"}}  # fmt: skip
ADAPTED = "sana"  # the layout audited with a LoRA adapter on its base


@pytest.mark.parametrize("name", list(SKIPPED))
def test_a_full_audit_with_copies_and_a_reference_runs_on_the_replica(name, inputs, ray_in_process, tmp_path):
    images, reference = inputs
    model = BUILDERS[name](str(tmp_path / "model"), tokenizer_texts())
    adapter = [f"model.adapters=[{{path: {save_replica_lora(name, model, tmp_path / 'lora', seed=1)}, scale: 0.5}}]"] if name == ADAPTED else []
    output = tmp_path / "run"
    cfg = load_config("conf/test.yaml", [
        f"model.path={model}", f"run.output={output}", f"images.source={images}", f"analyze.reference={reference}",
        "corpus.synthetic.n_reports=60", STRATEGIES, "copies.generations=2", "copies.pixel_size=8", "copies.n_controls=3",
        "copies.top_k=2", *adapter,
    ])  # fmt: skip
    run_audit(cfg)
    layout, store = RunLayout(str(output)), Store()
    summary = json.loads(Path(layout.summary).read_text())
    manifest = json.loads(Path(output / "manifest.json").read_text())
    assert manifest["model_fingerprint"] == fingerprint_model(cfg.model)  # the adapter's, on the Sana audit (below)
    copies = store.read_table(layout.copies).to_pandas()
    memorized = summary["analysis"]["memorized_count"]
    sampled = summary["copies"]["sample"]["sampled"]
    assert memorized >= 1 and set(copies.group) == {"memorized", "control"}
    unmitigated = copies[copies.strategy == "none"]
    # At w = 7.5 and w = 1: the sampled memorized prompts and 3 controls, then each runnable strategy on the sample.
    assert len(unmitigated) == 2 * (sampled + 3) and set(copies.guidance) == {7.5, 1.0}
    # Each strategy is checked on the sampled prompts it changed (remove_marker: those with a marker).
    mitigation = store.read_table(layout.mitigation).to_pandas()
    changed = mitigation[mitigation.changed & ~mitigation.strategy.isin(SKIPPED[name] | {"original"})]
    assert set(copies.strategy) == {"none"} | set(changed.strategy) and "delayed_guidance" in set(changed.strategy)
    checked = copies[copies.strategy != "none"].groupby(["strategy", "guidance"]).prompt_id.agg(set)
    assert all(ids == set(changed.prompt_id[changed.strategy == s]) for (s, _), ids in checked.items())
    assert np.isfinite(copies.max_similarity).all() and (copies.nearest_source_id.str.match(r"s\d")).all()
    reason = f"which the {name} layout's denoiser lacks"
    assert set(summary["copies"]["skipped"]) == SKIPPED[name]
    assert all(why.endswith(reason) for why in summary["copies"]["skipped"].values())
    # Checked: every strategy the denoiser runs (one that changed no sampled prompt has no copies rows, as asserted above).
    assert summary["copies"]["strategies_checked"] == [s for s in STRATEGY_NAMES if s not in SKIPPED[name] | {"original"}]
    calibration = store.read_table(layout.calibration).to_pandas()
    assert len(calibration) == summary["analysis"]["counts"]["finite"]
    assert calibration.p_value.between(0, 1, inclusive="right").all() and calibration.p_value.nunique() > 1
    assert "p_value" in pd.read_csv(layout.memorized).columns and summary["calibration"]["global_p"] is not None
    page = Path(layout.report).read_text()
    if name == ADAPTED:  # the adapted model is another model than its base: its own fingerprint, named on the page
        base = load_config("conf/test.yaml", [f"model.path={model}"]).model
        assert manifest["model_fingerprint"] != fingerprint_model(base) and f"+ LoRA {tmp_path / 'lora'} (scale 0.5)" in page
    assert "Copies of training images" in page and ("Strategy <code>attention_rescaling</code> skipped" in page) == bool(SKIPPED[name])
