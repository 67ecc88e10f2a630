"""launch.sharding=fsdp as the planner prices it: each process holds 1/processes of the frozen
denoiser, plus the blocks FSDP gathers whole while they run."""
from __future__ import annotations

import torch

# FSDP2 gathers a block just before it runs and may already gather the next one (its prefetch),
# so two of the largest blocks are priced as whole at once.
GATHERED_AT_ONCE = 2


def unit_bytes(units: list[tuple[str, torch.nn.Module]]) -> list[int]:
    """The frozen bytes of each block FSDP shards as a unit (Family.offload_units)."""
    return [sum(p.numel() * p.element_size() for p in module.parameters() if not p.requires_grad)
            for _, module in units]


def price(parts: dict[str, int], frozen_key: str, units: list[int], processes: int) -> int:
    """Rewrite `parts` for a sharded denoiser and return the bytes it saves at the peak (the frozen
    weights are alive throughout the step, so the saving holds at the peak too)."""
    frozen = parts.get(frozen_key, 0)
    if processes < 2 or not frozen or not units:
        return 0
    share = -(-frozen // processes)
    gathered = min(frozen - share, GATHERED_AT_ONCE * max(units))
    renamed = {(f"{frozen_key}, 1/{processes} per GPU" if key == frozen_key else key): size
               for key, size in parts.items()}
    renamed[f"{frozen_key}, 1/{processes} per GPU"] = share
    parts.clear()
    parts.update(renamed)
    parts[f"+ {GATHERED_AT_ONCE} largest blocks gathered whole"] = gathered
    return frozen - share - gathered
