"""Policy-gradient training on a batch of episodes: one `Trainer.step` per iteration.

`Trainer.step(episodes)`:
0. with `algorithm.reasoning_in_loss` false, gives the policy turns' reasoning tokens loss mask 0
   (reasoning_mask.py; the episodes keep them);
1. selects what to train on (`select_episodes`, selection.py): drops env_error episodes,
   episodes whose reward or a reward component is not finite (never trained on, whatever the
   environment layer did), stale ones (sampled more than `max_steps_off_policy` policy
   versions before this iteration started), truncated ones listed in
   `algorithm.mask_truncated`, and, when configured, zero-variance groups (rewards all equal)
   and groups too small for grpo_passk;
2. computes advantages over what is left (`algorithm.advantage_method`, see advantages.py):
   one per policy turn, applied to that turn's generated tokens (prompt and environment
   tokens are masked); a rollout split into segments (several rows, see groups.py) counts once
   in its group's baseline (`rollout_advantages`);
3. feeds only the episodes that have loss tokens to the model, split into
   `optimizer.mini_batches_per_step` mini-batches of whole groups, each taking one optimizer
   step, for `optimizer.epochs_per_batch` passes; within a mini-batch the episodes are sorted
   by length and cut into micro-batches of `optimizer.micro_batch_size` (so short episodes are
   not padded to long ones), whose losses (`algorithm.loss_fn`, `algorithm.loss_aggregation`,
   see losses.py) use the mini-batch's denominators, so the accumulated gradient equals the
   one-big-mini-batch gradient;
4. per mini-batch: clips the gradient norm and takes an AdamW step, unless the loss or the
   gradient norm is not finite: then the step is skipped (weights and optimizer state
   untouched, a warning logged, `train/nonfinite_step` counted). `policy.version` counts the
   optimizer steps applied; the iteration's `StepMetrics` (step_metrics.py) say what happened.
Backward, clipping and the step go through a backend (model/backends.py, `trainer.backend`):
plain torch, or DeepSpeed (ZeRO) taking the same update. Padding (or, with `trainer.packing`,
packing episodes end to end, attention computed episode by episode: model/packed_attention.py)
and the forward pass that gives token log-probs live in token_batch.py. With `trainer.precision`
bf16 the forward passes run under torch.autocast(bfloat16) over float32 weights; log-probs and
the loss are float32. With several learner ranks (rl_core/distributed/), every rank runs this
same step over the same episodes and feeds only its share of each mini-batch (ranks.py), the
losses still divided by the mini-batch's totals, so the summed gradient is the one-process one.

Log-probs and entropies are those of the distribution each episode was sampled from,
softmax(logits / T), with T the episode's recorded `sampling.temperature` (see
`training_temperature`). pi_old in the ratio is the token sampler's `behavior_logprobs`, or,
with `tis_cap`, the trainer's own log-probs under the iteration's starting weights, with the
token sampler's gap as a capped per-token weight. The mismatch between the token sampler's and
the trainer's log-probs is measured on forward passes made with the iteration's starting
weights.
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch

from rl_core.advantages import compute_advantages
from rl_core.config import AlgorithmConfig, OptimizerConfig, TrainerConfig
from rl_core.distributed.ranks import Ranks, all_reduce_measures, rank_shares
from rl_core.groups import group_episodes, rollouts
from rl_core.losses import policy_loss, truncated_is_weights
from rl_core.model.backends import make_backend
from rl_core.model.packed_attention import use_packed_attention
from rl_core.model.policy import Policy
from rl_core.reasoning_mask import mask_reasoning
from rl_core.selection import length_sorted_micro_batches, select_episodes, split_mini_batches
from rl_core.step_metrics import (
    SKIPPED_STEP_METRICS,
    Measures,
    OptimizerStep,
    StepMetrics,
    add_mismatch,
    fill_step_metrics,
)
from rl_core.token_batch import batch_logprobs, micro_batch, pad_rows, rollout_turn_rewards, token_logprobs
from rl_core.trajectory import Episode

__all__ = ["SKIPPED_STEP_METRICS", "StepMetrics", "Trainer", "make_optimizer", "rollout_advantages"]

log = logging.getLogger(__name__)


def make_optimizer(policy: Policy, cfg: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters with the configured numbers."""
    params = [p for p in policy.model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def rollout_advantages(episodes: list[Episode], algorithm: AlgorithmConfig) -> list[torch.Tensor]:
    """Per row of `episodes`, its advantages (float32): one per policy turn of that row for
    `group_based_per_turn`, one value ([1]) for the episode-level methods (`algorithm.advantage_method`).

    A rollout counts once in its group's baseline, whatever number of segments it has. The rows of
    one rollout (`groups.rollouts`: rows sharing group_id and sample_index, one with segment > 0)
    enter the advantage method as one sample: its reward is its rows' reward (equal by contract;
    the last segment's if not), its generated-token count (opo's L) the sum over its rows, and its
    turn rewards the concatenation of its segments' (`token_batch.rollout_turn_rewards`, which
    credits the outcome once). Each row then gets its rollout's advantages: the one value of an
    episode-level method, or, per turn, the slice for that segment's policy turns (a segment without
    a policy turn gets [0.0]; it has no token to apply one to). A batch without a multi-segment rollout
    gives exactly (bit for bit) the advantages of its rows taken one by one. Raises ValueError as
    `compute_advantages` does (e.g. opo with a group that generated no token).
    """
    if not episodes:
        return []
    groups_of_rows = rollouts(episodes)
    segments = [[episodes[p] for p in rows] for rows in groups_of_rows]
    split_rewards = [rollout_turn_rewards(rows) for rows in segments]
    advantages = compute_advantages(
        algorithm.advantage_method,
        torch.tensor([rows[-1].reward for rows in segments], dtype=torch.float64),
        [rows[0].group_id for rows in segments],
        token_counts=torch.tensor([sum(e.response_tokens for e in rows) for rows in segments], dtype=torch.float64),
        turn_rewards=[[r for part in parts for r in part] for parts in split_rewards],
        normalize_std=algorithm.normalize_advantage_std,
        pass_k=algorithm.pass_k,
    )
    out: list[torch.Tensor | None] = [None] * len(episodes)
    for rows, parts, values in zip(groups_of_rows, split_rewards, advantages):
        if len(rows) == 1:
            out[rows[0]] = values
            continue
        per_turn, start = algorithm.advantage_method == "group_based_per_turn", 0
        for position, part in zip(rows, parts):
            if not per_turn:
                out[position] = values
            elif part:
                out[position] = values[start : start + len(part)]
            else:
                out[position] = torch.zeros(1)
            start += len(part)
    return out


class Trainer:
    """Owns the optimizer and applies training steps to `policy` in place.

    `reference` (a frozen copy of the starting model) is needed only for the KL penalty.
    `trainer_cfg` picks the backend (default: plain torch). `optimizer` has torch's
    state_dict()/load_state_dict() (AdamW's per-parameter format) for checkpoints, whatever the backend.
    `temperature` is the sampling temperature assumed for episodes that carry no `sampling`
    record (schema version 1 batches, hand-built episodes); episodes that carry one are trained
    at their own (`training_temperature`; 0 = greedy is trained as 1). Raises ValueError for a
    KL penalty without a reference or a negative / non-finite temperature.
    """

    def __init__(
        self,
        policy: Policy,
        algorithm: AlgorithmConfig,
        optimizer: OptimizerConfig,
        reference: torch.nn.Module | None = None,
        trainer_cfg: TrainerConfig | None = None,
        temperature: float = 1.0,
    ):
        self.policy, self.algorithm, self.optim_cfg = policy, algorithm, optimizer
        if algorithm.kl_coef > 0 and reference is None:
            raise ValueError("algorithm.kl_coef > 0 needs a reference model")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be finite and >= 0, got {temperature!r}")
        self.reference = reference
        self.temperature = temperature
        self.trainer_cfg = trainer_cfg = trainer_cfg or TrainerConfig()
        if trainer_cfg.packing:  # a packed row's attention computed episode by episode (model/packed_attention.py)
            use_packed_attention(policy.model)
            if reference is not None:
                use_packed_attention(reference)
        if trainer_cfg.gradient_checkpointing:
            policy.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.backend = make_backend(trainer_cfg, policy.model, make_optimizer(policy, optimizer), optimizer)
        self.optimizer = self.backend.optimizer
        self.ranks = Ranks.current() if trainer_cfg.backend == "deepspeed" else Ranks()
        if self.ranks.world_size != trainer_cfg.world_size:
            raise ValueError(
                f"trainer.num_processes x trainer.num_nodes = {trainer_cfg.world_size} learner ranks, but this process "
                f"group has {self.ranks.world_size}: a multi-rank learner is launched by rl_core.distributed "
                "(Learner does it), one Trainer per rank"
            )

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context forward passes run in: torch.autocast(bfloat16) with trainer.precision bf16 (the weights stay
        float32; token_logprobs takes log-probs in float32), else nothing."""
        if self.trainer_cfg.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(self.policy.device).type, dtype=torch.bfloat16)

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Set trainable weights by name (`named_parameters` of the policy's model) in place, in the backend's
        own copies too (ZeRO's fp32 master partitions): a rollback or a resume. Raises KeyError for a name the
        model has no trainable parameter of, ValueError for a shape that differs."""
        self.backend.load_weights(weights)

    def reset_optimizer(self) -> None:
        """Forget the optimizer's state (AdamW moments and step count): the next step is a fresh optimizer's."""
        self.backend.reset_optimizer()

    def advantages(self, episodes: list[Episode]) -> list[torch.Tensor]:
        """Per episode, one advantage per policy turn (episode-level methods give one for all turns);
        the segments of one rollout count as one sample (`rollout_advantages`).

        opo weights its baseline by generated tokens, which a group whose episodes generated none
        (e.g. all overflowed their context) does not have: such a group gets advantage 0 (it has no
        loss token to apply one to) and the other groups' advantages are unchanged.
        """
        if self.algorithm.advantage_method == "opo":
            silent = {p for g in group_episodes(episodes) if g.response_tokens == 0 for p in g.positions}
            if silent:
                kept = iter(self._advantages([e for p, e in enumerate(episodes) if p not in silent]))
                return [torch.zeros(1) if p in silent else next(kept) for p in range(len(episodes))]
        return self._advantages(episodes)

    def _advantages(self, episodes: list[Episode]) -> list[torch.Tensor]:
        return rollout_advantages(episodes, self.algorithm)

    def step(self, episodes: list[Episode]) -> StepMetrics:
        """Train on one iteration's `episodes`: `optimizer.mini_batches_per_step` x `optimizer.epochs_per_batch`
        optimizer steps (see the module docstring). Never raises for what the batch holds: a batch with
        nothing to train on, or whose every step is non-finite, returns metrics with `skipped` set."""
        reasoning_masked = 0
        if not self.algorithm.reasoning_in_loss:  # the episodes keep their reasoning; the loss leaves it out
            episodes, reasoning_masked = mask_reasoning(episodes, self.policy.episode_renderer().reasoning_spans)
        selection = select_episodes(episodes, self.algorithm, self.policy.version)
        train = selection.train
        fed = [i for i, e in enumerate(train) if e.response_tokens > 0]
        metrics = StepMetrics(
            step=self.policy.version,
            loss=0.0,
            clip_fraction=0.0,
            approx_kl=0.0,
            entropy=0.0,
            grad_norm=0.0,
            loss_tokens=sum(train[i].response_tokens for i in fed),
            episodes=len(train),
            stale_dropped=selection.stale,
            nonfinite_reward_dropped=selection.nonfinite_reward,
            truncated_masked=selection.truncated_masked,
            no_loss_token_episodes=len(train) - len(fed),
            reasoning_masked_tokens=reasoning_masked,
        )
        if not fed:
            reason = (
                selection.nothing_left_reason(self.algorithm)
                if not train
                else (f"nothing to train on: none of the {len(train)} episodes left has a generated (loss) token")
            )
            log.info("training step skipped: %s", reason)
            metrics.skipped = reason
            return metrics
        advantages = self.advantages(train)
        fed_episodes, fed_advantages = [train[i] for i in fed], [advantages[i] for i in fed]
        self._train_on(fed_episodes, fed_advantages, metrics)
        return metrics

    def _train_on(self, episodes: list[Episode], advantages: list[torch.Tensor], metrics: StepMetrics) -> None:
        """The optimizer steps of one iteration on `episodes` (all with loss tokens); fills `metrics`."""
        self.policy.model.train()
        plan = split_mini_batches(episodes, self.optim_cfg.mini_batches_per_step)
        planned = len(plan) * self.optim_cfg.epochs_per_batch
        start_logprobs, measured = None, Measures()
        if self.algorithm.tis_cap is not None and planned > 1:  # pi_old = the trainer at the iteration's start
            start_logprobs = self._start_logprobs(episodes, plan, measured)
        steps: list[OptimizerStep] = []
        for _ in range(self.optim_cfg.epochs_per_batch):
            for indices in plan:
                measure_mismatch = start_logprobs is None and not any(s.applied for s in steps)
                step = self._optimizer_step(
                    [episodes[i] for i in indices],
                    [advantages[i] for i in indices],
                    None if start_logprobs is None else [start_logprobs[i] for i in indices],
                    measure_mismatch,
                )
                steps.append(step)
                if measure_mismatch:
                    measured.mismatch_sum += step.measures.mismatch_sum
                    measured.mismatch_tokens += step.measures.mismatch_tokens
                    measured.mismatch_max = max(measured.mismatch_max, step.measures.mismatch_max)
        fill_step_metrics(metrics, steps, measured, self.policy.version)

    def _optimizer_step(
        self,
        episodes: list[Episode],
        advantages: list[torch.Tensor],
        start_logprobs: list[torch.Tensor | None] | None,
        measure_mismatch: bool,
    ) -> OptimizerStep:
        """Forward/backward one mini-batch in length-sorted micro-batches, then one optimizer step unless
        its loss or gradient norm is not finite (then nothing changes but the logged warning).

        With several ranks, this rank feeds only its share of the mini-batch (`rank_shares`) and runs as many
        forward/backward passes as the busiest rank (ZeRO's collectives run inside them); the loss and the
        statistics are added over the ranks, so every rank takes the same decision."""
        self.backend.zero_grad()
        total_tokens = sum(e.response_tokens for e in episodes)
        measures, loss = Measures(), 0.0
        chunks, passes = self._my_micro_batches([len(e.tokens) for e in episodes])
        for chunk in chunks:
            batch = micro_batch(
                [episodes[i] for i in chunk],
                [advantages[i] for i in chunk],
                self.policy.episode_renderer().pad_id,
                self.policy.device,
                self.temperature,
                packed=self.trainer_cfg.packing,
            )
            if start_logprobs is not None:
                batch["start_logprobs"] = pad_rows([start_logprobs[i] for i in chunk], batch["tokens"].shape[1]).to(
                    self.policy.device
                )
            loss += self._accumulate(batch, total_tokens, len(episodes), measures, measure_mismatch)
        for _ in range(passes - len(chunks)):
            self._idle_pass(min(episodes, key=len_tokens), backward=True)
        loss = all_reduce_measures(loss, measures, self.ranks)
        if not math.isfinite(loss):
            self.backend.discard()
            return self._skip(loss, math.nan, measures, f"non-finite loss ({loss})")
        grad_norm = self.backend.step()  # clip to grad_clip, optimizer step; the norm before clipping
        if not math.isfinite(grad_norm):
            return self._skip(loss, grad_norm, measures, f"non-finite gradient norm ({grad_norm})")
        self.policy.version += 1
        return OptimizerStep(loss, grad_norm, measures, applied=True)

    def _my_micro_batches(self, lengths: list[int], share: list[int] | None = None) -> tuple[list[list[int]], int]:
        """This rank's micro-batches of the episodes with these token `lengths` (positions into them: its share
        of whole episodes, or `share` when given; all of them with one rank), length-sorted and cut into
        `optimizer.micro_batch_size`; and the number of passes the busiest rank makes, which every rank makes."""
        size = self.optim_cfg.micro_batch_size
        if not self.ranks.many:
            chunks = length_sorted_micro_batches(lengths, size)
            return chunks, len(chunks)
        shares = rank_shares(lengths, self.ranks.world_size) if share is None else None
        mine = shares[self.ranks.rank] if shares is not None else share
        chunks = [[mine[i] for i in chunk] for chunk in length_sorted_micro_batches([lengths[i] for i in mine], size)]
        if shares is None:  # `share` given: the other ranks' counts come from the ranks themselves
            count = torch.tensor([len(chunks)], device=self.ranks.device())
            torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
            return chunks, int(count)
        return chunks, max(-(-len(s) // size) for s in shares)

    def _idle_pass(self, episode: Episode, backward: bool) -> None:
        """A forward pass (and, with `backward`, a backward pass of its loss times 0) that changes nothing: a
        rank with fewer micro-batches than the busiest one makes these so that every rank joins every
        collective ZeRO runs inside forward and backward passes (ZeRO-3 gathers weights in forward passes;
        ZeRO-2/3 reduce gradients in backward passes)."""
        tokens = torch.tensor([episode.tokens], device=self.policy.device)
        with torch.set_grad_enabled(backward), self.autocast():
            logprobs, _ = token_logprobs(self.backend.model, tokens, torch.ones_like(tokens))
        if backward:
            self.backend.backward(logprobs.sum() * 0.0)

    def _skip(self, loss: float, grad_norm: float, measures: Measures, problem: str) -> OptimizerStep:
        log.warning(
            "optimizer step skipped at policy version %d: %s; weights and optimizer state left unchanged",
            self.policy.version,
            problem,
        )
        return OptimizerStep(loss, grad_norm, measures, applied=False, problem=problem)

    def _accumulate(
        self,
        batch: dict[str, torch.Tensor],
        total_tokens: int,
        total_sequences: int,
        measures: Measures,
        measure_mismatch: bool,
    ) -> float:
        """Forward and backward one micro-batch (gradients add up across micro-batches); returns its loss."""
        a = self.algorithm
        with self.autocast():
            logprobs, entropy = batch_logprobs(self.backend.model, batch)
        mask, behavior = batch["mask"], batch["old_logprobs"]
        if measure_mismatch:
            add_mismatch(logprobs.detach(), behavior, mask, measures)
        old, is_weights = behavior, None
        if (
            a.tis_cap is not None
        ):  # pi_old = the trainer's own log-probs; the token sampler's gap becomes a capped weight
            old = batch.get("start_logprobs", logprobs.detach())
            is_weights = truncated_is_weights(old, behavior, mask, a.tis_cap)
        reference = None
        if a.kl_coef > 0:
            with torch.no_grad(), self.autocast():
                reference, _ = batch_logprobs(self.reference, batch)
        loss, stats = policy_loss(
            a.loss_fn,
            logprobs,
            old,
            batch["advantages"],
            mask,
            clip_low=a.clip_low_threshold,
            clip_high=a.clip_high_threshold,
            aggregation=a.loss_aggregation,
            total_tokens=total_tokens,
            total_sequences=total_sequences,
            is_weights=is_weights,
            ref_logprobs=reference,
            kl_coef=a.kl_coef,
            clip_ratio_dual=a.clip_ratio_dual,
        )
        self.backend.backward(loss)
        measures.stats = measures.stats + stats
        measures.entropy_sum += float((entropy * mask).sum())
        return float(loss.detach())

    def _start_logprobs(
        self, episodes: list[Episode], plan: list[list[int]], measured: Measures
    ) -> list[torch.Tensor | None]:
        """The log-probs [len(tokens)] under the iteration's starting weights (no gradient) of every episode this
        rank trains on in the mini-batches of `plan` (None for the others' episodes), for tis_cap's pi_old across
        several optimizer steps; measures the token-sampler mismatch on the way (added over the ranks)."""
        out: list[torch.Tensor | None] = [None] * len(episodes)
        zeros = [torch.zeros(1)] * len(episodes)
        lengths = [len(e.tokens) for e in episodes]
        mine = list(range(len(episodes)))
        if self.ranks.many:
            mine = sorted(
                indices[i]
                for indices in plan
                for i in rank_shares([lengths[j] for j in indices], self.ranks.world_size)[self.ranks.rank]
            )
        chunks, passes = self._my_micro_batches(lengths, mine if self.ranks.many else None)
        for chunk in chunks:
            batch = micro_batch(
                [episodes[i] for i in chunk],
                [zeros[i] for i in chunk],
                self.policy.episode_renderer().pad_id,
                self.policy.device,
                self.temperature,
                packed=self.trainer_cfg.packing,
            )
            with torch.no_grad(), self.autocast():
                logprobs, _ = batch_logprobs(self.backend.model, batch)
            add_mismatch(logprobs, batch["old_logprobs"], batch["mask"], measured)
            for row, i in enumerate(chunk):
                out[i] = logprobs[row, : len(episodes[i].tokens)].cpu()
        for _ in range(passes - len(chunks)):
            self._idle_pass(min(episodes, key=len_tokens), backward=False)
        all_reduce_measures(0.0, measured, self.ranks)
        return out


def len_tokens(episode: Episode) -> int:
    """An episode's length in tokens (prompt, generated and environment tokens)."""
    return len(episode.tokens)
