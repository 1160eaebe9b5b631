"""GPU check (issue 16, item 4): bf16 training and in-process generation throughput of Qwen3-shaped models,
through Turnstile's own trainer and decoder, with model FLOPs utilisation (MFU).

Per model (`MODELS`: random init from the Qwen3-0.6B and Qwen3-4B config.json numbers, no download):

1. Training: `rl_core.trainer.Trainer.step` (trainer.backend torch, trainer.precision bf16: autocast over
   float32 master weights, AdamW) on one batch of random-token episodes built like tests/test_trainer.py's
   `make_episodes` (prompt, generated span, observation, generated span; loss mask 1 on the generated
   spans): 16 episodes (2 groups of 8) of 1024-4096 tokens (`GPU_WORKLOAD`), micro-batches of 2 episodes,
   once padded (trainer.packing false) and once packed (true). The 4B model trains with
   trainer.gradient_checkpointing (fp32 weights + gradients + AdamW's two moments are 16 bytes/parameter =
   64 GB before activations).
   `--warmup` untimed steps, then up to `--steps` timed ones (fewer when the time budget says so), each
   bracketed by torch.cuda.synchronize. Reported: parameter count N, training tokens/s (episode tokens;
   padding is not counted), MFU, peak GPU memory (torch.cuda.max_memory_allocated), seconds per step.
2. Generation: `rl_core.model.token_sampler.hf_token_sampler` (the rollout's in-process decoder,
   generation.BatchDecoder with its KV cache) continuing 64 random prompts of 512 tokens at temperature 1:
   one call with a limit of 1 token (the prefill), then one continuing every sequence for up to 255 more
   (the decode), as a rollout's next turn does. Reported: prefill tokens/s and decode (generated) tokens/s,
   with the float32 weights training leaves (as the in-process rollout runs today) and with the model cast
   to bfloat16. First, `decoder_check` compares the decoder's log-probs with a full forward pass (a decoder
   whose KV cache is silently unused would otherwise report a meaningless rate).

MFU = achieved model FLOP/s / the GPU's dense bf16 peak (`PEAK_BF16_FLOPS`, NVIDIA datasheets, the
with-sparsity figures halved: H100 SXM and H200 989.4 TFLOP/s). Model FLOPs of one training step over
episodes of lengths s_i (`training_flops`): 6 * N * sum(s_i) (forward 2N + backward 4N per token; Kaplan et
al. 2020; with tied embeddings, as both Qwen3 configs have, N counts the LM head's matrix once and the
embedding lookup does no matmul, so 6N is exact for the matmuls) plus the attention scores and values,
6 * L * H * Q * sum(s_i^2) (L layers, H query heads, Q head_dim; PaLM's 12 * L * H * Q * s per token,
Chowdhery et al. 2022 appendix B, halved for the causal mask). Both MFU figures are printed: "mfu_6n"
(6N only) and "mfu" (with attention). Gradient checkpointing's recomputed forward is hardware work, not
model FLOPs, so it lowers MFU. The script also times an 8192^3 bf16 matmul (torch.matmul) as the
machine's reachable ceiling. An unknown GPU prints MFU n/a with the reason; so does a CPU run.

Run (from the repo root) on a machine with a CUDA GPU. The `device` machine (H200) lacks pydantic,
jsonschema and openai_harmony (rl_core imports them), and has transformers 5.17, whose models take
`past_key_values` where rl_core's decoder passes 5.24's `cache` (generation then runs without its KV cache):
carry those as wheels in .whl (transformers 5.24.0, peft 0.21.2, pydantic 2.14.4, pydantic_core 2.50.5,
annotated-types, typing-inspection, typing_extensions 4.16.0, jsonschema 4.26.0, jsonschema-specifications,
referencing, rpds-py, oss-harmony 0.0.11; cp312 manylinux x86_64, about 21 MB) and run, with carry
[".whl"] and timeout_s 600:

    set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; nvidia-smi -L; \
        PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.log

It keeps itself under --budget-s (default 420 s) of wall time: every phase gets an equal share of what
is left, a training phase times as many of its --steps as its warm-up step says fit (at least one), the
decode length is cut to fit its share, and a model is skipped (said so) when less than 15 % of the
budget is left before it is built. Expected on one H200 (an estimate, not yet measured): 0.6B about
1 s/step, 4B about 5 s/step, 2-4 minutes in all with the imports and model builds.

CPU smoke mode (the test suite, tests/test_gpu_check.py): tiny Qwen3 configs, 2 timed steps, a few
generated tokens, bf16 when this CPU has bf16 instructions (else fp32):

    python benchmarks/gpu_check.py --cpu-smoke --out /tmp/gpu_check.json

Output: a table on stdout and, with --out, a JSON file of every figure, the formulas, the peak used and
the environment (GPU name, torch / transformers versions, config numbers). Exit status 0 when every
phase ran, 1 when one failed (its error is in the JSON and on stderr; the others still run), 2 when a
package is missing.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent

# (substring of torch.cuda.get_device_name(), dense bf16 tensor-core FLOP/s or None = not in the table).
# NVIDIA datasheets give these with 2:4 sparsity; dense is half. First match wins: the NVL parts (lower
# power, another peak) and anything unlisted get MFU n/a.
PEAK_BF16_FLOPS: tuple[tuple[str, float | None], ...] = (
    ("NVL", None),
    ("H200", 989.4e12),  # H200 SXM: 1,979 TFLOP/s with sparsity
    ("H100 80GB HBM3", 989.4e12),  # H100 SXM's name in torch: 1,979 with sparsity
    ("H100 SXM", 989.4e12),
    ("H100 PCIe", 756.0e12),  # 1,513 with sparsity
    ("A100", 312.0e12),  # SXM and PCIe: 624 with sparsity
)


@dataclass(frozen=True)
class ModelSpec:
    """A Qwen3-architecture model to build from its config numbers, and how to train it.

    hidden_size .. head_dim: transformers.Qwen3Config's fields (tokens of `vocab_size` ids); micro_batch_size:
    episodes per forward pass (optimizer.micro_batch_size); gradient_checkpointing: trainer.gradient_checkpointing.
    """

    name: str
    source: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    micro_batch_size: int
    gradient_checkpointing: bool


# Qwen/Qwen3-0.6B and Qwen/Qwen3-4B config.json (both: rope_theta 1e6, rms_norm_eps 1e-6, max_position_embeddings
# 40960, no attention bias, no sliding window).
MODELS: dict[str, ModelSpec] = {
    "qwen3-0.6b": ModelSpec("qwen3-0.6b", "Qwen/Qwen3-0.6B", 1024, 3072, 28, 16, 8, 128, 151936, True, 2, False),
    "qwen3-4b": ModelSpec("qwen3-4b", "Qwen/Qwen3-4B", 2560, 9728, 36, 32, 8, 128, 151936, True, 2, True),
}
# --cpu-smoke: the same code paths on two tiny Qwen3 configs (one with gradient checkpointing, like the 4B).
SMOKE_MODELS: dict[str, ModelSpec] = {
    "tiny-a": ModelSpec("tiny-a", "tiny Qwen3 (CPU smoke)", 64, 128, 2, 4, 2, 16, 2048, True, 2, False),
    "tiny-b": ModelSpec("tiny-b", "tiny Qwen3 (CPU smoke)", 64, 160, 2, 4, 2, 16, 2048, True, 2, True),
}


# Each model's phases, in order: training with padded then packed micro-batches, then generation with the
# float32 weights training leaves and with the model cast to bfloat16.
PHASES = ("train_padded", "train_packed", "generate_float32", "generate_bfloat16")


@dataclass(frozen=True)
class Workload:
    """Episodes per training step (lengths in tokens) and the generation batch."""

    episodes: int
    min_len: int
    max_len: int
    gen_batch: int
    gen_prompt_len: int
    gen_tokens: int


GPU_WORKLOAD = Workload(episodes=16, min_len=1024, max_len=4096, gen_batch=64, gen_prompt_len=512, gen_tokens=256)
SMOKE_WORKLOAD = Workload(episodes=4, min_len=24, max_len=64, gen_batch=3, gen_prompt_len=12, gen_tokens=6)


def peak_bf16_flops(device_name: str) -> tuple[float | None, str]:
    """The dense bf16 peak (FLOP/s) of the GPU called `device_name` (torch.cuda.get_device_name), and where it
    came from; (None, why) when `PEAK_BF16_FLOPS` has no figure for it."""
    for key, peak in PEAK_BF16_FLOPS:
        if key in device_name:
            if peak is None:
                return None, f"no dense bf16 peak in this script's table for {device_name!r} (matched {key!r})"
            return peak, f"NVIDIA datasheet, dense bf16, {device_name!r} matched {key!r}"
    return None, f"no dense bf16 peak in this script's table for {device_name!r}"


def training_flops(params: int, spec: ModelSpec, lengths: list[int]) -> tuple[float, float]:
    """Model FLOPs of one training step (forward + backward) over sequences of `lengths` tokens:
    (6 * N * sum(s), 6 * L * H * Q * sum(s^2)), the dense term (Kaplan et al. 2020) and the causal attention
    term (PaLM's 12 * L * H * Q * s per token, Chowdhery et al. 2022 appendix B, halved for the causal mask)."""
    dense = 6.0 * params * sum(lengths)
    attention = 6.0 * spec.num_hidden_layers * spec.num_attention_heads * spec.head_dim * sum(s * s for s in lengths)
    return dense, attention


def qwen3_parameter_count(spec: ModelSpec) -> int:
    """Parameters of a Qwen3ForCausalLM with `spec`'s numbers, in closed form: embeddings (V * h, once when
    tied, else also the LM head), per layer q/k/v/o projections, q_norm and k_norm (Q each), the SwiGLU MLP
    (3 * h * I) and two RMSNorms (h each), and the final norm (h)."""
    h, q = spec.hidden_size, spec.head_dim
    attention = h * spec.num_attention_heads * q * 2 + h * spec.num_key_value_heads * q * 2 + 2 * q
    layer = attention + 3 * h * spec.intermediate_size + 2 * h
    embeddings = spec.vocab_size * h * (1 if spec.tie_word_embeddings else 2)
    return embeddings + spec.num_hidden_layers * layer + h


def _import_rl_core() -> SimpleNamespace:
    """rl_core's pieces this check uses (the repo root put on sys.path); exits with status 2 naming a
    missing package."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    try:
        import huggingface_hub
        import transformers
        from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

        from rl_core.config import AlgorithmConfig, OptimizerConfig, TrainerConfig
        from rl_core.model.policy import Policy
        from rl_core.model.token_sampler import hf_token_sampler
        from rl_core.model.tokenizer import chat_format
        from rl_core.paths import DATA_DIR
        from rl_core.selection import length_sorted_micro_batches
        from rl_core.trainer import Trainer
        from rl_core.trajectory import Episode, Turn
    except ModuleNotFoundError as exc:
        print(
            f"gpu_check: missing Python package {exc.name!r} (needed by rl_core); carry it as a wheel in .whl "
            "and install it first (benchmarks/gpu_check.py's docstring has the command)",
            file=sys.stderr,
        )
        sys.exit(2)
    return SimpleNamespace(
        transformers=transformers,
        huggingface_hub=huggingface_hub,
        AutoTokenizer=AutoTokenizer,
        Qwen3Config=Qwen3Config,
        Qwen3ForCausalLM=Qwen3ForCausalLM,
        AlgorithmConfig=AlgorithmConfig,
        OptimizerConfig=OptimizerConfig,
        TrainerConfig=TrainerConfig,
        Policy=Policy,
        hf_token_sampler=hf_token_sampler,
        chat_format=chat_format,
        DATA_DIR=DATA_DIR,
        length_sorted_micro_batches=length_sorted_micro_batches,
        Trainer=Trainer,
        Episode=Episode,
        Turn=Turn,
    )


def make_episodes(rl: SimpleNamespace, count: int, min_len: int, max_len: int, vocab: int, seed: int) -> list[Any]:
    """`count` episodes of random token ids in [5, vocab), lengths uniform in [min_len, max_len] tokens, laid out
    like tests/test_trainer.py's make_episodes: prompt (30 %), generated span (25 %), observation (15 %),
    generated span (the rest), loss mask 1 on the generated spans. Behaviour log-probs are -ln(vocab), about what
    a random-init model gives random tokens, so the PPO ratio starts near 1. Groups of 8 with rewards 0/1."""
    Episode, Turn = rl.Episode, rl.Turn
    g = torch.Generator().manual_seed(seed)
    logprob = -math.log(vocab)
    episodes = []
    for i in range(count):
        n = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        prompt, gen1, obs = int(0.3 * n), max(1, int(0.25 * n)), int(0.15 * n)
        gen2 = max(1, n - prompt - gen1 - obs)
        n = prompt + gen1 + obs + gen2
        tokens = torch.randint(5, vocab, (n,), generator=g).tolist()
        mask = [0] * prompt + [1] * gen1 + [0] * obs + [1] * gen2
        turns = [
            Turn("user", "p", 0, prompt),
            Turn("assistant", "a", prompt, prompt + gen1),
            Turn("tool", "o", prompt + gen1, prompt + gen1 + obs),
            Turn("assistant", "b", prompt + gen1 + obs, n),
        ]
        episodes.append(
            Episode(
                run_id="gpu-check",
                iteration=1,
                policy_version=0,
                env_name="random",
                task_id=f"t{i // 8}",
                group_id=f"g{i // 8}",
                sample_index=i % 8,
                tokens=tokens,
                loss_mask=mask,
                behavior_logprobs=[logprob if m else 0.0 for m in mask],
                turns=turns,
                reward=float(i % 2),
                reward_components={},
                success=bool(i % 2),
                finish_reason="answered",
            )
        )
    return episodes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def build_policy(rl: SimpleNamespace, spec: ModelSpec, device: torch.device, seed: int) -> Any:
    """A Policy around a random-init Qwen3ForCausalLM of `spec` (float32 master weights, built on `device`) and
    the reference checkpoint's tokenizer (training needs only its pad id and text renderer)."""
    tokenizer = rl.AutoTokenizer.from_pretrained(str(rl.DATA_DIR / "checkpoints" / "reference"))
    chat = rl.chat_format("turnstile", tokenizer)
    config = rl.Qwen3Config(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=spec.tie_word_embeddings,
        attention_bias=False,
        use_sliding_window=False,
        pad_token_id=chat.pad_id,
        eos_token_id=chat.stop_id,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = rl.Qwen3ForCausalLM(config)
    return rl.Policy(model=model, tokenizer=tokenizer, chat=chat)


class Clock:
    """The script's time budget: `share(phases_left)` is an equal share of the seconds left."""

    def __init__(self, budget_s: float):
        self.start, self.budget_s = time.perf_counter(), budget_s

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def share(self, phases_left: int) -> float:
        return max(self.left(), 0.0) / max(phases_left, 1)


def train_phase(
    rl: SimpleNamespace,
    policy: Any,
    spec: ModelSpec,
    work: Workload,
    args: argparse.Namespace,
    packing: bool,
    allowed_s: float,
    peak: float | None,
    params: int,
) -> dict[str, Any]:
    """Warm-up and timed `Trainer.step`s on one batch of episodes; the figures of the timed ones.
    Raises RuntimeError when the trainer skips a step (nothing trained: the figures would be meaningless)."""
    device = policy.device
    trainer_cfg = rl.TrainerConfig(
        precision=args.precision, gradient_checkpointing=spec.gradient_checkpointing, packing=packing
    )
    optimizer_cfg = rl.OptimizerConfig(lr=1e-6, micro_batch_size=spec.micro_batch_size)
    episodes = make_episodes(rl, work.episodes, work.min_len, work.max_len, spec.vocab_size, args.seed)
    lengths = [len(e.tokens) for e in episodes]
    chunks = rl.length_sorted_micro_batches(lengths, spec.micro_batch_size)
    padded_tokens = sum(len(c) * max(lengths[i] for i in c) for c in chunks)
    _reset_peak(device)
    trainer = rl.Trainer(policy, rl.AlgorithmConfig(), optimizer_cfg, trainer_cfg=trainer_cfg)

    def one_step(trainer: Any) -> tuple[float, Any]:
        for e in episodes:  # fresh for the step's policy version (algorithm.max_steps_off_policy)
            e.policy_version = policy.version
        _sync(device)
        t0 = time.perf_counter()
        metrics = trainer.step(episodes)
        _sync(device)
        seconds = time.perf_counter() - t0
        if metrics.skipped:
            raise RuntimeError(f"the trainer skipped the step: {metrics.skipped}")
        return seconds, metrics

    phase_start = time.perf_counter()
    warm = [one_step(trainer)[0] for _ in range(args.warmup)]
    estimate = warm[-1] if warm else 0.0
    spent = time.perf_counter() - phase_start
    steps = args.steps if estimate <= 0 else max(1, min(args.steps, int((allowed_s - spent) / estimate)))
    timed, metrics = [], None
    for _ in range(steps):
        seconds, metrics = one_step(trainer)
        timed.append(seconds)
    step_s = sum(timed) / len(timed)
    tokens = sum(lengths)
    dense, attention = training_flops(params, spec, lengths)
    result = {
        "packing": packing,
        "precision": args.precision,
        "gradient_checkpointing": spec.gradient_checkpointing,
        "episodes": len(episodes),
        "micro_batch_size": spec.micro_batch_size,
        "tokens_per_step": tokens,
        "loss_tokens_per_step": sum(e.response_tokens for e in episodes),
        "padded_tokens_per_step": padded_tokens,
        "warmup_s": warm,
        "timed_steps": len(timed),
        "steps_requested": args.steps,
        "step_s": timed,
        "mean_step_s": step_s,
        "tokens_per_s": tokens / step_s,
        "model_tflop_per_step_6n": dense / 1e12,
        "model_tflop_per_step_attention": attention / 1e12,
        "achieved_tflops": (dense + attention) / step_s / 1e12,
        "mfu_6n": None if peak is None else dense / step_s / peak,
        "mfu": None if peak is None else (dense + attention) / step_s / peak,
        "peak_memory_gib": _peak_gib(device),
        "last_loss": metrics.loss,
        "last_grad_norm": metrics.grad_norm,
    }
    del trainer
    policy.model.zero_grad(set_to_none=True)
    _free(device)
    return result


# Largest |log-prob difference| (nats) between the decoder's cached decoding and a full forward pass that
# `decoder_check` accepts in float32: a decoder that drops its KV cache (e.g. transformers < 5.24, whose models
# take `past_key_values`, not `cache`) is off by about 0.1 or more; a working one by 1e-6 on CPU.
DECODER_TOLERANCE = 1e-2


def decoder_check(rl: SimpleNamespace, policy: Any, seed: int, new_tokens: int = 8) -> float:
    """Greedy-decode two short random prompts through `hf_token_sampler` (a prefill call, then a decode call
    reusing the KV cache) and recompute the same tokens' log-probs with one full forward pass; returns the
    largest absolute difference (nats). Raises RuntimeError above `DECODER_TOLERANCE` (the decoder's cache is
    not being used: the throughput would be meaningless)."""
    rng = random.Random(seed + 1)
    vocab = policy.model.config.vocab_size
    prompts = [[rng.randrange(5, vocab) for _ in range(length)] for length in (12, 9)]
    sample = rl.hf_token_sampler(policy, batch_size=len(prompts))
    first = sample([0, 1], prompts, [1, 1], 0.0)
    rest = sample([0, 1], [p + f.tokens for p, f in zip(prompts, first)], [new_tokens - 1] * 2, 0.0)
    worst = 0.0
    for prompt, head, tail in zip(prompts, first, rest):
        full = prompt + head.tokens + tail.tokens
        with torch.no_grad():
            logits = policy.model(input_ids=torch.tensor([full], device=policy.device)).logits[0].float()
        logp = torch.log_softmax(logits, dim=-1)
        for k, (token, got) in enumerate(zip(full[len(prompt) :], head.logprobs + tail.logprobs)):
            worst = max(worst, abs(float(logp[len(prompt) - 1 + k, token]) - got))
    if not worst <= DECODER_TOLERANCE:
        raise RuntimeError(
            f"the decoder's log-probs differ from a full forward pass by {worst:.3g} nats (> {DECODER_TOLERANCE}): "
            f"its KV cache is not used with transformers {rl.transformers.__version__} (rl_core needs >= 5.24)"
        )
    return worst


def generate_phase(
    rl: SimpleNamespace, policy: Any, work: Workload, args: argparse.Namespace, dtype: torch.dtype, allowed_s: float
) -> dict[str, Any]:
    """Prefill then decode a batch of random prompts through the rollout's in-process token sampler
    (`hf_token_sampler`), with the model's weights cast to `dtype`."""
    device = policy.device
    policy.model.to(dtype)
    policy.model.eval()
    check = decoder_check(rl, policy, args.seed) if dtype == torch.float32 else None
    rng = random.Random(args.seed)
    vocab = policy.model.config.vocab_size
    prompts = [[rng.randrange(5, vocab) for _ in range(work.gen_prompt_len)] for _ in range(work.gen_batch)]
    generator = torch.Generator(device=device).manual_seed(args.seed)
    sample = rl.hf_token_sampler(policy, batch_size=work.gen_batch, generator=generator)
    _reset_peak(device)
    phase_start = time.perf_counter()
    warm_tokens = 4
    _sync(device)
    t0 = time.perf_counter()
    sample([-(k + 1) for k in range(len(prompts))], prompts, [warm_tokens] * len(prompts), 1.0)
    _sync(device)
    per_token = (time.perf_counter() - t0) / warm_tokens  # an over-estimate: it includes the prefill
    budget_tokens = int((allowed_s - (time.perf_counter() - phase_start)) / per_token / 2)  # prefill + decode again
    new_tokens = max(2, min(work.gen_tokens, budget_tokens))
    keys = list(range(len(prompts)))
    _sync(device)
    t0 = time.perf_counter()
    first = sample(keys, prompts, [1] * len(prompts), 1.0)  # the prefill and one sampled token
    _sync(device)
    t1 = time.perf_counter()
    contexts = [p + g.tokens for p, g in zip(prompts, first)]
    rest = sample(keys, contexts, [new_tokens - 1] * len(prompts), 1.0)  # decode, reusing the KV cache
    _sync(device)
    t2 = time.perf_counter()
    decoded = sum(len(g.tokens) for g in rest)
    if decoded == 0:
        raise RuntimeError("the decoder generated no token")
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "decoder_check_max_abs_logprob_diff": check,
        "batch": len(prompts),
        "prompt_tokens": work.gen_prompt_len,
        "new_tokens_requested": work.gen_tokens,
        "new_tokens_per_sequence": new_tokens,
        "prefill_s": t1 - t0,
        "prefill_tokens_per_s": len(prompts) * work.gen_prompt_len / (t1 - t0),
        "decode_s": t2 - t1,
        "decoded_tokens": decoded,
        "decode_tokens_per_s": decoded / (t2 - t1),
        "generated_tokens_per_s": (decoded + len(first)) / (t2 - t0),
        "peak_memory_gib": _peak_gib(device),
    }


def matmul_tflops(device: torch.device, n: int = 8192, repeats: int = 10) -> float | None:
    """Measured bf16 matmul rate (TFLOP/s) of an n x n x n product on a CUDA `device` (None on CPU)."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    seconds = (time.perf_counter() - t0) / repeats
    del a, b
    _free(device)
    return 2 * n**3 / seconds / 1e12


def environment(rl: SimpleNamespace, device: torch.device) -> dict[str, Any]:
    """Versions and the machine: python, torch, transformers, CUDA, the device's name and memory."""
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": rl.transformers.__version__,
        "huggingface_hub": rl.huggingface_hub.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        env["device_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    return env


def run_model(
    rl: SimpleNamespace,
    spec: ModelSpec,
    work: Workload,
    args: argparse.Namespace,
    device: torch.device,
    clock: Clock,
    phases_left: int,
    peak: float | None,
    errors: list[str],
) -> dict[str, Any]:
    """Build one model, run its training and generation phases; a failing phase is recorded in `errors`."""
    out: dict[str, Any] = {"name": spec.name, "config": asdict(spec), "phases": {}}
    if clock.left() < 0.15 * args.budget_s:
        out["skipped"] = f"only {clock.left():.0f} s of the {args.budget_s:.0f} s budget left"
        return out
    t0 = time.perf_counter()
    policy = build_policy(rl, spec, device, args.seed)
    _sync(device)
    out["build_s"] = time.perf_counter() - t0
    params = sum(p.numel() for p in policy.model.parameters())
    out["params"] = params
    for index, name in enumerate(PHASES):
        allowed = clock.share(phases_left - index)
        try:
            if name.startswith("train"):
                packing = name == "train_packed"
                out["phases"][name] = train_phase(rl, policy, spec, work, args, packing, allowed, peak, params)
            else:
                dtype = torch.float32 if name == "generate_float32" else torch.bfloat16
                out["phases"][name] = generate_phase(rl, policy, work, args, dtype, allowed)
        except Exception as exc:  # noqa: BLE001 - every phase runs; the failure is reported and fails the exit status
            message = f"{spec.name} {name}: {type(exc).__name__}: {exc}"
            traceback.print_exc()
            print(f"gpu_check: FAILED {message}", file=sys.stderr, flush=True)
            errors.append(message)
            out["phases"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            policy.model.zero_grad(set_to_none=True)
            _free(device)
        print(f"gpu_check: {spec.name} {name} done at {time.perf_counter() - clock.start:.0f} s", flush=True)
    del policy
    _free(device)
    return out


def _fmt(value: Any, spec: str, width: int) -> str:
    return ("n/a" if value is None else format(value, spec)).rjust(width)


def _count(params: int) -> str:
    return f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.1f}M"


def print_table(report: dict[str, Any]) -> None:
    """The report as a readable table on stdout."""
    env = report["environment"]
    print(f"\nGPU check on {env['device_name']} ({env['device']}): torch {env['torch']}, ", end="")
    print(f"transformers {env['transformers']}")
    print(f"peak: {report['peak_note']}; measured bf16 matmul: {_fmt(report['matmul_tflops'], '.0f', 0)} TFLOP/s")
    print(f"MFU = {report['mfu_formula']}")
    header = f"{'model':<11} {'params':>8} {'phase':<18} {'tokens/s':>10} {'MFU':>6} {'MFU 6N':>6} {'peak GiB':>8}"
    header += f" {'steps':>5} {'s/step':>7}"
    print(header)
    print("-" * len(header))
    for model in report["models"]:
        params = _count(model["params"]) if "params" in model else "-"
        if "skipped" in model:
            print(f"{model['name']:<11} {params:>8} skipped: {model['skipped']}")
            continue
        for name, phase in model["phases"].items():
            if "error" in phase:
                print(f"{model['name']:<11} {params:>8} {name:<18} FAILED: {phase['error'][:80]}")
            elif name.startswith("train"):
                print(
                    f"{model['name']:<11} {params:>8} {name:<18} {phase['tokens_per_s']:>10.0f} "
                    f"{_fmt(phase['mfu'], '.1%', 6)} {_fmt(phase['mfu_6n'], '.1%', 6)} "
                    f"{_fmt(phase['peak_memory_gib'], '.1f', 8)} {phase['timed_steps']:>5} {phase['mean_step_s']:>7.2f}"
                )
            else:
                print(
                    f"{model['name']:<11} {params:>8} {name:<18} {phase['decode_tokens_per_s']:>10.0f} "
                    f"{'':>6} {'':>6} {_fmt(phase['peak_memory_gib'], '.1f', 8)} "
                    f"  decode, batch {phase['batch']} x {phase['new_tokens_per_sequence']} tokens; "
                    f"prefill {phase['prefill_tokens_per_s']:.0f} tokens/s"
                )
    print(f"wall time {report['wall_s']:.0f} s; errors: {len(report['errors'])}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny configs on the CPU (the test suite's mode)")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    parser.add_argument("--models", nargs="+", help="model names (default: all of the mode's)")
    parser.add_argument(
        "--precision", choices=("bf16", "fp32"), help="trainer.precision (default bf16; smoke: bf16 if the CPU has it)"
    )
    parser.add_argument("--steps", type=int, help="timed training steps per phase, at most (default 3; smoke 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed training steps per phase first (default 1)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="wall-time budget of the whole check (s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.warmup < 0 or (args.steps is not None and args.steps < 1) or args.budget_s <= 0:
        parser.error("--warmup must be >= 0, --steps >= 1 and --budget-s > 0")
    clock = Clock(args.budget_s)
    if not args.cpu_smoke and not torch.cuda.is_available():
        parser.error("no CUDA device here: run on a machine with a GPU, or use --cpu-smoke")
    catalogue = SMOKE_MODELS if args.cpu_smoke else MODELS
    names = args.models or list(catalogue)
    unknown = [n for n in names if n not in catalogue]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; this mode has {sorted(catalogue)}")
    rl = _import_rl_core()
    if args.cpu_smoke:
        device, work = torch.device("cpu"), SMOKE_WORKLOAD
        args.steps = args.steps or 2
        if args.precision is None:
            args.precision = "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    else:
        device, work = torch.device("cuda", torch.cuda.current_device()), GPU_WORKLOAD
        args.steps = args.steps or 3
        args.precision = args.precision or "bf16"
    env = environment(rl, device)
    if device.type == "cuda":
        peak, peak_note = peak_bf16_flops(env["device_name"])
    else:
        peak, peak_note = None, "MFU n/a: a CPU run (no CUDA device), no tensor-core peak to compare with"
    report: dict[str, Any] = {
        "mode": "cpu-smoke" if args.cpu_smoke else "gpu",
        "environment": env,
        "peak_bf16_flops": peak,
        "peak_note": peak_note if peak is None else f"{peak / 1e12:.1f} TFLOP/s ({peak_note})",
        "mfu_formula": "(6 * N * tokens + 6 * L * H * Q * sum(s_i^2)) / step_s / peak; mfu_6n leaves out the "
        "attention term (N parameters, L layers, H query heads, Q head_dim, s_i episode lengths)",
        "workload": asdict(work),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "matmul_tflops": None,
        "models": [],
        "errors": [],
    }
    print(f"gpu_check: {report['mode']} on {env['device_name']}, budget {args.budget_s:.0f} s", flush=True)
    try:
        report["matmul_tflops"] = matmul_tflops(device)
    except Exception as exc:  # noqa: BLE001 - a reference figure only: reported, the check goes on
        report["errors"].append(f"matmul reference: {type(exc).__name__}: {exc}")
    for position, name in enumerate(names):
        phases_left = len(PHASES) * (len(names) - position)
        report["models"].append(
            run_model(rl, catalogue[name], work, args, device, clock, phases_left, peak, report["errors"])
        )
    report["wall_s"] = time.perf_counter() - clock.start
    print_table(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"report: {args.out}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
