#!/usr/bin/env python
"""The DreamBooth paper's prior-preservation ablation (Ruiz et al. 2023, its ablation studies), measured on the toy
world (issue #18 §2): `preset=demo` trained through lora-booth's own trainer, one cell per setting,
the same training seeds in every cell, each adapter measured by the toy world's detector with the
functions of lora_booth/training/toy_study.py on the same sampling seeds. Prints a markdown table
of mean (min–max over the seeds) per cell.

The tables of docs/training.md ("What prior preservation does, measured"): 13 cells × 3 seeds,
then 2 more seeds for no prior and the old and new demo default, about 55 CPU-minutes in all:

    OMP_NUM_THREADS=1 python tools/prior_study.py --out study/ --json > study.md
    OMP_NUM_THREADS=1 python tools/prior_study.py --out study/ --cells no-prior,images-1,prediction-1 --seeds 0,1,2,3,4

A dry run of the machinery (tiny settings, a minute):

    OMP_NUM_THREADS=1 python tools/prior_study.py --cells no-prior,images-1 --seeds 0 -n 4 --set max_steps=20

Columns, per cell (n samples per prompt, sampling seeds evaluate.SEED…+n-1, DPM-Solver++ 10 steps,
guidance 3, as `lora-booth eval`):

- subject: evaluate.subject_hit_rate on "a photo of a sks star"; in context: the same on
  "a photo of a sks star on a cyan background", and how many of those samples have the cyan
  background the prompt asks for (detector.detect's background colour, nearest world background);
- class shape kept, distinct colours, drift: evaluate.class_stats on "a photo of a star";
  colour TV: total-variation distance between the class samples' colour distribution and the
  base model's on the same seeds (0: the same distribution, 1: disjoint);
- brown bg: share of "a photo of a sks star" samples drawn on a brown background. The shipped
  photos have four different backgrounds; the `brown*` cells train on the same four subjects
  (subject.sample_subject_scene with the shipped seed, so the same geometry and colour) composed on
  one brown background, the background DreamBooth should not learn, without and with a loss mask
  (data.masks=files, made from the scene's own geometry, subject.subject_mask: `outline` whites
  every pixel the outline touches, `core` only the latent elements the subject mostly fills) —
  this column is their background leakage;
- wall: seconds of the whole `train` run on one CPU thread, class images included: every run draws
  its own class images into a fresh class_dir (prior.mode=images; class images are keyed by
  train.seed, so the cache could not be shared across seeds anyway).

Each finished run is appended to OUT/runs.jsonl; rerunning with the same --out skips it, so an
interrupted study continues. --json prints every run and the per-cell summary as JSON after the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from lora_booth.toyworld import detector, subject, toy_base_dir, world
from lora_booth.training import toy_study as evaluate  # noqa: E402

CONTEXT_PROMPT = "a photo of a sks star on a cyan background"
CONTEXT_BACKGROUND = "cyan"
LEAK_BACKGROUND = "brown"   # a world background, so the detector names it; none of the shipped photos has it

# name → (label, training overrides, photos). Photos: builtin (the shipped four), brown (the same
# subjects on one brown background), brown-outline / brown-core (the same, with masks beside them).
# Every cell names its prior.mode, so a later change of the demo preset's mode changes no cell.
IMAGES, PREDICTION = {"prior.mode": "images"}, {"prior.mode": "prediction"}
CELLS: dict[str, tuple[str, dict, str]] = {
    "no-prior": ("no prior (λ=0)", {"prior.weight": "0"}, "builtin"),
    "images-0.5": ("images, λ=0.5", {**IMAGES, "prior.weight": "0.5"}, "builtin"),
    "images-1": ("images, λ=1 (demo before 2026-12-02)", IMAGES, "builtin"),
    "images-2": ("images, λ=2", {**IMAGES, "prior.weight": "2"}, "builtin"),
    "prediction-1": ("prediction, λ=1 (demo)", PREDICTION, "builtin"),
    "rank-4": ("images, λ=1, rank 4", {**IMAGES, "lora.rank": "4"}, "builtin"),
    "rank-16": ("images, λ=1, rank 16", {**IMAGES, "lora.rank": "16"}, "builtin"),
    "frozen-te": ("images, λ=1, text encoder frozen", {**IMAGES, "lora.text_encoder": "false"}, "builtin"),
    "brown": ("images, λ=1, brown photos", IMAGES, "brown"),
    "brown-masked": ("images, λ=1, brown photos, outline mask", {**IMAGES, "data.masks": "files"}, "brown-outline"),
    "brown-core": ("images, λ=1, brown photos, core mask", {**IMAGES, "data.masks": "files"}, "brown-core"),
    # candidates for the demo's defaults (target: subject ≥ 95 %, class shape within 10 points of the base)
    "prediction-2": ("prediction, λ=2", {**PREDICTION, "prior.weight": "2"}, "builtin"),
    "class-128": ("images, λ=1, 128 class images", {**IMAGES, "prior.num_class_images": "128"}, "builtin"),
}
DEFAULT_CELLS = ("no-prior", "images-0.5", "images-1", "images-2", "prediction-1", "rank-4", "rank-16",
                 "frozen-te", "brown", "brown-masked", "brown-core", "prediction-2", "class-128")
METRICS = ("subject", "context_subject", "context_background", "class_shape", "class_colour_tv",
           "class_colours", "class_drift", "trigger_leak", "wall_s")


def write_photos(folder: Path, mask: str, background: str = LEAK_BACKGROUND) -> Path:
    """The shipped subjects (same scenes: geometry, colour) on one `background`, with masks beside
    them: `mask` none, outline (every pixel the outline touches) or core (only the 4×4-pixel blocks,
    one latent element each, that the outline covers by at least 3/4). The shipped photos are
    plain-coloured, so the leak is measurable by colour."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(subject.SAMPLE_SEED)   # the scenes of subject.sample_images(), in order
    scenes = [subject.sample_subject_scene(rng, name) for name in subject.SAMPLE_BACKGROUNDS]
    for index, scene in enumerate(scenes):
        moved = dataclasses.replace(scene, background=background, background_rgb=world.BACKGROUNDS[background])
        Image.fromarray(subject.render_subject(moved), mode="RGB").save(folder / f"toystar-{index}.png")
        if mask != "none":
            coverage = subject.subject_mask(scene.cx, scene.cy, scene.radius, scene.angle)   # (32, 32)
            if mask == "outline":   # the anti-aliased rim belongs to the subject
                white = coverage > 0
            else:   # a latent element holds 4×4 pixels (32 px → 8×8): keep those that are mostly subject
                blocks = coverage.reshape(8, 4, 8, 4).mean(axis=(1, 3)) >= 0.75
                white = np.kron(blocks, np.ones((4, 4), bool))
            Image.fromarray(np.where(white, 255, 0).astype(np.uint8), mode="L").save(
                folder / f"toystar-{index}.mask.png")
    return folder


