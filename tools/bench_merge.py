#!/usr/bin/env python3
"""Time and peak RSS of `lora-booth merge` on the full-size SD 1.5 architecture (random weights,
4.3 GB fp32): into a diffusers folder and into a single file, with a rank-16 adapter on every
attention projection of the UNet and the text encoder. Each merge is a real CLI process; its peak
RSS comes from the kernel's accounting of that child (wait4).

    python tools/bench_merge.py [--work /tmp/lora-booth-bench-train]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from sd15_arch import build_sd15_architecture  # noqa: E402
from lora_booth.adapters import diffusers_layout
from lora_booth.adapters import neutral


def random_adapter(model: Path, out: Path, rank: int = 16) -> Path:
    """A rank-16 adapter on to_q/to_k/to_v/to_out.0 and q/k/v/out_proj, shaped from the model's files."""
    import torch

    from lora_booth.io import tensorfile

    generator = torch.Generator().manual_seed(0)
    modules = {}
    for part, file, targets in (("unet", "unet/diffusion_pytorch_model.safetensors", ("to_q", "to_k", "to_v", "to_out.0")),
                                ("text_encoder", "text_encoder/model.safetensors", ("q_proj", "k_proj", "v_proj", "out_proj"))):
        for key, (shape, _) in tensorfile.header_of(model / file).items():
            path = key[:-len(".weight")]
            if key.endswith(".weight") and path.endswith(targets) and len(shape) == 2:
                modules[(part, neutral.canonical_path(part, path))] = neutral.Module(
                    torch.randn(rank, shape[1], generator=generator) * 0.01,
                    torch.randn(shape[0], rank, generator=generator) * 0.01, float(rank))
    return diffusers_layout.write_diffusers(neutral.Adapter(modules), out)


def measure(command: list[str]) -> dict:
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if status:
        raise SystemExit(f"failed: {' '.join(command)}\n{output[-2000:]}")
    return {"wall_s": round(time.perf_counter() - started, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/lora-booth-bench-train"))
    args = parser.parse_args()
    model = build_sd15_architecture(args.work / "models" / "sd15-arch")
    adapter = random_adapter(model, args.work / "sd15-rank16.safetensors")
    results = {}
    for name, out, extra in (("folder, same dtype", args.work / "merged", []),
                             ("single file, fp16", args.work / "merged.safetensors", ["dtype=fp16"])):
        command = [sys.executable, "-m", "lora_booth", "merge", f"base={model}", f"lora={adapter}:0.8",
                   f"out={out}", "overwrite=true", *extra]
        results[name] = measure(command)
        print(name, json.dumps(results[name]), flush=True)
    model_gib = sum(p.stat().st_size for p in model.rglob("*.safetensors")) / 2**30
    print(f"\nbase {model_gib:.2f} GiB of safetensors, adapter {adapter.stat().st_size / 2**20:.1f} MiB\n")
    print("| merge output | wall s | peak RSS MiB |\n|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['wall_s']} | {r['peak_rss_mib']} |")


if __name__ == "__main__":
    main()
