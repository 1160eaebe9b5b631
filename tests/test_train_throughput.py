"""benchmarks/train_throughput.py (issue 16, item 3) in a reduced mode: what it counts and where its batches come from.

The benchmark's figures are only as good as its counts: the real tokens of every forward pass (no padding),
the cells fed and the attention pairs, in both layouts, and both modes doing the same work on the same
weights (the same loss). A quickstart batch of 16 episodes (group 4) keeps this to seconds on one thread.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from rl_core.config import load_config
from rl_core.model.packed_attention import use_packed_attention
from rl_core.store import TrajectoryStore
from rl_core.token_batch import batch_logprobs, micro_batch

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL = ["rollout.global_batch_size=16", "rollout.group_size=4"]


def load_benchmark():
    """benchmarks/train_throughput.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("train_throughput", REPO_ROOT / "benchmarks" / "train_throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def benchmark():
    return load_benchmark()


@pytest.fixture(scope="module")
def collected(benchmark):
    """One small quickstart batch collected with the reference policy, and that policy."""
    cfg = load_config(None, SMALL)
    batches, start = benchmark.collected_batches(cfg, 1)
    return cfg, batches, start


@pytest.mark.parametrize("packed, episode_attention", [(False, False), (True, False), (True, True)])
def test_input_counter_counts_real_tokens_cells_and_attention_pairs(benchmark, collected, packed, episode_attention):
    _, batches, start = collected
    if episode_attention:  # what trainer.packing sets: a packed row's attention computed episode by episode
        start = copy.deepcopy(start)
        use_packed_attention(start.model)
    episodes = batches[0][:5]
    lengths = [len(e.tokens) for e in episodes]
    assert len(set(lengths)) > 1  # some padding in the padded layout
    batch = micro_batch(episodes, [torch.zeros(1)] * len(episodes), 0, torch.device("cpu"), packed=packed)
    counter = benchmark.InputCounter(start.model)
    with torch.no_grad():
        batch_logprobs(start.model, batch)
    counter.close()
    assert counter.tokens == sum(lengths)
    assert counter.episode_attention_cells == sum(n * n for n in lengths)
    if packed:
        assert counter.cells == sum(lengths)
        assert counter.attention_cells == (sum(n * n for n in lengths) if episode_attention else sum(lengths) ** 2)
    else:
        assert counter.cells == len(lengths) * max(lengths)
        assert counter.attention_cells == len(lengths) * max(lengths) ** 2
    with torch.no_grad():  # the hook is gone once closed
        batch_logprobs(start.model, batch)
    assert counter.tokens == sum(lengths)


def test_both_modes_train_the_same_tokens_to_the_same_loss(benchmark, collected):
    cfg, batches, start = collected
    before = [p.detach().clone() for p in start.model.parameters()]
    (comparison,) = benchmark.compare(cfg, start, batches, micro_batch_sizes=[4], repeats=2)
    padded, packed = comparison.results["padded"], comparison.results["packed"]
    assert len(padded) == len(packed) == 2
    fed = sum(len(e.tokens) for e in batches[0] if e.response_tokens > 0)
    for a, b in zip(padded, packed):
        assert a.tokens == b.tokens and 0 < a.tokens <= fed
        assert a.steps == b.steps == 1 and a.seconds > 0 and b.seconds > 0
        assert b.padding_fraction == 0 and 0 < a.padding_fraction < 1
        assert a.episode_attention_cells == b.episode_attention_cells
    loss_abs, loss_rel = comparison.max_difference("losses")
    assert loss_rel < 1e-5, (loss_abs, loss_rel)
    assert comparison.max_difference("grad_norms")[1] < 1e-4
    assert padded[0].losses == padded[1].losses  # every repeat starts from the same weights
    assert comparison.ratio > 0
    # the starting policy is deep-copied for every step, never trained itself
    assert all(torch.equal(p, q) for p, q in zip(before, start.model.parameters()))


def test_stored_batches_come_from_a_run_folder_or_a_store_root(benchmark, collected, tmp_path):
    _, batches, _ = collected
    episodes = batches[0]
    run_id = episodes[0].run_id
    TrajectoryStore(tmp_path).commit(run_id, episodes[0].iteration, episodes)
    for path in (tmp_path / run_id, tmp_path):
        read, source = benchmark.stored_batches(path, 1)
        assert [e.tokens for e in read[0]] == [e.tokens for e in episodes]
        assert run_id in source
    with pytest.raises(SystemExit, match="no run folder there with 2 committed"):
        benchmark.stored_batches(tmp_path, 2)
    with pytest.raises(SystemExit, match="--runs"):
        benchmark.stored_batches(tmp_path / "missing", 1)
