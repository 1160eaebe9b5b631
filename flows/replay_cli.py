"""The `replay` and `transcript` commands of the `turnstile` command line.

    turnstile replay RUN_ID [--first N] [--last N] [--include-quarantined] [--run-dir runs]
                     [--no-revalidate] [--validation original|current] [--config PATH]
                     [--scorer environment|strict|package.module:function] [--threshold X]
                     [--retrain] [--retrain-set KEY=VALUE ...] [--retrain-run-id ID]
                     [--transcript ITERATION:EPISODE | ITERATION:GROUP_ID#SAMPLE ...]
    turnstile replay --manifest PATH [--manifest PATH ...] [same options]
    turnstile transcript RUN_ID --iteration N [--episode INDEX | --group GROUP_ID --sample K]
                     [--run-dir runs] [--markdown]

`replay` runs the Prefect flow `turnstile-replay` (flows/replay.py) and prints a summary of
each part; `transcript` reads one episode straight from the store (no Prefect). Wire them
into a parser with `add_replay_commands(subparsers)` and dispatch with `run_replay_command(args)`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, get_args

from pydantic import ValidationError

from flows.environment import prepare_environment
from rl_core.config import config_error_line
from rl_core.replay import (
    EpisodeRef,
    ReplayError,
    ValidationThresholds,
    find_batch,
    pick_episode,
    read_episodes,
    render_transcript,
    select_batches,
)


def episode_ref(text: str) -> EpisodeRef:
    """`ITERATION:EPISODE` or `ITERATION:GROUP_ID#SAMPLE` as an EpisodeRef (argparse type)."""
    iteration, sep, rest = text.partition(":")
    group, hash_, sample = rest.rpartition("#")
    try:
        if not sep or not rest:
            raise ValueError
        if hash_:
            return EpisodeRef(iteration=int(iteration), group_id=group, sample=int(sample))
        return EpisodeRef(iteration=int(iteration), episode=int(rest))
    except (ValueError, ValidationError):
        raise argparse.ArgumentTypeError(f"{text!r} is not ITERATION:EPISODE or ITERATION:GROUP_ID#SAMPLE") from None


def add_replay_commands(subparsers: Any) -> None:
    """Add `replay` and `transcript` to an argparse subparsers object (dest must be `command`)."""
    replay = subparsers.add_parser(
        "replay", help="re-validate, re-score, re-train or show stored batches (no new rollouts)"
    )
    replay.add_argument("run_id", nargs="?", help="run whose committed batches to replay (or give --manifest)")
    replay.add_argument("--run-dir", default="runs", help="folder holding the runs (default: runs)")
    replay.add_argument("--first", type=int, dest="first_iteration", help="first iteration to replay")
    replay.add_argument("--last", type=int, dest="last_iteration", help="last iteration to replay")
    replay.add_argument("--include-quarantined", action="store_true", help="also the run's quarantined batches")
    replay.add_argument(
        "--manifest",
        action="append",
        default=[],
        dest="manifests",
        metavar="PATH",
        help="a batch's manifest, anywhere (repeatable; instead of RUN_ID)",
    )
    replay.add_argument("--no-revalidate", action="store_false", dest="revalidate", help="skip re-validation")
    replay.add_argument(
        "--validation",
        choices=get_args(ValidationThresholds),
        default="original",
        help="validation thresholds: the run's own or --config's",
    )
    replay.add_argument(
        "--config", dest="config_path", help="YAML config for --validation current (default: the shipped quickstart)"
    )
    replay.add_argument("--scorer", help="re-score with environment, strict or package.module:function")
    replay.add_argument(
        "--threshold", type=float, dest="success_threshold", help="success threshold (default: the run's)"
    )
    replay.add_argument("--retrain", action="store_true", help="train again on the committed batches into a new run")
    replay.add_argument(
        "--retrain-set",
        action="append",
        default=[],
        dest="retrain_overrides",
        metavar="KEY=VALUE",
        help="config change for re-training (repeatable)",
    )
    replay.add_argument("--retrain-run-id", help="name of the re-training run (default: RUN_ID-replay-TIME)")
    replay.add_argument(
        "--transcript",
        action="append",
        default=[],
        dest="transcripts",
        type=episode_ref,
        metavar="ITERATION:EPISODE",
        help="publish an episode's transcript (repeatable; ITERATION:GROUP_ID#SAMPLE also works)",
    )

    transcript = subparsers.add_parser("transcript", help="print one stored episode as a readable transcript")
    transcript.add_argument("run_id", help="the run")
    transcript.add_argument(
        "--iteration", type=int, required=True, help="iteration of the batch (committed, else quarantined)"
    )
    which = transcript.add_mutually_exclusive_group()
    which.add_argument("--episode", type=int, help="row index in the batch (default: 0)")
    which.add_argument("--group", dest="group_id", help="group id (with --sample)")
    transcript.add_argument("--sample", type=int, help="sample index inside --group")
    transcript.add_argument("--run-dir", default="runs", help="folder holding the runs (default: runs)")
    transcript.add_argument("--markdown", action="store_true", help="print markdown instead of plain text")


def run_replay_command(args: argparse.Namespace) -> int:
    """Run `replay` or `transcript`; returns the exit code (2 for bad input, named on stderr)."""
    try:
        return _transcript(args) if args.command == "transcript" else _replay(args)
    except (ReplayError, ValidationError, FileNotFoundError) as err:
        print(f"turnstile {args.command}: {config_error_line(err)}", file=sys.stderr)
        return 2


def _transcript(args: argparse.Namespace) -> int:
    by_group = args.group_id is not None or args.sample is not None
    ref = EpisodeRef(
        iteration=args.iteration,
        episode=None if by_group else (args.episode or 0),
        group_id=args.group_id,
        sample=args.sample,
    )
    batch = find_batch(args.run_dir, args.run_id, args.iteration)
    _, episode = pick_episode(read_episodes(batch), ref, batch.label)
    print(render_transcript(episode, markdown=args.markdown), end="")
    return 0


SETTINGS_ARGS = (
    "run_id",
    "run_dir",
    "first_iteration",
    "last_iteration",
    "include_quarantined",
    "manifests",
    "revalidate",
    "validation",
    "config_path",
    "scorer",
    "success_threshold",
    "retrain",
    "retrain_overrides",
    "retrain_run_id",
    "transcripts",
)


def _replay(args: argparse.Namespace) -> int:
    from rl_core.config import RunConfig

    # the selection is checked before prepare_environment creates anything, and that comes before Prefect is imported
    select_batches(
        args.run_dir, args.run_id, args.first_iteration, args.last_iteration, args.manifests, args.include_quarantined
    )
    prepare_environment(RunConfig(storage={"run_dir": args.run_dir}))
    from flows.replay import ReplaySettings, check_settings, replay_flow

    settings = ReplaySettings(**{name: getattr(args, name) for name in SETTINGS_ARGS})
    check_settings(settings)  # every other input is named here, before the flow starts
    print(format_summary(replay_flow(settings)))
    return 0


def format_summary(summary: dict[str, Any]) -> str:
    """What the replay flow found, part by part, for the terminal."""
    lines = [f"Replayed {len(summary['batches'])} batches: {', '.join(summary['batches'])}"]
    if summary["revalidation"] is not None:
        changed = [c for c in summary["revalidation"] if c["status"] == "changed"]
        lines += ["", f"Re-validation: {len(changed)} of {len(summary['revalidation'])} validation reports changed"]
        for c in summary["revalidation"]:
            stored = "none" if c["stored_passed"] is None else "passed" if c["stored_passed"] else "FAILED"
            now = "passed" if c["new_passed"] else "FAILED"
            where = "" if c["committed"] else " (quarantined)"
            lines.append(
                f"  iteration {c['iteration']}{where}: stored {stored}, now {now} [{c['status']}] {c['new_reason']}"
            )
    if summary["rescoring"] is not None:
        r = summary["rescoring"]
        thresholds = ", ".join(f"{threshold} ({run})" for run, threshold in r["thresholds"].items())
        lines += ["", f"Re-scoring with {r['scorer']} (success = reward >= {thresholds}):"]
        for t in [*r["per_environment"], r["total"]]:
            lines.append(
                f"  {t['env_name']:<12} {t['rescored']:>5} re-scored  successes {t['successes_before']} -> "
                f"{t['successes_after']}  "
                f"success->failure {t['success_to_failure']}  failure->success {t['failure_to_success']}  "
                f"rewards changed {t['reward_changed']}  env_error skipped {t['skipped_env_error']}  errors "
                f"{t['errors']}"
            )
        lines += [
            f"  {c['flip']}: iteration {c['iteration']} episode "
            f"{c['index']} ({c['task_id']}) reward {c['stored_reward']:.3f} "
            f"-> {c['new_reward']:.3f}"
            for c in r["examples"]
        ]
        lines += [f"  error: {e}" for e in r["errors"]]
    if summary["retraining"] is not None:
        t = summary["retraining"]
        lines += [
            "",
            f"Re-training {t['source_run_id']} into {t['run_folder']} "
            f"(changed: {', '.join(t['changed_fields']) or 'nothing'})",
        ]
        for s in t["steps"]:
            if s.get("skipped"):
                lines.append(
                    f"  iteration {s['iteration']}: no optimizer step, "
                    f"the policy stays at step {s['step']} ({s['skipped']})"
                )
                continue
            match = (
                ""
                if s["matches_original"] is None
                else f", matches original: {s['matches_original']} (max diff {s['max_abs_diff']:.3g})"
            )
            lines.append(
                f"  iteration {s['iteration']} -> step {s['step']}: loss {s['metrics']['train/loss']:.4f}{match}"
            )
        lines += [f"  skipped iteration {s['iteration']}: {s['reason']}" for s in t["skipped"]]
        lines += [f"  note: {n}" for n in t["notes"]]
    for transcript in summary["transcripts"]:
        lines += ["", transcript["text"].rstrip()]
    return "\n".join(lines)
