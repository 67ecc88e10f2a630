"""Qwen-Image (Qwen/Qwen-Image, Qwen/Qwen-Image-2512 and fine-tunes in their layout): a 20 B
rectified-flow MMDiT of 60 dual-stream blocks (image and text tokens apart, attending jointly),
conditioned on the last hidden states of Qwen2.5-VL 7B read through the pipeline's chat template,
with padding masked out of the attention. Its 3-D VAE (one frame for an image) normalises 16
latent channels by their own mean and standard deviation; the latents reach the transformer packed
2×2 into 64-wide tokens, as FLUX.1's, with their grid as `img_shapes`. Sampling uses true
classifier-free guidance with a negative prompt (the transformer has no guidance input)."""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

from . import noise as noising
from .flow import RectifiedFlowFamily
from .conditioning import Conditioning
from .flux import pack, resolution_shift, unpack
from .latents import LatentCodec

# QwenImagePipeline's prompt template and the number of its leading tokens whose states are dropped
# (the system prompt and "<|im_start|>user\n": prompt_template_encode / _start_idx in diffusers 0.42)
PROMPT_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                   "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
                   "<|im_end|>\n<|im_start|>assistant\n")
TEMPLATE_TOKENS = 34
# text states per prompt after the template's are dropped: the pipeline's max_sequence_length default
TEXT_TOKENS = 512
NEGATIVE_PROMPT = " "  # what Qwen's own examples give the pipeline for true CFG without a negative prompt
TRUE_CFG_SCALE = 4.0   # QwenImagePipeline's default true_cfg_scale
SAMPLE_STEPS = 50      # QwenImagePipeline's default num_inference_steps

# the pipelines of Qwen-Image variants lora-booth does not train, by class name, and why
VARIANT_PIPELINES = {
    "QwenImageEditPipeline": "Qwen-Image-Edit (image editing: it trains on pairs of a source image and its edit, "
                             "which DreamBooth's photos are not)",
    "QwenImageEditPlusPipeline": "Qwen-Image-Edit-2509/2511 (multi-image editing: it trains on pairs of source images "
                                 "and their edit)",
    "QwenImageEditInpaintPipeline": "Qwen-Image-Edit inpainting (editing with a mask: paired images)",
    "QwenImageLayeredPipeline": "Qwen-Image-Layered (it decomposes an image into RGBA layers, not text-to-image)",
    "QwenImageControlNetPipeline": "a Qwen-Image ControlNet pipeline (a control image conditions it)",
    "QwenImageControlNetInpaintPipeline": "a Qwen-Image ControlNet inpainting pipeline",
    "QwenImageInpaintPipeline": "a Qwen-Image inpainting pipeline",
    "QwenImageImg2ImgPipeline": "a Qwen-Image image-to-image pipeline",
    "QwenImage21Pipeline": "Qwen-Image 2.1 (another transformer architecture, QwenImage21Transformer2DModel)",
}
# transformer config switches only the variants set (Edit-2511's zero_cond_t, Layered's layer RoPE and
# its extra time condition): refused even when model_index.json names the text-to-image pipeline
VARIANT_SWITCHES = {"zero_cond_t": "an Edit-2511-style transformer (zero_cond_t: it conditions on reference images)",
                    "use_layer3d_rope": "a Qwen-Image-Layered transformer (use_layer3d_rope)",
                    "use_additional_t_cond": "a Qwen-Image-Layered transformer (use_additional_t_cond)"}
# adapter module paths that only FLUX.1's transformer has (Qwen-Image's are img_mlp/txt_mlp, img_mod/txt_mod,
# img_in/txt_in), and Qwen-Image's block count: an adapter beyond either is not Qwen-Image's
FLUX_ONLY_ROOTS = ("single_transformer_blocks.", "x_embedder", "context_embedder")
FLUX_ONLY_PARTS = re.compile(r"\.(ff|ff_context|norm1|norm1_context)\.")
MAX_BLOCKS = 60
SINGLE_FILE_PREFIXES = ("", "model.diffusion_model.")  # as Comfy-Org ships it / as ComfyUI saves a checkpoint
SINGLE_FILE_MARK = "transformer_blocks.0.img_mod.1.weight"
# keys of ComfyUI's scaled-fp8 checkpoints: weight = stored fp8 × a per-layer scale that diffusers lacks
SCALED_FP8_MARKS = (".scale_weight", ".weight_scale", "scaled_fp8", ".scale_input", ".input_scale")


