"""Mitigation rewrites, the pairwise distance and the paired experiment, on the real tiny model."""

import copy
import re

import numpy as np
import pandas as pd
import pytest
import torch

from cxrmem.config import load_config
from cxrmem.corpus.text import MARKER_REGEX
from cxrmem.mitigation import (
    MITIGATION_COLUMNS,
    MitigationSettings,
    Rewriting,
    generate_images,
    mitigate_prompt,
    mitigated_prompt,
    optimise_embedding,
    pairwise_rms_distance,
    random_insertion,
    random_number,
    random_word,
    remove_marker,
    surrogate,
    vocabulary_words,
)
from cxrmem.models.loading import fingerprint_model, load_components
from cxrmem.runfiles import RunLayout
from cxrmem.scoring.scorer import Scorer
from cxrmem.scoring.settings import ScoreSettings
from cxrmem.stages import mitigate
from cxrmem.stages.worker import mitigation_settings
from cxrmem.storage import Store
from tests.test_attribution import write_scores_key

PATTERN = re.compile(MARKER_REGEX)
PROMPT = "Compared to ___, the heart is enlarged. Dr. ___ was notified at ___ a.m. XXXX noted."
TINY = [
    "score.steps=2",
    "score.generations=1",
    "mitigation.n_generations=2",
    "mitigation.optimisation_iters=2",
    "model.device=cpu",
]


def tiny_config(model_dir, *overrides):
    return load_config(None, [f"model.path={model_dir}", *TINY, *overrides])


@pytest.fixture(scope="module")
def components(tiny_model_dir):
    return load_components(tiny_config(tiny_model_dir).model, need_vae=True)


@pytest.fixture(scope="module")
def vocab(components):
    return vocabulary_words(components.tokenizer)


def replacements(prompt: str, rewritten: str) -> list[str]:
    """What each marker became, asserting that everything between the markers is untouched."""
    outside = PATTERN.split(prompt)
    match = re.fullmatch("(.+?)".join(re.escape(p) for p in outside), rewritten)
    assert match, rewritten
    return list(match.groups())


def rng(seed=0):
    return np.random.default_rng(seed)


def rewriting(vocab=(), **settings) -> Rewriting:
    return Rewriting(PATTERN, vocab, MitigationSettings(**settings))


def test_vocabulary_words_are_whole_alphabetic_entries(components, vocab):
    entries = components.tokenizer.get_vocab()
    assert len(vocab) > 50
    assert all(w in entries and w.isalpha() and len(w) >= 3 and not w.startswith("##") for w in vocab)
    assert not set(vocab) & set(components.tokenizer.all_special_tokens)


def test_random_word_replaces_only_markers_with_vocabulary_words(vocab):
    words = replacements(PROMPT, random_word(PROMPT, rng(), rewriting(vocab)))
    assert len(words) == 4 and all(w in vocab for w in words)
    assert random_word(PROMPT, rng(), rewriting(vocab)) == random_word(PROMPT, rng(), rewriting(vocab))


def test_random_number_replaces_only_markers_with_numbers():
    numbers = replacements(PROMPT, random_number(PROMPT, rng(), rewriting()))
    assert len(numbers) == 4 and all(n.isdigit() for n in numbers)


def test_surrogate_replaces_only_markers_by_context():
    parts = replacements(PROMPT, surrogate(PROMPT, rng(), rewriting()))
    assert re.search(r"\d", parts[0])  # "compared to" -> a date
    assert parts[1].isalpha()  # "Dr." -> a surname
    assert re.fullmatch(r"\d{1,2}:\d{2}", parts[2])  # "... a.m." -> a time


def test_remove_marker_leaves_tidy_text():
    removed = remove_marker(PROMPT, rng(), rewriting())
    assert removed == "Compared to, the heart is enlarged. Dr. was notified at a.m. noted."
    assert "  " not in removed and not PATTERN.search(removed)
    assert remove_marker("No markers here.", rng(), rewriting()) == "No markers here."


def test_random_insertion_only_inserts_vocabulary_words(vocab):
    inserted = random_insertion(PROMPT, rng(), rewriting(vocab, insertion_words=4)).split(" ")
    original = PROMPT.split(" ")
    assert len(inserted) == len(original) + 4
    # The original words survive in order (greedy subsequence match); the rest come from the vocabulary.
    position, extras = 0, []
    for word in inserted:
        if position < len(original) and word == original[position]:
            position += 1
        else:
            extras.append(word)
    assert position == len(original)
    assert len(extras) == 4 and all(w in vocab for w in extras)


