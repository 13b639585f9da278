"""TIDE: lossless expert offloading for MoE diffusion LLMs (LLaDA2.0) on one GPU plus the host CPU.

The public names are imported on first use (PEP 562), so every entry point (`tide`, `tide-lm-eval`, the
`python -m tide.bench.*` studies) can set the process's threading policy (`passive_openmp`) before torch loads.
"""

import os
from importlib import import_module
from pathlib import Path

# The checkout's baselines/, bench/ and evals/ are tide.baselines, tide.bench and tide.evals: through links in tide/
# in a checkout, as real sub-packages in a wheel. Where a copy of the tree lost the links (copied without symlinks,
# or checked out with core.symlinks=false), the checkout's root joins this package's path and the names still resolve.
_ROOT = Path(__file__).resolve().parent.parent
if not (Path(__file__).parent / "bench").is_dir() and (_ROOT / "bench" / "__init__.py").is_file():
    __path__.append(str(_ROOT))

_PUBLIC = {"DecodeConfig": "tide.config", "ModelConfig": "tide.config", "preset": "tide.config",
           "Engine": "tide.engine", "load": "tide.engine", "ExpertStore": "tide.experts.store",
           "POLICIES": "tide.policy", "Plan": "tide.policy", "Policy": "tide.policy", "StepInfo": "tide.policy",
           "register_policy": "tide.policy"}
__all__ = sorted(_PUBLIC)


def passive_openmp() -> None:
    """OpenMP threads sleep at barriers instead of spinning (README, "Threads"), so the main thread's intra-op team
    neither steals cores from the host-tier workers after each op nor collapses when other processes share the
    cores. libgomp reads the variable once, when torch loads it: every entry point calls this first. A value in the
    environment wins."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'tide' has no attribute {name!r}")
    return getattr(import_module(_PUBLIC[name]), name)
