"""The lossless contract, checked at three levels (stated in README, "Lossless, at three levels").

  a. device-only runs (no expert on the host: full-offload, lru, accelerate, reference) run the same kernels on
     the same rows as the all-resident reference: their outputs are bit-identical to it;
  b. host-tier runs (cpu-fallback, tide) compute some experts with the host's GEMM, which rounds differently
     from the device's: they are bit-identical to the tier-matched reference (baselines/tier_matched.py), the
     same experts computed on the same tier from the run's recorded host sets;
  c. against the all-device reference they agree within TOLERANCE: teacher-forced logits at every generated
     position of every prompt, pooled (max |diff|; top-1 flips judged by a binomial test, see Tolerance),
     free-running token agreement and first divergence, log-likelihood relative difference.
On a CPU-only machine both tiers are the CPU, so all three collapse to identity.
Batches (`tide bench --batch-sizes`): per request, a batched run is held to the same levels against the ground
truth decoded on the same batch schedule (same batch size, same requests: the schedule depends on step counts
only), and level b's replay decodes the same batch. Against batch 1 the contract is level c's tolerance, since a
GEMM over more rows may round differently; on the CPU in float32 every request got exactly its lone tokens
(tests/test_decode.py), so there the batch changes nothing.

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
    asserted by `make bench-check` and `tide eval --check-lossless`).

    Top-1: on a correct engine a teacher-forced argmax differs from the reference's only where the two tiers' last-bit
    rounding flips a near-tie, at a rate p that we bound by `top1_flip_rate_max`. With k flips among n pooled positions
    (every generated position of every prompt), the run fails when a correct engine would show k or more flips with
    probability below `significance` (the one-sided binomial test of p <= 1% at the 1% level: at n = 384 that is
    10 flips or more). A wrong expert flips far more than that. Fewer than `min_positions` positions decide nothing."""

    top1_flip_rate_max: float = 0.01  # p: teacher-forced argmax flips a correct engine may show (near-ties)
    significance: float = 0.01  # the chance of failing a correct engine whose flip rate is p
    min_positions: int = 256  # teacher-forced positions, pooled over prompts, needed to decide
    ll_rel_diff_max: float = 0.01  # log-likelihoods within 1% of the reference's

    def top1_failure(self, flips: int, positions: int) -> str | None:
        """Why `flips` argmax differences in `positions` break level c, or None when they do not."""
        from scipy.stats import binom

        if positions < self.min_positions:
            return (f"only {positions} teacher-forced positions (level c needs >= {self.min_positions}: more prompts "
                    "or a longer --gen-length)")
        chance = float(binom.sf(flips - 1, positions, self.top1_flip_rate_max))  # P(X >= flips) at p = max rate
        if chance < self.significance:
            return (f"{flips} of {positions} teacher-forced argmaxes differ: a correct engine (flip rate <= "
                    f"{self.top1_flip_rate_max:.0%}) shows that many with probability {chance:.1e} < "
                    f"{self.significance}")
        return None


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


def level(pairs_cpu: int, device_kernel: str = "swiglu") -> str:
    """The level the code promises for a run: 'a' with no (token, expert) pair on the host, 'b' with some, both
    only where every device expert runs alone through `swiglu`; 'c' with the grouped device kernel, whose result
    for one expert may depend on the others' rows (tide/experts/executor.py)."""
    if device_kernel != "swiglu":
        return "c"
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
    """Logits [n, V] (fp32, host) at every generated position, n = len(tokens) (the ground truth's output): each block
    of the canvas (aligned from position 0, as the decoder aligns them) is masked whole and predicted from the prompt
    and the truth's earlier tokens, one full-recompute forward per block, under the run's placement."""
    P, n = len(prompt), len(tokens)
    device = next(engine.model.parameters()).device
    out = []
    for block in range(P // block_length, (P + n - 1) // block_length + 1) if n else ():
        start, end = max(P, block * block_length), (block + 1) * block_length
        ids = torch.tensor(prompt + tokens[: start - P] + [engine.mask_id] * (end - start), device=device)
        with torch.no_grad():
            logits = engine.model(ids[None], 0, block_causal_mask(end, block_length, device),
                                  at=StepInfo(block, 0))[0]
        out.append(logits[start: min(end, P + n)].float().cpu())
    return torch.cat(out) if out else torch.empty(0, 0)


def compare_logits(truth: Tensor, run: Tensor) -> tuple[float, int, int]:
    """(max |difference|, positions whose argmax differs, positions)."""
    if truth.numel() == 0:
        return 0.0, 0, 0
    return float((truth - run).abs().max()), int((truth.argmax(-1) != run.argmax(-1)).sum()), truth.shape[0]


def relative_difference(truth: float, run: float) -> float:
    return abs(run - truth) / max(abs(truth), 1e-12)
