#!/usr/bin/env python
"""DreamBooth on the toy world, measured: train the shipped subject (or take adapters) and print
the table of subject hit rate, class correctness, diversity and drift, next to the base model.

    OMP_NUM_THREADS=1 python tools/eval_toyworld.py                      # train with and without prior
    python tools/eval_toyworld.py --adapter out/ --adapter out2/x.safetensors   # measure given adapters
    python tools/eval_toyworld.py --prompt-following                    # + the 24-prompt accuracy
    python tools/eval_toyworld.py --set max_steps=800 --set rank=8      # other training settings

The base defaults to lora_booth/toyworld/base (or $LORA_BOOTH_TOY_BASE).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_booth.training import toy_study as evaluate
from lora_booth.toyworld import subject, toy_base_dir  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=None, help="toy pipeline folder (default: the shipped base)")
    p.add_argument("--adapter", action="append", default=[], help="adapter folder or file (repeatable); "
                   "without any, train with and without prior preservation")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra training setting")
    p.add_argument("--out", default=None, help="where trained adapters go (default: a temporary folder)")
    p.add_argument("-n", type=int, default=32, help="samples per prompt (seeds SEED..SEED+n-1)")
    p.add_argument("--steps", type=int, default=evaluate.STEPS)
    p.add_argument("--guidance", type=float, default=evaluate.GUIDANCE)
    p.add_argument("--prompt-following", action="store_true", help="also the 24 prompts x 4 samples accuracy")
    p.add_argument("--detector-check", action="store_true", help="also the subject check's own accuracy")
    p.add_argument("--json", action="store_true", help="print the rows as JSON lines too")
    p.add_argument("--grid", default=None, help="write a PNG: per model, a row of trigger-prompt and a row of "
                   "class-prompt samples (12 seeds, 4× enlarged)")
    args = p.parse_args(argv)

    base = Path(args.base) if args.base else toy_base_dir()
    measure = dict(n=args.n, steps=args.steps, guidance=args.guidance, with_prompt_following=args.prompt_following)
    if args.detector_check:
        print("subject check:", subject.subject_accuracy())
    rows = [evaluate.evaluate(base, None, "base", **measure)]
    walls, adapters = {}, [None]
    if args.adapter:
        for adapter in args.adapter:
            rows.append(evaluate.evaluate(base, adapter, Path(adapter).name, **measure))
            adapters.append(adapter)
    else:
        out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="toyworld-eval-"))
        overrides = dict(kv.split("=", 1) for kv in args.set)
        for name, extra in (("LoRA, prior preservation", {}), ("LoRA, no prior (λ=0)", {"prior.weight": "0"})):
            folder = out / ("prior" if not extra else "no-prior")
            adapter, wall = evaluate.train_subject(folder, base, print, class_dir=str(out / "class-images"),
                                                   **{**overrides, **extra})
            walls[name] = wall
            rows.append(evaluate.evaluate(base, adapter, f"{name} ({wall:.0f} s)", **measure))
            adapters.append(adapter)
        print(f"adapters in {out}")
    if args.grid:
        write_grid(Path(args.grid), base, adapters, args)
    print()
    print(evaluate.format_table(rows))
    if args.json:
        for row in rows:
            print(json.dumps(row.as_dict()))
    return 0


def write_grid(path: Path, base: Path, adapters: list, args) -> None:
    import numpy as np
    from PIL import Image

    rows = []
    for adapter in adapters:
        pipe = evaluate.load(base, adapter)
        for prompt in (evaluate.TRIGGER_PROMPT, evaluate.CLASS_PROMPT):
            rows.append(np.concatenate(list(evaluate.sample(pipe, prompt, 12, steps=args.steps,
                                                             guidance=args.guidance)), axis=1))
    image = Image.fromarray(np.concatenate(rows, axis=0))
    image.resize((image.width * 4, image.height * 4), Image.NEAREST).save(path)
    print(f"grid: {path}")


if __name__ == "__main__":
    raise SystemExit(main())
