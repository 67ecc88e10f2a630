"""The memory savers of big bases (issue #32) as the planner prices them: block offload (auto picks
the fewest blocks that fit), quantized frozen weights, and host RAM, with the first combination
of savers that makes a run fit when the usual ones do not."""
from __future__ import annotations

import dataclasses

from ..config import loading
from ..config.checks import offload_amount
from ..config.sections import Config
from ..io.errors import ConfigError
from .plan import GiB, estimate, offload_total

# Tried, in order, on top of the usual savers (presets.SAVERS) when those are not enough: the
# smallest quality cost first. fp8 rounds the weights a little; offload costs only time (the same
# numbers); int8 and nf4 round more (docs/memory.md has the measured cost) and do not combine with
# offload here.
COMBINATIONS = [
    ((("train.base_weights", "fp8"),), "fp8 frozen weights"),
    ((("train.base_weights", "fp8"), ("train.offload_blocks", "0.5")), "fp8 weights, half the blocks in host RAM"),
    ((("train.base_weights", "fp8"), ("train.offload_blocks", "all")), "fp8 weights, every block in host RAM"),
    ((("train.offload_blocks", "0.5"),), "half the blocks in host RAM"),
    ((("train.offload_blocks", "all"),), "every block in host RAM"),
    ((("train.base_weights", "int8"),), "int8 frozen weights"),
    ((("train.base_weights", "nf4"),), "nf4 frozen weights"),
]


def with_offload(cfg: Config, blocks: str) -> Config:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, offload_blocks=blocks))


def auto_offload(cfg: Config, budget: int) -> str:
    """train.offload_blocks=auto: the fewest blocks (none, then an eighth of them, a quarter, ...)
    whose plan fits `budget`; every block when none does (the memory check then says so)."""
    total = offload_total(cfg)
    if total == 0:  # a denoiser with no offloadable blocks: install would refuse any other number
        return "0"
    for count in sorted({0, *(max(1, total * k // 8) for k in range(1, 9))}):
        if estimate(with_offload(cfg, str(count)), flops=False).fits(budget):
            return str(count)
    return str(total)


def resolve_auto(cfg: Config, budget: int | None, report=print) -> Config:
    """cfg with train.offload_blocks=auto replaced by its number for `budget` (0 without a GPU)."""
    if str(cfg.train.offload_blocks).strip().lower() != "auto":
        return cfg
    chosen = auto_offload(cfg, budget) if budget is not None else "0"
    report(f"train.offload_blocks=auto → {chosen} of {offload_total(cfg)} blocks")
    return with_offload(cfg, chosen)


def combination(pairs: list[tuple[str, str]], budget: int, report=print) -> list[tuple[str, str, str]]:
    """The first of COMBINATIONS that makes the run of `pairs` fit `budget`; [] when none does.
    A combination the run's other settings refuse (fp8 with mixed_precision=no) is passed over."""
    for keys, why in sharding_first(pairs) + COMBINATIONS:
        try:
            cfg, _ = loading.resolve(pairs + list(keys))
            if offload_amount(cfg.train.offload_blocks) and offload_total(cfg) == 0:
                continue  # this family's denoiser has no blocks to offload
        except (ConfigError, ValueError):
            continue
        total = estimate(cfg, flops=False).total
        report(f"  with {' '.join(f'{k}={v}' for k, v in keys)}: {total / GiB:.2f} GiB "
               f"({'fits' if total <= budget else 'does not fit'})")
        if total <= budget:
            return [(key, value, why) for key, value in keys]
    return []


def sharding_first(pairs: list[tuple[str, str]]) -> list:
    """A run of several processes first tries sharding its frozen denoiser across them: it costs
    no quality, only the time of gathering each block; a sharded run draws no sample grids
    (sample.num=0), since one process alone cannot run a denoiser the others hold."""
    try:
        cfg, _ = loading.resolve(pairs)
    except ConfigError:
        return []
    if cfg.launch.processes < 2 or cfg.launch.sharding != "none":
        return []
    return [((("launch.sharding", "fsdp"), ("sample.num", "0")),
             f"the frozen denoiser sharded across the {cfg.launch.processes} processes (no sample grids: "
             "lora-booth generate draws afterwards)")]
