"""Flows that compose the pipeline stages, and the `turnstile` command line."""
