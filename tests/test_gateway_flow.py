"""Agents that are not Turnstile code train a policy through the rollout gateway, in the real train flow.

An agent written with the official `openai` client (tests/agents/openai_agent.py) plays SOP-domain tasks for
2 iterations: the batches validate, training runs, evaluation is played by the agent too, and every generated
token and log-prob stored is exactly what the token sampler produced. An OpenAI Agents SDK agent
(tests/agents/agents_sdk_agent.py) does the same for one iteration.
"""

from __future__ import annotations

import json
import socket

import pytest

from rl_core.store import TrajectoryStore
from tests.agents.openai_agent import AgentServer, OpenAIAgent
from tests.test_train_flow import run_flow

pytestmark = [pytest.mark.slow, pytest.mark.gateway]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def sampled(monkeypatch):
    """Every generation the token sampler returns while rollouts are played through the gateway."""
    import rl_core.gateway.collection as collection

    produced: list[tuple[list[int], list[float]]] = []
    original = collection.hf_token_sampler

    def recording(*args, **kwargs):
        sample = original(*args, **kwargs)

        def wrapped(keys, contexts, limits, temperature):
            generations = sample(keys, contexts, limits, temperature)
            produced.extend((list(g.tokens), list(g.logprobs)) for g in generations)
            return generations

        return wrapped

    monkeypatch.setattr(collection, "hf_token_sampler", recording)
    return produced


def generated_spans(episodes) -> list[tuple[list[int], list[float]]]:
    """Each assistant turn's ids and log-probs; the loss mask is 1 exactly on those turns."""
    spans = []
    for e in episodes:
        mask = [0] * len(e.tokens)
        for t in e.turns:
            if t.role == "assistant":
                mask[t.start : t.end] = [1] * (t.end - t.start)
                spans.append((e.tokens[t.start : t.end], e.behavior_logprobs[t.start : t.end]))
        assert e.loss_mask == mask
    return spans


def test_an_openai_client_agent_trains_through_the_gateway(prefect_harness, tmp_path, sampled):
    agent = OpenAIAgent(native=False)
    with AgentServer(agent, free_port()) as server:
        summary = run_flow(tmp_path, "byoa", [f"rollout.agent={{url: '{server.url}'}}"])
    assert agent.errors == []
    assert summary["trained_steps"] == 2 and summary["skipped"] == []
    store = TrajectoryStore(tmp_path)
    assert store.iterations("byoa") == [1, 2]
    stored = []
    for iteration in (1, 2):
        report = json.loads(
            (tmp_path / "byoa" / "trajectories" / f"iteration-{iteration:06d}.validation.json").read_text()
        )
        assert report["passed"] is True and report["rows"] == 8
        episodes = store.read("byoa", iteration)
        assert all(e.finish_reason != "env_error" for e in episodes)
        assert all(e.segment == 0 for e in episodes)  # the agent re-sends its history: every call was stitched
        assert {e.sampling.policy_version for e in episodes} == {iteration - 1}
        stored += generated_spans(episodes)
    # the agent played 16 training rollouts + the evaluations; each stored turn is a sampled generation, exactly
    produced = {(tuple(t), tuple(round(x, 4) for x in lp)) for t, lp in sampled}
    for tokens, logprobs in stored:
        assert (tuple(tokens), tuple(round(float(x), 4) for x in logprobs)) in produced
    assert len(agent.played) >= 16


def test_an_agents_sdk_agent_trains_through_the_gateway(prefect_harness, tmp_path):
    from tests.agents.agents_sdk_agent import AgentsSDKAgent

    agent = AgentsSDKAgent()
    with AgentServer(agent, free_port()) as server:
        summary = run_flow(tmp_path, "sdk", ["iterations=1", f"rollout.agent={{url: '{server.url}'}}"])
    assert agent.errors == []
    assert summary["trained_steps"] == 1 and summary["skipped"] == []
    report = json.loads((tmp_path / "sdk" / "trajectories" / "iteration-000001.validation.json").read_text())
    assert report["passed"] is True and report["rows"] == 8
