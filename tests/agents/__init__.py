"""Agents that are not Turnstile code: they play rollouts through the rollout gateway with public clients."""
