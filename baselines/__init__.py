"""Baseline placement policies. Each is a short class over tide.policy, registered by name on import."""

from tide.baselines import accelerate_peer, cpu_fallback, full_offload, lru, reference, tier_matched  # noqa: F401
