"""The lossless contract, checked at three levels (stated in README, "Lossless, at three levels").

  a. device-only runs (no expert on the host: full-offload, lru, accelerate, reference) run the same kernels on
     the same rows as the all-resident reference: their outputs are bit-identical to it;
  b. host-tier runs (cpu-fallback, tide) compute some experts with the host's GEMM, which rounds differently
     from the device's: they are bit-identical to the tier-matched reference (baselines/tier_matched.py), the
     same experts computed on the same tier from the run's recorded host sets;
  c. against the all-device reference they agree within TOLERANCE: teacher-forced logits (max |diff|, top-1
     agreement), free-running token agreement and first divergence, log-likelihood relative difference.
On a CPU-only machine both tiers are the CPU, so all three collapse to identity.

Owns the comparisons and the teacher-forced probe; runs nothing else. Where the all-resident reference does not
fit the device, full-offload (level a: exact) stands in for it as the ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tide.model import block_causal_mask
from tide.policy import StepInfo


@dataclass(frozen=True)
class Tolerance:
    """Level c: what a host-tier run must keep against the all-device reference (bf16 on a GPU; stated here,
    asserted by `make bench-check` and `tide eval --check-lossless`)."""

    top1_agreement_min: float = 0.99  # teacher-forced: same argmax at >= 99% of positions
    ll_rel_diff_max: float = 0.01  # log-likelihoods within 1% of the reference's


TOLERANCE = Tolerance()


def all_resident_fits(engine) -> tuple[bool, str]:
    """Whether the all-resident reference's expert tier fits the device beside what is loaded, and a sentence."""
    from tide.experts.store import free_bytes

    store = engine.store
    need = (store.num_experts * len(store.layers) + engine.staging) * store.expert_bytes
    room = free_bytes(store.device) + store.device_bytes  # the current tier is given back first
    where = f"free on {store.device}" if store.device.type == "cuda" else "of available host memory"
    fits = need <= room
    return fits, (f"the all-resident reference needs {need / 1e9:.2f} GB of expert memory, {room / 1e9:.2f} GB "
                  f"{where}: " + ("it fits" if fits else "it does not fit"))


def level(pairs_cpu: int) -> str:
    """'b' for a run that computed any (token, expert) pair on the host, else 'a'."""
    return "b" if pairs_cpu else "a"


def token_agreement(truth: list[int], run: list[int]) -> tuple[float, int | None]:
    """(fraction of positions with equal tokens over the longer sequence, first differing position or None)."""
    n = max(len(truth), len(run))
    if n == 0:
        return 1.0, None
    same = [a == b for a, b in zip(truth, run, strict=False)]
    first = next((i for i, s in enumerate(same) if not s), None if len(truth) == len(run) else len(same))
    return sum(same) / n, first


def teacher_forced_logits(engine, prompt: list[int], tokens: list[int], block_length: int) -> Tensor:
    """Logits [n, V] (fp32, host) at the first n <= block_length generated positions, all masked, after `prompt`,
    with `tokens` (the ground truth's output) deciding n: one forward under the run's placement."""
    n = min(len(tokens), block_length)
    device = next(engine.model.parameters()).device
    ids = torch.tensor(prompt + [engine.mask_id] * n, device=device)
    T = len(ids)
    with torch.no_grad():
        logits = engine.model(ids[None], 0, block_causal_mask(T, block_length, device),
                              at=StepInfo(T // block_length, 0))[0]
    return logits[len(prompt):].float().cpu()


def compare_logits(truth: Tensor, run: Tensor) -> tuple[float, float]:
    """(max |difference|, fraction of positions with the same argmax)."""
    if truth.numel() == 0:
        return 0.0, 1.0
    return float((truth - run).abs().max()), float((truth.argmax(-1) == run.argmax(-1)).float().mean())


def relative_difference(truth: float, run: float) -> float:
    return abs(run - truth) / max(abs(truth), 1e-12)
