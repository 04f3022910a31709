"""The memorized-set stages' executor on Ray: ModelWorker actors, each loading the model once.

`ActorModels.map` has the signature of the stages' in-process `LocalModel.map`: chunks of
prompts spread over the actors, (prompts done, result) per chunk in input order, so the
attribute and mitigate stages run unchanged on either.
"""

from __future__ import annotations

import math
from typing import Iterator

import pandas as pd

from cxrmem.distributed.session import pool_size
from cxrmem.stages.worker import ModelWorker
from cxrmem.storage import Store


class ActorModels:
    def __init__(self, cfg, store: Store, n_prompts: int, need_vae: bool):
        import ray

        actors, gpus = pool_size(cfg.ray, cfg.model.device)
        worker = ray.remote(ModelWorker).options(
            num_cpus=cfg.ray.num_cpus_per_worker,
            num_gpus=gpus,
            max_restarts=cfg.ray.max_restarts,
            max_task_retries=-1 if cfg.ray.max_restarts else 0,  # a restarted actor reruns the lost chunk
        )
        threads = int(cfg.ray.num_cpus_per_worker)
        count = max(1, min(actors, n_prompts))
        self.actors = [worker.remote(cfg, store, need_vae=need_vae, torch_threads=threads) for _ in range(count)]

    def map(self, method: str, prompts: pd.DataFrame, *args) -> Iterator[tuple[int, object]]:
        from ray.util import ActorPool

        # A few chunks per actor balance uneven prompts; always at least one so the result has its schema.
        size = max(1, math.ceil(len(prompts) / (4 * len(self.actors))))
        chunks = [prompts.iloc[lo : lo + size] for lo in range(0, max(len(prompts), 1), size)]
        results = ActorPool(self.actors).map(
            lambda actor, chunk: getattr(actor, method).remote(chunk["prompt_id"].tolist(), chunk["prompt"].tolist(), *args),
            chunks,
        )
        for chunk, result in zip(chunks, results):
            yield len(chunk), result

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
