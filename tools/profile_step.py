#!/usr/bin/env python3
"""torch.profiler on one real training step of `lora-booth train` (the second: the first carries
one-off warm-up): where the time and the memory of a step go. Prints the top operators by CPU time
and by memory allocated.

    python tools/profile_step.py --model /tmp/lora-booth-bench/models/sd15-arch --resolution 256
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lora_booth.config import loading
from lora_booth.training import recipe  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lora-booth-profile-"))
    cfg, _ = loading.resolve({"model": args.model, "instance_dir": "builtin:dog", "instance_prompt": "a photo of sks dog",
                             "class_prompt": "a photo of dog", "num_class_images": "2", "prior.sample_steps": "2",
                             "output_dir": str(work / "out"), "resolution": str(args.resolution), "max_steps": "2",
                             "rank": "4", "sample.num": "0", "save.checkpoint_every": "0", "train.device": "cpu",
                             "class_dir": str(work / "class")})
    original, calls = recipe.training_step, []

    def profiled(setup, micro_step, cfg):
        calls.append(micro_step)
        if len(calls) != 2:
            return original(setup, micro_step, cfg)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            result = original(setup, micro_step, cfg)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
        print(prof.key_averages().table(sort_by="self_cpu_memory_usage", row_limit=8))
        return result

    recipe.training_step = profiled
    recipe.run(cfg, report=lambda *_: None)


if __name__ == "__main__":
    main()
