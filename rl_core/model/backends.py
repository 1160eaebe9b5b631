"""Training backends: how the trainer's accumulated gradients become an optimizer step.

The trainer (trainer.py) runs forward passes through `backend.model`, and calls
`backend.zero_grad()`, `backend.backward(loss)` once per micro-batch, then one
`backend.step()` per optimizer step, which clips the gradient norm to `optimizer.grad_clip`,
takes the AdamW step and returns the gradient norm before clipping. A step whose gradient norm
is not finite (NaN or inf) is never applied: `step()` then drops the gradients, leaves the
weights and the optimizer state (AdamW's exp_avg, exp_avg_sq, step count) untouched and
returns that non-finite norm, so "the returned norm is finite" means "the step was applied".
`backend.discard()` drops the accumulated gradients without stepping (the trainer's answer to
a non-finite loss). `backend.optimizer` has torch's
`state_dict()` / `load_state_dict()` in torch AdamW's own per-parameter format, whatever the
backend, so checkpoints (checkpoint.py) move between backends.

- `TorchBackend`: plain `loss.backward()`, `clip_grad_norm_`, `AdamW.step()`.
- `DeepSpeedBackend`: the model wrapped by `deepspeed.initialize` (ZeRO stage 0-3) on one
  process (gloo on CPU, NCCL on GPU), with the same torch AdamW as the client optimizer and
  `gradient_clipping = grad_clip`, so it takes the same update as `TorchBackend`. The
  trainer's micro-batch losses are already normalised by batch-wide totals, so DeepSpeed's
  own accumulation scaling is switched off: `gradient_accumulation_steps` is 1,
  `engine.backward` is called with `scale_wrt_gas=False`, and
  `managed_gradient_accumulation: false` makes `backward` only add up gradients and
  `step()` the one accumulation boundary (reduction, clipping, optimizer step).
  fp32 only. The model must hold its final starting weights before the backend is built:
  ZeRO 1-3 keep their own fp32 master copy, so later in-place edits of the weights are lost.
  ZeRO-3 keeps every weight whole (one process holds all partitions anyway), so generation and
  checkpoints read the policy as usual, but its hooked model cannot be deep-copied.
  DeepSpeed is imported only when this backend is built.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
from typing import Any, get_args

import torch

from rl_core.config.choices import TrainerBackendName, ZeroStage
from rl_core.model.zero_state import ZeroAdamWState, set_full_fp32_state

# DeepSpeed's name for its shared-memory all-reduce kernel for several ranks on one CPU host.
_SHM_COMM_OP = "deepspeed_shm_comm"


class TorchBackend:
    """Today's plain torch path: gradients add up in `.grad`, one clipped AdamW step."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float):
        self.model, self.optimizer, self.grad_clip = model, optimizer, grad_clip
        self.params = [p for p in model.parameters() if p.requires_grad]

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        """Clip the accumulated gradient to `grad_clip`, step; returns the norm before clipping.

        With a non-finite norm nothing is stepped: the gradients are dropped and the norm returned.
        (`clip_grad_norm_` is exactly `get_total_norm` then `clip_grads_with_norm_`.)
        """
        grads = [p.grad for p in self.params if p.grad is not None]
        total = torch.nn.utils.get_total_norm(grads)
        norm = float(total)
        if not math.isfinite(norm):
            self.zero_grad()
            return norm
        torch.nn.utils.clip_grads_with_norm_(self.params, self.grad_clip, total)
        self.optimizer.step()
        return norm

    def discard(self) -> None:
        """Drop the accumulated gradients without stepping."""
        self.zero_grad()

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy `weights` (trainable parameters by name) into the model (see `load_named_weights`)."""
        load_named_weights(self.model, weights)

    def reset_optimizer(self) -> None:
        """Drop AdamW's state: the next step is a fresh optimizer's first."""
        self.optimizer.state.clear()

    def trainable_weights(self) -> dict[str, torch.Tensor]:
        """Every trainable parameter by name, whole, as a detached float32 CPU copy."""
        return {name: p.detach().float().cpu().clone() for name, p in trainable_parameters(self.model).items()}


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The model's trainable parameters by `named_parameters` name, in their order."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def load_named_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy `weights` into the model's trainable parameters of the same names, in place (no gradient).
    Raises KeyError for a name that is no trainable parameter of the model, ValueError for a shape mismatch."""
    params = trainable_parameters(model)
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise KeyError(f"no trainable parameter named {unknown[:3]} in the model ({len(unknown)} unknown names)")
    with torch.no_grad():
        for name, value in weights.items():
            if tuple(value.shape) != tuple(params[name].shape):
                expected = tuple(params[name].shape)
                raise ValueError(f"weight {name} has shape {tuple(value.shape)}, the model's {expected}")
            params[name].copy_(value)