def nearest_background(rgb) -> str:
    names = list(world.BACKGROUNDS)
    palette = np.array([world.BACKGROUNDS[name] for name in names], np.float32)
    return names[int(np.argmin(np.linalg.norm(palette - np.asarray(rgb, np.float32), axis=1)))]


def background_share(images, name: str) -> float:
    found = [nearest_background(detector.detect(image).background_rgb) for image in images]
    return sum(f == name for f in found) / max(len(found), 1)


def colour_tv(counts: dict, reference: dict) -> float:
    """Total-variation distance between two colour histograms (evaluate.class_stats' colour_counts)."""
    total, ref_total = max(sum(counts.values()), 1), max(sum(reference.values()), 1)
    return 0.5 * sum(abs(counts.get(c, 0) / total - reference.get(c, 0) / ref_total) for c in world.COLOURS)


def measure(base: Path, adapter, n: int, reference_counts: dict | None) -> dict:
    """One model (base, or base + adapter) on fixed sampling seeds, with evaluate's functions."""
    pipe = evaluate.load(base, adapter)
    trigger = evaluate.sample(pipe, evaluate.TRIGGER_PROMPT, n)
    context = evaluate.sample(pipe, CONTEXT_PROMPT, n)
    stats = evaluate.class_stats(evaluate.sample(pipe, evaluate.CLASS_PROMPT, n))
    return {
        "subject": evaluate.subject_hit_rate(trigger),
        "context_subject": evaluate.subject_hit_rate(context),
        "context_background": background_share(context, CONTEXT_BACKGROUND),
        "class_shape": stats["shape"],
        "class_colours": stats["distinct_colours"],
        "class_colour_counts": stats["colour_counts"],
        "class_colour_tv": colour_tv(stats["colour_counts"], reference_counts or stats["colour_counts"]),
        "class_drift": stats["drift"],
        "trigger_leak": background_share(trigger, LEAK_BACKGROUND),
    }


def train_cell(out: Path, base: Path, cell: str, seed: int, overrides: dict, report) -> tuple[Path, float]:
    label, settings, photos = CELLS[cell]
    run_dir = out / cell / f"seed-{seed}"
    if run_dir.exists():
        shutil.rmtree(run_dir)   # a run cut short last time: start it again from nothing
    settings = {**settings, **overrides, "train.seed": str(seed), "prior.class_dir": str(run_dir / "class-images")}
    if photos != "builtin":
        mask = photos.split("-")[1] if "-" in photos else "none"
        settings.update({"data.instance_dir": str(write_photos(out / f"photos-{photos}", mask)),
                         # your own photos drop the demo's subject keys: name them again
                         "data.instance_prompt": evaluate.TRIGGER_PROMPT, "prior.class_prompt": evaluate.CLASS_PROMPT})
    return evaluate.train_subject(run_dir / "run", base, report, **settings)


