"""The copies check reuses mitigation's generations where the settings match (issue 33), on a tiny real model."""

from argparse import Namespace

import numpy as np
import pandas as pd
import pytest

from bench.audit_cost import stage_costs
from cxrmem import strategies
from cxrmem.runfiles import RunLayout
from cxrmem.settings import with_overrides
from cxrmem.stages import copies, copies_reuse, mitigate
from cxrmem.stages.worker import mitigation_settings
from cxrmem.storage import Store
from tests.test_copies_stage import ROOT, TEXTS, own_images, stage_config, write_run  # noqa: F401 (own_images: a fixture)

# A rewrite, an embedding change and a sampling change with its preparation (noise_adjustment): each reused.
CHECKED = ["remove_marker", "embedding_noise", "noise_adjustment"]
SETTINGS = [f"mitigation.strategies=[original,{','.join(CHECKED)}]", "mitigation.n_generations=2", "mitigation.noise_iters=1",
            "report.top_prompts=1", "fidelity.measure=phantom_reader", f"fidelity.reader={ROOT / 'testbed' / 'reader'}"]  # fmt: skip


@pytest.fixture(scope="module")
def memorized_images(own_images, tmp_path_factory):  # noqa: F811 (the imported fixture, asked for by name)
    """The image table of the 2 memorized prompts' own first generations at w=7.5 only: the controls' nearest images
    are others', so the copy threshold sits below the memorized prompts' similarity, not at it (the tiny model's
    generations are all alike: with the controls' own images too, every similarity and the threshold are 1 to 1e-6)."""
    path = tmp_path_factory.mktemp("memorized_images") / "images.csv"
    pd.read_csv(own_images).head(2).to_csv(path, index=False)
    return str(path)


def audited(tiny_model_dir, images_csv, output, mitigated_as=None, *overrides) -> tuple:
    """(copies.parquet sorted, the copies section, its counted work, the config) after mitigate (under
    `mitigated_as(copies' config)`, default the copies') then copies, on a run of 2 memorized prompts (both with a
    marker) and 3 controls."""
    write_run(output, TEXTS, memorized=2, sources=[f"s{i}" for i in range(len(TEXTS))], model_dir=tiny_model_dir)
    cfg = stage_config(tiny_model_dir, output, images_csv, *SETTINGS, *overrides)
    mitigate.run(mitigated_as(cfg) if mitigated_as else cfg)
    section = copies.run(cfg)
    layout = RunLayout(str(output))
    table = Store().read_table(layout.copies).to_pandas().sort_values(["guidance", "strategy", "prompt_id"], ignore_index=True)
    return table, section, Store().read_json(layout.summary)["cost"]["stages"]["copies"], cfg


def no_images(cfg):
    """The config with the copies stage off: mitigation then embeds nothing, and copies generates everything."""
    return with_overrides(cfg, images__source="")


