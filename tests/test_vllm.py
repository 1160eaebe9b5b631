"""rollout.backend vllm: a real vLLM server (from `make vllm`'s venv) samples the rollouts (issue 12).

The server is started and stopped by the tests on 127.0.0.1. Without the vLLM venv these tests are
skipped with the command that builds it (`make vllm`); under CI (`CI` set) a missing venv fails them,
so the real component is tested on every submission.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from rl_core.config import load_config
from rl_core.model.policy import load_policy
from rl_core.paths import REPO_ROOT
from rl_core.token_batch import token_logprobs
from rl_core.vllm import VLLMClient, VLLMServer, sync_policy

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

VLLM_PYTHON = REPO_ROOT / ".venv-vllm" / "bin" / "python"
REFERENCE = REPO_ROOT / "data" / "checkpoints" / "reference"
TOLERANCE = 1e-3  # nats: served log-probs vs the trainer's (measured: ~2e-5 on CPU, float32)


def need_vllm() -> None:
    if not VLLM_PYTHON.exists():
        message = f"the vLLM venv is missing ({VLLM_PYTHON}): build it with `make vllm` (about 2-7 minutes)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    need_vllm()
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    # the served length as a run sets it (policy.context_window): the reference config allows 8192 positions, more
    # than the default --max-num-batched-tokens 2048 that vLLM needs without chunked pre-fill
    with VLLMServer(
        python=VLLM_PYTHON, model=str(REFERENCE), port=8031, log_path=log, threads=1, max_model_len=1024
    ) as running:
        yield running


def prompts(policy, n=6):
    return [
        policy.chat.prompt(policy.tokenizer, "You handle refunds.", f"Refund request for order {4800 + i}.")
        for i in range(n)
    ]


def largest_gap(model, contexts, generations) -> float:
    """The largest |served log-prob - trainer's log-prob| over every sampled token (nats)."""
    gap = 0.0
    for context, generation in zip(contexts, generations):
        full = torch.tensor([context + generation.tokens])
        with torch.no_grad():
            logprobs, _ = token_logprobs(model, full, torch.ones_like(full))
        ours = logprobs[0, len(context) :].tolist()
        gap = max(gap, max(abs(a - b) for a, b in zip(ours, generation.logprobs)))
    return gap


def vllm_run(tmp_path, run_id: str, port: int, *extra: str):
    """A TrainingRun of the quickstart config sampling from a vLLM server it starts on `port` (one thread),
    groups of 4 in batches of 8, in `tmp_path`; `extra` overrides come last."""
    from rl_core.run import TrainingRun

    overrides = [
        "rollout.backend=vllm",
        f"rollout.vllm.port={port}",
        "rollout.vllm.threads=1",
        "rollout.group_size=4",
        "rollout.global_batch_size=8",
        f"storage.run_dir={tmp_path}",
        f"storage.run_id={run_id}",
        *extra,
    ]
    return TrainingRun(load_config(REPO_ROOT / "data/configs/quickstart.yaml", overrides))


def assert_served_log_probs_are_the_trainer_s(model, episodes) -> None:
    """Every sampled token's served log-prob is the trainer's (within TOLERANCE nats): the server sampled
    from `model`'s weights."""
    for episode in episodes:
        tokens = torch.tensor([episode.tokens])
        with torch.no_grad():
            ours, _ = token_logprobs(model, tokens, torch.ones_like(tokens))
        mask = torch.tensor(episode.loss_mask, dtype=torch.bool)
        served = torch.tensor(episode.behavior_logprobs)[mask]
        assert float((ours[0][mask] - served).abs().max()) < TOLERANCE


def test_token_in_token_out_with_the_trainer_s_log_probs_and_reproducible_seeds(server):
    policy = load_policy(REFERENCE)
    client = VLLMClient(server.url, [policy.chat.stop_id])
    contexts = prompts(policy)
    first = client.generate(list(range(6)), contexts, [30] * 6, 1.0, torch.Generator().manual_seed(0))
    again = client.generate(list(range(6)), contexts, [30] * 6, 1.0, torch.Generator().manual_seed(0))
    assert [g.tokens for g in first] == [g.tokens for g in again]  # seeds from the run's generator
    assert all(1 <= len(g.tokens) <= 30 for g in first)
    assert all(g.stopped == (g.tokens[-1] == policy.chat.stop_id) for g in first)
    assert largest_gap(policy.model, contexts, first) < TOLERANCE


