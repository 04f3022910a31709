"""Trajectories carried from one cascade stage to the next, so that a later stage continues them.

A dmem screen over the first k steps runs exactly the first k steps of the full score's trajectories
when it has the full score's seeds and schedule (cxrmem/scoring/scorer.py `ScoreSettings` equal but for
`screening_steps`: the same T, G, seed, seed mode, guidance and encoder settings; d_mem's definition is
docs/design.md, "The score"). A later stage of the same trajectories then starts from x after step k and
the k norms already computed, runs steps k..s only, and gives the from-scratch d_mem and [G, T] norms
(to floating-point tolerance: the batches are composed otherwise). A stage under other settings (another
G, or a detector screen whose first-step d_mem runs under other noises) neither uses nor makes states:
it restarts, and the states carried so far wait, pruned to its survivors, for a later stage.

Where the states live: in this process's memory only, in a `TrajectoryCarry` that the cascade driver
(cxrmem/stages/cascade.py) hands to the in-process executor (`score.local_batches`). While a stage
streams, at most `capacity` states are held: those of the best screen values so far, capacity being
the number the stage keeps (`stats.top_k` of its inputs), so memory is bounded by the survivors, not
the corpus (a RadEdit-shaped latent at G = 4 is 4 x 4 x 64 x 64 float32 = 256 KB per prompt: 1.3 GB
for 5,000 survivors). After the stage only its survivors' states are kept. A survivor without a state
(resumed from an earlier round's part files, tied past the capacity, or screened under other settings)
restarts from x_T: the carry saves work, it never changes a score. A carry lives for one round of the
cascade: after a widening, the new survivors of a resumed screen restart (part files hold no latents),
and the audit sample (rejected prompts) always restarts.

On Ray (cxrmem/distributed/pipeline.py) the carry stays on the driver and its states ride in the
blocks: the driver attaches each prompt's state to its block (`STATE_COLUMN`, counting what continuing
saves as here), an actor of the pool (cxrmem/stages/worker.py, `score_carried`) continues from them and returns the
states it makes in the same column, and the driver offers those to the carry, which keeps the best
`capacity` as here. What that costs: every prompt a state-making stage scores sends its state through
the object store once (256 KB for RadEdit at G = 4: a first stage at the full G over 100,000 prompts
streams 25 GB, batch by batch; the default first stage, at G = 1, makes none), and the blocks of a
continuing stage hold its inputs' states at once (1.3 GB for 5,000 survivors).
"""

from __future__ import annotations

import heapq
import io
import itertools
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import pyarrow as pa
import torch

from cxrmem.detectors import REGISTRY, oriented
from cxrmem.scoring.scorer import Continuation, ScoreBatch
from cxrmem.scoring.settings import ScoreSettings


@dataclass
class TrajectoryState:
    """One prompt's trajectories after k steps of the full score's schedule."""

    latents: torch.Tensor  # [G, C, H, W] float32 CPU
    step_norms: torch.Tensor  # [G, k] float32 CPU

    @property
    def steps(self) -> int:
        return int(self.step_norms.shape[1])

    def to_bytes(self) -> bytes:
        """One `STATE_COLUMN` cell: both tensors in NumPy's .npz format (it carries their shapes)."""
        buffer = io.BytesIO()
        np.savez(buffer, latents=self.latents.numpy(), step_norms=self.step_norms.numpy())
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, blob: bytes) -> "TrajectoryState":
        with np.load(io.BytesIO(blob)) as arrays:
            return cls(torch.from_numpy(arrays["latents"]), torch.from_numpy(arrays["step_norms"]))


STATE_COLUMN = "carried_state"  # a block's (or a scored batch's) trajectory states on Ray; null: none


def state_column(states: Sequence[Optional[TrajectoryState]]) -> pa.Array:
    return pa.array([None if s is None else s.to_bytes() for s in states], pa.binary())


def column_states(table: pa.Table) -> dict[str, TrajectoryState]:
    """The states of a table's `STATE_COLUMN` by prompt id (rows without one left out)."""
    blobs = table[STATE_COLUMN].to_pylist()
    return {pid: TrajectoryState.from_bytes(b) for pid, b in zip(table["prompt_id"].to_pylist(), blobs) if b is not None}


def trajectory_key(settings: ScoreSettings) -> ScoreSettings:
    """What makes two scorings the same trajectories: every score setting but how many steps are run."""
    return settings.replace(screening_steps=None)


