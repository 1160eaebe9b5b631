"""Training tokens/s with padded against packed micro-batches (`trainer.packing`, issue 16 item 3).

The batches are real episodes of the quickstart (data/configs/quickstart.yaml, reference checkpoint
data/checkpoints/reference): the first `--iterations` committed batches of a stored run (`--runs`: a
run folder, or a store root holding run folders, e.g. `runs` after `make demo`), or, without `--runs`,
`--iterations` batches collected here by the run's collector with the starting policy. For each
`--micro-batch-sizes` value and each of `--repeats` repeats, one `Trainer.step` per batch runs in each
mode, padded then packed (ABAB: machine noise hits both), each from a fresh deep copy of the same
starting policy and a fresh optimizer, so both modes do the same work on the same weights.

Reported per mode (medians over the repeats): training tokens/s, where the tokens are the real tokens
fed to forward passes (the episodes' lengths, counted by a forward pre-hook on the model: padding is
not counted), and seconds per `Trainer.step`; the padded mode's padding fraction (padded cells /
total cells of its [batch, width] inputs); the packed/padded ratio (median of the per-repeat ratios);
and the largest difference of the step's loss and gradient norm between the modes (the same to float
tolerance: packing changes no number the update uses).

    python benchmarks/train_throughput.py [--runs DIR] [--iterations 1] [--micro-batch-sizes 16 4]
                                          [--repeats 3] [--threads 2] [--config PATH] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rl_core.config import RunConfig, load_config  # noqa: E402
from rl_core.learner import load_start_policy, make_trainer  # noqa: E402
from rl_core.model.packed_attention import PREFIX as PACKED_ATTENTION  # noqa: E402
from rl_core.model.policy import Policy  # noqa: E402
from rl_core.run import TrainingRun  # noqa: E402
from rl_core.store import TrajectoryStore  # noqa: E402
from rl_core.store.trajectory_store import TRAJECTORIES_DIR  # noqa: E402
from rl_core.trajectory import Episode  # noqa: E402

MODES = ("padded", "packed")
WARMUP_EPISODES = 16


@dataclass
class StepResult:
    """One `Trainer.step` per batch in one mode: seconds (wall clock, all batches), real tokens fed to forward
    passes, input cells fed (real tokens + padding), attention pairs computed and those within episodes
    (`InputCounter`), and each batch's loss and gradient norm."""

    seconds: float = 0.0
    tokens: int = 0
    cells: int = 0
    attention_cells: int = 0
    episode_attention_cells: int = 0
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / self.steps

    @property
    def padding_fraction(self) -> float:
        """Padded cells / all cells of the forward passes' inputs (0 when packed)."""
        return (self.cells - self.tokens) / self.cells

    @property
    def attention_excess(self) -> float:
        """Attention pairs computed / pairs within episodes (1 = no pair wasted on padding or across episodes)."""
        return self.attention_cells / self.episode_attention_cells


@dataclass
class Comparison:
    """Every repeat of both modes at one micro-batch size; `results[mode][repeat]`."""

    micro_batch_size: int
    results: dict[str, list[StepResult]] = field(default_factory=lambda: {mode: [] for mode in MODES})

    def median(self, mode: str, attribute: str) -> float:
        return statistics.median(getattr(r, attribute) for r in self.results[mode])

    @property
    def ratio(self) -> float:
        """Median over repeats of packed tokens/s / padded tokens/s (each repeat's pair measured back to back)."""
        pairs = zip(self.results["padded"], self.results["packed"])
        return statistics.median(packed.tokens_per_second / padded.tokens_per_second for padded, packed in pairs)

    def max_difference(self, attribute: str) -> tuple[float, float]:
        """Largest |packed - padded| of a per-batch value ("losses" or "grad_norms") over all repeats, and
        the same relative to |padded|."""
        absolute, relative = 0.0, 0.0
        for padded, packed in zip(self.results["padded"], self.results["packed"]):
            for a, b in zip(getattr(padded, attribute), getattr(packed, attribute)):
                absolute = max(absolute, abs(b - a))
                relative = max(relative, abs(b - a) / max(abs(a), 1e-30))
        return absolute, relative