class QwenLatentCodec(LatentCodec):
    """AutoencoderKLQwenImage: a video VAE, so images go in as one frame (B, 3, 1, H, W) and latents
    come out (B, z_dim, 1, h, w); QwenImagePipeline normalises them as (z − mean) / std per channel
    with the config's latents_mean/latents_std, and decodes z = x · std + mean."""

    def __init__(self, vae_config) -> None:
        super().__init__(vae_config)
        get = vae_config.get if hasattr(vae_config, "get") else lambda key, default=None: getattr(vae_config, key, default)
        self.channels = int(get("z_dim", 16))
        self.scaling_factor, self.shift_factor = 1.0, 0.0

    def distribution(self, vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = vae.encode(pixels.to(vae.dtype)[:, :, None]).latent_dist
        return dist.mean[:, :, 0], dist.std[:, :, 0]

    def decode(self, vae, latents: torch.Tensor) -> torch.Tensor:
        return vae.decode(self.denormalize(latents)[:, :, None]).sample[:, :, 0]


@functools.cache
def guided_pipeline_class():
    """QwenImagePipeline whose `guidance_scale` is true CFG's scale (lora-booth's samplers and
    class-image drawing pass guidance_scale; the transformer has no guidance input, so the plain
    pipeline would ignore it and draw without guidance). Without a negative prompt, the negative is
    Qwen's " ", encoded once per text encoder where that encoder is (the CPU when the prompts were
    cached and the transformer alone is on the GPU), then moved to the transformer."""
    from diffusers import QwenImagePipeline

    class GuidedQwenImagePipeline(QwenImagePipeline):
        def __call__(self, *args, guidance_scale=None, true_cfg_scale=None, negative_prompt=None,
                     negative_prompt_embeds=None, negative_prompt_embeds_mask=None, **kwargs):
            scale = true_cfg_scale if true_cfg_scale is not None else guidance_scale
            scale = TRUE_CFG_SCALE if scale is None else float(scale)
            if scale > 1 and negative_prompt_embeds is None:
                rows = _rows(args, kwargs)
                negative_prompt_embeds, negative_prompt_embeds_mask = self._negative(negative_prompt or NEGATIVE_PROMPT,
                                                                                     rows)
            return super().__call__(*args, true_cfg_scale=scale, negative_prompt_embeds=negative_prompt_embeds,
                                    negative_prompt_embeds_mask=negative_prompt_embeds_mask, **kwargs)

        @torch.no_grad()
        def _negative(self, prompt: str, rows: int):
            where = next(self.text_encoder.parameters()).device
            cache = self.text_encoder.__dict__.setdefault("_lora_booth_negative", {})
            if (prompt, where) not in cache:
                cache[(prompt, where)] = self.encode_prompt(prompt=[prompt], device=where)
            embeds, mask = cache[(prompt, where)]
            device = self._execution_device
            return embeds.repeat(rows, 1, 1).to(device), None if mask is None else mask.repeat(rows, 1).to(device)

    return GuidedQwenImagePipeline


def _rows(args, kwargs) -> int:
    prompt = args[0] if args else kwargs.get("prompt")
    if prompt is None:
        return kwargs["prompt_embeds"].shape[0] * kwargs.get("num_images_per_prompt", 1)
    return (1 if isinstance(prompt, str) else len(prompt)) * kwargs.get("num_images_per_prompt", 1)


@dataclass(frozen=True)
class QwenImageFamily(RectifiedFlowFamily):
    # ------------------------------------------------------------------ recognising a base model

    def claims_folder(self, index: dict, denoiser_config: dict) -> bool:
        return index.get("_class_name") in (*self.pipelines, *VARIANT_PIPELINES)

    def refuses_folder(self, index: dict, denoiser_config: dict, vae_config: dict | None = None) -> str | None:
        variant = VARIANT_PIPELINES.get(index.get("_class_name", ""))
        if variant:
            return f"{variant}; lora-booth trains Qwen-Image text-to-image models (Qwen-Image, Qwen-Image-2512 and " \
                   "their fine-tunes)"
        switched = next((why for key, why in VARIANT_SWITCHES.items() if denoiser_config.get(key)), None)
        if switched:
            return f"{switched}; lora-booth trains Qwen-Image text-to-image models"
        return self.refuses_inputs(denoiser_config.get("in_channels"), vae_config or {})

    def denoiser_inputs(self, vae_config: dict) -> int:
        return int(vae_config.get("z_dim", self.default_vae_channels)) * self.latent_packing

    def refuses_inputs(self, in_channels, vae_config: dict) -> str | None:
        expected = self.denoiser_inputs(vae_config)
        if in_channels is None or in_channels == expected:
            return None
        return (f"the transformer takes {in_channels} input channels, not the {expected} of its VAE's "
                f"{expected // self.latent_packing} latent channels packed 2×2 (a variant conditioned on another "
                "image or mask); lora-booth trains text-to-image models")

    def claims_single_file(self, keys: set[str]) -> bool:
        return single_file_prefix(keys) is not None

    def refuses_single_file(self, keys: set[str]) -> str | None:
        prefix = single_file_prefix(keys)
        if any(key.startswith(f"{prefix}txt_in.text_norm.") or ".img_mlp.gate_up." in key for key in keys):
            return "a Qwen-Image 2.1 transformer (another architecture); lora-booth trains Qwen-Image and Qwen-Image-2512"
        scaled = sorted(key for key in keys if key.endswith(SCALED_FP8_MARKS))
        if scaled:
            return (f"a scaled-fp8 checkpoint ({scaled[0]}: its fp8 weights need per-layer scales that lora-booth does "
                    "not apply); use the bf16 file or a plain fp8 (e4m3fn) one, e.g. Comfy-Org's "
                    "qwen_image_fp8_e4m3fn.safetensors")
        return None

    def refuses_transformer_file(self, checkpoint, vae_config: dict | None = None) -> str | None:
        key = f"{single_file_prefix(set(checkpoint.keys()))}img_in.weight"
        if key not in checkpoint.keys():
            return None
        return self.refuses_inputs(checkpoint.get_slice(key).get_shape()[1], vae_config or {})

    def native_size(self, base) -> int:
        return self.default_resolution  # neither the transformer's nor the VAE's config states a size

    def size_multiple(self, base) -> int:
        return base.vae_scale_factor * 2  # the VAE's downsampling, then 2×2 packing

    def vae_downsampling(self, vae_config) -> int:
        """2 per VAE level: AutoencoderKLQwenImage has len(temperal_downsample) + 1 levels (8 for Qwen-Image)."""
        levels = vae_config.get("temperal_downsample") if hasattr(vae_config, "get") else vae_config.temperal_downsample
        return 2 ** len(levels)

    def latent_codec(self, vae) -> LatentCodec:
        return QwenLatentCodec(vae.config)

    # ------------------------------------------------------------------ loading and sampling

    def run_defaults(self, variant: str = "") -> dict:
        """QwenImagePipeline's 50 steps at true_cfg_scale 4 (real classifier-free guidance, against
        the negative prompt " ")."""
        return {"prior.guidance_scale": TRUE_CFG_SCALE, "sample.guidance_scale": TRUE_CFG_SCALE,
                "prior.sample_steps": SAMPLE_STEPS, "sample.steps": SAMPLE_STEPS}

    def token_length(self, part: str, tokenizer, variant: str = "") -> int:
        return TEXT_TOKENS

    def pipeline_class(self):
        return guided_pipeline_class()

    def load_single_file(self, pipeline_class, path, kwargs: dict, dtypes: dict | None = None):
        """The transformer alone as ComfyUI holds it (Comfy-Org's qwen_image_bf16 / fp8_e4m3fn files:
        diffusers' own module names, bare or under `model.diffusion_model.`), the rest (Qwen2.5-VL,
        VAE, scheduler) from model.single_file_config: a Qwen-Image folder, or a hub id in the cache.
        Every tensor of the transformer must be in the file at its shape and nothing else may be
        (an untrusted file); fp8 tensors load as bf16."""
        from diffusers import QwenImageTransformer2DModel
        from safetensors import safe_open

        config = kwargs["config"]
        transformer_config = QwenImageTransformer2DModel.load_config(str(config), subfolder="transformer",
                                                                     local_files_only=True)
        with torch.device("meta"):
            transformer = QwenImageTransformer2DModel.from_config(transformer_config)
        wanted_dtype = (dtypes or {}).get("default")
        state = {}
        with safe_open(str(path), framework="pt") as checkpoint:
            keys = set(checkpoint.keys())
            prefix = single_file_prefix(keys)
            expected = transformer.state_dict()
            extra = sorted(keys - {prefix + name for name in expected})
            if extra:
                raise ValueError(f"{extra[0]} is not a tensor of QwenImageTransformer2DModel ({len(extra)} such keys): "
                                 "not a Qwen-Image transformer of this architecture")
            for name, meta in expected.items():
                if prefix + name not in keys:
                    raise ValueError(f"no {prefix + name}: not a complete Qwen-Image transformer")
                tensor = checkpoint.get_tensor(prefix + name)
                if tuple(tensor.shape) != tuple(meta.shape):
                    raise ValueError(f"{prefix + name} has shape {tuple(tensor.shape)}, {name} needs "
                                     f"{tuple(meta.shape)}: the configs describe another Qwen-Image architecture")
                state[name] = tensor.to(wanted_dtype or (torch.bfloat16 if tensor.element_size() == 1 else tensor.dtype))
        transformer.load_state_dict(state, strict=True, assign=True)
        return pipeline_class.from_pretrained(config, transformer=transformer, local_files_only=True,
                                              use_safetensors=True, **({"dtype": dtypes} if dtypes else {}))

    def pipeline_kwargs(self, base) -> dict:
        return {"max_sequence_length": TEXT_TOKENS}

    def pipeline_conditioning(self, conditioning: Conditioning) -> dict:
        """Cached prompts as the pipeline's embeds and mask, cut after the longest prompt (the rest
        is padding the mask hides: the same images, fewer text tokens at every step)."""
        hidden, mask = conditioning.hidden, conditioning.mask
        if mask is not None:
            used = int(mask.sum(dim=1).max())
            hidden, mask = hidden[:, :used], mask[:, :used]
        return {"prompt_embeds": hidden, "prompt_embeds_mask": mask}

    def pipeline_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return pack(latents)

    def latents_from_pipeline(self, latents: torch.Tensor, size: int, vae_scale_factor: int) -> torch.Tensor:
        side = size // vae_scale_factor
        return unpack(latents, side, side)

    def refuses_config(self, cfg) -> tuple[str, str, str] | None:
        if cfg.objective.min_snr_gamma:
            return ("objective.min_snr_gamma", f"is {cfg.objective.min_snr_gamma:g}, but min-SNR weighting is defined "
                    "for DDPM's noise schedule; Qwen-Image trains by flow matching, whose timestep distribution "
                    "(objective.timesteps) plays that part", "remove it (0)")
        if cfg.objective.loss != "mse" and cfg.objective.huber_schedule == "snr":
            return ("objective.huber_schedule", "is snr, which needs DDPM's ᾱ_t; Qwen-Image trains by flow matching",
                    "use huber_schedule=exponential or constant")
        if cfg.model.prediction_type != "auto":
            return ("model.prediction_type", f"is {cfg.model.prediction_type}, but Qwen-Image predicts the flow ε − x₀",
                    "leave it at auto")
        if cfg.lora.text_encoder:
            return ("lora.text_encoder", "is on, but Qwen-Image's text encoder is Qwen2.5-VL 7B, which lora-booth keeps "
                    "frozen (its adapters would need the 7 B model on the GPU beside the 20 B transformer)",
                    "lora.text_encoder=false")
        if cfg.pivotal.enabled:
            return ("pivotal", "is on, but pivotal tuning of Qwen-Image is not supported (the trigger's new token "
                    "embeddings would live in the frozen 7 B Qwen2.5-VL)", "train without pivotal=true")
        return None

    # ------------------------------------------------------------------ the objective: rectified flow

    def sample_noise(self, scheduler, latents: torch.Tensor, generators: list, cfg) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise and σ per row; timesteps=auto is logit-normal shifted by exp(μ), μ from the image's
        token count as QwenImagePipeline's calculate_shift computes it from the scheduler config
        (Qwen-Image: 0.5 at 256 tokens to 0.9 at 8192; its scheduler shifts exponentially, which is
        exp(μ)·u / (1 + (exp(μ) − 1)·u))."""
        tokens = (latents.shape[-2] // 2) * (latents.shape[-1] // 2)
        return noising.sample_flow_noise(latents, generators, cfg, resolution_shift(scheduler, tokens))

    def token_lengths(self) -> tuple[int, ...]:
        return (TEXT_TOKENS,)

    def predict(self, base, model, noisy: torch.Tensor, time: torch.Tensor, conditioning: Conditioning,
                sizes: torch.Tensor, guidance: float) -> torch.Tensor:
        """The transformer on the packed latents with σ as its timestep (QwenImagePipeline passes
        t / 1000), the text states with their mask. Text states past the longest prompt of the
        batch are padding every row masks out: they are cut off first (the same numbers, less work);
        a mask with no padding left goes as None, as the pipeline sends it."""
        b, _, h, w = noisy.shape
        dtype = base.compute_dtype
        hidden, mask = conditioning.hidden, conditioning.mask
        if mask is not None:
            used = int(mask.sum(dim=1).max())
            hidden, mask = hidden[:, :used], mask[:, :used]
            mask = None if bool(mask.all()) else mask
        output = model(hidden_states=pack(noisy).to(dtype), timestep=time.to(dtype),
                       encoder_hidden_states=hidden.to(dtype), encoder_hidden_states_mask=mask,
                       img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
        return unpack(output, h, w)

    # ------------------------------------------------------------------ conditioning

    def tokenize(self, part: str, tokenizer, prompts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each prompt inside the pipeline's chat template, padded on the right (so a prompt's own
        tokens start at position 0 and the template's first TEMPLATE_TOKENS are the first columns)
        to the template's tokens + `length`, and cut there, as the pipeline cuts its states."""
        tokens = tokenizer([PROMPT_TEMPLATE.format(prompt) for prompt in prompts], padding="max_length",
                           max_length=TEMPLATE_TOKENS + length, truncation=True, padding_side="right",
                           return_tensors="pt")
        return tokens.input_ids, tokens.attention_mask.bool()

    def encode(self, encoders: list, ids: list[torch.Tensor], masks: list | None = None) -> Conditioning:
        """Qwen2.5-VL's last hidden states (its language model's, the lm_head never runs) with the
        template's first TEMPLATE_TOKENS dropped, padding zeroed and masked, as
        QwenImagePipeline.encode_prompt computes them. Ids without a mask (the planner's stand-ins)
        are all prompt."""
        mask = masks[0] if masks and masks[0] is not None else torch.ones_like(ids[0], dtype=torch.bool)
        encoder = encoders[0]
        language_model = getattr(encoder, "module", encoder).model  # DDP: .module
        states = language_model(input_ids=ids[0], attention_mask=mask.long(),
                                output_hidden_states=True).hidden_states[-1]
        kept = mask[:, TEMPLATE_TOKENS:]
        hidden = states[:, TEMPLATE_TOKENS:] * kept.unsqueeze(-1).to(states.dtype)
        return Conditioning(hidden, None, kept if masks and masks[0] is not None else None)

    def planned_tokens(self, rows: int) -> tuple[list[torch.Tensor], list]:
        """The longest prompt the template admits, mask-free (the trace cannot cut by a fake mask)."""
        return [torch.zeros(rows, TEMPLATE_TOKENS + TEXT_TOKENS, dtype=torch.long)], [None]

    def planned_conditioning(self, rows: int, encoders: dict, hidden_width: int, dtype: torch.dtype) -> Conditioning:
        return Conditioning(torch.randn(rows, TEXT_TOKENS, hidden_width, dtype=dtype))

    # ------------------------------------------------------------------ other tools' names

    def base_model_version(self, v_prediction: bool) -> str:
        return "qwen_image"

    def modelspec_architecture(self, v_prediction: bool, variant: str = "") -> str:
        return "qwen-image/lora"

    def text_encoders_phrase(self) -> str:
        return "Qwen2.5-VL (frozen)"

    def adapter_paths_fit(self, paths) -> bool:
        """No single-stream blocks and FLUX.1's names for the text stream's MLP, modulation and
        embedders (ff_context, norm1_context, x_embedder, context_embedder); at most 60 blocks; none of
        Z-Image's layers.N and refiners."""
        return not any(path.startswith(FLUX_ONLY_ROOTS + ("layers.", "noise_refiner.", "context_refiner.")) or FLUX_ONLY_PARTS.search(path) or _block(path) >= MAX_BLOCKS
                       for path in paths)


def _block(path: str) -> int:
    match = re.match(r"transformer_blocks\.(\d+)\.", path)
    return int(match.group(1)) if match else -1


def single_file_prefix(keys: set[str]) -> str | None:
    """The key prefix of a Qwen-Image transformer file ("" as Comfy-Org ships it,
    "model.diffusion_model." as ComfyUI saves a checkpoint), or None for any other file."""
    return next((prefix for prefix in SINGLE_FILE_PREFIXES if prefix + SINGLE_FILE_MARK in keys), None)


QWENIMAGE = QwenImageFamily(
    name="qwenimage", title="Qwen-Image", pipelines=("QwenImagePipeline",), single_file_repo="Qwen/Qwen-Image",
    plan_configs="qwen-image", text_encoder_classes=("Qwen2_5_VLForConditionalGeneration",),
    preset_prefix="qwen-image-", has_safety_checker=False, text_width=3584, default_resolution=1024,
    kohya_compounds=("add_q_proj", "to_add_out", "img_mlp", "txt_mlp", "img_mod", "txt_mod", "img_in", "txt_in",
                     "txt_norm", "norm_out", "time_text_embed", "timestep_embedder"),
    clip_skip="None", modelspec_implementation="https://github.com/QwenLM/Qwen-Image",
    denoiser="transformer", denoiser_class="QwenImageTransformer2DModel", vae_class="AutoencoderKLQwenImage",
    adapter_text_parts=(), latent_packing=4, default_vae_channels=16,
    # fp8: every Linear of the 60 blocks (attention, MLPs, modulation: 20.39 of the 20.43 B parameters); the
    # embedders, the text-input RMSNorm and the output layers (41 M parameters) stay in the compute precision
    fp8_keep=("pos_embed", "time_text_embed", "txt_norm", "img_in", "txt_in", "norm_out", "proj_out"),
    # train.offload_blocks: the 60 dual-stream blocks, each what gradient checkpointing recomputes as a whole
    offload_units=r"transformer_blocks\.\d+",
    stages_denoiser=True, webui_names="",  # AUTOMATIC1111 and Forge run no Qwen-Image
    comfyui_reads_diffusers_file=True,
    # attention of both streams: the image stream's to_*, the text stream's add_*_proj/to_add_out
    default_targets=("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"))
