"""Turnstile's ML core: config, environments, policy, rollouts, trajectory store, trainer, evaluation.

This package never imports prefect, mlflow or great_expectations; the pipeline layers
(`tasks/`, `flows/`) build on it.
"""
