"""Parameters, file size and planned peak of each adapter type (lora.type) on the SD 1.5
architecture, counted on the meta device (no weights, seconds). The README's table comes from:

    OMP_NUM_THREADS=1 python tools/adapter_types.py
"""
from __future__ import annotations

import sys
from pathlib import Path
from lora_booth.config import loading

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def count(kind: str, rank: int, text_encoder: bool) -> dict[str, int]:
    import json

    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lora_booth.model import lora
    from lora_booth.planning import plan
    from lora_booth.config.sections import LoraConfig

    folder = plan.config_folder("sd15")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads((folder / "unet" / "config.json").read_text()))
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    for module in (unet, te):
        module.requires_grad_(False)
    base = type("Base", (), {"unet": unet, "text_encoder": te})()
    return lora.count(lora.add_adapters(base, LoraConfig(type=kind, rank=rank, text_encoder=text_encoder), 0))


def main() -> None:
    from lora_booth.planning import plan
    from lora_booth.cli import PLAN_PLACEHOLDERS
    from lora_booth.model.loading import quiet_libraries

    quiet_libraries()
    kinds = ("lora", "dora", "loha", "lokr")
    print("| type | rank | UNet parameters | × LoRA | + CLIP-L text encoder | fp16 file (UNet) | "
          "planned peak, 512 px, batch 1 + 1 class row |")
    print("|---|---|---|---|---|---|---|")
    for rank in (4, 16):
        reference = count("lora", rank, False)["unet"]
        for kind in kinds:
            unet_only = count(kind, rank, False)["unet"]
            with_te = count(kind, rank, True)["text_encoder"]
            cfg, _ = loading.resolve([*PLAN_PLACEHOLDERS, ("model", "sd15"), ("lora.type", kind),
                                     ("lora.rank", str(rank))])
            peak = plan.estimate(cfg).total / plan.GiB
            print(f"| {kind} | {rank} | {unet_only:,} | {unet_only / reference:.2f} | {with_te:,} | "
                  f"{unet_only * 2 / 2**20:.1f} MiB | {peak:.2f} GiB |")


if __name__ == "__main__":
    main()
