"""One learner rank (run by torchrun: `python -m torch.distributed.run ... -m rl_core.distributed.worker`).

Global rank 0 connects to the driver (launch.py `connect_to_driver`) and receives its commands;
every rank gets each command by broadcast (torch.distributed.broadcast_object_list) and carries it
out on its own `Trainer` (the same on every rank: the config, weights and version the driver
sent with "start"); rank 0 answers ("ok", result) or ("error", traceback). A rank that raises
exits non-zero, and torchrun then stops the others. Commands: start, step, optimizer_state,
load_optimizer_state, load_weights, reset_optimizer, shard_sizes, close.
"""

from __future__ import annotations

import os
import traceback
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from rl_core.distributed.launch import receive, send
from rl_core.distributed.ranks import Ranks


def _receive(connection: Connection | None, ranks: Ranks) -> tuple[str, Any]:
    """The driver's next command on every rank (rank 0 reads it, the others get it by broadcast)."""
    message = [receive(connection) if connection is not None else None]
    dist.broadcast_object_list(message, src=0, device=ranks.device())
    return message[0]


class RankServer:
    """Carries out the driver's commands on this rank's `Trainer` (built by "start")."""

    def __init__(self, ranks: Ranks):
        self.ranks = ranks
        self.trainer = None

    def start(self, payload: dict[str, Any]) -> None:
        """Build the policy (the run's starting model with the driver's trainable weights) and its Trainer."""
        from rl_core.config import RunConfig
        from rl_core.learner import load_start_policy, make_trainer

        cfg = RunConfig.model_validate(payload["config"])
        if torch.device(cfg.policy.device).type == "cuda":  # rank r of a machine uses its GPU r
            local = int(os.environ.get("LOCAL_RANK", "0"))
            cfg = cfg.model_copy(update={"policy": cfg.policy.model_copy(update={"device": f"cuda:{local}"})})
        policy = load_start_policy(cfg)
        policy.version = payload["version"]
        self.trainer = make_trainer(cfg, policy)
        self.trainer.load_weights(payload["weights"])

    def handle(self, command: str, payload: Any) -> Any:
        """Carry out one command; returns what rank 0 sends back."""
        if command == "start":
            return self.start(payload)
        trainer = self.trainer
        if trainer is None:
            raise RuntimeError(f"command {command!r} before 'start'")
        if command == "step":
            trainer.policy.version = payload["version"]
            metrics = trainer.step(payload["episodes"])
            applied = metrics.skipped is None  # only rank 0's copy goes to the driver; every rank joins the gather
            weights = trainer.backend.trainable_weights(keep=self.ranks.rank == 0) if applied else None
            return metrics, weights, trainer.policy.version
        if command == "optimizer_state":
            return trainer.optimizer.state_dict()
        if command == "load_optimizer_state":
            return trainer.optimizer.load_state_dict(payload)
        if command == "load_weights":
            return trainer.load_weights(payload)
        if command == "reset_optimizer":
            return trainer.reset_optimizer()
        if command == "shard_sizes":  # every rank's `DeepSpeedBackend.shard_sizes`, by rank
            sizes: list[Any] = [None] * self.ranks.world_size
            dist.all_gather_object(sizes, trainer.backend.shard_sizes())
            return sizes
        raise ValueError(f"unknown learner command {command!r}")


@record  # torchrun's summary of a failed rank then names its exception and traceback
def main() -> None:
    """Serve the driver's commands until "close" (or the driver's channel closes: the run died)."""
    from rl_core.distributed.launch import connect_to_driver
    from rl_core.model.backends import _import_deepspeed

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    _import_deepspeed()  # the process group from torchrun's environment
    ranks = Ranks.current()
    connection = connect_to_driver() if ranks.rank == 0 else None
    server = RankServer(ranks)
    while True:
        try:
            command, payload = _receive(connection, ranks)
        except EOFError:  # the driver is gone: nothing more will come
            raise SystemExit("rank 0: the driver closed the channel; stopping the learner") from None
        if command == "close":
            break
        try:
            result = server.handle(command, payload)
        except BaseException:
            if connection is not None:
                send(connection, ("error", traceback.format_exc()))
            raise
        if connection is not None:
            send(connection, ("ok", result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
