"""The training sections of the run config: policy (with LoRA), rollout, algorithm, optimizer, trainer.

What is trained and how: the model and its precision, how episodes are sampled, how rewards
become advantages and a loss, and how the optimizer and the training backend take the step.
Each field has a one-line description; a bad value raises pydantic's ValidationError naming
the dotted field (e.g. `rollout.max_turns`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rl_core.advantages import AdvantageMethod
from rl_core.config.choices import (
    ChatFormatName,
    DType,
    RolloutBackendName,
    ToolParserName,
    TruncatedFinishReason,
    ZeroVarianceGroups,
)
from rl_core.config.section import Section
from rl_core.losses import LossAggregation, LossFn


class LoraConfig(Section):
    enabled: bool = Field(
        False,
        description="Train low-rank adapters (peft LoRA) instead of all weights; checkpoints then hold only the "
        "adapter.",
    )
    rank: int = Field(
        32, gt=0, description="LoRA rank r of each adapter (32 for large models; small models do with 4-16)."
    )
    alpha: int = Field(64, gt=0, description="LoRA alpha; the adapter update is scaled by alpha / rank.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter input during training.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="Names of the linear layers that get adapters (Llama-style attention and MLP projections "
        "by default).",
    )


class PolicyConfig(Section):
    path: str = Field(
        "data/checkpoints/reference",
        min_length=1,
        description="Hugging Face causal LM directory (or hub id when online) to start from; ~ is expanded and "
        "relative paths are resolved against the repository root.",
    )
    context_window: int = Field(
        768,
        gt=0,
        description="Longest episode in tokens (prompt + all turns); must not exceed the model's maximum positions.",
    )
    chat_format: ChatFormatName = Field(
        "turnstile",
        description="How episodes are rendered: Turnstile's text actions between its own special tokens "
        "(turnstile) or ChatML markers (chatml), or the tokenizer's own chat template with the tools as schemas "
        "and native tool calls (hf_template, read by policy.tool_parser), or GPT-OSS's harmony format (harmony, "
        "openai_harmony library; needs policy.tool_parser harmony or auto); auto picks from the tokenizer: harmony "
        "when it has harmony's <|channel|> token, else hf_template when it has a chat template, else turnstile "
        "when it has Turnstile's role tokens, else chatml.",
    )
    tool_parser: ToolParserName = Field(
        "auto",
        description="With chat_format hf_template: the tool-call format the model writes and is parsed "
        "(hermes: <tool_call>{json}</tool_call>, Qwen and Hermes models; gemma: ```tool_code name(arg=...)```; "
        "harmony: GPT-OSS's commentary to=functions.NAME calls, only with chat_format harmony; auto: harmony for a "
        "tokenizer with <|channel|>, gemma for one with Gemma's <start_of_turn>, else hermes).",
    )
    stop_token: str | None = Field(
        None,
        description="With chat_format hf_template: the token that ends a policy turn (the template's end-of-turn "
        "marker); None = <end_of_turn> or <|im_end|> when the vocabulary has it (Gemma; ChatML, Qwen), else the "
        "tokenizer's eos token.",
    )
    dtype: DType = Field("float32", description="Parameter dtype for training and generation.")
    device: str = Field("cpu", description="Torch device for the policy: cpu, cuda, cuda:1 ...")
    lora: LoraConfig = Field(
        default_factory=LoraConfig, description="Low-rank adaptation (LoRA) of the policy; off by default."
    )

    @model_validator(mode="after")
    def _harmony_pairs(self) -> "PolicyConfig":
        if self.chat_format == "harmony" and self.tool_parser not in ("harmony", "auto"):
            raise ValueError(
                f"policy.chat_format harmony parses its own tool calls: policy.tool_parser must be harmony or auto, "
                f"not {self.tool_parser!r}"
            )
        if self.tool_parser == "harmony" and self.chat_format not in ("harmony", "auto"):
            raise ValueError(
                f"policy.tool_parser harmony needs policy.chat_format harmony or auto, not {self.chat_format!r}"
            )
        return self


class VLLMConfig(Section):
    url: str | None = Field(
        None,
        description="A running vLLM server to sample from (e.g. http://127.0.0.1:8000, started with the flags the "
        "README lists and serving the run's starting policy as 'policy'); None = Turnstile starts one itself.",
    )
    python: str = Field(
        ".venv-vllm/bin/python",
        min_length=1,
        description="The vLLM venv's interpreter (`make vllm` builds it); relative to the repository root.",
    )
    port: int = Field(8011, ge=1, le=65535, description="Port of the server Turnstile starts (on 127.0.0.1).")
    dtype: str = Field("float32", min_length=1, description="Served dtype (float32 on CPU; bfloat16 on a GPU).")
    kv_cache_gib: int = Field(1, ge=1, description="KV cache of the server Turnstile starts, GiB.")
    max_num_batched_tokens: int | None = Field(
        None, ge=1, description="Tokens per engine step (>= the longest episode); None = policy.context_window."
    )
    threads: int | None = Field(None, ge=1, description="OMP threads of the server Turnstile starts; None = inherit.")
    cpu_bind: str | None = Field(
        None,
        description="CPU cores the started server's engine binds to (VLLM_CPU_OMP_THREADS_BIND, e.g. 0-1); None = "
        "vLLM's choice, which on a 2-core machine binds it to core 0 only (measured: about 3x slower).",
    )
    extra_args: list[str] = Field(default_factory=list, description="More flags for the server Turnstile starts.")
    startup_timeout_s: float = Field(300.0, gt=0, description="Seconds to wait for the server's /health.")
    request_timeout_s: float = Field(600.0, gt=0, description="Seconds one completion request may take.")
    max_concurrency: int = Field(64, ge=1, description="Completion requests in flight at once.")


class AgentConfig(Section):
    """Rollouts played by an external agent through the OpenAI-compatible rollout gateway (rl_core/gateway/)."""

    mode: Literal["push", "pull"] = Field(
        "push",
        description="push: Turnstile starts each rollout with POST {url}/rollout; pull: agents ask the gateway for the "
        "next rollout (POST /rollouts/next).",
    )
    url: str | None = Field(
        None, description="The agent's base URL (push mode): POST {url}/rollout starts a rollout, GET {url}/health."
    )
    host: str = Field("127.0.0.1", min_length=1, description="Address the gateway binds (loopback by default).")
    port: int = Field(0, ge=0, le=65535, description="Port the gateway binds; 0 = a free port chosen at start.")
    public_url: str | None = Field(
        None,
        description="The gateway's URL as agents reach it (e.g. from a container); None = http://{host}:{port}.",
    )
    token: str | None = Field(
        None,
        description="Bearer token agents must send (passed to them in each rollout request); None = a new random "
        "token per run.",
    )
    reward_fn: str | None = Field(
        None,
        description="A Turnstile-side reward function 'package.module:function' (rollout, task) -> reward or "
        "(reward, components); when set it decides the reward and the agent's own reward is ignored.",
    )
    max_concurrency: int = Field(64, ge=1, description="Rollouts open at once.")
    batch_window_s: float = Field(
        0.05,
        ge=0,
        description="Seconds without a new model call after which the waiting calls are sampled as one batch (a "
        "batch is sampled at once when every open rollout has a call waiting; at most 20 windows in all).",
    )
    max_request_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Largest request body; above it: 413.")
    reward_wait_s: float = Field(
        30.0,
        gt=0,
        description="Seconds a rollout completed as ready waits for its reward (POST .../reward) before it ends as "
        "env_error (without rollout.agent.reward_fn).",
    )
    start_timeout_s: float = Field(10.0, gt=0, description="Seconds one POST {url}/rollout may take.")

    @model_validator(mode="after")
    def _url_for_push(self) -> AgentConfig:
        if self.mode == "push" and not self.url:
            raise ValueError("rollout.agent.url is required in push mode (or set rollout.agent.mode: pull)")
        return self


class RolloutConfig(Section):
    group_size: int = Field(8, ge=1, le=64, description="Episodes sampled per task (one group); 2-32 in practice.")
    global_batch_size: int = Field(
        32,
        ge=1,
        description="Episodes per iteration (tasks per batch x group_size); 128 in production, 32 for debugging.",
    )
    max_turns: int = Field(6, ge=1, description="Policy turns before an unanswered episode ends as max_turns.")
    max_tokens_per_turn: int = Field(
        40, ge=1, description="Token cap for one policy turn; hitting it ends the episode as token_cap."
    )
    temperature: float = Field(1.0, ge=0.0, description="Sampling temperature for training rollouts (0 = greedy).")
    timeout_s: float = Field(
        600.0, gt=0, description="Wall-clock limit for one episode; past it the episode ends as timeout."
    )
    max_retries: int = Field(
        3,
        ge=0,
        description="Retries of an environment step that raised (or, with rollout.agent, of an agent's rollout start) "
        "before the episode ends as env_error.",
    )
    generation_batch_size: int = Field(256, ge=1, description="Most sequences generated in one batched forward pass.")
    overlap_collection: bool = Field(
        False,
        description="Collect iteration k+1 (from a snapshot of the policy) while step k trains; its rollouts "
        "are then one step off-policy, so it needs algorithm.max_steps_off_policy >= 1.",
    )
    backend: RolloutBackendName = Field(
        "hf",
        description="What samples the rollouts: hf (the policy's own model in this process) or vllm (a vLLM "
        "server, rollout.vllm; the weights are pushed to it before each collection that follows a step).",
    )
    vllm: VLLMConfig = Field(default_factory=VLLMConfig, description="The vLLM server (rollout.backend: vllm).")
    agent: AgentConfig | None = Field(
        None,
        description="Rollouts played by an external agent through the rollout gateway (README: Bring your own "
        "agent); None = Turnstile's environments play them in this process.",
    )


class AlgorithmConfig(Section):
    advantage_method: AdvantageMethod = Field(
        "group_based",
        description="How advantages come from rewards (see rl_core/advantages.py): group_based = GRPO (reward "
        "minus group mean, over group std).",
    )
    normalize_advantage_std: bool = Field(
        True, description="group_based / group_based_per_turn: divide by the group's reward standard deviation."
    )
    pass_k: int = Field(
        4, ge=1, description="grpo_passk: the k whose pass@k the advantages optimise (needs group_size >= k)."
    )
    loss_fn: LossFn = Field(
        "ppo",
        description="Policy loss (see rl_core/losses.py): ratio-weighted policy gradient, PPO clipped surrogate, "
        "or CISPO (clipped stop-gradient weight times log-prob).",
    )
    loss_aggregation: LossAggregation = Field(
        "token_mean",
        description="How per-token losses add up: over all loss tokens of the batch, or per sequence then over "
        "sequences.",
    )
    clip_low_threshold: float = Field(
        0.8, ge=0.0, le=1.0, description="Lower bound on the ratio pi_new/pi_old (PPO 0.8; CISPO usually 1.0)."
    )
    clip_high_threshold: float = Field(
        1.2, ge=1.0, description="Upper bound on the ratio pi_new/pi_old (PPO 1.2; CISPO usually 6.0)."
    )
    clip_ratio_dual: float | None = Field(
        3.0,
        gt=1.0,
        description="Dual-clip bound c of ppo (Ye et al. 2020): on tokens with a negative advantage the loss "
        "is capped at -c * A however large the ratio grows; must be > 1 (None = off).",
    )
    kl_coef: float = Field(
        0.0, ge=0.0, description="Weight of a KL(pi || pi_ref) penalty against the starting policy (0 = off)."
    )
    tis_cap: float | None = Field(
        None,
        gt=0.0,
        description="Truncated importance sampling against the inference/trainer mismatch: pi_old becomes the "
        "trainer's own log-probs and each token is weighted by min(pi_trainer / pi_sampler, cap). "
        "None = off.",
    )
    max_steps_off_policy: int = Field(
        3,
        ge=0,
        description="Rollouts sampled by a policy more than this many "
        "optimizer steps old are dropped (0 = synchronous).",
    )
    zero_variance_groups: ZeroVarianceGroups = Field(
        "keep",
        description="Groups whose rewards are all equal carry no signal: keep them (their advantages are 0 but "
        "their tokens count in the loss denominator), drop them from the loss, or resample (dynamic "
        "sampling: drop them and collect more tasks until the batch is full).",
    )
    max_resample_rounds: int = Field(
        3, ge=1, description="With zero_variance_groups=resample: most extra collection rounds per iteration."
    )
    mask_truncated: list[TruncatedFinishReason] = Field(
        default_factory=list,
        description=(
            "Finish reasons that count as truncated (cut off, not judged): such episodes get no loss "
            "tokens and are left out of "
            "their group's baseline statistics, whose advantages come from the group's other members, "
            "because a cut-off "
            "attempt's reward does not judge the attempt and counting its penalty would lift wrong "
            "answers above the "
            "baseline ([] = train on them as on any episode)."
        ),
    )

    reasoning_in_loss: bool = Field(
        True,
        description="Whether the loss trains on the reasoning tokens of policy turns (a <think> block, harmony's "
        "analysis channel). The episode keeps them either way; false sets their loss mask to 0 at training time "
        "(rl_core/reasoning_mask.py), counted as train/reasoning_masked_tokens.",
    )

    @model_validator(mode="after")
    def _mask_truncated_unique(self) -> "AlgorithmConfig":
        if len(set(self.mask_truncated)) != len(self.mask_truncated):
            raise ValueError(f"algorithm.mask_truncated lists a finish reason twice: {self.mask_truncated}")
        return self


class OptimizerConfig(Section):
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, gt=0, description="Gradient norm clip.")
    micro_batch_size: int = Field(
        16,
        ge=1,
        description="Episodes per forward/backward pass; gradients accumulate over the micro-batches of one mini-batch "
        "into one optimizer step.",
    )
    mini_batches_per_step: int = Field(
        1,
        ge=1,
        description="Mini-batches each iteration's batch is split into (whole groups, in batch order; single "
        "episodes when there are fewer groups, and at most one mini-batch per episode), each taking "
        "one optimizer step; 1 = one step per batch.",
    )
    epochs_per_batch: int = Field(
        1,
        ge=1,
        description="Passes over the batch's mini-batches per iteration (PPO epochs); optimizer steps per iteration "
        "= mini-batches x epochs_per_batch, at most mini_batches_per_step x epochs_per_batch.",
    )

    @model_validator(mode="after")
    def _betas_in_range(self) -> "OptimizerConfig":
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optimizer.betas must lie in [0, 1), got {self.betas}")
        return self
