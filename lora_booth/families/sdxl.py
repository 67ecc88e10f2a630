"""SDXL: two CLIP text encoders side by side (CLIP-L and OpenCLIP bigG), the second's pooled
output, and six size-and-crop numbers per image as the UNet's added conditioning."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .ldm import SDXL_UNET_LAYOUT
from .conditioning import Conditioning
from .base import Family


@dataclass(frozen=True)
class StableDiffusionXL(Family):
    def claims_folder(self, index: dict, denoiser_config: dict) -> bool:
        return index.get("_class_name") in self.pipelines

    def claims_single_file(self, keys: set[str]) -> bool:
        return any(k.startswith("conditioner.embedders.") for k in keys)  # the SGM layout

    def refuses_folder(self, index: dict, denoiser_config: dict, vae_config: dict | None = None) -> str | None:
        if not index.get("text_encoder") or not index["text_encoder"][0]:
            return ("an SDXL model without the first text encoder (a refiner?); lora-booth trains SDXL base models, "
                    "which have both text encoders")
        return super().refuses_folder(index, denoiser_config, vae_config)

    def refuses_single_file(self, keys: set[str]) -> str | None:
        # the base model has CLIP-L (embedders.0.transformer) and OpenCLIP bigG (embedders.1); the refiner bigG only
        if not any(k.startswith("conditioner.embedders.0.transformer.") for k in keys) or \
                not any(k.startswith("conditioner.embedders.1.") for k in keys):
            return "an SDXL refiner (one text encoder); lora-booth trains SDXL base models"
        return None

    def encode(self, encoders: list, ids: list[torch.Tensor], masks: list | None = None) -> Conditioning:
        """The penultimate hidden states of both encoders side by side (768 + 1280 = 2048 wide)
        and the pooled, projected output of the second."""
        hidden, pooled = [], None
        for encoder, tokens in zip(encoders, ids):
            output = encoder(tokens, output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
            pooled = output[0]  # the last encoder's: CLIPTextModelWithProjection's text_embeds
        return Conditioning(torch.cat(hidden, dim=-1), pooled)

    def added_conditioning(self, conditioning: Conditioning, sizes: torch.Tensor) -> dict | None:
        """The pooled text embedding and each row's six size numbers (original size, crop, target)."""
        return {"text_embeds": conditioning.pooled,
                "time_ids": sizes.to(conditioning.pooled.device, conditioning.pooled.dtype)}

    def planned_conditioning(self, rows: int, encoders: dict, hidden_width: int, dtype: torch.dtype) -> Conditioning:
        pooled_width = encoders["text_encoder_2"].config.projection_dim
        return Conditioning(torch.randn(rows, 77, hidden_width, dtype=dtype), torch.randn(rows, pooled_width, dtype=dtype))

    def base_model_version(self, v_prediction: bool) -> str:
        return "sdxl_base_v1-0"

    def modelspec_architecture(self, v_prediction: bool, variant: str = "") -> str:
        return "stable-diffusion-xl-v1-base/lora"

    def precision_note(self, mixed_precision: str) -> str:
        if mixed_precision == "no":
            return ""
        return "; VAE in fp32 (SDXL's VAE overflows to NaN in fp16), sample images decoded outside autocast"


SDXL = StableDiffusionXL(name="sdxl", title="SDXL", pipelines=("StableDiffusionXLPipeline",
                                                               "StableDiffusionXLImg2ImgPipeline"),
                         single_file_repo="stabilityai/stable-diffusion-xl-base-1.0", plan_configs="sdxl",
                         text_parts=("text_encoder", "text_encoder_2"),
                         text_encoder_classes=("CLIPTextModel", "CLIPTextModelWithProjection"),
                         preset_prefix="sdxl-", has_safety_checker=False, zeros_for_empty_prompt=True,
                         text_width=2048, default_resolution=1024,
                         # kohya: lora_te1_/lora_te2_, the UNet in the original (SGM) block names
                         kohya_text_prefixes=(("text_encoder", "lora_te1_"), ("text_encoder_2", "lora_te2_")),
                         kohya_unet_layout=SDXL_UNET_LAYOUT, clip_skip="None",  # kohya writes None: fixed layer
                         modelspec_implementation="https://github.com/Stability-AI/generative-models")
