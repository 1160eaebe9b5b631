"""Expert demonstrations in the policy's own format: episodes to fine-tune on before RL (a warm start).

A real chat model rarely writes a valid tool call for an unfamiliar set of tools at first (SmolLM2-135M
never did in `benchmarks/real_model.py`), so RL from it sees no successful episode and no signal.
The usual remedy is a supervised warm start on demonstrations. Here the demonstrations are the SOP
expert's moves (rl_core/environments/expert.py) played through the ROLLOUT ENGINE with a scripted
token sampler: each move is written in the policy's own turn format (`turn_ids`: Turnstile's text
action, or a native tool call in the renderer's tool-call format, the answer as the `submit_answer`
tool), so a demonstration's tokens, loss mask and turn boundaries are laid out exactly as a rollout
of that policy (same chat template, same tool messages, same extensions). `fine_tune`
(rl_core/model/sft.py) then trains on the demonstrations' (tokens, loss_mask).
"""

from __future__ import annotations

from collections.abc import Sequence

from rl_core.environments.actions import FinalAnswer, ToolCall, parse_action
from rl_core.environments.expert import solve
from rl_core.environments.messages import AssistantTurn
from rl_core.environments.sop import ANSWER_TOOL, SOPEnvironment
from rl_core.model.generation import Generation
from rl_core.model.policy import Policy
from rl_core.model.token_sampler import TokenSampler
from rl_core.rollout import RolloutSettings, collect_rollouts
from rl_core.trajectory import Episode

# `sampling.backend` of demonstration episodes.
DEMONSTRATION_BACKEND = "demonstration"


def native_turn(action_text: str) -> AssistantTurn:
    """A Turnstile text action (`CALL tool {...}` / `ANSWER {...}`) as the structured policy turn a native
    tool-calling model writes: one tool call, the answer as the `submit_answer` tool. Raises ValueError
    for text that is neither."""
    action = parse_action(action_text)
    if isinstance(action, FinalAnswer):
        return AssistantTurn(tool_calls=(ToolCall(ANSWER_TOOL, dict(action.fields)),))
    if isinstance(action, ToolCall):
        return AssistantTurn(tool_calls=(action,))
    raise ValueError(f"not a text action (CALL or ANSWER): {action_text!r}")


def turn_ids(policy: Policy, action_text: str) -> list[int]:
    """The token ids the policy samples to take the action `action_text` in its own format, ending with
    the renderer's stop token: the text action itself for a text renderer, else the native tool call
    written by the renderer (`renderer.turn_ids(AssistantTurn)`). Raises ValueError for a renderer that
    cannot write turns."""
    renderer = policy.episode_renderer()
    if not renderer.native_tools:
        return [*policy.tokenizer.encode(action_text, add_special_tokens=False), renderer.stop_id]
    write = getattr(renderer, "turn_ids", None)
    if write is None:
        raise ValueError(f"the {renderer.name} renderer cannot write a policy turn (it has no turn_ids)")
    return list(write(native_turn(action_text)))


def scripted_token_sampler(turns: dict[int, Sequence[list[int]]]) -> TokenSampler:
    """A token sampler that answers episode key k's n-th call with `turns[k][n]` (ids, stop token included),
    each token with log-prob 0. Raises ValueError when an episode asks for more turns than scripted, or
    when a scripted turn is longer than the engine's token limit for it."""
    played = dict.fromkeys(turns, 0)

    def sample(keys: list[int], contexts: list[list[int]], limits: list[int], temperature: float) -> list[Generation]:
        out = []
        for key, limit in zip(keys, limits):
            if played[key] >= len(turns[key]):
                raise ValueError(f"demonstration {key} asked for turn {played[key] + 1}; {len(turns[key])} scripted")
            ids = list(turns[key][played[key]])
            played[key] += 1
            if len(ids) > limit:
                raise ValueError(f"demonstration {key}: a {len(ids)}-token turn is over this turn's limit ({limit})")
            out.append(Generation(ids, [0.0] * len(ids), True))
        return out

    return sample


def expert_demonstrations(
    policy: Policy, env: SOPEnvironment, tasks: Sequence, settings: RolloutSettings, *, run_id: str = "warm-start"
) -> list[Episode]:
    """One episode per task in `tasks`: the expert's moves (`solve`) in the policy's own format, played
    through the rollout engine, so tokens and loss mask are what a rollout of this policy would hold.
    Demonstrations the engine cut short (`settings` too tight: token cap, context window, max turns) are
    left out; the others end `answered` with the expert's reward."""
    scripts = {i: [turn_ids(policy, action) for action in solve(env, task).actions] for i, task in enumerate(tasks)}
    played = collect_rollouts(
        policy,
        [(env, task) for task in tasks],
        settings,
        group_size=1,
        run_id=run_id,
        iteration=0,
        token_sampler=scripted_token_sampler(scripts),
        backend=DEMONSTRATION_BACKEND,
    )
    return [episode for episode in played if episode.finish_reason == "answered"]
