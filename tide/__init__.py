"""TIDE: lossless expert offloading for MoE diffusion LLMs (LLaDA2.0) on one GPU plus the host CPU."""

from tide.config import DecodeConfig, ModelConfig, preset
from tide.engine import Engine, load
from tide.experts.store import ExpertStore
from tide.policy import POLICIES, Plan, Policy, StepInfo, register_policy

__all__ = ["DecodeConfig", "Engine", "ExpertStore", "ModelConfig", "POLICIES", "Plan", "Policy", "StepInfo",
           "load", "preset", "register_policy"]
