#!/usr/bin/env python3
"""Steady seconds per step and peak RSS of `lora-booth train`, with and without cached latents and
prompt embeddings, on the tiny model and on the full-size SD 1.5 and SDXL architectures (random
weights).

Each case is a real `python -m lora_booth train` process: its per-step times come from the run's
own metrics.jsonl (steady = mean of steps 2..N: step 1 carries one-off warm-up), its peak RSS from
the kernel's accounting of that child (wait4). Class images are 10 pre-made files, so no case
times their generation. Batch 1 + 1 class row, rank 4, fp32, AdamW, as the diffusers reference.

    python tools/bench_train.py                          # tiny at 64 px and sd15-arch at 256 px
    python tools/bench_train.py --models tiny --steps 50
    python tools/bench_train.py --models sdxl-arch        # SDXL at 256 px (builds 13.9 GB of weights once)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from sd15_arch import build_sd15_architecture  # noqa: E402
from sdxl_arch import build_sdxl_architecture  # noqa: E402
from lora_booth.config import loading


def make_class_images(folder: Path, count: int, size: int) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        path = folder / f"class-{index:02d}.png"
        if not path.exists():
            rng = np.random.default_rng(index)
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return folder


def run_case(model: str, resolution: int, steps: int, cached: bool, work: Path) -> dict:
    out = work / "out" / f"{Path(model).name}-{resolution}-{'cached' if cached else 'uncached'}"
    command = [sys.executable, "-m", "lora_booth", "train", f"model={model}", "instance_dir=builtin:dog",
               "instance_prompt=a photo of sks dog", "class_prompt=a photo of dog",
               f"class_dir={make_class_images(work / 'class', 10, resolution)}", "num_class_images=10",
               f"output_dir={out}", "overwrite=true", f"resolution={resolution}", f"max_steps={steps}", "rank=4",
               "lr=1e-4", "seed=0", "train.device=cpu", "train.log_every=1", "sample.num=0", "save.checkpoint_every=0",
               f"data.cache_latents={str(cached).lower()}", f"train.cache_text_embeddings={str(cached).lower()}"]
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"case failed ({' '.join(command)}):\n{output[-3000:]}")
    seconds = [json.loads(line)["step_seconds"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = seconds[1:] or seconds
    return {"model": Path(model).name, "resolution": resolution, "steps": steps, "cached": cached,
            "s_per_step_steady": statistics.mean(steady), "s_per_step_median": statistics.median(steady),
            "peak_rss_mib": usage.ru_maxrss / 1024, "wall_s": wall,
            "adapter_bytes": (out / "pytorch_lora_weights.safetensors").stat().st_size}


def matmul_peak(seconds: float = 3.0) -> float:
    """This machine's fp32 matmul FLOP/s with torch's default threads (2048² GEMMs)."""
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        count += 1
    return count * 2 * 2048**3 / (time.perf_counter() - started)


def step_flops(model: str, resolution: int, cached: bool) -> float:
    """FLOPs of the same step, from the planner's trace of the same configuration."""
    from lora_booth.planning import plan

    cfg, _ = loading.resolve({"model": model, "resolution": str(resolution), "rank": "4", "instance_dir": "x",
                             "instance_prompt": "a photo of sks dog", "class_prompt": "a photo of dog",
                             "output_dir": "x", "data.cache_latents": str(cached),
                             "train.cache_text_embeddings": str(cached)})
    return plan.estimate(cfg).flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,sd15-arch")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lora-booth-bench-train"))
    parser.add_argument("--steps", type=int, default=0, help="steps per case (default: 30 tiny, 6 sd15-arch)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    cells = {"tiny": ("tiny", 64, args.steps or 30),
             "sd15-arch": (build_sd15_architecture, 256, args.steps or 6),
             "sdxl-arch": (build_sdxl_architecture, 256, args.steps or 4)}
    results = []
    for name in args.models.split(","):
        model, resolution, steps = cells[name]
        model = model if isinstance(model, str) else str(model(args.work / "models" / name))
        for cached in (True, False):
            result = run_case(model, resolution, steps, cached, args.work)
            result["tflop_per_step"] = step_flops(model, resolution, cached) / 1e12
            results.append(result)
            print(json.dumps(result), flush=True)
    peak = matmul_peak()
    for result in results:
        result["fraction_of_matmul_peak"] = result["tflop_per_step"] * 1e12 / result["s_per_step_steady"] / peak
    import torch
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, " \
              f"{torch.get_num_threads()} threads"
    print(f"\nmachine: {machine}; fp32 matmul peak {peak / 1e9:.1f} GFLOP/s\n")
    print("| model | px | steps | latents + prompts cached | s/step (mean 2..N) | median | peak RSS MiB | wall s "
          "| TFLOP/step | of matmul peak |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['resolution']} | {r['steps']} | {'yes' if r['cached'] else 'no'} | "
              f"{r['s_per_step_steady']:.3f} | {r['s_per_step_median']:.3f} | {r['peak_rss_mib']:.0f} | {r['wall_s']:.1f} "
              f"| {r['tflop_per_step']:.3f} | {r['fraction_of_matmul_peak']:.0%} |")
    (args.work / "results.json").write_text(json.dumps({"machine": machine, "results": results}, indent=1))


if __name__ == "__main__":
    main()
