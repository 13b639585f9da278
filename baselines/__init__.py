"""Baseline placement policies. Each is a short class over tide.policy, registered by name on import."""

from baselines import reference  # noqa: F401
