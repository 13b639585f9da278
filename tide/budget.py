"""GPU budgets: "8GiB"/"10GB"/"123456" (bytes), "64/layer" (experts per MoE layer), "50%" (of the experts).

Turns a budget string into resident slots per MoE layer, with errors that say what would fit. Knows
nothing about models beyond the sizes it is given.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BudgetSizes:
    num_experts: int
    moe_layers: int
    expert_bytes: int
    non_expert_bytes: int  # attention, routers, shared experts, embeddings, lm_head: counted first
    staging_experts: int  # the staging ring, counted next


def slots_per_layer(budget: str | None, sizes: BudgetSizes) -> int:
    """Resident expert slots per MoE layer; None or "all" means every expert (the reference's need)."""
    if budget is None or budget.strip().lower() in ("", "all"):
        return sizes.num_experts
    text = budget.strip()
    if text.endswith("/layer"):
        slots = _int(text[: -len("/layer")], budget)
    elif text.endswith("%"):
        try:
            frac = float(text[:-1]) / 100
        except ValueError:
            raise ValueError(f"gpu budget {budget!r}: not a percentage") from None
        if not 0 < frac <= 1:
            raise ValueError(f"gpu budget {budget!r}: a percentage must be in (0, 100]")
        slots = max(1, round(frac * sizes.num_experts))
    else:
        total = parse_bytes(text, f"gpu budget {budget!r}")
        left = total - sizes.non_expert_bytes - sizes.staging_experts * sizes.expert_bytes
        slots = left // (sizes.expert_bytes * sizes.moe_layers) if left > 0 else 0
        need = sizes.non_expert_bytes + (sizes.staging_experts + sizes.moe_layers) * sizes.expert_bytes
        if slots < 1:
            raise ValueError(f"gpu budget {budget!r} ({total} bytes) is too small for one expert per MoE layer: "
                             f"non-expert weights take {sizes.non_expert_bytes} bytes, one expert per layer plus the "
                             f"staging ring {need - sizes.non_expert_bytes}; the smallest valid budget is {need} "
                             f"bytes ({need / 1e9:.3f}GB) or 1/layer")
    if slots < 1:
        raise ValueError(f"gpu budget {budget!r}: at least one expert per MoE layer is needed")
    return min(slots, sizes.num_experts)


UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
         "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str, what: str = "size") -> int:
    """'10GB' = 10*10^9, '8GiB' = 8*2^30, '123456' = bytes; units case-insensitive (mb = MB = 10^6 bytes). Ours,
    not accelerate's convert_file_size_to_int: that refuses the string '123456' and reads '1kb' as kilobits."""
    number = text.strip().rstrip("bBiIkKmMgGtT")
    unit = text.strip()[len(number):].lower()
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in UNITS or not 0 <= value < float("inf"):  # NaN and inf fail too
        raise ValueError(f"{what}: expected bytes like '10GB', '8GiB' or '123456' (B, KB, MB, GB, TB = powers of "
                         "1000; KiB, MiB, GiB, TiB = powers of 1024), experts like '64/layer', or a share like '50%'")
    return int(value * UNITS[unit])


def _int(text: str, budget: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"gpu budget {budget!r}: '{text}' is not a whole number of experts") from None
