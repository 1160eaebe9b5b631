"""Shared fixtures: a tiny tokenizer and policy built from text (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

CORPUS = [
    'CALL get_order {"order_id": "4821"}',
    'ANSWER {"decision": "refund", "amount": "120"}',
    '{"status": "delivered", "days": "12", "customer_id": "7731"}',
    "Customer asks for a refund on order 4821.",
] * 20


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server (own database) for every test that runs flows or tasks."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from rl_core.model.tokenizer import build_tokenizer

    return build_tokenizer(CORPUS, vocab_size=300)


@pytest.fixture()
def tiny_policy(tiny_tokenizer):
    """A fresh, randomly initialised 2-layer policy (same weights every time)."""
    from rl_core.model.policy import Policy, build_tiny_model
    from rl_core.model.tokenizer import chat_format

    model = build_tiny_model(
        tiny_tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_positions=512, seed=0
    )
    return Policy(model=model, tokenizer=tiny_tokenizer, chat=chat_format("turnstile", tiny_tokenizer))


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """A migrated, empty MLflow SQLite file to copy into a test's run folder (creating one costs seconds)."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path
