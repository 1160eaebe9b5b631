"""Prefect tasks, one module per pipeline stage (collect, write, validate, train, evaluate, gate, promote)."""
