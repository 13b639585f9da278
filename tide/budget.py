"""GPU budgets: "8GiB" (bytes, accelerate's parser), "64/layer" (experts per MoE layer), "50%" (of the experts).

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
        from accelerate.utils import convert_file_size_to_int

        try:
            total = convert_file_size_to_int(text)
        except ValueError:
            raise ValueError(f"gpu budget {budget!r}: expected bytes like '8GiB', experts like '64/layer', "
                             f"or a share like '50%'") from None
        left = total - sizes.non_expert_bytes - sizes.staging_experts * sizes.expert_bytes
        slots = left // (sizes.expert_bytes * sizes.moe_layers) if left > 0 else 0
        need = sizes.non_expert_bytes + (sizes.staging_experts + sizes.moe_layers) * sizes.expert_bytes
        if slots < 1:
            raise ValueError(f"gpu budget {budget!r} ({total} bytes) is too small: non-expert weights take "
                             f"{sizes.non_expert_bytes} bytes and one expert per MoE layer plus the staging ring "
                             f"needs {need} bytes in all")
    if slots < 1:
        raise ValueError(f"gpu budget {budget!r}: at least one expert per MoE layer is needed")
    return min(slots, sizes.num_experts)


def _int(text: str, budget: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"gpu budget {budget!r}: '{text}' is not a whole number of experts") from None
