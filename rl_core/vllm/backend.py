"""`rollout.backend: vllm` for a run: the server's life, the token sampler, and weight syncs.

`VLLMBackend` is owned by the run's `Collector`. It starts the server from the vLLM venv
(`rollout.vllm.python`) serving the run's starting policy, or uses a running one (`rollout.vllm.url`);
`token_sampler(policy, generator)` first makes sure the server samples from `policy`'s weights (a sync
when its version is not the one served: `sync_policy`, timed as `perf/weight_sync_s`) and then gives a
`TokenSampler` that sends every request to the server with seeds from the run's token-sampler generator.
Every episode records the policy version that sampled it (`sampling.policy_version`), which is the
version served. `close()` stops a server it started.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from rl_core.config import RunConfig
from rl_core.model.policy import Policy
from rl_core.model.token_sampler import TokenSampler
from rl_core.paths import REPO_ROOT
from rl_core.vllm.client import VLLMClient, VLLMRequestError, sync_policy
from rl_core.vllm.server import VLLMServer

log = logging.getLogger(__name__)

# `sampling.backend` of episodes sampled by a vLLM server.
VLLM_BACKEND = "vllm"


def configured_server(cfg: RunConfig, model_path: str, log_path: Path) -> VLLMServer:
    """The (not yet started) server `rollout.vllm` describes, serving `model_path` with the run's context
    window (`--max-model-len`, and `--max-num-batched-tokens` unless set) and LoRA when the policy has it."""
    v = cfg.rollout.vllm
    return VLLMServer(
        python=Path(v.python) if Path(v.python).is_absolute() else REPO_ROOT / v.python,
        model=model_path,
        port=v.port,
        log_path=log_path,
        dtype=v.dtype,
        kv_cache_gib=v.kv_cache_gib,
        max_num_batched_tokens=v.max_num_batched_tokens or cfg.policy.context_window,
        max_model_len=cfg.policy.context_window,
        max_lora_rank=cfg.policy.lora.rank if cfg.policy.lora.enabled else None,
        extra_args=list(v.extra_args),
        startup_timeout_s=v.startup_timeout_s,
        threads=v.threads,
        cpu_bind=v.cpu_bind,
    )


class VLLMBackend:
    """The vLLM server a run samples from (see the module docstring).

    cfg: the run config (`rollout.vllm`). model_path: the starting policy's folder, served at start.
    work_dir: where the server's log and the synced weights go (the run folder's `vllm/`).
    start_version: the policy version of `model_path` (what the server serves before any sync).
    Raises FileNotFoundError / VLLMServerError (rl_core/vllm/server.py) when the server cannot start, and
    ValueError when `model_path` is a LoRA adapter folder (the server needs a full model).
    """

    def __init__(self, cfg: RunConfig, model_path: str, work_dir: Path, stop_ids: list[int], start_version: int = 0):
        v = cfg.rollout.vllm
        self.work_dir = work_dir
        self.server: VLLMServer | None = None
        url = v.url
        if url is None:
            from rl_core.model.lora import is_adapter_dir

            if is_adapter_dir(model_path):
                raise ValueError(
                    f"rollout.backend vllm: policy.path {model_path} is a LoRA adapter folder; the server serves a "
                    "full model: set policy.path to the base model with policy.lora.enabled, or serve it yourself "
                    "(rollout.vllm.url)"
                )
            self.server = configured_server(cfg, model_path, work_dir / "server.log")
            url = self.server.start()
            log.info("vLLM server for %s started at %s (log: %s)", model_path, url, self.server.log_path)
        self.client = VLLMClient(url, stop_ids, timeout_s=v.request_timeout_s, max_concurrency=v.max_concurrency)
        if v.url is not None:  # a server Turnstile did not start may serve anything: give it our weights first
            start_version = -1
        self.served_version = start_version
        self.start_version_of_server = start_version  # what a (re)started server serves before any sync
        self.sync_seconds: list[float] = []

    def _recover(self) -> bool:
        """Restart the server this backend started when it has died; False when there is nothing to restart."""
        if self.server is None or self.server.alive():
            return False
        log.warning("the vLLM server died (log: %s); restarting it", self.server.log_path)
        self.server.restart()
        self.served_version = self.start_version_of_server
        return True

    def ensure_serving(self, policy: Policy) -> None:
        """Sync the server to `policy`'s weights when it serves another version (timed in `sync_seconds`);
        a server this backend started that has died is restarted first."""
        if policy.version == self.served_version:
            return
        try:
            seconds = sync_policy(self.client, policy, self.work_dir / "weights")
        except VLLMRequestError:
            if not self._recover():
                raise
            if policy.version == self.served_version:
                return
            seconds = sync_policy(self.client, policy, self.work_dir / "weights")
        self.served_version = policy.version
        self.sync_seconds.append(seconds)
        log.info("vLLM server now samples policy version %d (weight sync %.2f s)", policy.version, seconds)

    def token_sampler(self, policy: Policy, generator: torch.Generator) -> TokenSampler:
        """A TokenSampler on the server, serving `policy`'s weights (synced first when needed). When a request
        fails because the server this backend started has died, the server is restarted, given `policy`'s
        weights again, and the round is sent once more (with the same seeds); a failure of a running server,
        or of a server named by `rollout.vllm.url`, raises VLLMRequestError."""
        self.ensure_serving(policy)

        def sample(keys: list[int], contexts: list[list[int]], limits: list[int], temperature: float):
            state = generator.get_state()
            try:
                return self.client.generate(keys, contexts, limits, temperature, generator)
            except VLLMRequestError:
                if not self._recover():
                    raise
                self.ensure_serving(policy)
                generator.set_state(state)
                return self.client.generate(keys, contexts, limits, temperature, generator)

        return sample

    def take_metrics(self) -> dict[str, float]:
        """`perf/weight_sync_s` (seconds of the syncs since the last call, summed), then forgotten; {} when
        there was none."""
        if not self.sync_seconds:
            return {}
        total, self.sync_seconds = sum(self.sync_seconds), []
        return {"perf/weight_sync_s": total}

    def close(self) -> None:
        """Stop the server if this backend started it."""
        if self.server is not None:
            self.server.stop()