def test_rewrites_are_seeded_per_prompt_and_strategy(tiny_model_dir, vocab):
    cfg = tiny_config(tiny_model_dir)
    first = mitigated_prompt("random_word", PROMPT, "0" * 16, vocab, mitigation_settings(cfg))
    assert mitigated_prompt("random_word", PROMPT, "0" * 16, vocab, mitigation_settings(cfg)) == first
    assert len({mitigated_prompt("random_word", PROMPT, f"{i:016x}", vocab, mitigation_settings(cfg)) for i in range(5)}) > 1
    assert mitigated_prompt("embedding_noise", PROMPT, "0" * 16, vocab, mitigation_settings(cfg)) == PROMPT


def test_pairwise_rms_distance_by_hand():
    black, white, grey = torch.zeros(1, 2, 2), torch.ones(1, 2, 2), torch.full((1, 2, 2), 0.5)
    # pairs: black-white 1, black-grey 0.5, white-grey 0.5
    assert pairwise_rms_distance(torch.stack([black, white, grey])) == pytest.approx(2 / 3)
    one_pixel = white.clone()
    one_pixel[0, 0, 0] = 0.0  # differs from white in 1 of 4 pixels by 1: RMS = sqrt(1/4)
    assert pairwise_rms_distance(torch.stack([white, one_pixel])) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="at least 2"):
        pairwise_rms_distance(white[None])


def test_pairwise_rms_distance_is_the_mean_over_every_pair():
    images = torch.rand(7, 1, 5, 6, generator=torch.Generator().manual_seed(0))
    pairs = [(images[i] - images[j]).pow(2).sum().sqrt().item() / 30**0.5 for i in range(7) for j in range(i + 1, 7)]
    assert pairwise_rms_distance(images) == pytest.approx(sum(pairs) / len(pairs), rel=1e-6)
    assert pairwise_rms_distance(images, torch.device("cpu")) == pytest.approx(pairwise_rms_distance(images), rel=1e-12)


def test_embedding_optimisation_lowers_the_first_step_norm(tiny_model_dir, components):
    cfg = tiny_config(tiny_model_dir)
    scorer = Scorer(components, ScoreSettings.of(cfg.score), device="cpu")
    latents, timestep = scorer.first_step_inputs(scorer.initial_latents(["0" * 16])[0])
    cond = scorer.encode([PROMPT]).embeddings

    def first_step_norm(embedding):
        return float(scorer.conditional_noise_norms(latents, timestep.expand(len(latents)), embedding).mean())

    optimised = optimise_embedding(scorer, latents, timestep, cond, iters=3, lr=0.01)
    assert optimised.shape == cond.shape and not optimised.requires_grad
    assert first_step_norm(optimised) < first_step_norm(cond)


def test_strategies_share_seeds(tiny_model_dir, components, vocab):
    """Strategies that leave this prompt's embedding unchanged must give identical numbers: paired noises."""
    cfg = tiny_config(
        tiny_model_dir, "mitigation.strategies=[original,remove_marker,embedding_noise]", "mitigation.noise_std=0.0"
    )
    scorer, settings = Scorer(components, ScoreSettings.of(cfg.score), device="cpu"), mitigation_settings(cfg)
    rows, grids = mitigate_prompt(scorer, scorer.with_steps(settings.steps), "No acute process.", "0" * 16, settings, vocab, keep=2)
    frame = pd.DataFrame(rows)
    assert frame["strategy"].tolist() == ["original", "remove_marker", "embedding_noise"]
    # One batch holds all three rows: the same numbers up to float32 noise from their batch positions,
    # which depends on the BLAS thread count (1.8e-5 relative on a d_mem of 0.008 with 2 threads);
    # a strategy that changed the embedding moves d_mem by far more than 1e-4.
    np.testing.assert_allclose(frame["d_mem"], frame["d_mem"].iloc[0], rtol=1e-4)
    np.testing.assert_allclose(frame["pairwise_distance"], frame["pairwise_distance"].iloc[0], rtol=1e-4)
    assert np.isfinite(frame["d_mem"]).all() and (frame["pairwise_distance"] > 0).all()
    np.testing.assert_allclose(grids["original"], grids["embedding_noise"], rtol=1e-5, atol=1e-6)
    assert grids["original"].shape[0] == 2 and grids["original"].ndim == 3


