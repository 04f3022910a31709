"""The model worker of the Ray pipeline: one model replica per actor, loaded once.

`ModelWorker` is a callable class for `Dataset.map_batches` (scoring: a batch of
(prompt_id, prompt) in, scores.parquet rows out) and, wrapped with `ray.remote`, an actor with
`attribute` and `mitigate` methods for the small memorized set, so that each replica loads the
model once for both.

Tokenization stays in the worker (inside `Scorer.score`): it costs well under 1% of the
2 x G x T UNet passes per prompt, and a separate CPU stage would only ship padded id tensors
through the object store.
"""

from __future__ import annotations

import logging
import os

import pyarrow as pa

from cxrmem.config import config_hash

log = logging.getLogger(__name__)

# Fault injection for the tests: a worker that finds this file deletes it and exits at once,
# so exactly one worker dies, mid-run, the way a lost GPU node does.
FAULT_ONCE_ENV = "CXRMEM_FAULT_ONCE_FILE"


def inject_fault_once() -> None:
    flag = os.environ.get(FAULT_ONCE_ENV)
    if not flag:
        return
    try:
        os.remove(flag)
    except FileNotFoundError:
        return
    log.error("fault injection: scoring worker pid %d exits", os.getpid())
    os._exit(1)


class ModelWorker:
    """One model replica: loads tokenizer, text encoder and UNet (and the VAE if asked) once."""

    def __init__(self, cfg, need_vae: bool = False, torch_threads: int = 1):
        import torch

        from cxrmem.models.loading import load_components
        from cxrmem.scoring.scorer import Scorer

        torch.set_num_threads(max(1, torch_threads))  # the actor's CPU share, not the whole node
        self.cfg = cfg
        components = load_components(cfg.model, cfg.storage, need_vae=need_vae)
        self.scorer = Scorer(components, cfg.score, device=cfg.model.device)
        self.model_fingerprint = components.fingerprint
        self.config_hash = config_hash(cfg)
        log.info("worker pid %d loaded %s on %s", os.getpid(), components.source, self.scorer.device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Score a batch of (prompt_id, prompt) rows into scores.parquet rows."""
        from cxrmem.scoring.run import score_prompts

        inject_fault_once()
        prompt_ids = batch.column("prompt_id").to_pylist()
        prompts = batch.column("prompt").to_pylist()
        tables = score_prompts(
            self.scorer, prompt_ids, prompts, self.cfg.score.batch_size, self.model_fingerprint, self.config_hash
        )
        return pa.concat_tables(tables)

    def attribute(self, prompt_ids: list[str], prompts: list[str]):
        """tokens.parquet rows (a DataFrame) of these memorized prompts."""
        from cxrmem.attribution import attribute_prompts

        return attribute_prompts(self.scorer, prompts, prompt_ids, self.cfg)

    def mitigate(self, prompt_ids: list[str], prompts: list[str], grid_ids: frozenset = frozenset()):
        """mitigation.parquet rows (a DataFrame) of these memorized prompts, and the image grids
        ({prompt_id: {strategy: [k, H, W]}}) of those in `grid_ids`."""
        from cxrmem.mitigation import generation_scorer, mitigate_prompt, mitigation_frame, vocabulary_words

        vocab = vocabulary_words(self.scorer.components.tokenizer)
        sampler = generation_scorer(self.scorer, self.cfg.mitigation.steps)
        rows, grids = [], {}
        for prompt_id, prompt in zip(prompt_ids, prompts):
            keep = self.cfg.report.grid_generations if prompt_id in grid_ids else 0
            prompt_rows, grids[prompt_id] = mitigate_prompt(self.scorer, prompt, prompt_id, self.cfg, vocab, keep, sampler)
            rows += prompt_rows
        return mitigation_frame(rows), {pid: g for pid, g in grids.items() if g}
