"""`cxrmem reference`: the reference of non-members (analyze.reference), prepared and scored as the corpus is.

    analyze.reference (a table of prompts the model was not trained on)
        -> reference/prompts.parquet (prompts also in the audited corpus dropped and counted)
        -> reference/scores.parquet (the corpus's score settings, the same model)

The analyze stage tests every corpus prompt's d_mem against these scores (cxrmem/calibration.py). A valid
reference holds prompts of the same kind as the corpus (the same report section, the same preparation)
that the model never saw: for RadEdit and MIMIC-CXR, the impressions of a split it was not trained on. A
reference that holds training prompts (or near copies) makes every p-value conservative and hides
memorization; one of another kind of text (other lengths, other vocabulary) breaks exchangeability and
the p-values mean nothing (docs/design.md, "Calibrated calls").
"""

from __future__ import annotations

import logging
from typing import Optional

import pyarrow.compute as pc

from cxrmem import storage
from cxrmem.runfiles import Run, RunLayout
from cxrmem.settings import with_overrides
from cxrmem.stages import prepare, score
from cxrmem.stages.results import ReferenceResult

log = logging.getLogger(__name__)

def reference_config(cfg):
    """The run's config as the reference's preparation and scoring see it: the reference table as the corpus,
    every prompt of it (no cascade: each reference prompt needs its full d_mem), the same model and scoring."""
    return with_overrides(
        cfg, run__output=RunLayout(cfg.run.output).reference.prefix, corpus__source="table", corpus__path=cfg.analyze.reference,
        corpus__text_column=cfg.analyze.reference_text_column, corpus__max_reports="null", cascade__enabled=False,
    )  # fmt: skip


def run(cfg, out: Optional[Run] = None, scored_batches=score.local_batches) -> ReferenceResult:
    """Prepare and score the reference of analyze.reference; its prompts that the corpus also
    holds are dropped first: a prompt cannot be its own non-member."""
    out = score.fingerprinted(cfg, out)
    store, corpus, ref = out.store, out.layout, out.reference
    if not store.exists(corpus.prompts):
        raise FileNotFoundError(f"{corpus.prompts} does not exist; run `cxrmem prepare` for this run first")
    ref_cfg, layout = reference_config(cfg), ref.layout
    if not store.exists(layout.prompts):
        prepare.run(ref_cfg, ref)
        prompts = store.read_table(layout.prompts)
        in_corpus = pc.is_in(prompts["prompt_id"], value_set=store.read_table(corpus.prompts, columns=["prompt_id"])["prompt_id"])
        dropped = int(pc.sum(in_corpus).as_py() or 0)
        kept = prompts.filter(pc.invert(in_corpus))
        if kept.num_rows == 0:
            raise ValueError(f"every prompt of the reference {cfg.analyze.reference} is also in the audited corpus: "
                             "a reference must hold prompts the model was not trained on (analyze.reference)")  # fmt: skip
        store.write_table(kept, layout.prompts)
        store.write_json(storage.join(layout.prefix, "reference.json"), {"source": cfg.analyze.reference, "prompts": kept.num_rows,
                                                                         "dropped_in_corpus": dropped})  # fmt: skip
        if dropped:
            log.warning("reference: %d of its %d prompts are also in the audited corpus: dropped", dropped, prompts.num_rows)
    scored = score.run(ref_cfg, ref, scored_batches, what="reference scored", cost=None)
    out.record_cost("reference", scored.work)  # the corpus run's cost: the reference is part of its audit
    kept = store.read_json(storage.join(layout.prefix, "reference.json"))
    return ReferenceResult(source=kept["source"], prompts=kept["prompts"], dropped_in_corpus=kept["dropped_in_corpus"],
                           scores=layout.scores, computed=scored.computed, resumed=scored.resumed, work=scored.work)  # fmt: skip
