"""vLLM as the policy's token sampler (`rollout.backend: vllm`): the server process (server.py) and the
client that samples token-in, token-out and pushes new weights after each optimizer step (client.py)."""

from rl_core.vllm.client import VLLMClient, VLLMRequestError, sync_policy
from rl_core.vllm.server import SERVED_MODEL, VLLMServer, VLLMServerError

__all__ = ["SERVED_MODEL", "VLLMClient", "VLLMRequestError", "VLLMServer", "VLLMServerError", "sync_policy"]
