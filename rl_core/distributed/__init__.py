"""The learner on several ranks: torchrun-launched DeepSpeed processes driven by the run's process.

`trainer.num_processes` x `trainer.num_nodes` > 1 splits the run in two:
- the driver, the run's own process (the Prefect flow or `TrainingRun`): collection, validation,
  records, checkpoints, tracking, evaluation. It keeps a whole copy of the policy, which samples
  rollouts (or is synced to the vLLM server) and is written into checkpoints;
- the learner ranks, launched by torchrun (`launch.py`: `torchrun_command`, `LearnerRanks`), each
  running `worker.py`: the same `Trainer` over a DeepSpeed engine whose ZeRO stage shards the
  optimizer state (1), gradients (2) and weights (3) across the ranks. Every rank trains on its
  share of each mini-batch (ranks.py).

The driver talks to global rank 0 only, over an authenticated local socket (the standard
library's multiprocessing.connection, pickled messages); rank 0 broadcasts each command to the
other ranks (torch.distributed) and returns the result. A step returns its metrics and the
trainable weights after it (gathered whole under ZeRO-3), which the driver copies into its
policy; checkpoints ask the ranks for the optimizer state in torch AdamW's per-parameter format
(gathered from the ZeRO partitions), so a checkpoint is the same whatever the ranks, and a
resume pushes the checkpoint's weights and optimizer state back into the ranks.

torchrun (torch.distributed.run) rather than DeepSpeed's launcher: it ships with torch, so it is
on every machine that trains (the GPU machines this project targets may lack DeepSpeed's
launcher dependencies such as pdsh); its static rendezvous (master address and port, node rank)
is all multi-node needs; and its agent supervises the ranks: when one dies it stops the others
and exits, which the driver sees as its channel closing.
"""