class InputCounter:
    """Counts what every forward pass of `model` is fed (a forward pre-hook on input_ids [rows, width]):
    - cells: input_ids.numel(); real tokens: attention_mask.sum(), or all cells without an attention mask
      (the packed layout, which has no padding);
    - attention cells: the query x key pairs the attention layers compute: rows x width^2 (sdpa and eager
      attention compute every pair of a row, masked or not), except for a packed row under Turnstile's packed
      attention (rl_core/model/packed_attention.py, which `trainer.packing` sets) or flash-attention, which
      compute each episode's own pairs; and the pairs within episodes, the sum of the episodes' length^2 (the
      episodes of a packed row are where `position_ids` restart at 0)."""

    def __init__(self, model: torch.nn.Module):
        self.tokens = self.cells = self.attention_cells = self.episode_attention_cells = 0
        self.handle = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
        rows, width = ids.shape
        self.cells += ids.numel()
        self.attention_cells += rows * width**2
        if mask is not None:
            self.tokens += int(mask.sum())
            self.episode_attention_cells += int((mask.sum(1) ** 2).sum())
        else:
            self.tokens += ids.numel()
            starts = torch.nonzero(positions[0] == 0).flatten().tolist() if positions is not None else [0]
            lengths = torch.diff(torch.tensor(starts + [width]))
            self.episode_attention_cells += int((lengths**2).sum())
            implementation = getattr(module.config, "_attn_implementation", None) or ""
            if implementation.startswith((PACKED_ATTENTION, "flash_attention")):  # episode by episode
                self.attention_cells += int((lengths**2).sum()) - rows * width**2

    def close(self) -> None:
        self.handle.remove()


def stored_batches(path: Path, iterations: int) -> tuple[list[list[Episode]], str]:
    """The first `iterations` committed batches of a stored run, read and verified through `TrajectoryStore`.

    `path` is a run folder (holding trajectories/) or a store root holding run folders (the first run,
    by name, with enough committed batches). Returns the batches and a description of where they came from.
    Raises SystemExit naming the path when it holds no run with `iterations` committed batches."""
    if (path / TRAJECTORIES_DIR).is_dir():
        candidates = [(path.parent, path.name)]
    else:
        candidates = [(path, run.name) for run in sorted(path.glob("*")) if (run / TRAJECTORIES_DIR).is_dir()]
    for root, run_id in candidates:
        store = TrajectoryStore(root)
        committed = store.iterations(run_id)
        if len(committed) >= iterations:
            chosen = committed[:iterations]
            return [store.read(run_id, i) for i in chosen], f"run {root / run_id}, iterations {chosen}"
    sys.exit(
        f"--runs {path}: no run folder there with {iterations} committed batch(es) under {TRAJECTORIES_DIR}/ "
        "(run `make demo`, or leave out --runs to collect batches here)"
    )


def collected_batches(cfg: RunConfig, iterations: int) -> tuple[list[list[Episode]], Policy]:
    """`iterations` batches collected by a fresh run's collector (`TrainingRun.collect`, in a temporary run
    folder) with the starting policy, no training in between; returns them and that starting policy."""
    with tempfile.TemporaryDirectory(prefix="train-throughput-") as run_dir:
        run = TrainingRun(cfg.model_copy(update={"storage": cfg.storage.model_copy(update={"run_dir": run_dir})}))
        try:
            batches = [run.collect(iteration) for iteration in range(1, iterations + 1)]
        finally:
            run.close()
    return batches, run.policy


def timed_steps(cfg: RunConfig, start: Policy, batches: list[list[Episode]]) -> StepResult:
    """One `Trainer.step` (the config's trainer) per batch, each from a deep copy of `start` with a fresh
    optimizer; only the steps are timed (copies and trainer construction are not)."""
    result = StepResult()
    for episodes in batches:
        policy = copy.deepcopy(start)
        policy.version = max(e.policy_version for e in episodes)  # a stored run's later batches are not stale
        trainer = make_trainer(cfg, policy)
        counter = InputCounter(trainer.backend.model)
        started = time.perf_counter()
        metrics = trainer.step(episodes)
        result.seconds += time.perf_counter() - started
        counter.close()
        if metrics.skipped:
            raise RuntimeError(f"Trainer.step took no optimizer step: {metrics.skipped}")
        result.tokens += counter.tokens
        result.cells += counter.cells
        result.attention_cells += counter.attention_cells
        result.episode_attention_cells += counter.episode_attention_cells
        result.steps += 1
        result.losses.append(metrics.loss)
        result.grad_norms.append(metrics.grad_norm)
    return result