def test_new_full_weights_are_served_after_a_sync(server, tmp_path):
    policy = load_policy(REFERENCE)
    client = VLLMClient(server.url, [policy.chat.stop_id])
    contexts = prompts(policy, 4)
    with torch.no_grad():
        for parameter in policy.model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    policy.version = 1
    stale = client.generate(list(range(4)), contexts, [20] * 4, 1.0, torch.Generator().manual_seed(1))
    assert largest_gap(policy.model, contexts, stale) > 10 * TOLERANCE  # still the old weights
    seconds = sync_policy(client, policy, tmp_path)
    fresh = client.generate(list(range(4)), contexts, [20] * 4, 1.0, torch.Generator().manual_seed(1))
    assert largest_gap(policy.model, contexts, fresh) < TOLERANCE and 0 < seconds < 30
    sync_policy(client, load_policy(REFERENCE), tmp_path)  # leave the module's server as it started


def test_two_iterations_train_on_vllm_rollouts_and_the_server_then_serves_the_trained_weights(tmp_path):
    """The quickstart policy with rollout.backend vllm: batches validate, a step trains, the next collection
    samples the trained weights (served log-probs = the trainer's), episodes are what the server returned."""
    need_vllm()
    run = vllm_run(tmp_path, "vllm", 8032, "evaluation.max_tasks=2")
    try:
        first = run.collect(1)
        assert {e.sampling.backend for e in first} == {"vllm"} and {e.policy_version for e in first} == {0}
        step = run.train(first)
        assert step.skipped is None and run.policy.version == 1
        second = run.collect(2)
        assert {e.policy_version for e in second} == {1}
        metrics = run.collector.backend.take_metrics()
        assert 0 < metrics["perf/weight_sync_s"] < 30
        assert_served_log_probs_are_the_trainer_s(run.policy.model, second)  # the trained weights were served
        run.commit(1, first)
        assert run.store.read(run.run_id, 1)[0].tokens == first[0].tokens  # stored as the server returned them
    finally:
        run.close()
    assert not run.collector.backend.server.alive()


def test_a_server_that_dies_mid_run_is_restarted_and_given_the_weights_again(tmp_path):
    need_vllm()
    run = vllm_run(tmp_path, "dies", 8033, "rollout.group_size=2", "rollout.global_batch_size=4")
    try:
        run.train(run.collect(1))
        server = run.collector.backend.server
        server.process.kill()  # the server dies between collections
        server.process.wait()
        episodes = run.collect(2)  # restarted, synced to version 1, the round sent again
        assert server.alive() and {e.policy_version for e in episodes} == {1}
        assert len(episodes) == 4 and all(e.finish_reason != "env_error" for e in episodes)
        # ... and in the middle of a collection: killed as the second generation round is sent
        client, rounds, pids = run.collector.backend.client, [0], [server.process.pid]
        generate = client.generate

        def dying(*args, **kwargs):
            rounds[0] += 1
            if rounds[0] == 2:
                server.process.kill()
                server.process.wait()
            return generate(*args, **kwargs)

        client.generate = dying
        episodes = run.collect(3)
        assert rounds[0] >= 3 and server.process.pid != pids[0]  # the round was sent again to a new server
        pids.append(server.process.pid)
        assert {e.policy_version for e in episodes} == {1} and len(episodes) == 4
        assert all(e.finish_reason != "env_error" for e in episodes)
    finally:
        run.close()
    for group in pids:  # no engine or worker of any server it started lives on (their leaders were killed)
        with pytest.raises(ProcessLookupError):
            os.killpg(group, 0)


def test_a_missing_vllm_venv_is_named_with_how_to_build_it(tmp_path):
    server = VLLMServer(python=tmp_path / "nope" / "python", model=str(REFERENCE), port=8034, log_path=tmp_path / "l")
    with pytest.raises(FileNotFoundError, match="make vllm"):
        server.start()
    assert Path(tmp_path / "l").exists() is False


def test_a_server_that_exits_while_starting_is_reported_with_its_status_and_log(tmp_path):
    """This venv has no vLLM: `python -m vllm...` exits 1 at once, and the error says so with the log's tail."""
    import sys

    from rl_core.vllm.server import VLLMServerError

    server = VLLMServer(python=Path(sys.executable), model=str(REFERENCE), port=8036, log_path=tmp_path / "log")
    with pytest.raises(VLLMServerError, match=r"exited with status 1 while starting(.|\n)*No module named"):
        server.start()
    assert not server.alive()


