"""The full-size SDXL base architecture with seeded random weights, for benchmarks (no hub here).
Built from the configs lora-booth ships for the planner (lora_booth/configs/sdxl)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_sdxl_architecture(folder: Path) -> Path:
    """UNet 2.57 B, CLIP-L 123 M, OpenCLIP bigG 695 M, VAE 84 M parameters (13.9 GB in fp32).
    The tokenizers are lora-booth's byte-level one: same 77-token sequences, so the same compute."""
    if (folder / "model_index.json").is_file():
        return folder
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from lora_booth.families.tiny import byte_level_vocab

    configs = ROOT / "lora_booth" / "configs" / "sdxl"
    torch.manual_seed(0)
    tokenizer = CLIPTokenizer(vocab=byte_level_vocab(), merges=[], model_max_length=77)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(configs / "text_encoder", **ids))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(configs / "text_encoder_2", **ids))
    unet = UNet2DConditionModel.from_config(json.loads((configs / "unet" / "config.json").read_text()))
    vae = AutoencoderKL.from_config(json.loads((configs / "vae" / "config.json").read_text()))
    scheduler = DDPMScheduler.from_config(json.loads((configs / "scheduler" / "scheduler_config.json").read_text()))
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    staging = folder.with_name(folder.name + ".partial")
    pipe.save_pretrained(staging, safe_serialization=True)
    staging.rename(folder)
    return folder


if __name__ == "__main__":
    print(build_sdxl_architecture(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/lora-booth-bench-train/models/sdxl-arch")))