def mode_config(cfg: RunConfig, mode: str, micro_batch_size: int) -> RunConfig:
    """`cfg` with trainer.packing for `mode` ("padded" or "packed") and optimizer.micro_batch_size set."""
    return cfg.model_copy(
        update={
            "trainer": cfg.trainer.model_copy(update={"packing": mode == "packed"}),
            "optimizer": cfg.optimizer.model_copy(update={"micro_batch_size": micro_batch_size}),
        }
    )


def compare(
    cfg: RunConfig, start: Policy, batches: list[list[Episode]], micro_batch_sizes: list[int], repeats: int
) -> list[Comparison]:
    """Every repeat, every micro-batch size: padded then packed (`timed_steps`), interleaved (ABAB), after one
    untimed warm-up step of each mode on the first batch's first `WARMUP_EPISODES` episodes."""
    comparisons = [Comparison(size) for size in micro_batch_sizes]
    for mode in MODES:
        timed_steps(mode_config(cfg, mode, micro_batch_sizes[0]), start, [batches[0][:WARMUP_EPISODES]])
    for repeat in range(repeats):
        for comparison in comparisons:
            for mode in MODES:
                result = timed_steps(mode_config(cfg, mode, comparison.micro_batch_size), start, batches)
                comparison.results[mode].append(result)
                print(
                    f"repeat {repeat + 1}/{repeats} micro_batch_size={comparison.micro_batch_size} {mode}: "
                    f"{result.tokens_per_second:,.0f} tokens/s, {result.seconds_per_step:.2f} s/step, "
                    f"loss {result.losses[0]:.6f}",
                    flush=True,
                )
    return comparisons


def print_table(comparisons: list[Comparison], repeats: int) -> None:
    print(
        f"\n| micro-batch size | mode | tokens/s (median of {repeats}) | s / Trainer.step | padding fraction "
        "| attention pairs / within-episode pairs | packed / padded tokens/s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for c in comparisons:
        for mode in MODES:
            ratio = f"{c.ratio:.3f}" if mode == "packed" else ""
            print(
                f"| {c.micro_batch_size} | {mode} | {c.median(mode, 'tokens_per_second'):,.0f} | "
                f"{c.median(mode, 'seconds_per_step'):.2f} | {c.median(mode, 'padding_fraction'):.3f} | "
                f"{c.median(mode, 'attention_excess'):.2f} | {ratio} |"
            )
    for c in comparisons:
        loss_abs, loss_rel = c.max_difference("losses")
        grad_abs, grad_rel = c.max_difference("grad_norms")
        print(
            f"micro_batch_size={c.micro_batch_size}: max |loss packed - loss padded| = {loss_abs:.2e} "
            f"({loss_rel:.1e} relative); max |grad norm packed - padded| = {grad_abs:.2e} ({grad_rel:.1e} relative)"
        )


def main(argv: list[str] | None = None) -> list[Comparison]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=None, help="a run folder or a store root of stored runs")
    parser.add_argument("--iterations", type=int, default=1, help="batches: one Trainer.step each per mode")
    parser.add_argument("--micro-batch-sizes", type=int, nargs="+", default=[16, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--config", default=None, help="run config (default: data/configs/quickstart.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.iterations < 1 or args.repeats < 1 or min(args.micro_batch_sizes) < 1:
        parser.error("--iterations, --repeats and --micro-batch-sizes must be at least 1")
    torch.set_num_threads(args.threads)

    cfg = load_config(args.config, args.overrides)
    started = time.perf_counter()
    if args.runs is not None:
        batches, source = stored_batches(args.runs, args.iterations)
        start = load_start_policy(cfg)
    else:
        batches, start = collected_batches(cfg, args.iterations)
        source = f"{args.iterations} batch(es) collected with the starting policy {cfg.policy.path}"
    lengths = [len(e.tokens) for episodes in batches for e in episodes]
    print(
        f"{len(lengths)} episodes from {source} ({time.perf_counter() - started:.0f}s); tokens per episode: "
        f"min {min(lengths)}, median {statistics.median(lengths):.0f}, max {max(lengths)}; "
        f"{args.threads} torch threads",
        flush=True,
    )
    comparisons = compare(cfg, start, batches, args.micro_batch_sizes, args.repeats)
    print_table(comparisons, args.repeats)
    return comparisons


if __name__ == "__main__":
    main()
