"""What every model family answers. Defaults are Stable Diffusion 1.x's; a family overrides what
differs."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .conditioning import Conditioning
from .latents import LatentCodec
from . import noise as noising

TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
# ComfyUI's scaled-fp8 checkpoints: fp8 weights with per-layer scales beside them, which plain
# loading would drop (the weights come out wrong by the scale, silently)
SCALED_FP8_MARKS = (".scale_weight", ".weight_scale", "scaled_fp8", ".scale_input", ".input_scale")


def scaled_fp8_refusal(keys) -> str | None:
    """Why a single file of any family is refused for its per-layer fp8 scales, or None."""
    scaled = sorted(key for key in keys if key.endswith(SCALED_FP8_MARKS))
    if not scaled:
        return None
    return (f"a scaled-fp8 checkpoint ({scaled[0]}: its fp8 weights need per-layer scales that lora-booth does "
            "not apply, so they would load wrong); use the bf16 file or a plain fp8 (e4m3fn) one")
CLIP_TOKENS = 77  # CLIP's position embeddings: no CLIP encoder reads a longer prompt


@dataclass(frozen=True)
class Family:
    name: str                       # stored in metadata and checkpoints: "sd1", "sd2", "sdxl"
    title: str                      # for people: "SD 1.x"
    pipelines: tuple[str, ...]      # diffusers pipeline classes of its folders; the first builds samples
    single_file_repo: str           # the official repo whose configs describe a single-file checkpoint
    plan_configs: str               # lora_booth/configs/<name>: the full-size configs the planner builds from
    text_parts: tuple[str, ...] = ("text_encoder",)
    text_encoder_classes: tuple[str, ...] = ("CLIPTextModel",)  # transformers classes, per text part
    preset_prefix: str = ""         # presets written for this family: "" (24gb, 8gb ...) or "sdxl-"
    has_safety_checker: bool = True  # the pipeline takes one (lora-booth loads it without)
    # classifier-free guidance's unconditional input: the encoded empty prompt, or zeros
    # (the pipeline's `force_zeros_for_empty_prompt`) — read from the model when it says
    zeros_for_empty_prompt: bool = False
    # ---- names and metadata in other tools' files (kohya sd-scripts, A1111, Forge, ComfyUI)
    text_width: int = 768           # the width the UNet cross-attends to: how an adapter file shows its family
    kohya_text_prefixes: tuple[tuple[str, str], ...] = (("text_encoder", "lora_te_"),)
    kohya_unet_layout: dict | None = None  # kohya names the UNet in the original layout (ldm.py), or diffusers'
    # words of its module names that hold "_" themselves (img_mlp), for reading kohya's flat names back
    kohya_compounds: tuple[str, ...] = ()
    default_resolution: int = 512
    clip_skip: str = "1"            # kohya's ss_clip_skip: the text layer the UNet reads, as kohya writes it
    modelspec_implementation: str = "diffusers"
    # ---- the denoiser and what trains
    denoiser: str = "unet"          # the trained network: its pipeline attribute, folder and diffusers-LoRA prefix
    adapter_text_parts: tuple[str, ...] | None = None  # text encoders that may carry adapters; None: all
    default_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")  # lora.targets' default
    denoiser_class: str = "UNet2DConditionModel"  # its diffusers class (the planner builds it from its config)
    vae_class: str = "AutoencoderKL"  # its VAE's diffusers class (the planner builds it from its config)
    # train.fp8_base: name patterns of layers kept in the compute precision; None: diffusers' choice for the model
    fp8_keep: tuple[str, ...] | None = None
    # train.offload_blocks: the denoiser's blocks (module names, a full-match regex) that gradient
    # checkpointing recomputes as a whole: a UNet's resnets and attention transformer blocks
    offload_units: str = (r"(down_blocks\.\d+|up_blocks\.\d+|mid_block)\."
                          r"(resnets\.\d+|attentions\.\d+\.transformer_blocks\.\d+)")
    webui_names: str = "AUTOMATIC1111 / Forge"  # the web UIs that load its kohya files with <lora:name:1>
    # ComfyUI and Forge map the diffusers file's denoiser keys (FLUX.1), not only its text encoders' (SD)
    comfyui_reads_diffusers_file: bool = False
    # on a GPU the denoiser joins the text encoders there only after the prompts are encoded
    stages_denoiser: bool = False
    # input channels of the denoiser per latent channel of the VAE: 1 for a UNet, 4 where 2×2
    # patches of latents are packed into one token (FLUX.1)
    latent_packing: int = 1
    default_vae_channels: int = 4   # the VAE's latent channels where no config says

    # ------------------------------------------------------------------ recognising a base model

    def claims_folder(self, index: dict, denoiser_config: dict) -> bool:
        return False

    def claims_single_file(self, keys: set[str]) -> bool:
        return False

    def claims_adapter_modules(self, paths: list[str]) -> bool:
        """Whether an adapter's denoiser module paths include names only this family has (FLUX.2's
        fused single-block layers beside FLUX.1's same-named double blocks)."""
        return False

    def refuses_folder(self, index: dict, denoiser_config: dict, vae_config: dict | None = None) -> str | None:
        """Why a folder of this family cannot be trained (a refiner, an inpainting model), or None."""
        return self.refuses_inputs(denoiser_config.get("in_channels"), vae_config or {})

    def denoiser_inputs(self, vae_config: dict) -> int:
        """The input width of a text-to-image denoiser over this VAE: its latent channels, packed as the
        family packs them. A wider input takes a mask, a masked image or a control image too."""
        return int(vae_config.get("latent_channels", self.default_vae_channels)) * self.latent_packing

    def refuses_inputs(self, in_channels, vae_config: dict) -> str | None:
        expected = self.denoiser_inputs(vae_config)
        if in_channels is None or in_channels == expected:
            return None
        return (f"the UNet takes {in_channels} input channels, not the {expected} latent channels of its VAE (an "
                "inpainting or depth model); lora-booth trains text-to-image models")

    def refuses_single_file(self, keys: set[str]) -> str | None:
        return None

    def refuses_transformer_file(self, checkpoint, vae_config: dict | None = None) -> str | None:
        return None

    def native_resolution(self, denoiser_config: dict, vae_config: dict) -> int:
        """The side the base model was trained at (data.resolution's default): its denoiser's
        sample_size in latents times the VAE's downsampling (toy world 8 × 4 = 32 px, SD 1.5 64 × 8 =
        512, SDXL 128 × 8 = 1024), else the family's usual size."""
        size, levels = denoiser_config.get("sample_size"), vae_config.get("block_out_channels")
        if isinstance(size, int) and size > 0 and isinstance(levels, list) and levels:
            return size * 2 ** (len(levels) - 1)
        return self.default_resolution

    # ------------------------------------------------------------------ members of the family

    def variant(self, denoiser_config) -> str:
        """Which member of the family a base is, where members train or sample differently (FLUX.1's
        dev and schnell); "" where they do not."""
        return ""

    def run_defaults(self, variant: str = "") -> dict:
        """The values of the family-dependent settings a run takes unless the user sets them (config
        keys → values): the guidance and sampler steps of class images and sample grids."""
        return {"prior.guidance_scale": 7.5, "sample.guidance_scale": 7.5, "prior.sample_steps": 25,
                "sample.steps": 25}

    def token_length(self, part: str, tokenizer, variant: str = "") -> int:
        """Tokens per prompt of the `part` encoder, the same in training and sampling: the tokenizer's
        own length, at most CLIP's 77 (a tokenizer that states no limit says a huge number)."""
        return min(int(tokenizer.model_max_length), CLIP_TOKENS)

    # ------------------------------------------------------------------ loading and sampling

    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipelines[0])

    def load_single_file(self, pipeline_class, path, kwargs: dict, dtypes: dict | None = None):
        """The pipeline from a single-file checkpoint (kwargs: config=the repo or folder whose configs
        describe it, and load_kwargs; `dtypes`: per component, as from_pretrained takes them)."""
        return pipeline_class.from_single_file(str(path), **kwargs)

    def load_kwargs(self) -> dict:
        """What from_pretrained / from_single_file get besides the weights."""
        return dict(safety_checker=None, requires_safety_checker=False) if self.has_safety_checker else {}

    def pipeline(self, base, unet, scheduler):
        """A text-to-image pipeline around the training modules themselves: no copy, no reload."""
        parts = {"vae": base.vae, self.denoiser: unet, "scheduler": scheduler}
        for part in self.text_parts:
            parts[part], parts[TOKENIZERS[part]] = getattr(base, part), getattr(base, TOKENIZERS[part])
        if self.has_safety_checker:
            parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        return self.pipeline_class()(**parts)

    def training_scheduler(self, config: dict):
        """The scheduler training adds noise with, from the pipeline's scheduler config: DDPM with
        the model's betas (and prediction type)."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(config)

    def sampler(self, noise_scheduler):
        """The scheduler samples and class images are drawn with: DPM-Solver++ on the model's betas."""
        from diffusers import DPMSolverMultistepScheduler

        return DPMSolverMultistepScheduler.from_config(noise_scheduler.config, algorithm_type="dpmsolver++")

    def pipeline_kwargs(self, base) -> dict:
        """What every call of this family's pipeline gets besides prompts and sizes."""
        return {}

    def pipeline_conditioning(self, conditioning: Conditioning) -> dict:
        """Encoded prompts as the pipeline's keyword arguments, in place of the prompts."""
        return {"prompt_embeds": conditioning.hidden}

    def negative_conditioning(self, encoded, rows: int, device, dtype) -> dict:
        """Sample grids drawn from cached prompts (`encoded`: a PromptCache holding ""): what the
        pipeline's unconditional branch gets, where it would otherwise run the text encoder itself."""
        return {}

    def negative_kwargs(self, base, negative: str) -> dict:
        """`generate negative=`: the pipeline's keyword arguments for a negative prompt ("" for none)."""
        return {"negative_prompt": negative or None}

    def pipeline_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Starting noise (B, C, h, w) in the layout the pipeline's `latents=` takes."""
        return latents

    def latents_from_pipeline(self, latents: torch.Tensor, size: int, vae_scale_factor: int) -> torch.Tensor:
        """The pipeline's output_type="latent" result back as (B, C, h, w)."""
        return latents

    def size_multiple(self, base) -> int:
        """Image sides must be multiples of this: the VAE's downsampling times the UNet's."""
        return base.vae_scale_factor * 2 ** (len(base.unet.config.block_out_channels) - 1)

    def native_size(self, base) -> int:
        """The image side the model was trained at, from its configs."""
        return base.unet.config.sample_size * base.vae_scale_factor

    def vae_downsampling(self, vae_config) -> int:
        """Pixels per latent along a side, from the VAE's config: 2 per level below the top (8 for
        SD's four levels; diffusers' tiny test VAEs have fewer)."""
        levels = vae_config.get("block_out_channels") if hasattr(vae_config, "get") else vae_config.block_out_channels
        return 2 ** (len(levels) - 1)

    def latent_codec(self, vae) -> LatentCodec:
        """How this family's VAE encodes pixels and normalises its latents (families/latents.py)."""
        return LatentCodec(vae.config)

    def context_width(self, denoiser_config) -> int:
        """The width of the text states the denoiser attends to (the UNet's cross-attention, a
        transformer's joint attention), for the planner's stand-in conditioning."""
        get = denoiser_config.get if hasattr(denoiser_config, "get") else lambda k: getattr(denoiser_config, k, None)
        return get("cross_attention_dim") or get("joint_attention_dim")

    def trainable_text_parts(self) -> tuple[str, ...]:
        return self.text_parts if self.adapter_text_parts is None else self.adapter_text_parts

    def refuses_config(self, cfg) -> tuple[str, str, str] | None:
        """(key, problem, fix) for a setting this family cannot train with, or None."""
        return None

    # ------------------------------------------------------------------ the objective

    def sample_noise(self, scheduler, latents: torch.Tensor, generators: list, cfg) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's noise and time, from its own generator (families/noise.py)."""
        return noising.sample_noise(latents, scheduler.config.num_train_timesteps, generators, cfg)

    def noisy_and_target(self, scheduler, latents: torch.Tensor, noise: torch.Tensor, time: torch.Tensor):
        """The noisy latents the denoiser sees at `time` and what it must predict there: DDPM's
        √ᾱ·x₀ + √(1 − ᾱ)·ε, and ε or v."""
        return scheduler.add_noise(latents, noise, time), noising.denoising_target(scheduler, latents, noise, time)

    def planned_time(self, scheduler, rows: int) -> torch.Tensor:
        """Stand-in times of the right kind, for the planner's trace."""
        return torch.randint(0, scheduler.config.num_train_timesteps, (rows,))

    def token_lengths(self) -> tuple[int, ...]:
        """Tokens per prompt of each text encoder, for the planner (CLIP: 77)."""
        return (77,) * len(self.text_parts)

    def timestep_index(self, scheduler, time: torch.Tensor) -> torch.Tensor:
        """`time` as a timestep in 0…T−1, for the schedules that are written in timesteps (huber_c)."""
        return time

    def predict(self, base, model, noisy: torch.Tensor, time: torch.Tensor, conditioning: Conditioning,
                sizes: torch.Tensor, guidance: float) -> torch.Tensor:
        """The denoiser's prediction for `noisy`, in the latents' own layout. `model` is the
        training module (DDP-wrapped under several processes), `base.unet` its plain self."""
        return model(noisy.to(base.compute_dtype), time, conditioning.hidden,
                     added_cond_kwargs=self.added_conditioning(conditioning, sizes)).sample

    # ------------------------------------------------------------------ conditioning

    def tokenize(self, part: str, tokenizer, prompts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompts → the `part` encoder's token ids (B, length) and, where the family's encoder reads
        an attention mask, that mask (B, length); CLIP and T5 read none: each prompt padded or cut
        to `length`, as the pipelines tokenize."""
        ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
        return ids, None

    def encode(self, encoders: list, ids: list[torch.Tensor], masks: list | None = None) -> Conditioning:
        """Prompts' token ids (and masks, from `tokenize`) → what the denoiser is conditioned on, as
        the pipeline computes it: SD 1.x/2.x take the last hidden states of their one encoder."""
        return Conditioning(encoders[0](ids[0])[0])

    def added_conditioning(self, conditioning: Conditioning, sizes: torch.Tensor) -> dict | None:
        """The denoiser's inputs besides the noisy latents, the timestep and the hidden states."""
        return None

    def planned_tokens(self, rows: int) -> tuple[list[torch.Tensor], list]:
        """Stand-in token ids (and masks) of each encoder's planned length, for the planner's trace."""
        return [torch.zeros(rows, length, dtype=torch.long) for length in self.token_lengths()], \
            [None] * len(self.text_parts)

    def planned_conditioning(self, rows: int, encoders: dict, hidden_width: int, dtype: torch.dtype) -> Conditioning:
        """Stand-in conditioning of the right shapes, for the planner when prompts are cached."""
        return Conditioning(torch.randn(rows, 77, hidden_width, dtype=dtype))

    # ------------------------------------------------------------------ other tools' names

    def own_layout(self, tensors: dict) -> dict | None:
        """An adapter file in a layout of this family's own (neither diffusers' nor kohya's `lora_unet_`
        names), as diffusers-spelled tensors; None when the file is not in it."""
        return None

    def kohya_tensors(self, modules: dict) -> dict[str, torch.Tensor] | None:
        """The kohya file's tensors when this family's names are not module by module (FLUX.1's
        fused q/k/v), else None: formats.kohya_name names each module."""
        return None

    def adapter_paths_fit(self, paths) -> bool:
        """Whether an adapter's denoiser module paths could be this family's (families that name their
        denoiser alike tell by them); True where nothing rules it out."""
        return True

    def single_file_locator(self, header: dict, adapters: list):
        """For `merge` into this family's single file: a function (part, module path) → (the file's
        key, its rows or None, halves swapped) or None where the file lacks it; None to leave the
        file to adapters/merging.py (SD's and FLUX.1's layouts)."""
        return None

    def read_kohya(self, tensors, metadata: dict) -> tuple[dict, dict] | None:
        """A kohya file in this family's own layout → (diffusers tensors, alphas per module), or None
        when the file is not one (SD's and FLUX.1's are read by adapters/kohya_layout.py)."""
        return None

    def loaders_note(self, adapter_kind: str) -> str | None:
        """Which tools load this family's files of `adapter_kind` at the trained weights, where that
        differs from formats.LOADERS (SD's), or None."""
        return None

    def kohya_prefix(self, part: str) -> str:
        return "lora_unet_" if part == self.denoiser else dict(self.kohya_text_prefixes)[part]  # kohya: any denoiser

    def base_model_version(self, v_prediction: bool) -> str:
        """kohya's ss_base_model_version, by which A1111 and Forge file a LoRA under its family."""
        return "sd_v1" + ("_v" if v_prediction else "")

    def modelspec_architecture(self, v_prediction: bool, variant: str = "") -> str:
        """ModelSpec's architecture id (sd-scripts' sai_model_spec); every adapter kind is "/lora"."""
        return "stable-diffusion-v1/lora"

    # ------------------------------------------------------------------ words

    def text_encoders_phrase(self) -> str:
        return "the text encoder" if len(self.text_parts) == 1 else "both text encoders"

    def precision_note(self, mixed_precision: str) -> str:
        """A start-summary remark on how this family runs in `mixed_precision`, or ""."""
        return ""
