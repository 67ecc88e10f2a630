"""Stable Diffusion 1.x and 2.x: one CLIP text encoder whose last hidden states the UNet
cross-attends to. SD 2.x exists as ε-prediction (512-base) and v-prediction (768); that difference
lives in the scheduler's prediction_type, not in the family."""
from __future__ import annotations

from dataclasses import dataclass

from .base import Family

SD_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")
OPENCLIP_WIDTH = 1024  # SD 2.x conditions on OpenCLIP-H (1024 wide); SD 1.x on CLIP-L (768), as do tiny models


@dataclass(frozen=True)
class StableDiffusion(Family):
    openclip: bool = False  # 2.x

    def claims_folder(self, index: dict, denoiser_config: dict) -> bool:
        return index.get("_class_name") in SD_PIPELINES and \
            (denoiser_config.get("cross_attention_dim") == OPENCLIP_WIDTH) == self.openclip

    def base_model_version(self, v_prediction: bool) -> str:
        return ("sd_v2" if self.openclip else "sd_v1") + ("_v" if v_prediction else "")

    def modelspec_architecture(self, v_prediction: bool, variant: str = "") -> str:
        if self.openclip:
            return ("stable-diffusion-v2-768-v" if v_prediction else "stable-diffusion-v2-512") + "/lora"
        return "stable-diffusion-v1/lora"

    def claims_single_file(self, keys: set[str]) -> bool:
        # the OpenCLIP text tower of 2.x; 1.x has CLIP-L under cond_stage_model.transformer
        openclip = any(k.startswith("cond_stage_model.model.") for k in keys)
        return "model.diffusion_model.input_blocks.0.0.weight" in keys and openclip == self.openclip


SD1 = StableDiffusion(name="sd1", title="SD 1.x", pipelines=SD_PIPELINES,
                      single_file_repo="stable-diffusion-v1-5/stable-diffusion-v1-5", plan_configs="sd15")
SD2 = StableDiffusion(name="sd2", title="SD 2.x", pipelines=SD_PIPELINES,
                      single_file_repo="stabilityai/stable-diffusion-2-1", plan_configs="sd21", openclip=True,
                      text_width=OPENCLIP_WIDTH, default_resolution=768)
