"""FLUX.2 [klein] base (4B: Apache-2.0; 9B: FLUX non-commercial licence): a rectified-flow
transformer of double-stream and single-stream blocks (Flux2Transformer2DModel), conditioned on
the hidden states of three layers of a Qwen3 language model (Qwen3-4B / Qwen3-8B) stacked along
the feature axis, from a chat-templated prompt padded to 512 tokens. Its VAE (AutoencoderKLFlux2)
has 32 latent channels; the pipeline patchifies them 2×2 (128 channels) and normalises them by
the VAE's batch-norm running statistics, then packs each patch into one token with (t, row,
column, layer) position ids. Base models sample with classifier-free guidance (4.0, 50 steps);
the transformer has no guidance input.

Training latents stay (B, 32, h, w), already normalised (Flux2Codec); `predict` patchifies and
packs them for the transformer and undoes both on its output, so the loss, masks and noise see
the VAE's own grid."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from ..io.errors import AdapterError
from . import noise as noising
from .flow import RectifiedFlowFamily
from .conditioning import Conditioning
from .flux2_layout import from_kohya, is_flux2_kohya, original_tensor_name, single_file_prefix, to_kohya
from .latents import LatentCodec

# Flux2KleinPipeline's defaults: the Qwen3 layers whose hidden states condition the transformer
# (its text_encoder_out_layers) and the tokens a prompt is padded to (max_sequence_length)
TEXT_LAYERS = (9, 18, 27)
TEXT_TOKENS = 512
# the training time shift, as musubi-tuner's flux2_shift and FLUX.1's dynamic shift: exp(μ) with μ
# linear in the image's token count, 0.5 at 256 tokens to 1.15 at 4096 (1024 px)
SHIFT_AT = ((256, 0.5), (4096, 1.15))

# module names only FLUX.2's transformer has (FLUX.1: to_q/k/v and proj_mlp, ff.net.*, time_text_embed)
OWN_NAMES = ("to_qkv_mlp_proj", "ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out",
             "stream_modulation", "time_guidance_embed")
SINGLE_OUT = re.compile(r"single_transformer_blocks\.\d+\.attn\.to_out")

VARIANT_PIPELINES = {
    "Flux2KleinInpaintPipeline": "FLUX.2 klein inpainting (its transformer takes the masked image too)",
    "Flux2KleinKVPipeline": "FLUX.2 klein KV (reference-image editing with cached keys and values)",
    "Flux2Pipeline": "FLUX.2 [dev] (a 32 B transformer conditioned on Mistral Small 3.1, no consumer-card "
                     "preset); lora-booth trains FLUX.2 klein base 4B and 9B",
}
DISTILLED = ("a step-distilled FLUX.2 klein (4 steps, no classifier-free guidance). DreamBooth on a few-step "
             "model trains the flow objective its distillation replaced, and LoRAs trained that way come out "
             "blurred or grey; the trainers that support klein train the base. Train "
             "black-forest-labs/FLUX.2-klein-base-4B (or -base-9B) instead: the LoRA loads onto the distilled "
             "klein of the same size for 4-step sampling")


class Flux2Codec(LatentCodec):
    """AutoencoderKLFlux2's normalisation: 2×2 patches of its latents (4C channels) minus the
    batch-norm running mean, over √(running var + eps), as Flux2KleinPipeline encodes and decodes.
    Applied in the patchified layout and undone, so latents keep the VAE's (B, C, h, w)."""

    def __init__(self, vae) -> None:  # noqa: super().__init__ reads SD's constants, which this VAE has not
        self.channels = int(vae.config.latent_channels)
        self.mean = vae.bn.running_mean.detach().float().clone().view(1, -1, 1, 1)
        self.std = torch.sqrt(vae.bn.running_var.detach().float().view(1, -1, 1, 1) + vae.config.batch_norm_eps)

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        return unpatchify((patchify(latents) - self.mean.to(latents)) / self.std.to(latents))

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        return unpatchify(patchify(latents) * self.std.to(latents) + self.mean.to(latents))


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) → (B, 4C, h/2, w/2), channel 4c + 2i + j holding row i, column j of each 2×2
    patch of channel c (Flux2KleinPipeline._patchify_latents)."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unpatchify(latents: torch.Tensor) -> torch.Tensor:
    b, c4, h, w = latents.shape
    return latents.view(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, h * 2, w * 2)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latents → (B, h/2 · w/2, 4C) tokens, rows first, as the pipeline feeds them."""
    patches = patchify(latents)
    return patches.flatten(2).transpose(1, 2)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack` for latents of h × w."""
    b, _, width = tokens.shape
    return unpatchify(tokens.transpose(1, 2).reshape(b, width, h // 2, w // 2))


def image_ids(h: int, w: int, device) -> torch.Tensor:
    """Each token's (t, row, column, layer) = (0, i, j, 0), rows first (_prepare_latent_ids)."""
    return torch.cartesian_prod(torch.arange(1), torch.arange(h // 2), torch.arange(w // 2), torch.arange(1)).to(device)


def text_ids(length: int, device) -> torch.Tensor:
    """Each text state's (0, 0, 0, l) (_prepare_text_ids)."""
    return torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(length)).to(device)


def time_shift(tokens: int) -> float:
    (base_len, base_shift), (max_len, max_shift) = SHIFT_AT
    return math.exp(base_shift + (max_shift - base_shift) / (max_len - base_len) * (tokens - base_len))


def _get(config, key: str, default=None):
    return config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)


@dataclass(frozen=True)
class Flux2Family(RectifiedFlowFamily):
    # ------------------------------------------------------------------ recognising a base model

    def claims_folder(self, index: dict, denoiser_config: dict) -> bool:
        return index.get("_class_name") in (*self.pipelines, *VARIANT_PIPELINES)

    def refuses_folder(self, index: dict, denoiser_config: dict, vae_config: dict | None = None) -> str | None:
        variant = VARIANT_PIPELINES.get(index.get("_class_name", ""))
        if variant:
            return f"{variant}; lora-booth trains FLUX.2 klein base text-to-image models"
        if index.get("is_distilled"):
            return DISTILLED
        return self.refuses_inputs(denoiser_config.get("in_channels"), vae_config or {})

    def refuses_inputs(self, in_channels, vae_config: dict) -> str | None:
        expected = self.denoiser_inputs(vae_config)
        if in_channels is None or in_channels == expected:
            return None
        return (f"the transformer takes {in_channels} input channels, not the {expected} of its VAE's "
                f"{expected // self.latent_packing} latent channels patchified 2×2: an inpainting or editing "
                "variant; lora-booth trains text-to-image models")

    def claims_single_file(self, keys: set[str]) -> bool:
        return single_file_prefix(keys) is not None

    def claims_adapter_modules(self, paths: list[str]) -> bool:
        """FLUX.2's own names: the single blocks' fused layers, the SwiGLU MLPs, the shared
        modulation and time embedding (FLUX.1's double-block attention has the same names as FLUX.2's)."""
        return any(any(name in path for name in OWN_NAMES) or SINGLE_OUT.fullmatch(path) for path in paths)

    def adapter_paths_fit(self, paths) -> bool:
        """Only where the paths name what FLUX.2 alone has: its double-block attention is spelled as FLUX.1's."""
        return self.claims_adapter_modules(list(paths))

    def refuses_transformer_file(self, checkpoint, vae_config: dict | None = None) -> str | None:
        key = f"{single_file_prefix(set(checkpoint.keys()))}img_in.weight"
        if key not in checkpoint.keys():
            return None
        return self.refuses_inputs(checkpoint.get_slice(key).get_shape()[1], vae_config or {})

    def native_resolution(self, denoiser_config: dict, vae_config: dict) -> int:
        size = vae_config.get("sample_size")  # the transformer's config has no size; the VAE's is klein's 1024
        return size if isinstance(size, int) and size > 0 else self.default_resolution

    # ------------------------------------------------------------------ members, defaults, lengths

    def run_defaults(self, variant: str = "") -> dict:
        """Flux2KleinPipeline's defaults for a base model: 50 steps, classifier-free guidance 4.0."""
        return {"prior.guidance_scale": 4.0, "sample.guidance_scale": 4.0, "prior.sample_steps": 50,
                "sample.steps": 50}

    def token_length(self, part: str, tokenizer, variant: str = "") -> int:
        return min(int(tokenizer.model_max_length), TEXT_TOKENS)

    def token_lengths(self) -> tuple[int, ...]:
        return (TEXT_TOKENS,)

    # ------------------------------------------------------------------ loading and sampling

    def load_single_file(self, pipeline_class, path, kwargs: dict, dtypes: dict | None = None):
        """The transformer alone in BFL's layout (ComfyUI's single files, fp8 included), the rest of
        the pipeline from model.single_file_config (a klein base folder or a hub id in the cache).
        Every tensor the transformer needs is read by its BFL name and checked (untrusted file)."""
        from diffusers import Flux2Transformer2DModel
        from safetensors import safe_open

        config = kwargs["config"]
        transformer_config = Flux2Transformer2DModel.load_config(str(config), subfolder="transformer",
                                                                 local_files_only=True)
        with torch.device("meta"):
            transformer = Flux2Transformer2DModel.from_config(transformer_config)
        state = {}
        with safe_open(str(path), framework="pt") as checkpoint:
            prefix = single_file_prefix(set(checkpoint.keys())) or ""
            for name, meta in transformer.state_dict().items():
                key, slot, parts, swapped = original_tensor_name(name)
                if prefix + key not in checkpoint.keys():
                    raise ValueError(f"no {prefix + key} (for {name}): not a complete FLUX.2 transformer of this size")
                tensor = checkpoint.get_tensor(prefix + key)
                if parts > 1:
                    tensor = tensor.chunk(parts)[slot] if tensor.shape[0] % parts == 0 else tensor
                tensor = torch.cat(tensor.chunk(2)[::-1]) if swapped else tensor
                if tuple(tensor.shape) != tuple(meta.shape):
                    raise ValueError(f"{prefix + key} has shape {tuple(tensor.shape)}, {name} needs "
                                     f"{tuple(meta.shape)}: the configs describe another FLUX.2 architecture")
                wanted = (dtypes or {}).get("default") or (torch.bfloat16 if tensor.element_size() == 1 else tensor.dtype)
                state[name] = tensor.to(wanted)  # fp8 files: at least bf16
        transformer.load_state_dict(state, strict=True, assign=True)
        pipe = pipeline_class.from_pretrained(config, transformer=transformer, local_files_only=True,
                                              use_safetensors=True, **({"dtype": dtypes} if dtypes else {}))
        if pipe.config.get("is_distilled"):
            raise ValueError(DISTILLED)
        return pipe

    def pipeline_kwargs(self, base) -> dict:
        return {"max_sequence_length": self.token_length("text_encoder", base.tokenizer)}

    def negative_conditioning(self, encoded, rows: int, device, dtype) -> dict:
        """The empty prompt's cached embeddings, which Flux2KleinPipeline's classifier-free guidance
        would otherwise encode with Qwen3 at every call (on the CPU, where staged grids leave it)."""
        return {"negative_prompt_embeds": encoded([""] * rows, device, dtype).hidden}

    def negative_kwargs(self, base, negative: str) -> dict:
        """Flux2KleinPipeline takes no negative prompt text, only its embeddings (it encodes "" itself):
        a negative prompt is encoded here, as the pipeline would encode it."""
        if not negative:
            return {}
        device = next(base.text_encoder.parameters()).device
        ids, mask = self.tokenize("text_encoder", base.tokenizer, [negative], self.token_length("text_encoder", base.tokenizer))
        with torch.no_grad():
            hidden = self.encode([base.text_encoder], [ids.to(device)], [mask.to(device)]).hidden
        return {"negative_prompt_embeds": hidden.to(base.compute_dtype)}

    def pipeline_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return patchify(latents)  # the pipeline's `latents=`: patchified, normalised, not yet packed

    def native_size(self, base) -> int:
        return self.native_resolution({}, dict(base.vae.config))

    def size_multiple(self, base) -> int:
        return base.vae_scale_factor * 2  # the VAE's downsampling, then 2×2 patches

    def latent_codec(self, vae) -> LatentCodec:
        return Flux2Codec(vae)

    def refuses_config(self, cfg) -> tuple[str, str, str] | None:
        if cfg.lora.text_encoder:
            return ("lora.text_encoder", "is on, but FLUX.2 klein's text encoder is a 4–8 B Qwen3 language model "
                    "whose LoRA Flux2KleinPipeline.load_lora_weights does not load (transformer only)",
                    "remove it (false); the transformer's adapters learn the subject")
        if cfg.pivotal.enabled:
            return ("pivotal", "is on, but pivotal tuning of FLUX.2 klein's Qwen3 encoder is not supported",
                    "train without pivotal=true; the trigger word works as it is")
        if cfg.objective.min_snr_gamma:
            return ("objective.min_snr_gamma", f"is {cfg.objective.min_snr_gamma:g}, but min-SNR weighting is "
                    "defined for DDPM's noise schedule; FLUX.2 trains by flow matching, whose timestep "
                    "distribution (objective.timesteps) plays that part", "remove it (0)")
        if cfg.objective.loss != "mse" and cfg.objective.huber_schedule == "snr":
            return ("objective.huber_schedule", "is snr, which needs DDPM's ᾱ_t; FLUX.2 trains by flow matching",
                    "use huber_schedule=exponential or constant")
        if cfg.model.prediction_type != "auto":
            return ("model.prediction_type", f"is {cfg.model.prediction_type}, but FLUX.2 predicts the flow ε − x₀",
                    "leave it at auto")
        if cfg.lora.type != "lora" and "kohya" in cfg.save.formats:
            return ("save.formats", f"includes kohya, whose FLUX.2 layout (BFL's names) fuses q, k and v and so "
                    f"holds plain LoRA only, not {cfg.lora.type}", "save.formats=diffusers")
        return None

    # ------------------------------------------------------------------ the objective: rectified flow

    def sample_noise(self, scheduler, latents: torch.Tensor, generators: list, cfg) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise and σ per row; timesteps=auto: logit-normal, shifted by the image's token count."""
        tokens = (latents.shape[-2] // 2) * (latents.shape[-1] // 2)
        return noising.sample_flow_noise(latents, generators, cfg, time_shift(tokens))

    def predict(self, base, model, noisy: torch.Tensor, time: torch.Tensor, conditioning: Conditioning,
                sizes: torch.Tensor, guidance: float) -> torch.Tensor:
        """The transformer on the packed latents; σ is the timestep (the pipeline's t / 1000; the
        model scales by 1000 itself). klein has no guidance embedding (guidance_embeds false)."""
        b, _, h, w = noisy.shape
        dtype, device = base.compute_dtype, noisy.device
        embeds_guidance = _get(base.unet.config, "guidance_embeds", False)
        output = model(hidden_states=pack(noisy).to(dtype), encoder_hidden_states=conditioning.hidden,
                       timestep=time.to(dtype),
                       guidance=torch.full((b,), guidance, device=device, dtype=dtype) if embeds_guidance else None,
                       img_ids=image_ids(h, w, device), txt_ids=text_ids(conditioning.hidden.shape[1], device),
                       return_dict=False)[0]
        return unpack(output, h, w)

    # ------------------------------------------------------------------ conditioning

    def tokenize(self, part: str, tokenizer, prompts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each prompt as one user turn of Qwen3's chat template with the assistant's turn opened and
        thinking off, padded or cut to `length` tokens; the mask marks the prompt's own tokens."""
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True, enable_thinking=False) for prompt in prompts]
        tokens = tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
        return tokens.input_ids, tokens.attention_mask.bool()

    def encode(self, encoders: list, ids: list[torch.Tensor], masks: list | None = None) -> Conditioning:
        """Qwen3's hidden states after layers 9, 18 and 27, side by side per token (3 × the encoder's
        width), every padded position kept: the transformer attends to all of them, as in
        Flux2KleinPipeline. The language-model head is skipped (its logits are never used)."""
        encoder = encoders[0]
        body = getattr(getattr(encoder, "module", encoder), "model", encoder)  # Qwen3ForCausalLM → Qwen3Model
        mask = masks[0] if masks and masks[0] is not None else torch.ones_like(ids[0], dtype=torch.bool)
        output = body(input_ids=ids[0], attention_mask=mask.long(), output_hidden_states=True, use_cache=False)
        states = torch.stack([output.hidden_states[k] for k in TEXT_LAYERS], dim=2)  # (B, L, 3, D)
        return Conditioning(states.flatten(2))

    def planned_tokens(self, rows: int) -> tuple[list[torch.Tensor], list]:
        return [torch.zeros(rows, TEXT_TOKENS, dtype=torch.long)], [torch.ones(rows, TEXT_TOKENS, dtype=torch.bool)]

    def planned_conditioning(self, rows: int, encoders: dict, hidden_width: int, dtype: torch.dtype) -> Conditioning:
        return Conditioning(torch.randn(rows, TEXT_TOKENS, hidden_width, dtype=dtype))

    # ------------------------------------------------------------------ other tools' names

    def kohya_tensors(self, modules: dict) -> dict[str, torch.Tensor]:
        """`lora_unet_<BFL name>` (musubi-tuner's FLUX.2 layout), which ComfyUI maps onto its
        BFL-named transformer: q, k and v fused exactly (flux2_layout)."""
        try:
            return to_kohya(modules)
        except AdapterError:
            raise
        except ValueError as exc:
            raise AdapterError(str(exc)) from None

    def single_file_locator(self, header: dict, adapters: list):
        """Where each adapter module's weight is in a BFL-layout klein transformer file: q, k and v are
        thirds of qkv's rows, every other module its own weight (norm_out's halves swapped)."""
        prefix = single_file_prefix(set(header))
        if prefix is None:
            return None
        others = sorted({part for adapter in adapters for part in adapter.parts() if part != self.denoiser})
        if others:
            raise AdapterError(f"the file holds FLUX.2's transformer alone, but the adapter also changes "
                               f"{', '.join(others)}; merge into a klein folder instead")

        def locate(part: str, module_path: str):
            if part != self.denoiser:
                return None
            try:
                key, slot, parts, swapped = original_tensor_name(f"{module_path}.weight")
            except AdapterError:
                return None
            if prefix + key not in header:
                return None
            rows = header[prefix + key][0][0] // parts
            return prefix + key, None if parts == 1 else (slot * rows, (slot + 1) * rows), swapped
        return locate

    def read_kohya(self, tensors, metadata: dict) -> tuple[dict, dict] | None:
        return from_kohya(tensors) if is_flux2_kohya(tensors, metadata) else None

    def loaders_note(self, adapter_kind: str) -> str | None:
        if adapter_kind == "lora":
            return None
        if adapter_kind == "loha":
            return ("its pytorch_lora_weights.safetensors is read by lora-booth's generate, merge and convert; "
                    "Flux2KleinPipeline.load_lora_weights refuses LoHa")
        return (f"its pytorch_lora_weights.safetensors is read by lora-booth's generate, merge and convert; "
                f"Flux2KleinPipeline.load_lora_weights takes it, but its {adapter_kind} output was not compared, "
                "and ComfyUI was not checked")

    def base_model_version(self, v_prediction: bool) -> str:
        return "flux2_klein"

    def modelspec_architecture(self, v_prediction: bool, variant: str = "") -> str:
        return "flux-2-klein/lora"

    def text_encoders_phrase(self) -> str:
        return "Qwen3 (frozen)"


FLUX2 = Flux2Family(
    name="flux2", title="FLUX.2 klein", pipelines=("Flux2KleinPipeline",),
    single_file_repo="black-forest-labs/FLUX.2-klein-base-4B", plan_configs="flux2-klein-4b",
    text_parts=("text_encoder",), text_encoder_classes=("Qwen3ForCausalLM",), preset_prefix="flux2-klein-",
    has_safety_checker=False, text_width=7680, default_resolution=1024, clip_skip="None",
    modelspec_implementation="https://github.com/black-forest-labs/flux2", denoiser="transformer",
    denoiser_class="Flux2Transformer2DModel", vae_class="AutoencoderKLFlux2", adapter_text_parts=(),
    latent_packing=4, default_vae_channels=32, stages_denoiser=True, kohya_text_prefixes=(),
    # fp8: every linear layer but the input embedders and the time embedding
    fp8_keep=("pos_embed", "time_guidance_embed", "context_embedder", "x_embedder"),
    # train.offload_blocks: each double and single block, what gradient checkpointing recomputes as a whole
    offload_units=r"(transformer_blocks|single_transformer_blocks)\.\d+",
    webui_names="", comfyui_reads_diffusers_file=False,  # no AUTOMATIC1111/Forge line: ComfyUI is the front-end
    # attention of both block kinds, as diffusers' klein DreamBooth script targets by default: the
    # double blocks' image and text projections, and each single block's fused qkv+MLP input and output
    default_targets=("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                     # (a single block's to_out by its full name: "attn.to_out" alone would also name the double
                     # blocks' to_out list, which peft cannot adapt; 48 covers every FLUX.2 size)
                     "to_qkv_mlp_proj", *(f"single_transformer_blocks.{i}.attn.to_out" for i in range(48))))
