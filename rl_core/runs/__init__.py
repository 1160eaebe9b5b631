"""A run's own state on disk: its folder, records, checkpoints and the task sampler."""
