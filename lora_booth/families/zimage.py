"""Z-Image (Tongyi-MAI: Base and Turbo, 6B): a single-stream DiT. Text tokens and 2×2 patches of
the latents are refined apart (context_refiner, noise_refiner), then one sequence through every
block. The text is Qwen3's penultimate hidden states of the prompt in its chat template, padding
dropped (a list of variable-length embeddings); the VAE is FLUX.1's (16 channels, shifted and
scaled); the objective is rectified flow with the scheduler's fixed shift. The transformer takes
1 − σ as its timestep and predicts x₀ − ε: ZImagePipeline negates its output before the Euler step.

Turbo is Base distilled to 8 steps without classifier-free guidance. DreamBooth on it trains the
flow at every σ again, which undoes the distillation: lora-booth trains Base and refuses Turbo,
saying why (docs/zimage.md)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..io.errors import AdapterError
from . import noise as noising
from .flow import RectifiedFlowFamily
from .conditioning import Conditioning
from .flux import resolution_shift
from .zimage_layout import (ADAPTER_ROOTS, comfyui_tensors, from_comfyui, is_comfyui_layout, original_tensor_name,
                            single_file_prefix)

# the variants lora-booth does not train, by the pipeline class of their folders
VARIANT_PIPELINES = {
    "ZImageImg2ImgPipeline": "a Z-Image image-to-image pipeline",
    "ZImageInpaintPipeline": "a Z-Image inpainting pipeline (its transformer takes the masked image too)",
    "ZImageControlNetPipeline": "a Z-Image ControlNet pipeline",
    "ZImageControlNetInpaintPipeline": "a Z-Image ControlNet inpainting pipeline",
    "ZImageOmniPipeline": "Z-Image Omni (editing and image conditioning through SigLIP features)",
}
# Qwen3 tokens per prompt: ZImagePipeline's max_sequence_length. The transformer sees only the
# prompt's own tokens; the planner plans a prompt that fills them (the most it can cost).
TEXT_TOKENS = 512
# The scheduler's fixed shift tells the two members apart (their transformers are alike): Turbo
# ships 3.0, Base 6.0 (Tongyi-MAI's scheduler_config.json; InvokeAI detects them the same way).
TURBO_SHIFT = 3.0
# A chat message as ZImagePipeline wraps a prompt: Qwen3's template, generation prompt added,
# enable_thinking=True (which leaves the assistant turn open, no empty <think> block).
TEMPLATE_KWARGS = {"add_generation_prompt": True, "enable_thinking": True, "tokenize": False}


def turbo_evidence(model_cfg) -> str | None:
    """Why model.source looks like Z-Image-Turbo, or None: its scheduler's shift of 3.0 (Base:
    6.0) in the folder, in model.single_file_config, or in the hub cache of a hub id; else the
    name (Tongyi-MAI/Z-Image-Turbo, ComfyUI's z_image_turbo_bf16.safetensors)."""
    for source in (model_cfg.source, model_cfg.single_file_config):
        source = (source or "").strip()
        if not source:
            continue
        shift = _scheduler_shift(source)
        if shift is not None:
            return f"its scheduler's shift is {shift:g}, Turbo's (Base's is 6)" if shift == TURBO_SHIFT else None
        if "turbo" in Path(source).name.lower():
            return f"its name, {Path(source).name}"
    return None


def _scheduler_shift(source: str) -> float | None:
    folder = Path(source).expanduser()
    config = folder / "scheduler" / "scheduler_config.json" if folder.is_dir() else None
    if config is None and not folder.exists() and source.count("/") == 1:  # a hub id: its cached config, if any
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(source, "scheduler/scheduler_config.json")
            config = Path(cached) if isinstance(cached, str) else None
        except Exception:  # noqa: BLE001 - no cache is as good as no evidence
            config = None
    if config is None or not config.is_file() or config.stat().st_size > 65536:
        return None
    try:
        value = json.loads(config.read_text(encoding="utf-8"))
        return None if value.get("use_dynamic_shifting") else float(value.get("shift", 1.0))
    except (OSError, ValueError, TypeError, AttributeError):
        return None


@dataclass(frozen=True)
class ZImageFamily(RectifiedFlowFamily):
    # ------------------------------------------------------------------ recognising a base model

    def claims_folder(self, index: dict, denoiser_config: dict) -> bool:
        return index.get("_class_name") in (*self.pipelines, *VARIANT_PIPELINES)

    def refuses_folder(self, index: dict, denoiser_config: dict, vae_config: dict | None = None) -> str | None:
        variant = VARIANT_PIPELINES.get(index.get("_class_name", ""))
        if variant:
            return f"{variant}; lora-booth trains Z-Image text-to-image models (Tongyi-MAI/Z-Image and its fine-tunes)"
        if denoiser_config.get("siglip_feat_dim") is not None:
            return ("a Z-Image transformer with SigLIP image conditioning (Omni); lora-booth trains Z-Image "
                    "text-to-image models")
        return self.refuses_inputs(denoiser_config.get("in_channels"), vae_config or {})

    def refuses_inputs(self, in_channels, vae_config: dict) -> str | None:
        expected = self.denoiser_inputs(vae_config)
        if in_channels is None or in_channels == expected:
            return None
        return (f"the transformer takes {in_channels} input channels, not the {expected} latent channels of its VAE "
                "(an inpainting or control variant); lora-booth trains text-to-image models")

    def claims_single_file(self, keys: set[str]) -> bool:
        return single_file_prefix(keys) is not None

    def refuses_single_file(self, keys: set[str]) -> str | None:
        prefix = single_file_prefix(keys)
        if any(k.startswith(f"{prefix}control_") for k in keys):
            return "a Z-Image ControlNet, not a base model; lora-booth trains Z-Image text-to-image models"
        if any(k.startswith(f"{prefix}siglip_") for k in keys):
            return "Z-Image Omni (SigLIP image conditioning); lora-booth trains Z-Image text-to-image models"
        if any(k.endswith(".scale_weight") or k == "scaled_fp8" for k in keys):
            return ("a scaled-fp8 file (ComfyUI's per-tensor scales), which lora-booth cannot read exactly; use the "
                    "bf16 file or a plain fp8 one")
        return None

    def refuses_transformer_file(self, checkpoint, vae_config: dict | None = None) -> str | None:
        """A transformer file whose patch embedding takes more than the VAE's 2×2 patches of latents."""
        key = f"{single_file_prefix(set(checkpoint.keys()))}x_embedder.weight"
        if key not in checkpoint.keys():
            return None
        channels = checkpoint.get_slice(key).get_shape()[1] // 4  # 2×2 patches, one frame
        return self.refuses_inputs(channels, vae_config or {})

    # ------------------------------------------------------------------ members and defaults

    def run_defaults(self, variant: str = "") -> dict:
        """ZImagePipeline's own defaults, which are Base's: 50 steps, classifier-free guidance 5."""
        return {"prior.guidance_scale": 5.0, "sample.guidance_scale": 5.0, "prior.sample_steps": 50,
                "sample.steps": 50}

    def token_length(self, part: str, tokenizer, variant: str = "") -> int:
        return min(int(tokenizer.model_max_length), TEXT_TOKENS)

    def refuses_config(self, cfg) -> tuple[str, str, str] | None:
        evidence = turbo_evidence(cfg.model)
        if evidence:
            return ("model", f"is {cfg.model.source}, Z-Image-Turbo ({evidence}): a model distilled to 8 steps "
                    "without guidance. DreamBooth trains the flow at every noise level again, which undoes that "
                    "distillation (ai-toolkit trains Turbo only through a de-distillation adapter, musubi-tuner "
                    "calls it unstable)",
                    "train on the undistilled base, model=Tongyi-MAI/Z-Image, as diffusers' DreamBooth example does; "
                    "its adapter also loads into Turbo for 8-step sampling (lora-booth generate "
                    "model=Tongyi-MAI/Z-Image-Turbo steps=9 guidance=0 lora=OUT), with results that vary")
        if cfg.objective.min_snr_gamma:
            return ("objective.min_snr_gamma", f"is {cfg.objective.min_snr_gamma:g}, but min-SNR weighting is defined "
                    "for DDPM's noise schedule; Z-Image trains by flow matching, whose timestep distribution "
                    "(objective.timesteps) plays that part", "remove it (0)")
        if cfg.objective.loss != "mse" and cfg.objective.huber_schedule == "snr":
            return ("objective.huber_schedule", "is snr, which needs DDPM's ᾱ_t; Z-Image trains by flow matching",
                    "use huber_schedule=exponential or constant")
        if cfg.model.prediction_type != "auto":
            return ("model.prediction_type", f"is {cfg.model.prediction_type}, but Z-Image predicts the flow "
                    "(x₀ − ε, which its pipeline negates)", "leave it at auto")
        if cfg.lora.text_encoder:
            return ("lora.text_encoder", "is true, but ZImagePipeline.load_lora_weights loads adapters into the "
                    "transformer only (and Qwen3's 4 B parameters would be trained through a chat template)",
                    "train the transformer only: lora.text_encoder=false")
        if cfg.pivotal.enabled:
            return ("pivotal", "is on, but pivotal tuning of Z-Image is not supported (new tokens would go into "
                    "Qwen3's vocabulary, which no Z-Image front-end reads from an adapter file)",
                    "train without pivotal=true; the trigger word works as it is")
        return None

    # ------------------------------------------------------------------ loading and sampling

    def load_single_file(self, pipeline_class, path, kwargs: dict, dtypes: dict | None = None):
        """The transformer alone in Tongyi-MAI's original layout (ComfyUI's `model.diffusion_model.`
        keys, fp8 files included), the rest of the pipeline from model.single_file_config (a Z-Image
        folder or a hub id in the cache). Every tensor is mapped by zimage_layout's names and its
        shape checked (an untrusted file); tensors the transformer has no place for are ignored."""
        from diffusers import ZImageTransformer2DModel
        from safetensors import safe_open

        config = kwargs["config"]
        transformer_config = ZImageTransformer2DModel.load_config(str(config), subfolder="transformer",
                                                                  local_files_only=True)
        with torch.device("meta"):
            transformer = ZImageTransformer2DModel.from_config(transformer_config)
        width = transformer.config.dim
        state = {}
        with safe_open(str(path), framework="pt") as checkpoint:
            keys = set(checkpoint.keys())
            prefix = single_file_prefix(keys)
            for name, meta in transformer.state_dict().items():
                key, rows = original_tensor_name(name, width)
                if prefix + key not in keys:
                    raise ValueError(f"no {prefix + key} (for {name}): not a complete Z-Image transformer of this "
                                     "architecture")
                tensor = checkpoint.get_tensor(prefix + key)
                tensor = tensor if rows is None else tensor[rows[0]:rows[1]]
                if tuple(tensor.shape) != tuple(meta.shape):
                    raise ValueError(f"{prefix + key} has shape {tuple(tensor.shape)}, {name} needs "
                                     f"{tuple(meta.shape)}: the configs describe another Z-Image architecture")
                wanted = (dtypes or {}).get("default") or (torch.bfloat16 if tensor.element_size() == 1 else tensor.dtype)
                state[name] = tensor.to(wanted)  # fp8 files: at least bf16
        transformer.load_state_dict(state, strict=True, assign=True)
        return pipeline_class.from_pretrained(config, transformer=transformer, local_files_only=True,
                                              use_safetensors=True, **({"dtype": dtypes} if dtypes else {}))

    def pipeline_kwargs(self, base) -> dict:
        return {"max_sequence_length": self.token_length("text_encoder", base.tokenizer)}

    def pipeline_conditioning(self, conditioning: Conditioning) -> dict:
        return {"prompt_embeds": prompt_list(conditioning)}

    def negative_conditioning(self, encoded, rows: int, device, dtype) -> dict:
        """ZImagePipeline given encoded prompts wants the unconditional branch's too: the empty prompt's."""
        return {"negative_prompt_embeds": prompt_list(encoded([""] * rows, device, dtype))}

    def native_size(self, base) -> int:
        return base.vae.config.sample_size  # the transformer's config has no size; the VAE's is the training size

    def size_multiple(self, base) -> int:
        return base.vae_scale_factor * patch_size(base.unet.config)  # the VAE's downsampling, then the patches

    def context_width(self, denoiser_config) -> int:
        get = denoiser_config.get if hasattr(denoiser_config, "get") else lambda k: getattr(denoiser_config, k, None)
        return get("cap_feat_dim")

    # ------------------------------------------------------------------ the objective: rectified flow

    def sample_noise(self, scheduler, latents: torch.Tensor, generators: list, cfg) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise and σ ∈ (0, 1) per row (families/noise.py: flow_sigma); timesteps=auto is logit-normal
        with the scheduler's fixed shift (Base: 6), which diffusers' DreamBooth example also samples at."""
        tokens = (latents.shape[-2] // 2) * (latents.shape[-1] // 2)
        return noising.sample_flow_noise(latents, generators, cfg, resolution_shift(scheduler, tokens))

    def token_lengths(self) -> tuple[int, ...]:
        return (TEXT_TOKENS,)

    def predict(self, base, model, noisy: torch.Tensor, time: torch.Tensor, conditioning: Conditioning,
                sizes: torch.Tensor, guidance: float) -> torch.Tensor:
        """The transformer on each row as a one-frame (C, 1, h, w) latent, its prompt's own tokens as
        the caption; 1 − σ as the timestep (it scales by 1000 itself), the output negated."""
        frames = list(noisy.to(base.compute_dtype).unsqueeze(2).unbind(0))
        output = model(frames, 1 - time.float(), prompt_list(conditioning), return_dict=False)[0]
        return -torch.stack(output).squeeze(2)

    # ------------------------------------------------------------------ conditioning

    def tokenize(self, part: str, tokenizer, prompts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each prompt as a user turn of Qwen3's chat template, then padded or cut to `length`, with
        the mask of its own tokens (ZImagePipeline._encode_prompt)."""
        chats = [tokenizer.apply_chat_template([{"role": "user", "content": prompt}], **TEMPLATE_KWARGS)
                 for prompt in prompts]
        tokens = tokenizer(chats, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        return tokens.input_ids, tokens.attention_mask.bool()

    def encode(self, encoders: list, ids: list[torch.Tensor], masks: list | None = None) -> Conditioning:
        """Qwen3's penultimate hidden states, and which of them are the prompt's (the rest is padding
        the transformer never sees)."""
        mask = masks[0] if masks else None
        output = encoders[0](input_ids=ids[0], attention_mask=mask, output_hidden_states=True)
        return Conditioning(output.hidden_states[-2], None, mask)

    # The planner's stand-in prompts fill every token, so they carry no mask: selecting by a mask has
    # a data-dependent shape, which a fake tensor cannot trace, and an all-true one selects everything.
    def planned_tokens(self, rows: int) -> tuple[list[torch.Tensor], list]:
        return [torch.zeros(rows, TEXT_TOKENS, dtype=torch.long)], [None]

    def planned_conditioning(self, rows: int, encoders: dict, hidden_width: int, dtype: torch.dtype) -> Conditioning:
        return Conditioning(torch.randn(rows, TEXT_TOKENS, hidden_width, dtype=dtype))

    # ------------------------------------------------------------------ other tools' names

    def single_file_locator(self, header: dict, adapters: list):
        """q, k and v are rows of the original file's qkv (zimage_layout); adapters of other parts have
        no place in a transformer file."""
        prefix = single_file_prefix(set(header))
        width = header[f"{prefix}layers.0.attention.qkv.weight"][0][1] if prefix is not None else None

        def locate(part: str, module_path: str):
            if part != "transformer" or width is None:
                return None
            key, rows = original_tensor_name(f"{module_path}.weight", width)
            return f"{prefix}{key}", rows, False
        return locate

    def adapter_paths_fit(self, paths) -> bool:
        """An adapter on this transformer's modules (layers.N, the refiners), not FLUX.1's blocks."""
        return any(path.startswith(ADAPTER_ROOTS) for path in paths)

    def own_layout(self, tensors: dict) -> dict | None:
        return from_comfyui(tensors) if is_comfyui_layout(tensors) else None

    def kohya_tensors(self, modules: dict) -> dict[str, torch.Tensor]:
        """The ComfyUI layout: `diffusion_model.<module>` in diffusers' module names with kohya's
        lora_down/lora_up/alpha, which ComfyUI's Z-Image key map (q, k, v as row slices of the
        original qkv) and ZImagePipeline.load_lora_weights both read, alpha included."""
        try:
            return comfyui_tensors(modules)
        except ValueError as exc:
            raise AdapterError(str(exc)) from None

    def loaders_note(self, adapter_kind: str) -> str | None:
        if adapter_kind == "lora":
            return None
        return ("lora-booth generate and merge apply it exactly; which Z-Image front-end loads a "
                f"{adapter_kind} file at the trained weights was not checked, so merge it into the model "
                "(lora-booth merge) for other tools")

    def base_model_version(self, v_prediction: bool) -> str:
        return "zimage"

    def modelspec_architecture(self, v_prediction: bool, variant: str = "") -> str:
        return "z-image/lora"

    def text_encoders_phrase(self) -> str:
        return "Qwen3 (frozen)"


def prompt_list(conditioning: Conditioning) -> list[torch.Tensor]:
    """Each row's hidden states without its padding: ZImagePipeline's list of prompt embeddings."""
    if conditioning.mask is None:
        return list(conditioning.hidden.unbind(0))
    return [hidden[mask.to(hidden.device)] for hidden, mask in zip(conditioning.hidden, conditioning.mask)]


def patch_size(config) -> int:
    sizes = config.get("all_patch_size") if hasattr(config, "get") else getattr(config, "all_patch_size", None)
    return int((sizes or (2,))[0])


ZIMAGE = ZImageFamily(name="zimage", title="Z-Image", pipelines=("ZImagePipeline",),
                      single_file_repo="Tongyi-MAI/Z-Image", plan_configs="zimage",
                      text_encoder_classes=("Qwen3Model",), preset_prefix="zimage-", has_safety_checker=False,
                      text_width=2560, default_resolution=1024, kohya_text_prefixes=(("text_encoder", "lora_te_"),),
                      clip_skip="None", modelspec_implementation="https://github.com/Tongyi-MAI/Z-Image",
                      denoiser="transformer", denoiser_class="ZImageTransformer2DModel", adapter_text_parts=(),
                      default_vae_channels=16, stages_denoiser=True, comfyui_reads_diffusers_file=True,
                      # fp8: every Linear but the embedders of the timestep, the caption and the patches and
                      # the final layer, which diffusers keeps in the compute precision too
                      fp8_keep=("t_embedder", "cap_embedder", "all_x_embedder", "all_final_layer"),
                      offload_units=r"(noise_refiner|context_refiner|siglip_refiner|layers)\.\d+",
                      webui_names="SwarmUI (on ComfyUI's loader)")