class TrajectoryCarry:
    """The full score's trajectories of the current survivors (module notes), and what continuing saved."""

    def __init__(self, full: ScoreSettings):
        self.key = trajectory_key(full)
        self.states: dict[str, TrajectoryState] = {}
        self.continued = 0  # prompts of the current stage that started from a carried state
        self.saved = 0  # UNet sample evaluations those prompts did not spend again (detectors' declared d_mem cost)
        self._capacity, self._screen, self.column = 0, "dmem", "d_mem"  # the stage's screen and its scores' column
        self._heap: list = []  # (oriented screen value, order, prompt_id) of the states made this stage
        self._made: dict[str, TrajectoryState] = {}
        self._order = itertools.count()

    def matches(self, settings: ScoreSettings) -> bool:
        return trajectory_key(settings) == self.key

    def begin_stage(self, capacity: int = 0, screen: str = "dmem", column: str = "d_mem") -> None:
        """A stage starts that keeps at most `capacity` prompts by its `screen` detector's `column` (0: the
        full score, which makes no states)."""
        self._capacity, self._screen, self.column, self._heap, self._made = capacity, screen, column, [], {}
        self.continued = self.saved = 0

    def starts(self, prompt_ids: Sequence[str], steps: int) -> list[Optional[TrajectoryState]]:
        """Each prompt's carried state if a scoring over `steps` steps can continue it, else None (restart);
        counts what the continued ones save, as one batch of the declared cost (`evaluations` in cascade.py)."""
        found = [self.states.get(pid) for pid in prompt_ids]
        found = [s if s is not None and s.steps <= steps else None for s in found]
        shared = self.key.seed_mode == "shared"
        for state in found:
            if state is not None:
                self.continued += 1
                self.saved += REGISTRY["dmem"].cost(self.key.generations, state.steps, shared).per_prompt
        if found and all(s is not None for s in found):
            self.saved += REGISTRY["dmem"].cost(self.key.generations, 1, shared).per_batch  # no first step shared by a fresh prompt
        return found

    def keep(self, prompt_ids: Sequence[str], scored: ScoreBatch, screen_values) -> None:
        """Hold the states of this stage's best `capacity` screen values so far (the rest are dropped)."""
        if scored.latents is not None:
            self.offer(prompt_ids, lambda j: TrajectoryState(scored.latents[j].clone(), torch.as_tensor(scored.step_norms[j]).clone()), screen_values)

    def offer(self, prompt_ids: Sequence[str], state_of: Callable[[int], TrajectoryState], screen_values) -> None:
        """`keep` for states made elsewhere (a Ray actor's): `state_of(j)` is prompt j's, built only if held."""
        if self._capacity == 0:
            return
        values = oriented(np.asarray(screen_values, dtype=np.float64), self._screen)
        for j, pid in enumerate(prompt_ids):
            if not np.isfinite(values[j]):
                continue  # never selected (detectors.screen_top)
            entry = (float(values[j]), next(self._order), pid)
            if len(self._heap) >= self._capacity:
                if entry[0] <= self._heap[0][0]:
                    continue
                _, _, dropped = heapq.heapreplace(self._heap, entry)
                self._made.pop(dropped, None)
            else:
                heapq.heappush(self._heap, entry)
            self._made[pid] = state_of(j)

    def worker_kwargs(self) -> dict:
        """What `score_carried` needs to know of the current stage, on the actor that continues its trajectories."""
        return {"screen": self._screen, "column": self.column, "keeps": self._capacity > 0}

    def made(self, prompt_id: str) -> Optional[TrajectoryState]:
        return self._made.get(prompt_id)

    def receive(self, scored: pa.Table) -> pa.Table:
        """A scored batch from `score_carried`: its states offered to the carry, the table without them."""
        if STATE_COLUMN not in scored.column_names:
            return scored
        blobs = scored[STATE_COLUMN].to_pylist()
        held = [j for j, b in enumerate(blobs) if b is not None]
        if held:
            ids = scored["prompt_id"].to_pylist()
            values = scored[self.column].to_numpy(zero_copy_only=False)[held]
            self.offer([ids[j] for j in held], lambda i: TrajectoryState.from_bytes(blobs[held[i]]), values)
        return scored.drop_columns([STATE_COLUMN])

    def with_states(self, block: pa.Table, steps: int, batch_size: int) -> pa.Table:
        """A block of prompts with the states a scoring over `steps` continues, counted as `starts` counts
        them batch by batch (the worker scores a block in batches of `batch_size`)."""
        ids = block["prompt_id"].to_pylist()
        states = [s for lo in range(0, len(ids), batch_size) for s in self.starts(ids[lo : lo + batch_size], steps)]
        return block.append_column(STATE_COLUMN, state_column(states))

    def end_stage(self, survivors: Sequence[str]) -> None:
        """Keep the survivors' states only: this stage's where it made them, else the ones carried in."""
        keep = set(survivors)
        merged = {**self.states, **self._made}
        self.states = {pid: state for pid, state in merged.items() if pid in keep}
        self._capacity, self._heap, self._made = 0, [], {}


def continuation(states: Sequence[TrajectoryState]) -> Continuation:
    """The batch form of prompts' states, all after the same number of steps."""
    return Continuation(torch.stack([s.latents for s in states]), torch.stack([s.step_norms for s in states]))

