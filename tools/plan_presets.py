#!/usr/bin/env python3
"""The memory plan of every GPU preset — SD 1.5 at 512 px, SDXL, FLUX.1, Z-Image and Qwen-Image at their presets' sizes — (the README table), and the check of
the fake-tensor trace against the same tracker on a real step (tiny at 64 px, SD 1.5 at 128 px).
Each Qwen-Image plan traces for 20-120 s: the tests check those presets' selection, this prints their plans.

    python tools/plan_presets.py [--check] [--prefix qwen-image-]
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_booth import families  # noqa: E402
from lora_booth.config import loading
from lora_booth.planning import plan  # noqa: E402

PLACEHOLDERS = {"instance_dir": "x", "instance_prompt": "a photo of sks dog", "class_prompt": "a photo of dog",
                "output_dir": "x"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="also compare fake and real traces")
    parser.add_argument("--prefix", default=None, help="only the presets whose name starts so (qwen-image-)")
    args = parser.parse_args()
    print("| preset | rows/step | weights + adapters GiB | optimizer GiB | grads + activations GiB | planned peak GiB "
          "| budget − 10 % GiB | TFLOP/step | est. s/step RTX 3090 | host-RAM peak GiB | stays in host RAM GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    def budget(name: str) -> int:
        return int(re.search(r"(\d+)gb$", name).group(1))

    names = sorted((n for n in loading.preset_names() if families.for_preset(n) is not None
                    and n.startswith(args.prefix or "")),
                   key=lambda n: (families.for_preset(n).preset_prefix, -budget(n)))
    for name in names:
        # SD 1.5 at 512 px for the plain presets; the others at their presets' own size, on their
        # family's full-size configs (sdxl, flux-dev, zimage, qwen-image)
        family = families.for_preset(name)
        model = {"model": family.plan_configs} if family.preset_prefix else {"model": "sd15", "resolution": "512"}
        cfg, _ = loading.resolve({**PLACEHOLDERS, "preset": name, **model})
        p = plan.estimate(cfg)
        weights = sum(v for k, v in p.parts.items() if "weights" in k or "adapters" in k)
        rtx3090 = next(peak for gpu, _, peak in plan.GPUS if gpu.startswith("RTX 3090"))
        print(f"| `{name}` | {p.rows} | {weights / plan.GiB:.2f} | {next(v for k, v in p.parts.items() if k.startswith('optimizer state')) / plan.GiB:.3f} | "
              f"{p.parts['gradients + activations (peak)'] / plan.GiB:.2f} | {p.total / plan.GiB:.2f} | "
              f"{0.9 * budget(name):.1f} | {p.flops / 1e12:.2f} | {p.flops / (rtx3090 * plan.UTILIZATION):.2f} | "
              f"{p.host_peak / plan.GiB:.2f} | {p.offloaded / plan.GiB:.2f} |")
    if args.check:
        print("\n| model | px | fake-trace peak MiB | real-step peak MiB | difference | fake s | real s |")
        print("|---|---|---|---|---|---|---|")
        for model, resolution in (("tiny", 64), ("sd15", 128)):
            cfg, _ = loading.resolve({**PLACEHOLDERS, "model": model, "resolution": str(resolution)})
            started = time.perf_counter()
            fake = plan.estimate(cfg)
            middle = time.perf_counter()
            real = plan.estimate(cfg, fake=False)
            done = time.perf_counter()
            print(f"| {model} | {resolution} | {fake.tracked_peak / 2**20:.1f} | {real.tracked_peak / 2**20:.1f} | "
                  f"{(fake.tracked_peak - real.tracked_peak) / real.tracked_peak:+.2%} | {middle - started:.1f} | "
                  f"{done - middle:.1f} |")


if __name__ == "__main__":
    main()
