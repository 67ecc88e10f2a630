"""`lora-booth plan` for the keys of the new-run page: the peak memory of a training step for the
GPU of this machine (or train.gpu_memory), and when it does not fit, the memory savers that would
make it fit, in the order the planner tries them."""
from __future__ import annotations

from ..planning import plan, presets
from .run_request import Checked


def memory_plan(checked: Checked, output_dir: str) -> dict:
    pairs = [tuple(word.split("=", 1)) for word in checked.arguments] + [("output_dir", output_dir)]
    cfg, _ = presets.resolve(pairs)
    budget = presets.gpu_budget(cfg.train.gpu_memory)
    estimate = plan.estimate(cfg)
    lines = [estimate.text(budget)]
    if budget is None:
        lines.append("no CUDA GPU here: set train.gpu_memory (e.g. 8GiB) to plan for a card")
    elif not estimate.fits(budget):
        lines.append(f"memory savers, added in order until the plan fits {budget / 2**30:.1f} GiB:")
        fixes = presets.advice(pairs, budget, report=lines.append)
        lines.append(("settings that fit: " + " ".join(f"{k}={v}" for k, v, _ in fixes)) if fixes else
                     "none of the savers suffice: lower data.resolution, or use a GPU with more memory")
    return {"text": "\n".join(lines), "fits": None if budget is None else estimate.fits(budget)}
