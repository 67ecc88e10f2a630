"""FLUX.1 (dev, schnell and fine-tunes in their layout): a rectified-flow transformer with two kinds
of block (double-stream: image and text tokens apart, attending jointly; single-stream: one
sequence), conditioned on T5-XXL's hidden states and CLIP-L's pooled output. Its latents have 16
channels, shifted and scaled, and reach the transformer packed 2×2 into 64-wide tokens with their
(row, column) as position ids; dev also takes the guidance it was distilled from as an input."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from ..io.errors import AdapterError
from . import noise as noising
from .flow import RectifiedFlowFamily
from .conditioning import Conditioning
from .flux_layout import original_tensor_name, to_kohya
from .flux2_layout import MARKER as FLUX2_MARKER  # FLUX.2 files share the double-block names

# the variants lora-booth does not train, by the pipeline class of their folders
VARIANT_PIPELINES = {
    "FluxFillPipeline": "FLUX.1 Fill (inpainting and outpainting: its transformer takes the masked image too)",
    "FluxControlPipeline": "a FLUX.1 control model (Canny/Depth: its transformer takes the control image too)",
    "FluxKontextPipeline": "FLUX.1 Kontext (image editing: it conditions on a reference image)",
    "FluxPriorReduxPipeline": "FLUX.1 Redux (an image-variation adapter, not a text-to-image model)",
    "FluxControlNetPipeline": "a FLUX.1 ControlNet pipeline",
    "FluxInpaintPipeline": "a FLUX.1 inpainting pipeline",
}
# Which outside tool reproduces a FLUX.1 file of each non-LoRA type, as tools/check_flux_loaders.py
# measured it (ComfyUI, Forge, diffusers; docs/flux.md): a hint names no tool that was not checked.
OUTSIDE_PATHS = {
    "dora": "Its pytorch_lora_weights.safetensors loads exactly in diffusers (FluxPipeline.load_lora_weights); "
            "ComfyUI and Forge drop its DoRA magnitudes, so for them bake it into a plain LoRA after training: "
            "lora-booth convert in=OUT to=kohya dora=bake rank=N (exact at the weights' full rank)",
    "loha": "Its pytorch_lora_weights.safetensors loads exactly in ComfyUI and Forge; diffusers cannot load LoHa "
            "for FLUX.1",
    "lokr": "Its pytorch_lora_weights.safetensors loads exactly in ComfyUI and Forge; diffusers cannot load LoKr "
            "for FLUX.1",
}
# T5 tokens per prompt, training and sampling alike: dev's 512 (FluxPipeline's max_sequence_length);
# schnell's 256, as Black Forest Labs' reference code and sd-scripts run it. A tokenizer with a
# shorter limit is read at its own. The planner plans dev's.
TEXT_TOKENS = 512
TEXT_TOKENS_BY_VARIANT = {"dev": 512, "schnell": 256}


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) → (B, h/2 · w/2, 4C): each 2×2 patch of latents one token, rows first, as
    FluxPipeline._pack_latents lays them out."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack` for latents of h × w."""
    b, _, width = tokens.shape
    c = width // 4
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """Each packed token's position (0, row, column): the rotary embedding's image axes."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device, dtype)


def resolution_shift(scheduler, tokens: int) -> float:
    """The time shift the base samples with, from its scheduler config, so training sees the noise
    levels sampling visits. With use_dynamic_shifting (dev): exp(μ), μ linear in the image's token
    count between base_shift at base_image_seq_len and max_shift at max_image_seq_len
    (FluxPipeline's calculate_shift), so larger images train at noisier times. Without it
    (schnell: shift 1.0): the config's fixed shift, whatever the size."""
    config = scheduler.config
    if not config.get("use_dynamic_shifting", False):
        return float(config.get("shift", 1.0))
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return math.exp(base_shift + slope * (tokens - base_len))


@dataclass(frozen=True)
class FluxFamily(RectifiedFlowFamily):
    def claims_folder(self, index: dict, denoiser_config: dict) -> bool:
        return index.get("_class_name") in (*self.pipelines, *VARIANT_PIPELINES)

    def refuses_folder(self, index: dict, denoiser_config: dict, vae_config: dict | None = None) -> str | None:
        variant = VARIANT_PIPELINES.get(index.get("_class_name", ""))
        if variant:
            return f"{variant}; lora-booth trains FLUX.1 text-to-image models (dev, schnell and their fine-tunes)"
        return self.refuses_inputs(denoiser_config.get("in_channels"), vae_config or {})

    def refuses_inputs(self, in_channels, vae_config: dict) -> str | None:
        expected = self.denoiser_inputs(vae_config)
        if in_channels is None or in_channels == expected:
            return None
        channels = expected // self.latent_packing
        return (f"the transformer takes {in_channels} input channels, not the {expected} of its VAE's {channels} "
                "latent channels packed 2×2: a Fill/Control variant; lora-booth trains text-to-image models")

    def claims_single_file(self, keys: set[str]) -> bool:
        return single_file_prefix(keys) is not None

    def refuses_transformer_file(self, checkpoint, vae_config: dict | None = None) -> str | None:
        """A Fill/Control transformer file: its image input is wider than the VAE's packed latents
        (the VAE of model.single_file_config when it is a folder, else FLUX.1's 16 channels)."""
        key = f"{single_file_prefix(set(checkpoint.keys()))}img_in.weight"
        if key not in checkpoint.keys():
            return None
        return self.refuses_inputs(checkpoint.get_slice(key).get_shape()[1], vae_config or {})

    def variant(self, denoiser_config) -> str:
        """dev takes the guidance it was distilled from as an input; schnell (timestep-distilled) has none."""
        return "dev" if _get(denoiser_config, "guidance_embeds", True) else "schnell"

    def run_defaults(self, variant: str = "") -> dict:
        """dev: FluxPipeline's 28 steps at guidance 3.5 (the distilled guidance, an input of the
        transformer, not classifier-free guidance); schnell: 4 steps, no guidance input (0)."""
        steps, guidance = (4, 0.0) if variant == "schnell" else (28, 3.5)
        return {"prior.guidance_scale": guidance, "sample.guidance_scale": guidance, "prior.sample_steps": steps,
                "sample.steps": steps}

    def token_length(self, part: str, tokenizer, variant: str = "") -> int:
        if part != "text_encoder_2":
            return super().token_length(part, tokenizer, variant)
        return min(int(tokenizer.model_max_length), TEXT_TOKENS_BY_VARIANT.get(variant, TEXT_TOKENS))

    def load_single_file(self, pipeline_class, path, kwargs: dict, dtypes: dict | None = None):
        """The transformer alone in Black Forest Labs' layout (what ComfyUI and Forge hold, fp8 files
        included), the rest of the pipeline (text encoders, VAE, scheduler) from
        model.single_file_config: a FLUX.1 folder, or a hub id in the cache. The file's tensors are
        mapped onto the transformer by flux_layout's names, every one checked (an untrusted file)."""
        from diffusers import FluxTransformer2DModel
        from safetensors import safe_open

        config = kwargs["config"]
        transformer_config = FluxTransformer2DModel.load_config(str(config), subfolder="transformer",
                                                                local_files_only=True)
        with torch.device("meta"):
            transformer = FluxTransformer2DModel.from_config(transformer_config)
        width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
        state = {}
        with safe_open(str(path), framework="pt") as checkpoint:
            prefix = single_file_prefix(set(checkpoint.keys()))
            for name, meta in transformer.state_dict().items():
                key, rows, swapped = original_tensor_name(name, width)
                if prefix + key not in checkpoint.keys():
                    raise ValueError(f"no {prefix + key} (for {name}): not a complete FLUX.1 transformer of this width")
                tensor = checkpoint.get_tensor(prefix + key)
                tensor = torch.cat(tensor.chunk(2)[::-1]) if swapped else tensor
                tensor = tensor if rows is None else tensor[rows[0]:rows[1]]
                if tuple(tensor.shape) != tuple(meta.shape):
                    raise ValueError(f"{prefix + key} has shape {tuple(tensor.shape)}, {name} needs {tuple(meta.shape)}: "
                                     "the configs describe another FLUX.1 architecture")
                wanted = (dtypes or {}).get("default") or (torch.bfloat16 if tensor.element_size() == 1 else tensor.dtype)
                state[name] = tensor.to(wanted)  # fp8 files: at least bf16
        transformer.load_state_dict(state, strict=True, assign=True)
        return pipeline_class.from_pretrained(config, transformer=transformer, local_files_only=True,
                                              use_safetensors=True, **({"dtype": dtypes} if dtypes else {}))

    def pipeline_kwargs(self, base) -> dict:
        return {"max_sequence_length": self.token_length("text_encoder_2", base.tokenizer_2, base.variant)}

    def pipeline_conditioning(self, conditioning: Conditioning) -> dict:
        return {"prompt_embeds": conditioning.hidden, "pooled_prompt_embeds": conditioning.pooled}

    def pipeline_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return pack(latents)

    def latents_from_pipeline(self, latents: torch.Tensor, size: int, vae_scale_factor: int) -> torch.Tensor:
        side = size // vae_scale_factor
        return unpack(latents, side, side)

    def native_size(self, base) -> int:
        return base.vae.config.sample_size  # the transformer's config has no size; the VAE's is the training size

    def size_multiple(self, base) -> int:
        return base.vae_scale_factor * 2  # the VAE's downsampling, then 2×2 packing

    def refuses_config(self, cfg) -> tuple[str, str, str] | None:
        if cfg.objective.min_snr_gamma:
            return ("objective.min_snr_gamma", f"is {cfg.objective.min_snr_gamma:g}, but min-SNR weighting is defined "
                    "for DDPM's noise schedule; FLUX.1 trains by flow matching, whose timestep distribution "
                    "(objective.timesteps) plays that part", "remove it (0)")
        if cfg.objective.loss != "mse" and cfg.objective.huber_schedule == "snr":
            return ("objective.huber_schedule", "is snr, which needs DDPM's ᾱ_t; FLUX.1 trains by flow matching",
                    "use huber_schedule=exponential or constant")
        if cfg.model.prediction_type != "auto":
            return ("model.prediction_type", f"is {cfg.model.prediction_type}, but FLUX.1 predicts the flow ε − x₀",
                    "leave it at auto")
        if cfg.lora.type != "lora" and "kohya" in cfg.save.formats:
            return ("save.formats", f"includes kohya, whose FLUX.1 layout fuses q, k and v and so holds plain LoRA "
                    f"only, not {cfg.lora.type}", "save.formats=diffusers. " + OUTSIDE_PATHS[cfg.lora.type])
        if cfg.pivotal.enabled:
            return ("pivotal", "is on, but pivotal tuning of FLUX.1 is not supported yet (new tokens would need "
                    "embeddings in both CLIP-L and T5)", "train without pivotal=true; the trigger word works as it is")
        return None

    # ------------------------------------------------------------------ the objective: rectified flow

    def sample_noise(self, scheduler, latents: torch.Tensor, generators: list, cfg) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise and σ ∈ (0, 1) per row (families/noise.py: flow_sigma); timesteps=auto is logit-normal
        with the resolution's shift (resolution_shift)."""
        tokens = (latents.shape[-2] // 2) * (latents.shape[-1] // 2)
        return noising.sample_flow_noise(latents, generators, cfg, resolution_shift(scheduler, tokens))

    def token_lengths(self) -> tuple[int, ...]:
        return (77, TEXT_TOKENS)

    def predict(self, base, model, noisy: torch.Tensor, time: torch.Tensor, conditioning: Conditioning,
                sizes: torch.Tensor, guidance: float) -> torch.Tensor:
        """The transformer on the packed latents; σ goes in as the timestep (it scales by 1000
        itself), and dev's guidance embedding gets `guidance` (objective.guidance)."""
        b, _, h, w = noisy.shape
        dtype, device = base.compute_dtype, noisy.device
        embeds_guidance = base.unet.config.guidance_embeds
        output = model(hidden_states=pack(noisy).to(dtype), timestep=time.to(dtype),
                       guidance=torch.full((b,), guidance, device=device, dtype=dtype) if embeds_guidance else None,
                       pooled_projections=conditioning.pooled, encoder_hidden_states=conditioning.hidden,
                       txt_ids=torch.zeros(conditioning.hidden.shape[1], 3, device=device, dtype=dtype),
                       img_ids=image_ids(h, w, device, dtype), return_dict=False)[0]
        return unpack(output, h, w)

    # ------------------------------------------------------------------ conditioning

    def encode(self, encoders: list, ids: list[torch.Tensor], masks: list | None = None) -> Conditioning:
        """CLIP-L's pooled output and T5's last hidden states, as FluxPipeline.encode_prompt computes them."""
        pooled = encoders[0](ids[0], output_hidden_states=False).pooler_output
        return Conditioning(encoders[1](ids[1], output_hidden_states=False)[0], pooled)

    def planned_conditioning(self, rows: int, encoders: dict, hidden_width: int, dtype: torch.dtype) -> Conditioning:
        pooled_width = encoders["text_encoder"].config.hidden_size
        return Conditioning(torch.randn(rows, TEXT_TOKENS, hidden_width, dtype=dtype),
                            torch.randn(rows, pooled_width, dtype=dtype))

    def kohya_tensors(self, modules: dict) -> dict[str, torch.Tensor]:
        """sd-scripts' layout in Black Forest Labs' names, which ComfyUI and Forge read: q, k and v
        fused into qkv (a single block's linear1 also holds the MLP's input), exactly (flux_layout).
        LoRA only: the fused layout has no place for DoRA magnitudes or LoHa/LoKr factors."""
        tensors, alphas = {}, {}
        for (part, path), module in modules.items():
            if getattr(module, "magnitude", None) is not None or not hasattr(module, "up"):
                raise AdapterError(f"{part}.{path}: FLUX.1's kohya layout holds plain LoRA modules only (q, k and v "
                                   "are fused); keep the diffusers file for DoRA, LoHa and LoKr, or save.formats=diffusers")
            key = f"{part}.{path}"
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = module.down, module.up
            alphas[key] = module.alpha
        return to_kohya(tensors, alphas)

    def adapter_paths_fit(self, paths) -> bool:
        """Qwen-Image's transformer names its blocks' MLPs and modulation img_/txt_ (FLUX.1: ff, norm1)
        and has 60 double-stream blocks to FLUX.1's 19; Z-Image's are layers.N and its refiners."""
        return not any(path.startswith(("layers.", "noise_refiner.", "context_refiner.")) or
                       re.search(r"\.(img_mlp|txt_mlp|img_mod|txt_mod)\.|^(img_in|txt_in|txt_norm)\b|"
                                 r"^transformer_blocks\.(19|[2-9]\d|\d{3,})\.", path)
                       for path in paths)

    def loaders_note(self, adapter_kind: str) -> str | None:
        return OUTSIDE_PATHS.get(adapter_kind)

    def base_model_version(self, v_prediction: bool) -> str:
        return "flux1"

    def modelspec_architecture(self, v_prediction: bool, variant: str = "") -> str:
        return "flux-1-schnell/lora" if variant == "schnell" else "flux-1-dev/lora"  # sd-scripts' sai_model_spec

    def text_encoders_phrase(self) -> str:
        return "CLIP-L (T5 stays frozen)"


def single_file_prefix(keys: set[str]) -> str | None:
    """The key prefix of a FLUX.1 transformer file in Black Forest Labs' layout ("" as BFL and Forge
    ship it, "model.diffusion_model." as ComfyUI saves it), or None for any other file."""
    for prefix in ("", "model.diffusion_model."):
        if f"{prefix}double_blocks.0.img_attn.qkv.weight" in keys and f"{prefix}{FLUX2_MARKER}" not in keys:
            return prefix
    return None


def _get(config, key: str, default):
    """A value of a config dict or a diffusers FrozenDict alike."""
    return config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)


FLUX = FluxFamily(name="flux", title="FLUX.1", pipelines=("FluxPipeline", "FluxImg2ImgPipeline"),
                  single_file_repo="black-forest-labs/FLUX.1-dev", plan_configs="flux-dev",
                  text_parts=("text_encoder", "text_encoder_2"), text_encoder_classes=("CLIPTextModel", "T5EncoderModel"),
                  preset_prefix="flux-", has_safety_checker=False, text_width=4096, default_resolution=1024,
                  kohya_text_prefixes=(("text_encoder", "lora_te1_"),), clip_skip="None",
                  modelspec_implementation="https://github.com/black-forest-labs/flux",
                  denoiser="transformer", denoiser_class="FluxTransformer2DModel", adapter_text_parts=("text_encoder",),
                  latent_packing=4, default_vae_channels=16,
                  # fp8: every linear layer but the embedders, the modulation ones (norm*.linear: 3.2 B of the
                  # 11.9 B parameters, which diffusers' "norm" pattern would keep in bf16) included, as sd-scripts
                  # stores FLUX.1 in fp8
                  fp8_keep=("pos_embed", "time_text_embed", "context_embedder", "x_embedder"), stages_denoiser=True,
                  offload_units=r"(transformer_blocks|single_transformer_blocks)\.\d+",
                  webui_names="Forge (AUTOMATIC1111 has no FLUX.1)", comfyui_reads_diffusers_file=True,
                  # attention of both block kinds: the image stream's to_*, the text stream's add_*_proj/to_add_out
                  default_targets=("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                                   "to_add_out"))
