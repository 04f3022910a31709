"""Every artefact names the model that made it: a later stage run with other weights than the scoring model's
refuses, tokens/mitigation rows carry the scores' fingerprint and config hash, and a mixed run gets no report."""

import json

import pyarrow.parquet as pq
import pytest

from cxrmem.config import load_config
from cxrmem.corpus.synthetic import tokenizer_texts
from cxrmem.models.loading import fingerprint_model
from cxrmem.models.tiny import build_tiny_model
from cxrmem.runfiles import RunLayout
from cxrmem.stages import analyze, attribute, mitigate, prepare, report, score
from cxrmem.storage import Store

SMALL = ["corpus.synthetic.n_reports=60", "score.steps=2", "score.generations=1", "analyze.top_percent=5", "model.device=cpu",
         "attribution.steps=1", "attribution.generations=1", "attribution.max_prompts=1", "attribution.leave_one_out=false",
         "mitigation.strategies=[original,remove_marker]", "mitigation.n_generations=2", "mitigation.steps=2", "mitigation.sample_size=1",
         "report.figures=false"]  # fmt: skip


@pytest.fixture(scope="module")
def analyzed(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = load_config(None, [f"run.output={out}", f"model.path={tiny_model_dir}", *SMALL])
    prepare.run(cfg)
    score.run(cfg)
    analyze.run(cfg)
    return cfg, RunLayout(str(out))


def test_a_stage_run_with_other_weights_refuses_naming_both_fingerprints(analyzed, tmp_path):
    cfg, layout = analyzed
    other = build_tiny_model(str(tmp_path / "retrained"), tokenizer_texts(seed=1), seed=1)
    swapped = load_config(None, [f"run.output={layout.prefix}", f"model.path={other}", *SMALL])
    scored, current = fingerprint_model(cfg.model), fingerprint_model(swapped.model)
    assert scored != current
    for stage in (attribute, mitigate):
        with pytest.raises(ValueError, match=f"fingerprint {current}.*model\\(s\\) {scored} scored.*rescore"):
            stage.run(swapped)
    assert not Store().exists(layout.tokens) and not Store().exists(layout.mitigation)


def test_artefacts_carry_the_scores_identity_and_a_mixed_run_gets_no_report(analyzed):
    cfg, layout = analyzed
    attribute.run(cfg)
    mitigate.run(cfg)
    keys = pq.read_table(layout.scores, columns=["model_fingerprint", "config_hash"])
    expected = {"model_fingerprint": keys["model_fingerprint"][0].as_py(), "config_hash": keys["config_hash"][0].as_py()}
    for uri in (layout.tokens, layout.mitigation):
        table = pq.read_table(uri, columns=list(expected))
        assert table.num_rows > 0 and {name: set(table[name].to_pylist()) for name in expected} == {k: {v} for k, v in expected.items()}
    summary = json.loads(open(layout.summary).read())
    assert summary["attribution"]["model"] == summary["mitigation"]["model"] == expected
    report.run(cfg)  # one model: the report is written
    summary["mitigation"]["model"]["model_fingerprint"] = "0123456789abcdef"  # as if mitigated with other weights
    open(layout.summary, "w").write(json.dumps(summary))
    with pytest.raises(ValueError, match="mixes models.*mitigation 0123456789abcdef"):
        report.run(cfg)
