"""Which tasks each training iteration uses.

`TaskSampler` walks through every training task of every environment in a seeded random
order, epoch after epoch, without repeats inside an epoch. Its position (`state_dict`) is
two integers, so a resumed run can continue with the same tasks it would have seen.
"""

from __future__ import annotations

import random

from rl_core.environments.base import Environment, Task


class TaskSampler:
    """Seeded epoch-wise shuffling over (environment, task) pairs of one split."""

    def __init__(self, envs: list[Environment], split: str, seed: int):
        self.pairs = [(env, task) for env in envs for task in env.tasks(split)]
        if not self.pairs:
            raise ValueError(f"no tasks in split {split!r} for environments {[e.name for e in envs]}")
        self.seed, self.epoch, self.offset = seed, 0, 0
        self._order = self._shuffled(0)

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(len(self.pairs)))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def next_batch(self, n: int) -> list[tuple[Environment, Task]]:
        """The next `n` pairs, moving to a freshly shuffled epoch when one runs out."""
        batch = []
        while len(batch) < n:
            if self.offset == len(self._order):
                self.epoch, self.offset = self.epoch + 1, 0
                self._order = self._shuffled(self.epoch)
            batch.append(self.pairs[self._order[self.offset]])
            self.offset += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._order = self._shuffled(self.epoch)
