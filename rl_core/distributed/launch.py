"""Launching the learner's ranks with torchrun, and the driver's end of the channel to rank 0.

`torchrun_command` is the command line for one machine's ranks; `LearnerRanks` starts node 0's
(the driver's machine, holding global rank 0), waits for rank 0 to connect, and sends it commands
(`call`); `RemoteTrainer` is the driver's `Trainer`: the same `step`, `optimizer` state,
`load_weights` and `reset_optimizer`, carried out by the ranks. See the package docstring.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

import torch

from rl_core.model.backends import load_named_weights, trainable_parameters
from rl_core.model.policy import Policy
from rl_core.trajectory import Episode

ADDRESS_ENV = "TURNSTILE_LEARNER_ADDRESS"  # host:port of the driver's listener, for global rank 0
AUTHKEY_ENV = "TURNSTILE_LEARNER_AUTHKEY"  # hex of the channel's shared secret
CONNECT_TIMEOUT_S = 600.0  # torchrun start, imports, model load, DeepSpeed's first initialize
LOG_FILE = "ranks.log"

log = logging.getLogger(__name__)


def send(connection: Connection, message: Any) -> None:
    """Send `message` pickled by value (plain `pickle`: torch registers shared-memory reducers for tensors
    with multiprocessing's own pickler, which another process group cannot open)."""
    connection.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def receive(connection: Connection) -> Any:
    """The next message `send` sent; raises EOFError when the other end closed."""
    return pickle.loads(connection.recv_bytes())


class LearnerRanksError(RuntimeError):
    """The learner's ranks failed: one exited, raised, or never connected. The message says what happened, quotes
    the first error a rank logged and the end of the ranks' log; `log_path` is that log (None when unknown)."""

    def __init__(self, message: str, log_path: Path | None = None):
        super().__init__(message)
        self.log_path = log_path


_RANK_ERROR = re.compile(r"^(\[rank\d+\]: )?\w*(Error|Exception|Interrupt)\b.*")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun_command(trainer_cfg: Any, node_rank: int, master_port: int) -> list[str]:
    """torchrun's command line starting machine `node_rank`'s `trainer.num_processes` learner ranks, which meet
    at `trainer.master_addr`:`master_port` (static rendezvous) with the other `trainer.num_nodes - 1` machines.
    Raises ValueError for a node rank outside 0..num_nodes-1 or a port outside 1..65535."""
    if not 0 <= node_rank < trainer_cfg.num_nodes:
        raise ValueError(f"node rank must be in 0..{trainer_cfg.num_nodes - 1} (trainer.num_nodes), got {node_rank}")
    if not 0 < master_port < 65536:
        raise ValueError(f"master port must be in 1..65535, got {master_port}")
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={trainer_cfg.num_nodes}",
        f"--nproc-per-node={trainer_cfg.num_processes}",
        f"--node-rank={node_rank}",
        f"--master-addr={trainer_cfg.master_addr}",
        f"--master-port={master_port}",
        "--max-restarts=0",
        "-m",
        "rl_core.distributed.worker",
    ]


