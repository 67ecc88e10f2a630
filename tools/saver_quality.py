"""The quality cost of storing the frozen denoiser in fewer bits (train.base_weights), on the tiny
models: one training step of the same batch (same photos, seed, noise and timesteps) per storage,
its loss, and how far the denoiser's first prediction lies from the bf16 and fp32 ones.

    OMP_NUM_THREADS=1 python tools/saver_quality.py          # a table for docs/memory.md

Random tiny weights are not a trained model: the numbers say how much each storage perturbs the
same computation, not how a finished adapter looks.
"""
from __future__ import annotations

import json
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from lora_booth.config import loading  # noqa: E402
from lora_booth.model import quantize  # noqa: E402
from lora_booth.training import recipe  # noqa: E402

STORAGES = [("no", "compute"), ("bf16", "compute"), ("bf16", "fp8"), ("bf16", "int8"), ("bf16", "nf4")]


def photos(root: Path) -> Path:
    folder = root / "photos"
    folder.mkdir()
    for index in range(2):
        array = np.random.default_rng(index).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(array, "RGB").save(folder / f"{index}.png")
    return folder


def one_step(model: str, precision: str, weights: str, root: Path, data: Path) -> tuple[float, torch.Tensor]:
    """The loss of the first step and the denoiser's first output under this storage."""
    out = root / f"{model}-{precision}-{weights}"
    cfg, _ = loading.resolve({"model": model, "instance_dir": str(data), "instance_prompt": "a photo of sks dog",
                              "output_dir": str(out), "resolution": "32", "max_steps": "1", "rank": "4",
                              "train.device": "cpu", "sample.num": "0", "prior.weight": "0",
                              "train.mixed_precision": precision, "train.base_weights": weights,
                              "train.gradient_checkpointing": "true"})
    outputs: list[torch.Tensor] = []
    store = quantize.store

    def store_and_watch(denoiser, *args):
        stored = store(denoiser, *args)
        denoiser.register_forward_hook(lambda module, inputs, output: outputs.append(
            (output[0] if isinstance(output, tuple) else output.sample).detach().float().clone()))
        return stored

    quantize.store = store_and_watch
    try:
        recipe.run(cfg, report=lambda *a: None)
    finally:
        quantize.store = store
    loss = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    return loss, outputs[0]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().mean() / b.abs().mean()).item()


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="saver-quality-"))
    data = photos(root)
    print("| model | storage | loss of step 1 | prediction vs bf16 | prediction vs fp32 |")
    print("|---|---|---|---|---|")
    for model in ("tiny", "tiny-sdxl", "tiny-flux"):
        results = {(p, w): one_step(model, p, w, root, data) for p, w in STORAGES}
        full, half = results[("no", "compute")][1], results[("bf16", "compute")][1]
        for (precision, weights), (loss, output) in results.items():
            name = "fp32" if precision == "no" else "bf16" if weights == "compute" else weights
            print(f"| {model} | {name} | {loss:.5f} | {relative(output, half):.2%} | {relative(output, full):.2%} |")


if __name__ == "__main__":
    main()
