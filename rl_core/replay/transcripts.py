"""Transcripts: name one episode of a stored batch and show it as text or markdown.

Contracts:
- no I/O: `pick_episode` and `render_transcript` work on the episodes they are given;
- an `EpisodeRef` names an episode either by row index or by group id and sample index
  (anything else fails its validation); `pick_episode` raises `ReplayError` if the episode
  is not there.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rl_core.replay.selection import ReplayError
from rl_core.trajectory import Episode


class EpisodeRef(BaseModel):
    """One episode of a stored batch: by row index, or by group id and sample index."""

    model_config = ConfigDict(extra="forbid")

    iteration: int = Field(..., ge=0, description="Iteration of the batch holding the episode.")
    episode: int | None = Field(None, ge=0, description="Row index of the episode in the batch (0 = first).")
    group_id: str | None = Field(None, description="Group id of the episode (with sample), instead of a row index.")
    sample: int | None = Field(None, ge=0, description="Sample index inside the group (with group_id).")

    @model_validator(mode="after")
    def _one_way(self) -> "EpisodeRef":
        by_group = self.group_id is not None or self.sample is not None
        if (self.episode is None) == (not by_group) or (by_group and (self.group_id is None or self.sample is None)):
            raise ValueError("name an episode either by `episode` (row index) or by `group_id` and `sample`")
        return self

    def describe(self) -> str:
        which = f"episode {self.episode}" if self.episode is not None else f"group {self.group_id} sample {self.sample}"
        return f"iteration {self.iteration} {which}"


def pick_episode(episodes: list[Episode], ref: EpisodeRef, label: str = "the batch") -> tuple[int, Episode]:
    """(row index, episode) that `ref` names in `episodes`; ReplayError if there is none."""
    if ref.episode is not None:
        if ref.episode >= len(episodes):
            raise ReplayError(
                f"{label} has {len(episodes)} episodes (0..{len(episodes) - 1}); episode {ref.episode} is out of range"
            )
        return ref.episode, episodes[ref.episode]
    for index, episode in enumerate(episodes):
        if episode.group_id == ref.group_id and episode.sample_index == ref.sample:
            return index, episode
    groups = sorted({e.group_id for e in episodes})
    raise ReplayError(
        f"{label} has no group {ref.group_id!r} sample "
        f"{ref.sample} (groups: {groups[:5]}{' ...' if len(groups) > 5 else ''})"
    )


def render_transcript(episode: Episode, markdown: bool = False) -> str:
    """The episode as a readable transcript: lineage, outcome, then every turn with its tool and flags."""
    facts, sections = _transcript_parts(episode)
    title = (
        f"Episode {episode.task_id}: {episode.run_id} iteration {episode.iteration}, group {episode.group_id} "
        f"sample {episode.sample_index}"
    )
    if not markdown:
        lines = [title, *(f"  {name + ':':<16}{value}" for name, value in facts)]
        for heading, text in sections:
            lines += ["", f"--- {heading} ---", text]
        return "\n".join(lines) + "\n"
    lines = [f"### {title}", "", "| | |", "|---|---|", *(f"| {name} | {_cell(value)} |" for name, value in facts)]
    for heading, text in sections:
        fence = "`" * max(3, _longest_backtick_run(text) + 1)
        lines += ["", f"**{heading}**", "", fence, text, fence]
    return "\n".join(lines) + "\n"


def _transcript_parts(ep: Episode) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    components = ", ".join(f"{k} {v:+.3f}" for k, v in ep.reward_components.items()) or "none"
    facts = [
        ("environment", ep.env_name),
        ("task", ep.task_id),
        ("policy version", str(ep.policy_version)),
        ("created", ep.created_at.isoformat()),
        ("finish reason", ep.finish_reason + (f" ({ep.env_error})" if ep.env_error else "")),
        ("reward", f"{ep.reward:.3f} ({components})"),
        ("success", "yes" if ep.success else "no"),
        ("tokens", f"{len(ep.tokens)} ({ep.prompt_tokens} prompt, {ep.response_tokens} generated)"),
        ("policy turns", str(ep.num_turns)),
        ("attempts", str(ep.attempts)),
    ]
    sections, policy_turn = [], 0
    for turn in ep.turns:
        heading = turn.role
        if turn.role == "assistant":
            policy_turn += 1
            heading = f"assistant, turn {policy_turn}" + (
                " (cut at the token cap)" if turn.finish_reason == "length" else ""
            )
        if turn.tool_name is not None or turn.tool_ok is not None:
            action = (
                f"{'call ' if turn.role == 'assistant' else ''}{turn.tool_name}" if turn.tool_name else "invalid action"
            )
            heading += f" [{action}: {'ok' if turn.tool_ok else 'FAILED'}]"
        sections.append((f"{heading} (tokens {turn.start}-{turn.end})", turn.text))
    return facts, sections


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _longest_backtick_run(text: str) -> int:
    longest = run = 0
    for char in text:
        run = run + 1 if char == "`" else 0
        longest = max(longest, run)
    return longest