def load_runs(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def summarise(runs: list[dict], cells: list[str]) -> dict[str, dict]:
    """Per cell and metric: mean, min, max over its seeds."""
    summary = {}
    for cell in cells:
        rows = [r for r in runs if r["cell"] == cell]
        if not rows:
            continue
        summary[cell] = {"label": CELLS[cell][0], "seeds": sorted(r["seed"] for r in rows)}
        for metric in METRICS:
            values = [r[metric] for r in rows if r.get(metric) is not None]
            if values:
                summary[cell][metric] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}
    return summary


def _cell_text(stat: dict | None, percent: bool, digits: int = 0) -> str:
    if not stat:
        return "–"
    show = (lambda v: f"{v * 100:.0f}") if percent else (lambda v: f"{v:.{digits}f}")
    if stat["min"] == stat["max"]:
        return show(stat["mean"]) + ("%" if percent else "")
    return f"{show(stat['mean'])} ({show(stat['min'])}–{show(stat['max'])}){'%' if percent else ''}"


def format_table(base_row: dict, summary: dict[str, dict], target_gap: float = 0.10) -> str:
    head = ["cell", '"a photo of a sks star": subject', "on cyan: subject", "on cyan: cyan bg",
            '"a photo of a star": shape ok', "colour TV vs base", "distinct colours", "drift (subject)",
            "sks star on brown bg", "wall s", "target"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["--:"] * (len(head) - 2) + [":-:"]) + "|"]
    one = lambda v: {"mean": v, "min": v, "max": v}  # noqa: E731
    rows = [("base model", {m: one(base_row[m]) for m in METRICS if m in base_row}, "")]
    for cell, s in summary.items():
        meets = (s["subject"]["mean"] >= 0.95 and s["class_shape"]["mean"] >= base_row["class_shape"] - target_gap)
        rows.append((f"{s['label']} ×{len(s['seeds'])}", s, "yes" if meets else "no"))
    for label, s, meets in rows:
        cells = [label, _cell_text(s.get("subject"), True), _cell_text(s.get("context_subject"), True),
                 _cell_text(s.get("context_background"), True), _cell_text(s.get("class_shape"), True),
                 _cell_text(s.get("class_colour_tv"), False, 2), _cell_text(s.get("class_colours"), False, 1),
                 _cell_text(s.get("class_drift"), True), _cell_text(s.get("trigger_leak"), True),
                 _cell_text(s.get("wall_s"), False), meets]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", default=",".join(DEFAULT_CELLS),
                   help=f"comma-separated cells, of: {', '.join(CELLS)} (default: the ablation)")
    p.add_argument("--seeds", default="0,1,2", help="training seeds (train.seed), the same for every cell")
    p.add_argument("-n", type=int, default=32, help="samples per prompt")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a setting for every cell")
    p.add_argument("--base", default=None, help="toy pipeline folder (default: the shipped base)")
    p.add_argument("--out", default=None, help="run folders and runs.jsonl (default: a temporary folder); "
                   "finished runs found there are not trained again")
    p.add_argument("--json", action="store_true", help="print the runs and the summary as JSON after the table")
    p.add_argument("--quiet", action="store_true", help="no training progress lines")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)   # the study's wall times are one-thread times
    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    unknown = [c for c in cells if c not in CELLS]
    if unknown:
        p.error(f"unknown cells {unknown}; choose from {', '.join(CELLS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    overrides = dict(kv.split("=", 1) for kv in args.set)
    base = Path(args.base) if args.base else toy_base_dir()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="prior-study-"))
    out.mkdir(parents=True, exist_ok=True)
    log = out / "runs.jsonl"
    report = (lambda message: None) if args.quiet else (lambda message: print(f"  {message}", file=sys.stderr))

    base_row = measure(base, None, args.n, None)
    runs = [r for r in load_runs(log) if r["n"] == args.n and r["settings"] == overrides]
    done = {(r["cell"], r["seed"]) for r in runs}
    for cell in cells:
        for seed in seeds:
            if (cell, seed) in done:
                continue
            print(f"{cell} seed {seed} …", file=sys.stderr, flush=True)
            adapter, wall = train_cell(out, base, cell, seed, overrides, report)
            row = {"cell": cell, "label": CELLS[cell][0], "seed": seed, "n": args.n, "settings": overrides,
                   "wall_s": wall, **measure(base, adapter, args.n, base_row["class_colour_counts"])}
            print(f"{cell} seed {seed}: subject {row['subject']:.0%}, class shape {row['class_shape']:.0%}, "
                  f"drift {row['class_drift']:.0%}, {wall:.0f} s", file=sys.stderr, flush=True)
            with log.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            runs.append(row)
    runs = [r for r in runs if r["cell"] in cells and r["seed"] in seeds]
    summary = summarise(runs, cells)
    extra = f", settings {overrides}" if overrides else ""
    print(f"toy world, preset=demo, seeds {seeds}, {args.n} samples per prompt{extra}; mean (min–max over seeds)\n")
    print(format_table(base_row, summary))
    if args.json:
        print()
        print(json.dumps({"base": base_row, "runs": runs, "summary": summary}, indent=1))
    print(f"\nruns in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
