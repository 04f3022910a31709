"""Mitigation's generations, reused by the copies check (issue 33): what they were made under, and which checks take them.

The mitigate stage generates N = mitigation.n_generations per sampled memorized prompt and strategy (`original`: the
prompt as it is) at the scoring guidance, from `Scorer.initial_latents([prompt_id], N)`, in mitigation.steps or
score.steps steps. The copies check generates the very same ones where its settings are those: the same noises, and
per strategy the same text, embedding and sampling plan (cxrmem/stages/worker.py CopiesOfPrompts), at the one of
its guidances that is the scoring one, with copies.generations = N and the scorer's score.steps. So when the copies
stage will run and the settings match, mitigation embeds its generations with the copies embedder and writes them,
stamped with what they were made under (mitigation_embeddings.parquet); the copies stage takes a (prompt, strategy)
pair from there instead of sampling it again, and the texts and fidelity from mitigation.parquet (the same measure:
the share of the pair's generations showing the original prompt's findings). A stamp that differs from what copies
would generate under (another model, settings or embedder) means no reuse, said in one line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from typing import Optional

import numpy as np
import pandas as pd
import pyarrow as pa

from cxrmem.copies.embedders import embedder_fingerprint
from cxrmem.copies.settings import guidances
from cxrmem.mitigation import EMBEDDING
from cxrmem.mitigation_sizing import BASELINE
from cxrmem.runfiles import Run
from cxrmem.score_key import config_hash
from cxrmem.stages.worker import embedder_settings, mitigation_settings, stamped

log = logging.getLogger(__name__)

UNMITIGATED = "none"  # the copies check's name for mitigation's `original`
NOT_REUSED = "mitigation's generations not reused"
# Mitigation settings that choose what runs, how much and how it is batched, not what one pair's generations are;
# every other one (the strategies' hooks: seed, noise_std, ...; new knobs too) enters the stamp's `settings`.
SIZING = frozenset({"enabled", "strategies", "n_generations", "steps", "sample_size", "sequential", "stop_level",
                    "look_every", "samples_per_call", "grid_generations"})  # fmt: skip


def made_under(cfg, identity: dict) -> dict[str, str]:
    """The stamp of mitigation's generations under `cfg`: the scores' model identity, the settings that shape a pair's
    generations, the copies embedder, N, the steps and the guidance (strings: cxrmem/stages/worker.py `stamped`)."""
    plan = {k: v for k, v in dataclasses.asdict(mitigation_settings(cfg)).items() if k not in SIZING}
    settings = hashlib.sha256(json.dumps([config_hash(cfg), plan], sort_keys=True, default=str).encode()).hexdigest()[:16]
    stamp = {**identity, "settings": settings, "embedder": embedder_fingerprint(embedder_settings(cfg)),
             "n_generations": cfg.mitigation.n_generations, "steps": cfg.mitigation.steps or cfg.score.steps,
             "guidance": float(cfg.score.guidance_scale)}  # fmt: skip
    return {k: str(v) for k, v in stamp.items()}


def wanted(cfg, identity: dict, guidance: float) -> dict[str, str]:
    """The stamp the copies check's own generations at `guidance` would carry (its scorer runs score.steps)."""
    own = {"n_generations": cfg.copies.generations, "steps": cfg.score.steps, "guidance": float(guidance)}
    return {**made_under(cfg, identity), **{k: str(v) for k, v in own.items()}}


def served_guidance(cfg) -> Optional[float]:
    """The copies guidance whose generations are mitigation's under `cfg` (the same stamp, whatever the model), or None."""
    made = made_under(cfg, {})
    return next((w for w in guidances(cfg) if wanted(cfg, {}, w) == made), None)


def stamp_for_copies(cfg, identity: dict) -> Optional[dict[str, str]]:
    """The stamp mitigation writes its embedded generations under, or None: the copies stage is off (as the audit
    decides: cxrmem/stages/table.py), or would not take them at any of its guidances."""
    from cxrmem.stages.table import BY_NAME

    if BY_NAME["copies"].off(cfg) is not None or served_guidance(cfg) is None:
        return None
    return made_under(cfg, identity)


def save(out: Run, frame: pd.DataFrame, stamp: Optional[dict]) -> None:
    """mitigation_embeddings.parquet from mitigation's rows with their `embedding` column, stamped; without a stamp,
    a file an earlier run left is removed (its generations are not this run's)."""
    store, uri = out.store, out.layout.mitigation_embeddings
    if stamp is None:
        if store.exists(uri):
            store.delete(uri)
        return
    table = pa.table({
        "prompt_id": pa.array(frame["prompt_id"], pa.string()), "strategy": pa.array(frame["strategy"], pa.string()),
        EMBEDDING: pa.array([e.tolist() for e in frame[EMBEDDING]], pa.list_(pa.list_(pa.float32()))),
    })  # fmt: skip
    store.write_table(stamped(table, stamp), uri)
    log.info("mitigation: %d prompt-strategy pairs' generations embedded for the copies check to reuse at w=%s", len(frame), stamp["guidance"])


def reusable(cfg, out: Run, identity: dict, guidances: list[float]) -> tuple[Optional[float], dict, str]:
    """(the copies guidance mitigation's generations serve, per copies strategy {prompt_id: (embeddings [N, D], text,
    fidelity)}, why): (None, {}, why not) where there are none or their stamp is not what copies generates under."""
    store, layout = out.store, out.layout
    if not (store.exists(layout.mitigation_embeddings) and store.exists(layout.mitigation)):
        return None, {}, f"{NOT_REUSED}: mitigation wrote none (it was off, or the copies stage would not take them)"
    table = store.read_table(layout.mitigation_embeddings).to_pandas()
    if table.empty:
        return None, {}, f"{NOT_REUSED}: mitigation_embeddings.parquet is empty"
    made = {k: table[k].iloc[0] if k in table else "unstamped" for k in made_under(cfg, identity)}  # a file of an older stamp
    wants = {w: wanted(cfg, identity, w) for w in guidances}
    match = [w for w, want in wants.items() if want == made]
    if not match:
        differ = [k for k in made if any(want[k] != made[k] for want in wants.values())]
        needs = {k: " or ".join(sorted({want[k] for want in wants.values()})) for k in differ}
        return None, {}, f"{NOT_REUSED}: made under " + ", ".join(f"{k} {made[k]} (copies: {needs[k]})" for k in differ)
    texts = store.read_table(layout.mitigation, columns=["prompt_id", "strategy", "mitigated_prompt", "fidelity"]).to_pandas()
    rows = table.merge(texts, on=["prompt_id", "strategy"], how="inner")
    pairs: dict = {}
    for row in rows.itertuples(index=False):
        strategy = UNMITIGATED if row.strategy == BASELINE else row.strategy
        pairs.setdefault(strategy, {})[row.prompt_id] = (np.stack(row.embedding).astype(np.float32), row.mitigated_prompt, float(row.fidelity))
    return match[0], pairs, f"mitigation's generations reused at w={match[0]:g}"
