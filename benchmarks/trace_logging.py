"""What logging episodes as MLflow traces costs (tasks/traces.py): time to build and write N traces, and store growth.

Reads one stored trajectory batch of a real run (`--batch`, default: the first `iteration-000001.parquet` under
`--runs`, e.g. after `make demo`), then for each N in `--counts` and each of `--repeats` repeats: a fresh SQLite
MLflow store, one batch of N traces built (`build_trace`) and written (`log_traces`), then 3 more batches to see
steady growth. Prints the median build and write times (ms) of the first batch and the store's growth per trace
(KiB, over the 4 batches).

    python benchmarks/trace_logging.py [--runs runs] [--batch PATH] [--counts 4 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rl_core.trajectory import table_to_episodes  # noqa: E402
from tasks.traces import TraceContext, build_trace, log_traces  # noqa: E402
from tasks.tracking import Tracker  # noqa: E402

BATCHES = 4  # the first batch is timed; all four measure growth


def _batch(args: argparse.Namespace) -> Path:
    if args.batch:
        return Path(args.batch)
    found = sorted(Path(args.runs).glob("*/trajectories/iteration-000001.parquet"))
    if not found:
        sys.exit(f"no iteration-000001.parquet under {args.runs}/*/trajectories: run `make demo` or pass --batch")
    return found[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--batch", default=None)
    parser.add_argument("--counts", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    batch = _batch(args)
    episodes = table_to_episodes(pq.read_table(batch))
    turns = sum(len(e.turns) for e in episodes) / len(episodes)
    print(f"{len(episodes)} episodes from {batch}, {turns:.1f} turns each on average")
    for count in args.counts:
        build_ms, write_ms, growth_kib = [], [], []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory(prefix="trace-bench-") as scratch:
                store = Path(scratch) / "mlflow.db"
                client = MlflowClient(f"sqlite:///{store}")
                experiment = client.create_experiment("bench", artifact_location=(Path(scratch) / "art").as_uri())
                run = client.create_run(experiment).info.run_id
                tracker = Tracker(f"sqlite:///{store}", run, experiment)
                before = store.stat().st_size
                for iteration in range(1, BATCHES + 1):
                    started = time.perf_counter()
                    context = TraceContext("bench", "train", iteration)
                    traces = [build_trace(e, context, experiment, run) for e in episodes[:count]]
                    built = time.perf_counter()
                    log_traces(tracker, traces)
                    if iteration == 1:
                        build_ms.append((built - started) * 1000)
                        write_ms.append((time.perf_counter() - built) * 1000)
                growth_kib.append((store.stat().st_size - before) / (BATCHES * count) / 1024)
        print(
            f"N={count:3d}: build {statistics.median(build_ms):.1f} ms, write {statistics.median(write_ms):.1f} ms "
            f"(median of {args.repeats}); store growth {statistics.median(growth_kib):.1f} KiB per trace"
        )


if __name__ == "__main__":
    main()
