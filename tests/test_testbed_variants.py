"""The training-time advice as testbed variants: the training texts change, nothing else (not trained in the suite)."""

import re
from collections import Counter

import numpy as np
import pytest

from cxrmem.config import load_config
from cxrmem.corpus.text import MARKER_REGEX
from cxrmem.testbed.dataset import build_training_set, with_text_variant

MARKER = re.compile(MARKER_REGEX)


@pytest.fixture(scope="module")
def small():
    cfg = load_config(None, ["testbed.n_unique=30", "testbed.planted_per_level=1", "testbed.duplication_levels=[4,8]",
                             "testbed.image_size=16"])  # fmt: skip
    return cfg, build_training_set(cfg.testbed, cfg.corpus)


def pairs(ts):
    """Per (manifest prompt, image bytes): pairs per epoch; and the texts each prompt is trained with."""
    per_pair, texts = Counter(), {}
    for i, p in enumerate(ts.image_prompt):
        per_pair[(p, ts.images[i].tobytes())] += int(ts.image_copies[i])
        texts.setdefault(p, []).extend([ts.training_texts[ts.text_of_image[i]]] * int(ts.image_copies[i]))
    return per_pair, texts


def test_random_markers_give_every_training_pair_its_own_surrogates(small):
    cfg, ts = small
    variant = with_text_variant(ts, "random_markers", cfg.testbed.seed, cfg.corpus.marker_regex)
    (before, _), (after, texts) = pairs(ts), pairs(variant)
    assert after == before  # the same images, the same pairs per epoch: the budget and duplication are unchanged
    assert variant.prompts == ts.prompts and (variant.n_copies == ts.n_copies).all() and variant.manifest().equals(ts.manifest())
    marked = [p for p, prompt in enumerate(ts.prompts) if MARKER.search(prompt)]
    planted_marked = [p for p in marked if ts.planted[p]]
    assert planted_marked and all(not MARKER.search(t) for p in marked for t in texts[p])
    for p in planted_marked:  # a planted prompt with n copies: n different texts, one per pair
        assert len(texts[p]) == ts.n_copies[p] and len(set(texts[p])) == len(texts[p])
    unmarked = [p for p in range(len(ts.prompts)) if p not in marked]
    assert all(set(texts[p]) == {ts.prompts[p]} for p in unmarked)  # prompts without a marker train as before


def test_no_markers_delete_the_markers_only(small):
    cfg, ts = small
    variant = with_text_variant(ts, "no_markers", cfg.testbed.seed, cfg.corpus.marker_regex)
    assert pairs(variant)[0] == pairs(ts)[0] and variant.manifest().equals(ts.manifest())
    for prompt, text in zip(ts.prompts, variant.training_texts):
        assert not MARKER.search(text)
        assert (text == prompt) == (not MARKER.search(prompt))


def test_none_is_the_committed_training_set_and_bad_names_fail(small):
    cfg, ts = small
    assert with_text_variant(ts, "none", 0, cfg.corpus.marker_regex) is ts
    assert ts.training_texts is ts.prompts and np.array_equal(ts.text_of_image, ts.image_prompt)
    with pytest.raises(ValueError, match="text_variant"):
        with_text_variant(ts, "recaption", 0, cfg.corpus.marker_regex)
    for name in ("random_markers", "no_markers"):
        assert load_config(f"conf/testbed_{name}.yaml").testbed.text_variant == name
