"""The trainer section of the run config: the training backend, its ranks, precision and batching.

`TrainerConfig` says how `rl_core.trainer.Trainer` computes the update (plain torch or DeepSpeed
ZeRO, in this process or on torchrun-launched ranks: rl_core/distributed/), in what precision,
with or without gradient checkpointing and packed micro-batches. The update itself (loss,
optimizer numbers) is the algorithm and optimizer sections' (training.py).
"""

from __future__ import annotations

from pydantic import Field, model_validator

from rl_core.config.choices import TrainerBackendName, TrainingPrecision, ZeroStage
from rl_core.config.section import Section


class TrainerConfig(Section):
    backend: TrainerBackendName = Field(
        "torch",
        description="Training backend (rl_core/model/backends.py): plain torch, or DeepSpeed (ZeRO) taking the same "
        "update, on one process or on trainer.num_processes ranks.",
    )
    zero_stage: ZeroStage = Field(
        0,
        description="DeepSpeed ZeRO stage (backend deepspeed only): 1 shards the optimizer state across the ranks, "
        "2 also the gradients, 3 also the weights (gathered for each forward pass and for publishing). All take the "
        "torch update; on one process none saves memory, and 3 (weights kept whole there) cannot deep-copy the "
        "policy, as rollout.overlap_collection does.",
    )
    num_processes: int = Field(
        1,
        ge=1,
        le=1024,
        description="Learner ranks per machine (torchrun --nproc-per-node; rl_core/distributed/). 1 = the learner "
        "runs in the run's own process; more needs backend deepspeed: each rank trains on its share of every "
        "mini-batch (whole episodes) and ZeRO shards across all ranks. On CUDA rank r uses GPU r of its machine; "
        "on CPU the ranks talk over gloo and share the cores.",
    )
    num_nodes: int = Field(
        1,
        ge=1,
        le=1024,
        description="Machines the learner ranks span (torchrun --nnodes). The run's machine is node 0; every "
        "other machine joins with `turnstile learner-node --node-rank K` (same config, same storage paths).",
    )
    master_addr: str = Field(
        "127.0.0.1",
        min_length=1,
        description="Address of node 0 that every rank reaches for the rendezvous (torchrun --master-addr); with "
        "num_nodes > 1, an address the other machines can reach.",
    )
    master_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Rendezvous port on master_addr (torchrun --master-port); 0 = a free port, single-machine only.",
    )
    precision: TrainingPrecision = Field(
        "fp32",
        description="Training compute precision. bf16: forward and backward under torch.autocast(bfloat16) over "
        "float32 weights, which stay the master copy the optimizer steps (policy.dtype float32); log-probs, "
        "entropies and the loss are computed in float32 either way. Needs bf16 support on policy.device.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute each decoder layer's activations in the backward pass instead of keeping them "
        "(Hugging Face gradient checkpointing): less activation memory, about one more forward pass of compute.",
    )
    packing: bool = Field(
        False,
        description="Pack each micro-batch's episodes end to end into one row (position ids restart per episode, "
        "attention computed episode by episode) instead of padding them to the longest: no compute on padding, "
        "the same loss to float tolerance. Pays when padding is large (wide spread of episode lengths) and on GPUs "
        "with flash-attention; about even on CPU with length-sorted micro-batches (README, Packed micro-batches).",
    )

    @model_validator(mode="after")
    def _zero_needs_deepspeed(self) -> "TrainerConfig":
        if self.zero_stage and self.backend != "deepspeed":
            raise ValueError(
                f"trainer.zero_stage {self.zero_stage} needs trainer.backend 'deepspeed' (got {self.backend!r})"
            )
        if self.world_size > 1 and self.backend != "deepspeed":
            raise ValueError(
                f"trainer.num_processes x trainer.num_nodes = {self.world_size} ranks needs trainer.backend "
                f"'deepspeed' (got {self.backend!r})"
            )
        if self.world_size > 1 and self.zero_stage == 0:
            raise ValueError(
                f"trainer.num_processes x trainer.num_nodes = {self.world_size} ranks needs trainer.zero_stage 1, 2 "
                "or 3 (1 has plain data parallelism's memory for weights and gradients and shards the optimizer state)"
            )
        if self.num_nodes > 1 and self.master_port == 0:
            raise ValueError(
                f"trainer.num_nodes {self.num_nodes} needs a fixed trainer.master_port that every machine can reach "
                "(0 picks a free port on this machine only)"
            )
        return self

    @property
    def world_size(self) -> int:
        """Learner ranks in all: num_processes x num_nodes."""
        return self.num_processes * self.num_nodes