def test_copies_reuses_mitigations_generations_with_the_same_rows_and_less_counted_work(tiny_model_dir, memorized_images, tmp_path):
    fresh, fresh_section, fresh_work, _ = audited(tiny_model_dir, memorized_images, tmp_path / "fresh", no_images)
    assert not Store().exists(RunLayout(str(tmp_path / "fresh")).mitigation_embeddings)  # copies off for mitigation: none written
    reused, section, work, cfg = audited(tiny_model_dir, memorized_images, tmp_path / "reused")
    assert Store().exists(RunLayout(str(tmp_path / "reused")).mitigation_embeddings)

    # At w=7.5 (the scoring guidance) every strategy's 2 pairs and the unmitigated memorized prompt that is not the
    # figures' come from mitigation; its top prompt and the 3 controls are generated, and everything at w=1.
    assert section.reuse["w=7.5"] == {"reused": 1 + 2 * len(CHECKED), "generated": 1 + 3}
    assert section.reuse["w=1"] == {"reused": 0, "generated": 5 + 2 * len(CHECKED)} and "reused at w=7.5" in section.reuse["why"]
    assert fresh_section.reuse["w=7.5"] == {"reused": 0, "generated": 5 + 2 * len(CHECKED)}

    exact = ["guidance", "strategy", "prompt_id", "prompt", "group", "is_copy", "nearest_image_id", "fidelity"]
    pd.testing.assert_frame_equal(reused[exact], fresh[exact])
    assert reused.fidelity.notna().all()  # mitigation.parquet's fidelity is the copies' measure of the same generations
    # Other batch compositions (mitigation samples every strategy in one call): equal up to float rounding (1e-6 seen),
    # while the strategies' and prompts' own values differ by 1e-3 and more in the second neighbour's similarity.
    for column in ["max_similarity", "mean_similarity", "threshold", "neighbour_similarities"]:
        np.testing.assert_allclose(np.stack(reused[column]), np.stack(fresh[column]), rtol=0, atol=1e-5, err_msg=column)

    # The counted work drops by exactly what the reused pairs declare: N generations of T steps, plus each strategy's preparation.
    n, t, plan = cfg.copies.generations, cfg.score.steps, mitigation_settings(cfg)
    top = section.sample["prompt_ids"][0]  # the figures' prompt: its unmitigated generations are made afresh
    at = reused[(reused.guidance == 7.5) & (reused.group == "memorized")]
    taken = at[(at.strategy != "none") | (at.prompt_id != top)].strategy
    declared = sum(strategies.row({"none": "original"}.get(s, s)).evaluations(plan, (0, 0), (n, t)) for s in taken)
    assert len(taken) == section.reuse["w=7.5"]["reused"]
    assert fresh_work["evaluations"] - work["evaluations"] == declared > 0
    assert fresh_work["vae_decodes"] - work["vae_decodes"] == len(taken) * n
    # bench/audit_cost.py's declared copies cost (every strategy on the whole sample, as here: the memorized set is the
    # sample, so the copy-rate rule has no prompt to add) is the counted one.
    assert not any(r["tried"] > 2 for g in section.guidances.values() for r in g["copy_rate_rule"].values())
    projection = Namespace(cascade_per_prompt=0, reference=0, words=1, mitigated_share=1, copy_rule_pairs=0, copy_rule_prompts=0,
                           copy_rule_guidances=[1.0])  # fmt: skip
    assert stage_costs(cfg, len(TEXTS), 2, projection)["copies"] == work["evaluations"]


@pytest.mark.parametrize("changed", [["copies.generations=3"], ["copies.pixel_size=16"], ["mitigation.noise_std=0.5"]])
def test_a_stamp_other_than_the_copies_settings_means_no_reuse_and_the_same_rows(tiny_model_dir, memorized_images, tmp_path, changed):
    """Mitigation's generations made under other settings (N, the embedder, a strategy's knob) are not taken: copies
    generates everything, says why in one line, and its rows are those of a run without reuse."""
    base = lambda cfg: stage_config(tiny_model_dir, tmp_path / "other", memorized_images, *SETTINGS)  # noqa: E731
    table, section, work, cfg = audited(tiny_model_dir, memorized_images, tmp_path / "other", base, *changed)
    assert Store().exists(RunLayout(str(tmp_path / "other")).mitigation_embeddings)  # written under the mitigation settings
    key = changed[0].split("=")[0].split(".")[-1]
    assert section.reuse["w=7.5"] == {"reused": 0, "generated": 5 + 2 * len(CHECKED)}
    named = {"generations": "n_generations 2 (copies: 3)", "pixel_size": "embedder", "noise_std": "settings"}[key]
    assert section.reuse["why"].startswith("mitigation's generations not reused: made under") and named in section.reuse["why"]
    plain, *_ = audited(tiny_model_dir, memorized_images, tmp_path / "plain", no_images, *changed)
    exact = ["guidance", "strategy", "prompt_id", "is_copy", "nearest_image_id", "fidelity"]
    pd.testing.assert_frame_equal(table[exact], plain[exact])
    np.testing.assert_allclose(np.stack(table.neighbour_similarities), np.stack(plain.neighbour_similarities), rtol=0, atol=1e-5)


def test_mitigation_writes_no_embeddings_where_copies_would_not_take_them(tiny_model_dir, memorized_images, tmp_path):
    """Another N for mitigation than for copies: nothing to reuse, so nothing embedded, and a stale file is removed."""
    layout = RunLayout(str(tmp_path))
    write_run(tmp_path, TEXTS, memorized=2, sources=[f"s{i}" for i in range(len(TEXTS))], model_dir=tiny_model_dir)
    cfg = stage_config(tiny_model_dir, tmp_path, memorized_images, *SETTINGS[:3])
    assert copies_reuse.served_guidance(cfg) == 7.5
    mitigate.run(cfg)
    assert Store().exists(layout.mitigation_embeddings)
    other = with_overrides(cfg, mitigation__n_generations=3)
    assert copies_reuse.served_guidance(other) is None
    mitigate.run(other)
    assert not Store().exists(layout.mitigation_embeddings)
