"""ZeRO's partitioned fp32 state seen whole: AdamW's state in torch's per-parameter format, and setting a
parameter's master weight or optimizer state from its whole value (the DeepSpeed backend, backends.py).
DeepSpeed is imported only when these are used."""

from __future__ import annotations

from typing import Any

import torch


def set_full_fp32_state(param: torch.nn.Parameter, value: torch.Tensor, key: str | None = None) -> None:
    """Set this rank's part of a ZeRO-held fp32 tensor of `param` from its whole `value` (shape of `param`): the
    master weight (`key` None) or an optimizer state (`key`, e.g. "exp_avg"). ZeRO 1-2 and one-rank ZeRO-3 go
    through DeepSpeed's safe_set_full_fp32_param / safe_set_full_optimizer_state. ZeRO-3 on several ranks is set
    here: DeepSpeed 0.19's set_full_hp_param reads past the end of a parameter whose size the ranks do not divide
    (the last rank's partition is zero-padded), e.g. any size not a multiple of 3 with 3 ranks."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    z3 = getattr(param, "_z3_optimizer", None) if hasattr(param, "ds_id") else None
    if z3 is None or z3._get_param_partition_world_size(param) == 1:
        if key is None:
            safe_set_full_fp32_param(param, value)
        else:
            safe_set_full_optimizer_state(param, value, key)
        return
    partition, _ = z3._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    start = partition.numel() * z3._get_param_partition_rank(param)
    piece = value.flatten()[start : start + partition.numel()]
    with torch.no_grad():
        partition.zero_()
        partition[: piece.numel()].copy_(piece)


class ZeroAdamWState:
    """`state_dict()` / `load_state_dict()` of a ZeRO-wrapped AdamW in torch AdamW's per-parameter format.

    ZeRO 1-3 step the AdamW over flat fp32 partitions; this view gathers each parameter's
    `exp_avg` / `exp_avg_sq` (deepspeed.utils.safe_get_full_optimizer_state) into a state-less
    torch AdamW over the model's parameters (`template`) and returns its state dict, and loads by
    the reverse path, so checkpoints match the torch backend's and load into either backend.
    """

    KEYS = ("exp_avg", "exp_avg_sq")

    def __init__(self, zero_optimizer: Any, params: list[torch.nn.Parameter], template: torch.optim.Optimizer):
        self.zero, self.params, self.template = zero_optimizer, params, template

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.template.param_groups

    def _flat_params(self) -> list[torch.Tensor]:
        """The flat fp32 partitions the inner AdamW steps (its state is keyed by them)."""
        if hasattr(self.zero, "fp32_partitioned_groups_flat"):  # ZeRO-3
            return list(self.zero.fp32_partitioned_groups_flat)
        return list(self.zero.single_partition_of_fp32_groups)  # ZeRO-1/2

    def _flat_states(self) -> list[dict[str, Any]]:
        state = self.zero.optimizer.state
        return [state[flat] for flat in self._flat_params()]

    def state_dict(self) -> dict[str, Any]:
        from deepspeed.utils import safe_get_full_optimizer_state

        self.template.state.clear()
        flat = self._flat_states()
        if flat and all(flat):  # AdamW creates its state on the first step
            step = flat[0]["step"]
            for p in self.params:
                self.template.state[p] = {"step": step.detach().clone()} | {
                    key: safe_get_full_optimizer_state(p, key).detach().clone() for key in self.KEYS
                }
        try:
            return self.template.state_dict()
        finally:
            self.template.state.clear()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.template.load_state_dict(state_dict)  # torch checks groups and sizes, casts to the params' device
        try:
            loaded = [self.template.state.get(p) for p in self.params]
            if not any(loaded):
                return
            if not all(loaded):
                raise ValueError("optimizer state covers only some parameters; ZeRO keeps one step count for all")
            steps = {float(s["step"]) for s in loaded}
            if len(steps) != 1:
                raise ValueError(f"optimizer state has several step counts {sorted(steps)}; ZeRO keeps one for all")
            self._create_flat_state()
            for p, state in zip(self.params, loaded):
                for key in self.KEYS:
                    set_full_fp32_state(p, state[key].to(torch.float32), key)
            for flat in self._flat_states():
                flat["step"] = loaded[0]["step"].detach().clone()
            saved = {k: v for k, v in self.template.param_groups[0].items() if k != "params"}
            for group in self.zero.optimizer.param_groups:  # e.g. a checkpoint's lr
                group.update(saved)
        finally:
            self.template.state.clear()

    def reset(self) -> None:
        """A fresh optimizer's state: zero moments and step count on every flat partition."""
        self._create_flat_state()
        for flat in self._flat_states():
            for value in flat.values():
                value.zero_()

    def _create_flat_state(self) -> None:
        """Zero AdamW state for every flat partition that has none yet (AdamW then uses it as is),
        linked to the parameters' fragments (ZeRO-1/2; ZeRO-3 reads the partitions' state directly)."""
        state = self.zero.optimizer.state
        for flat in self._flat_params():
            if not state.get(flat):
                state[flat] = {
                    "step": torch.tensor(0.0),
                    "exp_avg": torch.zeros_like(flat),
                    "exp_avg_sq": torch.zeros_like(flat),
                }
        if not hasattr(self.zero, "fp32_partitioned_groups_flat"):
            from deepspeed.utils import lazy_init_hp_params_optimizer_state

            for lp_params, flat in zip(self.zero.bit16_groups, self.zero.single_partition_of_fp32_groups):
                lazy_init_hp_params_optimizer_state(lp_params, flat, state)