class LearnerRanks:
    """Node 0's learner ranks, started with torchrun; `call` sends global rank 0 a command and returns its result.

    The ranks' output goes to `log_dir/ranks.log` (appended). Raises LearnerRanksError when torchrun exits
    or rank 0 does not connect within `connect_timeout_s` seconds (with the log's tail)."""

    def __init__(self, trainer_cfg: Any, log_dir: str | Path, connect_timeout_s: float = CONNECT_TIMEOUT_S):
        self.log_path = Path(log_dir) / LOG_FILE
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        authkey = secrets.token_bytes(32)
        self._listener = Listener(("127.0.0.1", 0), authkey=authkey)
        host, port = self._listener.address
        master_port = trainer_cfg.master_port or free_port()
        env = dict(os.environ, **{ADDRESS_ENV: f"{host}:{port}", AUTHKEY_ENV: authkey.hex()})
        self.command = torchrun_command(trainer_cfg, 0, master_port)
        with open(self.log_path, "ab") as out:
            out.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(self.command)}\n".encode())
            out.flush()
            self.process = subprocess.Popen(
                self.command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        log.info("learner: %d torchrun rank(s) here, logging to %s", trainer_cfg.num_processes, self.log_path)
        self._connection: Connection | None = None
        try:
            self._connection = self._accept(connect_timeout_s)
        except BaseException:
            self.close()
            raise
        finally:
            self._listener.close()

    def _accept(self, timeout_s: float) -> Connection:
        accepted: list[Connection] = []
        errors: list[BaseException] = []

        def accept() -> None:
            try:
                accepted.append(self._listener.accept())
            except BaseException as exc:  # e.g. a peer with the wrong key; the listener closed
                errors.append(exc)

        thread = threading.Thread(target=accept, name="learner-ranks-accept", daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout_s
        while thread.is_alive():
            thread.join(0.5)
            if self.process.poll() is not None and not accepted:
                raise self._failure(f"torchrun exited with code {self.process.returncode} before rank 0 connected")
            if time.monotonic() > deadline:
                raise self._failure(f"rank 0 did not connect within {timeout_s:.0f} s")
        if not accepted:
            raise self._failure(f"rank 0 could not connect: {errors[0] if errors else 'unknown error'}")
        return accepted[0]

    def _failure(self, what: str) -> LearnerRanksError:
        cause = self.first_error()
        return LearnerRanksError(
            f"the learner's ranks failed: {what}"
            + (f"; a rank logged: {cause}" if cause else "")
            + f"\nthe ranks' log: {self.log_path}; its end:\n{self.log_tail(25)}",
            self.log_path,
        )

    def _this_launch(self) -> list[str]:
        """The lines the ranks logged since this launch (the log is appended to by every launch of the run)."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        starts = [i for i, line in enumerate(lines) if line.startswith("# ") and "torch.distributed.run" in line]
        return lines[starts[-1] :] if starts else lines

    def first_error(self) -> str | None:
        """The first exception line a rank logged since this launch (e.g. `[rank2]: RuntimeError: ...`), or None."""
        return next((line.strip() for line in self._this_launch() if _RANK_ERROR.match(line.strip())), None)

    def log_tail(self, lines: int = 40) -> str:
        """The last `lines` lines the ranks logged since this launch."""
        return "\n".join(self._this_launch()[-lines:]) or "(no log)"

    def call(self, command: str, payload: Any = None) -> Any:
        """Send `command` (with its `payload`) to every rank through rank 0 and return rank 0's result.
        Raises LearnerRanksError when a rank raised (its traceback in the message) or the ranks died."""
        if self._connection is None:
            raise LearnerRanksError("the learner's ranks are closed", self.log_path)
        try:
            send(self._connection, (command, payload))
            while not self._connection.poll(1.0):
                if self.process.poll() is not None:
                    raise self._failure(f"torchrun exited with code {self.process.returncode} during {command!r}")
            status, result = receive(self._connection)
        except (EOFError, OSError) as exc:
            raise self._failure(f"the channel to rank 0 closed during {command!r} ({exc!r})") from exc
        if status == "error":
            last = result.strip().splitlines()[-1] if result.strip() else "an exception"
            raise LearnerRanksError(f"a learner rank raised during {command!r}: {last}\n{result}", self.log_path)
        return result

    def close(self, timeout_s: float = 60.0) -> None:
        """Ask the ranks to stop, wait up to `timeout_s` seconds for torchrun, then kill what is left."""
        if self._connection is not None:
            try:
                send(self._connection, ("close", None))
            except OSError:
                pass
            self._connection.close()
            self._connection = None
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        if self.process.returncode:
            log.warning(
                "the learner's ranks exited with code %s on close; the end of %s:\n%s",
                self.process.returncode,
                self.log_path,
                self.log_tail(20),
            )


def connect_to_driver() -> Connection:
    """Global rank 0's end of the channel: connect to the driver named by the environment LearnerRanks sets.
    Raises LearnerRanksError when the variables are missing (the worker was not started by a driver)."""
    address, key = os.environ.get(ADDRESS_ENV), os.environ.get(AUTHKEY_ENV)
    if not address or not key:
        raise LearnerRanksError(
            f"{ADDRESS_ENV} / {AUTHKEY_ENV} are not set: global rank 0 runs on the run's machine (node 0), started "
            "by the run itself; other machines join with `turnstile learner-node`"
        )
    host, port = address.rsplit(":", 1)
    return Client((host, int(port)), authkey=bytes.fromhex(key))


class RemoteOptimizerState:
    """The ranks' optimizer state as torch AdamW's `state_dict()` / `load_state_dict()` (gathered from the ZeRO
    partitions by the ranks), what checkpoints save and restore."""

    def __init__(self, ranks: LearnerRanks):
        self.ranks = ranks

    def state_dict(self) -> dict[str, Any]:
        return self.ranks.call("optimizer_state")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.ranks.call("load_optimizer_state", state_dict)


class RemoteTrainer:
    """The driver's trainer when the learner runs on several ranks: the interface of `rl_core.trainer.Trainer`
    that the learner uses (`step`, `optimizer`, `load_weights`, `reset_optimizer`), carried out by torchrun-launched
    ranks (rl_core/distributed/worker.py). `policy` is the driver's copy: each applied step copies the ranks'
    weights into it and sets its version. The ranks start from `policy`'s weights and version.
    Raises LearnerRanksError as `LearnerRanks` does."""

    def __init__(self, cfg: Any, policy: Policy, log_dir: str | Path):
        self.policy = policy
        self.ranks = LearnerRanks(cfg.trainer, log_dir)
        try:
            self.ranks.call(
                "start",
                {
                    "config": cfg.model_dump(mode="json"),
                    "weights": _cpu_weights(policy.model),
                    "version": policy.version,
                },
            )
        except BaseException:
            self.ranks.close()
            raise
        self.optimizer = RemoteOptimizerState(self.ranks)

    def step(self, episodes: list[Episode]) -> Any:
        """`Trainer.step` on the ranks; the driver's policy gets the weights and version after it."""
        metrics, weights, version = self.ranks.call("step", {"episodes": episodes, "version": self.policy.version})
        if weights is not None:
            load_named_weights(self.policy.model, weights)
        self.policy.version = version
        return metrics

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Set trainable weights by name in the driver's policy and on every rank."""
        load_named_weights(self.policy.model, weights)
        self.ranks.call("load_weights", {name: w.detach().float().cpu() for name, w in weights.items()})

    def reset_optimizer(self) -> None:
        """A fresh optimizer on every rank."""
        self.ranks.call("reset_optimizer")

    def shard_sizes(self) -> list[dict[str, int]]:
        """What each rank holds, by rank (`DeepSpeedBackend.shard_sizes`: weights, master weights and optimizer
        state, in elements): how much ZeRO shards."""
        return self.ranks.call("shard_sizes")

    def close(self) -> None:
        """Stop the ranks."""
        self.ranks.close()


def _cpu_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().float().cpu() for name, p in trainable_parameters(model).items()}
