"""The OpenAI-compatible rollout gateway: agents written in any framework play Turnstile's rollouts.

An external agent keeps running wherever it runs and only changes its model endpoint. Turnstile starts
each rollout (push: `POST {agent_url}/rollout`; pull: the agent asks `POST /rollouts/next`), serves the
agent's model calls (`POST /rollouts/{id}/v1/chat/completions` and `/v1/completions`) from the policy's
token sampler, records every call token for token, and takes the agent's completion and reward
(`POST /rollouts/{id}/complete`, `POST /rollouts/{id}/reward`). The recorded calls are stitched into
episodes of the trajectory record, which go through the same store, validation gate and training as any.

Modules: `protocol.py` (the request and response shapes, error answers), `conversation.py` (OpenAI
messages through the policy's chat format, and generated ids back into a message), `stitching.py` (a
rollout's calls stitched into segments and episodes), `server.py` (the HTTP server), `collection.py`
(`AgentGateway`: a collection of rollouts played by agents), `outcome.py` (how one rollout ends: its finish
reason and reward), `rewards.py` (Turnstile-side reward
functions). The contract is in README.md ("Bring your own agent") and deployments/README.md.
"""
