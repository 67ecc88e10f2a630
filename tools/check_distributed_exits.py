#!/usr/bin/env python3
"""Run a 2-process CPU (gloo) training N times and count clean exits: gloo can abort at interpreter
exit unless the process group is torn down (FACTS.md: 3–15 % of runs). lora-booth destroys it.

    python tools/check_distributed_exits.py [--runs 20]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lora-booth-exits-"))
    clean = 0
    try:
        for run in range(args.runs):
            command = [sys.executable, "-m", "lora_booth", "train", "model=tiny", "instance_dir=builtin:dog",
                       "instance_prompt=a photo of sks dog", "class_prompt=a photo of dog",
                       f"output_dir={work / f'out{run}'}", f"class_dir={work / 'class'}", "resolution=32",
                       "max_steps=2", "rank=2", "num_class_images=2", "prior.sample_steps=2", "train.device=cpu",
                       "sample.num=0", "launch.processes=2"]
            result = subprocess.run(command, capture_output=True, text=True,
                                    env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
            ok = result.returncode == 0 and (work / f"out{run}" / "pytorch_lora_weights.safetensors").is_file()
            clean += ok
            print(f"run {run + 1}: {'clean exit' if ok else f'exit {result.returncode}'}", flush=True)
            if not ok:
                print(result.stderr[-2000:])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{clean}/{args.runs} clean exits")


if __name__ == "__main__":
    main()
