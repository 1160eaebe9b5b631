"""A group: the `group_size` episodes sampled for one task in one iteration, compared with each other.

Group-relative methods (GRPO and its kin, see advantages.py) score an episode against the other
members of its group, so the group, not the episode, is the unit the trainer selects, splits and
reports on. On disk and in `Episode` a group is the `group_id` string column (data contract of
the trajectory store, unchanged); in memory `group_episodes` turns a list of episodes into
`Group`s once, and everything that asks "which episodes belong together" asks a `Group`.

A zero-variance group is one whose rewards are all equal (a group of one included): its
group-relative advantages are 0, so it carries no learning signal.

A rollout is one attempt at the group's task, identified by (`group_id`, `sample_index`). It is
usually one row, but an external agent's rollout whose model calls could not all be stitched into
one token sequence is several rows, its segments (`Episode.segment` 0, 1, ...), each carrying the
rollout's outcome. `rollouts` finds them, so that a rollout counts once in its group's baseline and
in the batch's per-rollout metrics, whatever number of segments it has.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from rl_core.trajectory import Episode


def make_group_id(run_id: str, iteration: int, number: int, task_id: str) -> str:
    """The `group_id` the rollout engine gives a group: "<run_id>/<iteration>/<number>/<task_id>".

    `number` counts the groups of an iteration's collections (several collections of one
    iteration never share a number). The id is an opaque key: nothing parses it back.
    """
    return f"{run_id}/{iteration}/{number}/{task_id}"


@dataclass(frozen=True)
class Group:
    """The episodes of one group, in the order they came in, and what they share.

    index: the group's position in the list `group_episodes` returned (0-based, groups in order
        of first appearance), a dense index for per-group arrays.
    group_id: the episodes' `group_id`.
    iteration, env_name, task_id: those of its first episode (the rollout engine gives every
        member of a group the same ones).
    episodes: its members, at least one, all with `group_id`.
    positions: where each member sits in the list `group_episodes` was given (same order as
        `episodes`).

    Raises ValueError for no episodes, a member with another `group_id`, or positions that do
    not match the episodes one for one.
    """

    index: int
    group_id: str
    iteration: int
    env_name: str
    task_id: str
    episodes: tuple[Episode, ...]
    positions: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.episodes:
            raise ValueError(f"group {self.group_id!r} has no episodes")
        if len(self.positions) != len(self.episodes):
            raise ValueError(
                f"group {self.group_id!r}: {len(self.positions)} positions for {len(self.episodes)} episodes"
            )
        strangers = sorted({e.group_id for e in self.episodes if e.group_id != self.group_id})
        if strangers:
            raise ValueError(f"group {self.group_id!r} holds episodes of other groups: {strangers}")

    @property
    def size(self) -> int:
        """Number of episodes in the group."""
        return len(self.episodes)

    @property
    def rewards(self) -> tuple[float, ...]:
        """Each member's reward, in member order."""
        return tuple(e.reward for e in self.episodes)

    @property
    def zero_variance(self) -> bool:
        """True when every member's reward is the same (exactly; a group of one too): no learning signal."""
        return len(set(self.rewards)) == 1

    @property
    def all_correct(self) -> bool:
        """True when every member succeeded (`Episode.success`)."""
        return all(e.success for e in self.episodes)

    @property
    def response_tokens(self) -> int:
        """Generated (loss) tokens of all members together."""
        return sum(e.response_tokens for e in self.episodes)


def group_episodes(episodes: Iterable[Episode]) -> list[Group]:
    """`episodes` grouped by `group_id`: the one place episodes are gathered into groups.

    Stable: groups in order of their first episode, members in the order given (members need not
    be adjacent). An empty input gives []. `Group.index` numbers the result from 0 and
    `Group.positions` says where each member sat in `episodes`.
    """
    members: dict[str, list[int]] = {}
    listed = list(episodes)
    for position, episode in enumerate(listed):
        members.setdefault(episode.group_id, []).append(position)
    groups = []
    for index, (group_id, positions) in enumerate(members.items()):
        first = listed[positions[0]]
        groups.append(
            Group(
                index=index,
                group_id=group_id,
                iteration=first.iteration,
                env_name=first.env_name,
                task_id=first.task_id,
                episodes=tuple(listed[p] for p in positions),
                positions=tuple(positions),
            )
        )
    return groups


def episodes_of(groups: Iterable[Group]) -> list[Episode]:
    """The members of `groups`, group after group, each group's members in order."""
    return [e for g in groups for e in g.episodes]


def rollouts(episodes: Sequence[Episode]) -> list[tuple[int, ...]]:
    """The rows of each rollout in `episodes`, as positions in `episodes`, each rollout's in segment order.

    The rows sharing (`group_id`, `sample_index`) are the segments of one rollout when one of them
    has segment > 0. A (`group_id`, `sample_index`) whose rows are all segment 0 gives one rollout per
    row, so a batch without segments gives [(0,), (1,), ..., (N - 1,)], even one that repeats a
    sample_index (as hand-built batches do). Stable: rollouts in order of their first row in
    `episodes`; a rollout's rows ordered by segment, rows with the same segment in the order given.
    An empty input gives [].
    """
    by_key: dict[tuple[str, int], list[int]] = {}
    for position, episode in enumerate(episodes):
        by_key.setdefault((episode.group_id, episode.sample_index), []).append(position)
    segmented = {key for key, positions in by_key.items() if any(episodes[p].segment > 0 for p in positions)}
    out: list[tuple[int, ...]] = []
    for position, episode in enumerate(episodes):
        key = (episode.group_id, episode.sample_index)
        if key not in segmented:
            out.append((position,))
        elif by_key[key][0] == position:  # the rollout's first row in `episodes`
            out.append(tuple(sorted(by_key[key], key=lambda p: episodes[p].segment)))
    return out