def test_turnstile_train_runs_two_iterations_on_a_vllm_server(prefect_harness, tmp_path):
    """The train flow with rollout.backend vllm: both batches validate and train, every stored episode was
    sampled by the server (the second one after the weights of step 1 were pushed), the server is stopped."""
    need_vllm()
    from mlflow import MlflowClient

    from rl_core.store import TrajectoryStore
    from tests.test_train_flow import run_flow

    summary = run_flow(
        tmp_path, "flow-vllm", ["rollout.backend=vllm", "rollout.vllm.port=8035", "rollout.vllm.threads=1"]
    )
    assert summary["trained_steps"] == 2 and summary["skipped"] == []
    store = TrajectoryStore(tmp_path)
    for iteration, version in ((1, 0), (2, 1)):
        assert store.read_report("flow-vllm", iteration).passed
        episodes = store.read("flow-vllm", iteration)
        assert {(e.sampling.backend, e.policy_version) for e in episodes} == {("vllm", version)}
    client = MlflowClient(summary["mlflow_uri"])
    synced = client.get_metric_history(summary["mlflow_run_id"], "perf/weight_sync_s")
    assert [m.step for m in synced] == [2] and 0 < synced[0].value < 30  # one sync: before iteration 2
    mismatch = client.get_metric_history(summary["mlflow_run_id"], "train/logprob_mismatch_mean")
    assert all(m.value < 1e-3 for m in mismatch)  # the server's log-probs against the trainer's
    import httpx

    with pytest.raises(httpx.TransportError):  # the run stopped the server it started
        httpx.get("http://127.0.0.1:8035/health", timeout=2.0)


def test_overlapped_collection_samples_from_the_server_within_the_staleness_bound(tmp_path):
    """rollout.overlap_collection with the server: batch k+1 is sampled while step k trains, from the
    snapshot's weights (one step behind), and kept within algorithm.max_steps_off_policy."""
    need_vllm()
    run = vllm_run(
        tmp_path,
        "overlap",
        8036,
        "iterations=3",
        "rollout.overlap_collection=true",
        "algorithm.max_steps_off_policy=1",
        "evaluation.max_tasks=2",
        "evaluation.val_every=10",
        "validation.max_token_cap_frac=1.0",
        "validation.max_turns_unanswered_frac=1.0",
    )
    result = run.run(log=lambda _: None)  # closes the run (and stops the server) when done
    assert [r.trained for r in result.records] == [True, True, True]
    versions = [{e.policy_version for e in run.store.read("overlap", k)} for k in (1, 2, 3)]
    assert versions == [{0}, {0}, {1}]  # batch k+1 sampled by the snapshot taken before step k
    assert all(r.metrics["rollout/stale_dropped"] == 0 for r in result.records)
    assert not run.collector.backend.server.alive()


def test_a_lora_policy_s_adapter_is_hot_loaded_after_each_step(tmp_path):
    """policy.lora: the server serves the base model with LoRA on; after a step the new adapter is loaded
    under a new name (the old one unloaded) and the served log-probs are the trainer's (base + adapter)."""
    need_vllm()
    run = vllm_run(tmp_path, "lora", 8037, "policy.lora.enabled=true", "policy.lora.rank=8", "optimizer.lr=1e-2")
    try:
        assert run.train(run.collect(1)).skipped is None
        for iteration in (2, 3):
            episodes = run.collect(iteration)
            assert run.collector.backend.client.model == f"policy-v{run.policy.version}"
            assert_served_log_probs_are_the_trainer_s(run.policy.model, episodes)
            assert run.train(episodes).skipped is None
    finally:
        run.close()


def test_an_adapter_folder_cannot_be_served_and_says_what_to_do(tmp_path):
    from rl_core.vllm.backend import VLLMBackend

    (tmp_path / "adapter_config.json").write_text("{}")
    cfg = load_config(None, ["rollout.backend=vllm"])
    with pytest.raises(ValueError, match="LoRA adapter folder; the server serves a full model"):
        VLLMBackend(cfg, str(tmp_path), tmp_path / "vllm", [1])


def test_a_port_in_use_is_refused_before_starting_and_an_external_server_gets_our_weights_first(server, tmp_path):
    """A run never adopts a server it did not start on its port; a server named by rollout.vllm.url is synced
    to the run's policy before the first collection (it may serve anything)."""
    from rl_core.vllm import VLLMServerError
    from rl_core.vllm.backend import VLLMBackend

    taken = VLLMServer(python=VLLM_PYTHON, model=str(REFERENCE), port=server.port, log_path=tmp_path / "log")
    with pytest.raises(VLLMServerError, match=f"port {server.port} on 127.0.0.1 is in use"):
        taken.start()
    assert taken.process is None
    cfg = load_config(None, ["rollout.backend=vllm", f"rollout.vllm.url={server.url}"])
    backend = VLLMBackend(cfg, str(REFERENCE), tmp_path / "vllm", [1])
    policy = load_policy(REFERENCE)
    backend.token_sampler(policy, torch.Generator())
    assert backend.served_version == 0 and backend.take_metrics()["perf/weight_sync_s"] > 0
    backend.close()
    assert server.alive()  # not ours to stop


def test_changing_only_where_the_server_runs_does_not_block_continuing_a_run():
    from rl_core.runs.folder import RESUMABLE_CHANGES

    assert any("rollout.vllm.port".startswith(prefix) for prefix in RESUMABLE_CHANGES)
    assert not any("rollout.backend".startswith(prefix) for prefix in RESUMABLE_CHANGES)