def test_generations_batched_over_strategies_match_one_strategy_at_a_time(tiny_model_dir, components):
    cfg = tiny_config(tiny_model_dir)
    scorer = Scorer(components, ScoreSettings.of(cfg.score), device="cpu")
    embeddings = scorer.encode(["No acute process.", "Small left effusion.", "Heart size is enlarged."]).embeddings
    latents = scorer.initial_latents(["0" * 16], 5)[:1]
    inputs = {"cond_embeddings": embeddings, "latents": latents.expand(3, -1, -1, -1, -1), "guidance": 7.5}
    together = generate_images(scorer, inputs, chunk=6)  # 2 generations x 3 strategies per call
    assert together.shape[:2] == (3, 5)
    for i in range(3):
        alone = generate_images(scorer, {**inputs, "cond_embeddings": embeddings[i : i + 1], "latents": latents}, chunk=5)[0]
        torch.testing.assert_close(together[i], alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(together[0], together[1])


def test_mitigate_run_writes_table_grids_and_summary(tiny_model_dir, tmp_path):
    strategies = "mitigation.strategies=[original,remove_marker,embedding_optimisation]"
    cfg = tiny_config(
        tiny_model_dir, f"run.output={tmp_path}", strategies, "report.top_prompts=1", "report.grid_generations=2",
        "mitigation.steps=3",
    )
    layout = RunLayout(str(tmp_path))
    memorized = pd.DataFrame(
        {"prompt": ["Compared to ___, stable.", "Dr. ___ notified."], "prompt_id": ["a" * 16, "b" * 16]}
    )
    Store().write_text(layout.memorized, memorized.to_csv(index=False))
    write_scores_key(layout, memorized["prompt_id"], fingerprint_model(cfg.model))  # scored by this very model
    summary = mitigate.run(cfg)
    table = Store().read_table(layout.mitigation).to_pandas()
    assert list(table.columns[-2:]) == ["model_fingerprint", "config_hash"]  # the scores' identity on every row
    table = table.drop(columns=["model_fingerprint", "config_hash"])
    assert list(table.columns) == list(MITIGATION_COLUMNS) == [
        "prompt_id", "prompt", "strategy", "mitigated_prompt", "d_mem", "pairwise_distance", "n_generations",
        "changed", "evaluations", "fidelity",
    ]  # fmt: skip
    assert list(table[table["prompt_id"] == "a" * 16]["changed"]) == [False, True, True]
    # The rows' declared cost is the work the Scorer counted (summary.json's cost), and it took the
    # generations' 3 steps (mitigation.steps), not the scorer's 2: Wen's optimisation costs beyond that.
    counted = Store().read_json(layout.summary)["cost"]["stages"]["mitigate"]
    assert counted["evaluations"] == table["evaluations"].sum() and counted["vae_decodes"] == len(table) * 2
    assert list(table[table["prompt_id"] == "a" * 16]["evaluations"]) == [1 * 2 * 2 + 2 * 2 * 3] * 2 + [16 + 1 * (1 + 2 * 3)]
    assert len(table) == 2 * 3 and (table["n_generations"] == 2).all()
    assert table["fidelity"].isna().all()  # fidelity.measure = none
    removed = table[(table["prompt_id"] == "a" * 16) & (table["strategy"] == "remove_marker")]
    assert removed["mitigated_prompt"].item() == "Compared to, stable."
    assert summary.figures == [layout.figure(f"generations_{'a' * 16}.npz")]
    with np.load(summary.figures[0]) as grids:
        assert sorted(grids.files) == ["embedding_optimisation", "original", "remove_marker"]
        assert grids["original"].shape[0] == 2 and 0 <= grids["original"].min() <= grids["original"].max() <= 1
    merged = Store().read_json(layout.summary)["mitigation"]["strategies"]
    assert sorted(merged) == ["embedding_optimisation", "original", "remove_marker"]
    assert merged["original"]["mean_d_mem"] == pytest.approx(table[table["strategy"] == "original"]["d_mem"].mean())


def test_vocabulary_words_leave_out_wordpiece_fragments(tmp_path):
    """A word-start fragment in the vocabulary ("conso" of "conso ##lidation") is not a word to draw."""
    from transformers import BertTokenizer

    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "conso", "##lidation",
                                                   "consolidation", "effusion", "left", "ab"]) + "\n")
    assert vocabulary_words(BertTokenizer(str(tmp_path / "vocab.txt"))) == ("consolidation", "effusion", "left")


