"""The learner's ranks inside one training step: who trains on which episodes, and the sums they share.

A multi-rank learner (`trainer.num_processes` x `trainer.num_nodes` > 1, rl_core/distributed/) runs
the same `Trainer.step` on every rank over the same episodes: every rank selects, computes
advantages and plans mini-batches identically (all of it is deterministic), then trains only on
its share of each mini-batch (`rank_shares`: whole episodes, balanced by tokens). The loss of
every micro-batch is normalised by the mini-batch's global totals (tokens, sequences), so the
gradients the ranks add up equal the single-process gradient. The per-rank sums the metrics need
(loss, per-token statistics) are added across ranks with `all_reduce_measures`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.distributed as dist

from rl_core.losses import LossStats
from rl_core.step_metrics import Measures


@dataclass(frozen=True)
class Ranks:
    """This process's place among the learner's ranks: `rank` of `world_size` (0 of 1 without a
    process group, or when the group is the one-process group the single-process DeepSpeed backend makes)."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> Ranks:
        """The ranks of the initialised default process group (torch.distributed), else 0 of 1."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def device(self) -> torch.device:
        """Where this group's collectives take their tensors: the current GPU with NCCL, else the CPU (gloo)."""
        if self.many and dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @property
    def many(self) -> bool:
        """Whether there is more than one rank."""
        return self.world_size > 1


def rank_shares(token_counts: list[int], world_size: int) -> list[list[int]]:
    """Split episodes (positions 0..len-1 of `token_counts`, tokens per episode) into `world_size` shares of
    whole episodes with balanced token totals: longest first (ties by position), each to the rank holding the
    fewest tokens so far (ties to the lowest rank) - the longest-processing-time rule (Graham 1969, "Bounds on
    multiprocessing timing anomalies"), within 4/3 of the best balance. Each share keeps its positions in
    ascending order; a rank gets an empty share when there are fewer episodes than ranks. Deterministic, so
    every rank computes every rank's share. Raises ValueError for world_size < 1 or a negative count."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if any(count < 0 for count in token_counts):
        raise ValueError(f"token counts must be >= 0, got {token_counts}")
    shares: list[list[int]] = [[] for _ in range(world_size)]
    loads = [0] * world_size
    for position in sorted(range(len(token_counts)), key=lambda i: (-token_counts[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        shares[rank].append(position)
        loads[rank] += token_counts[position]
    return [sorted(share) for share in shares]


_STAT_FIELDS = [f.name for f in fields(LossStats)]


def all_reduce_measures(loss: float, measures: Measures, ranks: Ranks) -> float:
    """Add `loss` and the per-token sums of `measures` (in place) over all ranks; the mismatch maximum
    becomes the largest on any rank. Returns the summed loss. A no-op with one rank. Collective: every
    rank must call it, in the same order."""
    if not ranks.many:
        return loss
    device = ranks.device()
    sums = torch.tensor(
        [loss, measures.entropy_sum, measures.mismatch_sum, measures.mismatch_tokens]
        + [getattr(measures.stats, name) for name in _STAT_FIELDS],
        dtype=torch.float64,
        device=device,
    )
    peak = torch.tensor([measures.mismatch_max], dtype=torch.float64, device=device)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    values = sums.tolist()
    measures.entropy_sum, measures.mismatch_sum, measures.mismatch_tokens = values[1:4]
    measures.stats = LossStats(**dict(zip(_STAT_FIELDS, values[4:])))
    measures.mismatch_max = float(peak)
    return values[0]