def single_process_env() -> None:
    """The environment variables torch.distributed needs for a one-process group, where unset."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


def _import_deepspeed() -> Any:
    """`deepspeed`, with a process group initialised (NCCL on GPUs, gloo on CPU) if there is none yet: from
    the environment torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR...), else a one-process group.

    On CPU, DeepSpeed's shared-memory all-reduce kernel (compiled with a C++ toolchain on first use, about
    a minute, per machine) is marked unavailable before DeepSpeed's communication layer starts: the ranks
    then all-reduce with plain torch.distributed over gloo, fast enough for the models CPUs train.
    """
    try:
        import deepspeed
        import deepspeed.ops
    except ImportError as exc:  # pragma: no cover - deepspeed is a dependency
        raise ImportError(
            "trainer.backend 'deepspeed' needs the deepspeed package: pip install 'deepspeed>=0.19,<0.20'"
        ) from exc
    single_process_env()
    if not torch.cuda.is_available():
        # deepspeed.ops.__compatible_ops__ is probed lazily and only read by build_shm_op
        # (deepspeed/comm/torch.py); an entry set to False skips that build.
        ops = deepspeed.ops.__dict__.setdefault("__compatible_ops__", {})
        ops[_SHM_COMM_OP] = False
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend)
    return deepspeed


def deepspeed_config(optimizer_cfg: Any, zero_stage: ZeroStage, world_size: int = 1) -> dict[str, Any]:
    """DeepSpeed's config for the trainer's update: fp32 weights, one accumulation boundary per step().
    With one rank ZeRO-3 keeps the weights whole; with several it partitions them (DeepSpeed's defaults)."""
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage == 3 and world_size == 1:
        # One process holds every partition anyway; keeping the weights whole outside the forward
        # pass lets rollouts and checkpoints read `policy.model` as with the other stages.
        zero["stage3_param_persistence_threshold"] = 2**62
        zero["stage3_model_persistence_threshold"] = 2**62
    return {
        "train_micro_batch_size_per_gpu": optimizer_cfg.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": optimizer_cfg.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # the client optimizer is torch's AdamW
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "steps_per_print": 2**31,
        "wall_clock_breakdown": False,
    }


class DeepSpeedBackend:
    """The model wrapped by a DeepSpeed engine (ZeRO `zero_stage`), stepping the given torch AdamW."""

    def __init__(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, optimizer_cfg: Any, zero_stage: ZeroStage
    ):
        bad = {p.dtype for p in model.parameters() if p.requires_grad} - {torch.float32}
        if bad:
            raise ValueError(
                "trainer.backend 'deepspeed' trains float32 weights "
                f"only (policy.dtype float32), got {sorted(map(str, bad))}"
            )
        deepspeed = _import_deepspeed()
        self.zero_stage = zero_stage
        self.world_size = torch.distributed.get_world_size()
        self.params = [p for p in model.parameters() if p.requires_grad]
        # A state-less copy of the optimizer over the model's own parameters (ZeRO re-points the
        # client optimizer at its flat partitions): the checkpoint format.
        template = type(optimizer)([dict(group, params=list(group["params"])) for group in optimizer.param_groups])
        self.engine, engine_optimizer, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            config=deepspeed_config(optimizer_cfg, zero_stage, self.world_size),
        )
        self._model = model
        self._gather_whole_weights()  # now, not at the first forward
        self.model = self.engine
        self.optimizer = (
            engine_optimizer if zero_stage == 0 else ZeroAdamWState(engine_optimizer, self.params, template)
        )

    def _gather_whole_weights(self) -> None:
        """ZeRO-3 on one rank: gather the (persistent, see deepspeed_config) weights so that they are whole outside
        the forward pass. Its step gathers them after an update; its overflow skip leaves them partitioned."""
        if self.zero_stage != 3 or self.world_size > 1:
            return
        partitioned = [p for p in self._model.parameters() if hasattr(p, "ds_id")]
        if partitioned:
            partitioned[0].all_gather(param_list=partitioned)

    def zero_grad(self) -> None:
        self.engine.zero_grad()
        if self.zero_stage > 0:
            self.engine.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        """Add this micro-batch's gradients. The loss is already normalised by the mini-batch's totals over all
        ranks: no 1/gradient_accumulation_steps, and times the world size, since DeepSpeed averages the ranks'
        gradients where the trainer's update is their sum."""
        self.engine.backward(loss * self.world_size if self.world_size > 1 else loss, scale_wrt_gas=False)

    def step(self) -> float:
        """Reduce, clip (`gradient_clipping`), step; returns the norm before clipping.

        A non-finite norm is not stepped: without ZeRO the norm is checked here first; ZeRO 1-3
        check it themselves (their overflow check: the step is skipped and the gradient
        buffers cleared), reported as an infinite norm.
        """
        norm = None
        if self.zero_stage == 0:  # DeepSpeed clips but does not report the norm without ZeRO
            grads = [p.grad for p in self.params if p.grad is not None]
            norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
            if not math.isfinite(norm):
                self.zero_grad()
                return norm
        self.engine.step()
        if not self.engine.was_step_applied():  # ZeRO's overflow check found a non-finite gradient
            self.zero_grad()
            self._gather_whole_weights()
            return math.inf
        return norm if norm is not None else float(self.engine.get_global_grad_norm())

    def discard(self) -> None:
        """Drop the accumulated gradients without stepping.

        ZeRO 1-3 also keep reduced gradients in their own buffers, which only their `step()`
        clears; a NaN gradient on every weight makes that step their overflow skip, which
        drops everything and changes neither weights nor optimizer state.
        """
        if self.zero_stage > 0:
            poison = sum((p * math.nan).sum() for p in self.params)
            self.engine.backward(poison, scale_wrt_gas=False)
            self.engine.step()
            if self.engine.was_step_applied():  # pragma: no cover - DeepSpeed's overflow check changed
                raise RuntimeError("DeepSpeed applied a step with NaN gradients while discarding them")
            self._gather_whole_weights()
        self.zero_grad()

    def _partitioned(self) -> contextlib.AbstractContextManager:
        """ZeRO-3 with several ranks: the weights gathered whole (every rank takes part), else nothing to do."""
        if self.zero_stage == 3 and self.world_size > 1:
            import deepspeed

            return deepspeed.zero.GatheredParameters(self.params, modifier_rank=0)
        return contextlib.nullcontext()

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Set the trainable weights by name, everywhere the engine keeps them: the model's (ZeRO-3: gathered,
        changed on rank 0 and re-partitioned) and ZeRO 1-3's fp32 master partitions. Every rank must call it
        with the same `weights` (see `load_named_weights` for the errors)."""
        with self._partitioned():
            if self.zero_stage != 3 or self.world_size == 1 or torch.distributed.get_rank() == 0:
                load_named_weights(self._model, weights)
        if self.zero_stage > 0:
            params = trainable_parameters(self._model)
            for name, value in weights.items():
                set_full_fp32_state(params[name], value.to(torch.float32))

    def reset_optimizer(self) -> None:
        """Forget AdamW's state: a fresh optimizer's (zero moments, step 0, which AdamW's next step makes 1)."""
        if self.zero_stage == 0:
            self.optimizer.state.clear()
        else:
            self.optimizer.reset()

    def trainable_weights(self, keep: bool = True) -> dict[str, torch.Tensor] | None:
        """Every trainable parameter by name, whole, as a detached float32 CPU copy (ZeRO-3 with several ranks:
        gathered, every rank taking part); None without `keep` (a rank that only joins the gather)."""
        with self._partitioned():
            if not keep:
                return None
            return {name: p.detach().float().cpu().clone() for name, p in trainable_parameters(self._model).items()}

    def shard_sizes(self) -> dict[str, int]:
        """What this rank holds, in elements: "weights" (its trainable weights as stored outside a forward pass:
        ZeRO-3 with several ranks keeps only its partition), "master_weights" (ZeRO 1-3's fp32 partitions the
        optimizer steps; 0 without ZeRO) and "optimizer_state" (AdamW's exp_avg and exp_avg_sq; 0 before the
        first step). With N ranks ZeRO 1-2 hold ~1/N of the master weights and optimizer state, ZeRO-3 also of
        the weights."""
        weights = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in self.params)
        state = self.engine.optimizer.optimizer.state if self.zero_stage > 0 else self.engine.optimizer.state
        moments = sum(v.numel() for entry in state.values() for k, v in entry.items() if k in ZeroAdamWState.KEYS)
        master = sum(f.numel() for f in self.optimizer._flat_params()) if self.zero_stage > 0 else 0
        return {"weights": weights, "master_weights": master, "optimizer_state": moments}


def make_backend(
    trainer_cfg: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer, optimizer_cfg: Any
) -> TorchBackend | DeepSpeedBackend:
    """The backend `trainer_cfg.backend` names (None: torch); ValueError for a name not in `TrainerBackendName`."""
    if trainer_cfg is None or trainer_cfg.backend == "torch":
        return TorchBackend(model, optimizer, optimizer_cfg.grad_clip)
    if trainer_cfg.backend == "deepspeed":
        return DeepSpeedBackend(model, optimizer, optimizer_cfg, trainer_cfg.zero_stage)
    expected = " or ".join(repr(name) for name in get_args(TrainerBackendName))
    raise ValueError(f"trainer.backend must be {expected}, got {trainer_cfg.backend!r}")