def test_vocabulary_words_of_a_sentencepiece_tokenizer_are_word_starts_not_inner_pieces(tmp_path):
    """T5's SentencePiece vocabulary (PixArt-Sigma's) marks a word start with "▁" and holds pieces from inside words
    ("ati", "hest"): the words drawn are the marked ones, unmarked, each read back as that one marked token."""
    from cxrmem.corpus.synthetic import tokenizer_texts
    from cxrmem.models.tiny import train_t5_tokenizer

    tokenizer = train_t5_tokenizer(tokenizer_texts(), str(tmp_path / "t5"))
    entries = tokenizer.get_vocab()
    words = vocabulary_words(tokenizer)
    assert len(words) > 20 and all(f"▁{w}" in entries and tokenizer.tokenize(w) == [f"▁{w}"] for w in words)
    inner = [e for e in entries if e.isascii() and e.isalpha() and len(e) >= 3 and f"▁{e}" not in entries]
    assert inner and not set(inner) & set(words)  # the vocabulary has inner pieces, and none is drawn


# -- a new strategy is one row (and its function) ----------------------------------------------------
SHOUTED = "large right pleural effusion with consolidation"


def shout(prompt: str, rng: np.random.Generator, rewriting: Rewriting) -> str:
    """A throwaway text strategy: every marker -> a phrase of the tokenizer's own words (a change d_mem can see)."""
    return rewriting.pattern.sub(SHOUTED, prompt)


def hush(scorer, embedding: torch.Tensor, prompt_id: str, rng: np.random.Generator, settings: MitigationSettings) -> torch.Tensor:
    """A throwaway embedding strategy: the embedding halved."""
    return embedding * 0.5


def test_a_registered_strategy_runs_through_the_real_mitigation(tiny_model_dir, components, vocab, monkeypatch):
    """One REGISTRY row per strategy, its hook a plain function: the experiment, its cost and `changed` follow."""
    from cxrmem import strategies

    monkeypatch.setitem(strategies.REGISTRY, "shout", strategies.Strategy("every marker -> SECRET", rewrite=shout))
    monkeypatch.setitem(strategies.REGISTRY, "hush", strategies.Strategy("the embedding halved", embedding=hush))
    cfg = tiny_config(tiny_model_dir)
    scorer = Scorer(components, ScoreSettings.of(cfg.score), device="cpu")
    settings = mitigation_settings(cfg).replace(strategies=("original", "shout", "hush"))
    rows = {}
    for prompt, pid in ((PROMPT, "0" * 16), ("No acute process.", "1" * 16)):
        before = copy.copy(scorer.work)
        out, _ = mitigate_prompt(scorer, scorer, prompt, pid, settings, vocab)
        assert (scorer.work - before).evaluations == sum(r["evaluations"] for r in out)  # counted == declared
        rows[pid] = {r["strategy"]: r for r in out}
    marked, plain = rows["0" * 16], rows["1" * 16]
    assert marked["shout"]["mitigated_prompt"] == PROMPT.replace("___", SHOUTED).replace("XXXX", SHOUTED)
    assert [marked[s]["changed"] for s in ("original", "shout", "hush")] == [False, True, True]
    assert not plain["shout"]["changed"] and plain["hush"]["changed"]  # no marker to rewrite; an embedding always changes
    assert marked["hush"]["mitigated_prompt"] == PROMPT and marked["hush"]["d_mem"] != pytest.approx(marked["original"]["d_mem"], rel=1e-3)
    # The experiment scores the rewritten text: its d_mem is that text's as the unmitigated prompt (another batch
    # composition: within 1e-4, above the 1.8e-5 batch-position noise), and not the original prompt's.
    again, _ = mitigate_prompt(scorer, scorer, marked["shout"]["mitigated_prompt"], "0" * 16, settings.replace(strategies=("original",)), vocab)
    assert marked["shout"]["d_mem"] == pytest.approx(again[0]["d_mem"], rel=1e-4)
    assert marked["shout"]["d_mem"] != pytest.approx(marked["original"]["d_mem"], rel=1e-2)
