"""Load a base model (diffusers folder, hub id, single-file checkpoint, or the built-in tiny one),
detect its family before any weights are read, and hand back the frozen parts."""
from __future__ import annotations

import functools
import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import families
from ..config.sections import ModelConfig
from ..families.tiny import TINY_NAMES, tiny_model_dir
from ..io.errors import ModelError
from ..toyworld import toy_base_dir
from . import offload, text

# Family names, as metadata and checkpoints store them; what each family is: lora_booth/families
SD1, SD2, SDXL = families.SD1.name, families.SD2.name, families.SDXL.name
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


@dataclass
class Base:
    """The frozen base model. The UNet later carries the adapters; nothing else is trained
    unless lora.text_encoder is on."""
    family: str
    source: str
    vae: Any
    text_encoder: Any
    tokenizer: Any
    unet: Any              # the denoiser: the UNet, or FLUX.1's transformer (Base.transformer names it so)
    noise_scheduler: Any   # what training adds noise with: DDPM with the model's betas, or FLUX.1's flow schedule
    text_encoder_2: Any = None  # SDXL's second encoder (OpenCLIP bigG, with projection); None otherwise
    tokenizer_2: Any = None
    # what the UNet and text encoders compute in, and so what their inputs are cast to; their
    # `.dtype` is not it once train.fp8_base stores the UNet's weights in fp8 (precision.py)
    compute_dtype: torch.dtype = torch.float32
    # classifier-free guidance's unconditional input is zeros, not the encoded empty prompt (SDXL's
    # `force_zeros_for_empty_prompt`); caption dropout must train on the same (text.unconditional)
    unconditional_zeros: bool = False

    @property
    def kind(self) -> families.Family:
        """What this base's family is (its encoders, conditioning, names): lora_booth/families."""
        return families.family(self.family)

    @property
    def variant(self) -> str:
        """The member of its family (FLUX.1: dev or schnell), from the denoiser's config."""
        return self.kind.variant(self.unet.config)

    @property
    def transformer(self) -> Any:
        """The denoiser of a family that calls it the transformer (its diffusers LoRA keys say
        `transformer.`); None for UNet families."""
        return self.unet if self.kind.denoiser == "transformer" else None

    @property
    def text_encoders(self) -> "text.TextEncoders":
        """(tokenizer, encoder) by part name, as many as the family has."""
        return text.TextEncoders({part: (getattr(self, families.base.TOKENIZERS[part]), getattr(self, part))
                                  for part in self.kind.text_parts}, self.kind)

    def to(self, device: torch.device) -> "Base":
        """Every part onto `device` (the text encoders that are still loaded)."""
        for module in (self.unet, self.vae, *(encoder for _, encoder in self.text_encoders.values())):
            if module is not None:
                offload.to_device(module, device)  # blocks offloaded to host RAM stay there
        return self

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.get("prediction_type", "flow")  # FLUX.1's scheduler has none: the flow

    @property
    def vae_scale_factor(self) -> int:
        return self.kind.vae_downsampling(self.vae.config)


@dataclass
class ModelInfo:
    """What is known about a base model before its weights are loaded."""
    kind: str          # "folder" | "single_file"
    path: Path         # the diffusers folder or the checkpoint file
    family: str
    source: str        # as the user wrote it


def locate(cfg: ModelConfig) -> ModelInfo:
    """Find the model on disk (downloading configs and weights of a hub id when online) and
    detect its family. Fails with a clear error for anything lora-booth cannot train."""
    source = cfg.source.strip()
    if source in TINY_NAMES:
        folder = tiny_model_dir(source)
        return ModelInfo("folder", folder, detect_folder_family(folder), source)
    if source == "toyworld":  # the pretrained toy-world pipeline shipped in the package
        folder = toy_base_dir()
        if not (folder / "model_index.json").is_file():
            raise ModelError(f"model=toyworld: {folder} holds no pipeline. Rebuild it with "
                             "tools/pretrain_toyworld.py, or reinstall lora-booth.")
        return ModelInfo("folder", folder, detect_folder_family(folder), source)
    path = Path(source).expanduser()
    if path.is_dir():
        return ModelInfo("folder", path, detect_folder_family(path), source)
    if path.is_file():
        return ModelInfo("single_file", path, detect_single_file_family(path, cfg.allow_pickle,
                                                                         _single_file_vae(cfg)), source)
    if path.suffix in (".safetensors", *PICKLE_SUFFIXES) or source.startswith((".", "/", "~")):
        raise ModelError(f"model '{source}': no such file or folder. Check the path.")
    folder = hub_snapshot(source, cfg)
    return ModelInfo("folder", folder, detect_folder_family(folder), source)


HUB_PROBE_SECONDS = 3.0


@functools.cache
def hub_unreachable() -> bool:
    """Whether the model hub cannot be reached: HF_HUB_OFFLINE is set, or a TCP connection to its
    host fails within a few seconds. Then loads go to the local cache at once, instead of
    through the hub client's retries (about a minute offline). Behind a proxy no probe is made."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=HUB_PROBE_SECONDS):
            return False
    except OSError:
        return True


def hub_snapshot(repo_id: str, cfg: ModelConfig) -> Path:
    """The local snapshot of a hub repo: downloaded when the hub is reachable, else from the cache."""
    from huggingface_hub import snapshot_download

    ignore = ["*.ckpt", "*.msgpack", "*.onnx", "*.pb", "*.h5", "*.ot", "safety_checker/*", "*.md"]
    if not cfg.allow_pickle:
        ignore += ["*.bin", "*.pt", "*.pth"]
    if not cfg.variant:  # a default load needs the plain files only, not fp16/ema/non_ema copies
        ignore += ["*.fp16.*", "*.ema.*", "*.non_ema.*", "*.bf16.*"]
    # single-file checkpoints at the repo root (several GB each) are not part of the diffusers layout
    allow = ["model_index.json", "scheduler/*", *(f"{denoiser}/*" for denoiser in families.denoisers()), "vae/*",
             *(f"{part}/*" for part in families.text_parts()), *(f"{families.base.TOKENIZERS[part]}/*"
                                                                 for part in families.text_parts())]
    kwargs = dict(repo_id=repo_id, revision=cfg.revision or None, allow_patterns=allow, ignore_patterns=ignore)
    try:
        if hub_unreachable():
            raise ConnectionError(f"the hub ({os.environ.get('HF_ENDPOINT', 'huggingface.co')}) cannot be reached")
        return Path(snapshot_download(**kwargs))
    except Exception as online_error:  # offline, unreachable, or gated: try the cache alone
        try:
            return Path(snapshot_download(**kwargs, local_files_only=True))
        except Exception:
            raise ModelError(
                f"model '{repo_id}': not a local file or folder, and not in the local hub cache "
                f"({type(online_error).__name__}: {str(online_error).splitlines()[0][:200]}). "
                "Download it once with network access (`hf download "
                f"{repo_id}`), or pass the path of a diffusers folder or .safetensors file.") from None


def _read_json(path: Path) -> dict:
    try:
        if not path.is_file():  # a pipe in a model folder would block the read forever
            raise ValueError("not a regular file")
        if path.stat().st_size > 4 * 2**20:  # a model's config is a few KB; never read a huge file whole
            raise ValueError(f"{path.stat().st_size:,} bytes is not a config")
        value = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise ModelError(f"{path}: nests deeper than any model config. Is the model folder complete?") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot read it as JSON ({str(exc)[:200]}). Is the model folder complete?") from None
    if not isinstance(value, dict):
        raise ModelError(f"{path}: holds a JSON {type(value).__name__}, not the mapping of a diffusers config. "
                         "Is the model folder complete?")
    return value


def detect_folder_family(folder: Path) -> str:
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise ModelError(f"{folder}: no model_index.json, so this is not a diffusers pipeline folder. "
                         "Pass a diffusers folder, a hub id or a single .safetensors checkpoint.")
    index = _read_json(index_path)
    pipeline_class = index.get("_class_name", "")
    family = families.for_folder(index, {})  # by the pipeline class; the denoiser's config can refuse it below
    if family is None:
        raise ModelError(f"{folder}: {pipeline_class or 'an unknown pipeline'} is not a {families.TRAINED} model; "
                         "lora-booth trains those only.")
    denoiser = _read_json(folder / family.denoiser / "config.json")
    family = families.for_folder(index, denoiser)
    vae = _read_json(folder / "vae" / "config.json") if (folder / "vae" / "config.json").is_file() else {}
    reason = family.refuses_folder(index, denoiser, vae)
    if reason:
        raise ModelError(f"{folder}: {reason}.")
    return family.name


def checkpoint_activations(text_encoder) -> None:
    """Gradient checkpointing of a transformers text encoder. transformers 5.23 renamed
    gradient_checkpointing_enable to activation_checkpointing_enable and warns (FutureWarning) on
    every call of the old name: the new one where it exists."""
    enable = getattr(text_encoder, "activation_checkpointing_enable", None) or text_encoder.gradient_checkpointing_enable
    enable()


def native_resolution(info: ModelInfo) -> int:
    """The base model's own training size, from its configs (no weights read); a single-file
    checkpoint says none, so its family's usual size."""
    family = families.family(info.family)
    if info.kind != "folder":
        return family.default_resolution
    vae = info.path / "vae" / "config.json"
    return family.native_resolution(_read_json(info.path / family.denoiser / "config.json"),
                                    _read_json(vae) if vae.is_file() else {})




def _single_file_vae(cfg: ModelConfig) -> dict:
    """The VAE config of model.single_file_config when it is a local folder, else {} (the family's own)."""
    folder = Path(cfg.single_file_config).expanduser() if cfg.single_file_config.strip() else None
    return _read_json(folder / "vae" / "config.json") if folder and (folder / "vae" / "config.json").is_file() else {}


def configs(info: ModelInfo, cfg: ModelConfig) -> tuple[dict, dict]:
    """The denoiser's and the VAE's configs before any weights load: a folder's own, a single file's
    from model.single_file_config when that is a folder; ({}, {}) where none is on disk."""
    folder = info.path if info.kind == "folder" else \
        Path(cfg.single_file_config).expanduser() if cfg.single_file_config.strip() else None
    denoiser = families.family(info.family).denoiser
    if folder is None or not folder.is_dir():
        return {}, {}
    return tuple(_read_json(folder / part / "config.json") if (folder / part / "config.json").is_file() else {}
                 for part in (denoiser, "vae"))


def detect_single_file_family(path: Path, allow_pickle: bool, vae_config: dict | None = None) -> str:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ModelError(f"{path}: a pickle checkpoint can run arbitrary code when loaded. Convert it to "
                             ".safetensors, or pass model.allow_pickle=true if you trust its source.")
        return SD1 if "v2" not in path.name.lower() else SD2
    if path.suffix.lower() != ".safetensors":
        raise ModelError(f"{path}: unknown checkpoint type; expected a .safetensors file or a diffusers folder.")
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as checkpoint:
            keys = set(checkpoint.keys())
            conv_in = "model.diffusion_model.input_blocks.0.0.weight"
            in_channels = checkpoint.get_slice(conv_in).get_shape()[1] if conv_in in keys else None
            family = families.for_single_file(keys)
            if family is not None and family.denoiser == "transformer":  # FLUX.1's transformer alone
                reason = families.base.scaled_fp8_refusal(keys) or family.refuses_single_file(keys) or \
                    family.refuses_transformer_file(checkpoint, vae_config)
                if reason:
                    raise ModelError(f"{path}: {reason}.")
                return family.name
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"{path}: not a readable safetensors file ({exc}).") from None
    if in_channels is None:
        raise ModelError(f"{path}: no Stable Diffusion UNet inside (no {conv_in}). Is this a LoRA or a VAE file?")
    family = families.for_single_file(keys) or families.SD1
    reason = families.base.scaled_fp8_refusal(keys) or family.refuses_inputs(in_channels, vae_config or {}) or \
        family.refuses_single_file(keys)
    if reason:
        raise ModelError(f"{path}: {reason}.")
    return family.name


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError("train.device=cuda, but PyTorch sees no CUDA GPU. Use train.device=auto or cpu.")
    return torch.device(name)


def quiet_libraries() -> None:
    """diffusers/transformers/bitsandbytes talk about optional backends (torchvision, GPU kernels)
    that training does not use; their warnings would only alarm users."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def pipeline_class(family: str):
    return families.family(family).pipeline_class()


def load_pipeline(info: ModelInfo, cfg: ModelConfig, dtype: torch.dtype = torch.float32):
    """The base model as a text-to-image pipeline of its family (no safety checker), weights from
    safetensors unless the user allowed pickle. The denoiser and text encoders load in `dtype`
    (the same numbers as loading fp32 and casting, without the fp32 copy: FLUX.1-dev's would be
    67 GB of RAM), the VAE in fp32."""
    quiet_libraries()
    cls = pipeline_class(info.family)
    common = families.family(info.family).load_kwargs()
    if dtype != torch.float32:
        common["dtype"] = {"default": dtype, "vae": torch.float32}
    if info.kind == "folder":
        try:
            return cls.from_pretrained(
                info.path, variant=cfg.variant or None, use_safetensors=None if cfg.allow_pickle else True,
                local_files_only=True, **common)
        except (OSError, EnvironmentError, ValueError) as exc:
            hint = (" If the folder has only .bin weights, convert them to safetensors or pass "
                    "model.allow_pickle=true if you trust them.") if "safetensors" in str(exc) else ""
            raise ModelError(f"{info.path}: cannot load the pipeline: {str(exc).splitlines()[0]}.{hint}") from None
    config = cfg.single_file_config or families.family(info.family).single_file_repo
    dtypes = common.pop("dtype", None)  # from_single_file takes no dict: SD single files load in fp32, then cast
    kwargs: dict[str, Any] = dict(config=config, **common)
    if cfg.prediction_type != "auto":
        kwargs["prediction_type"] = cfg.prediction_type
    try:
        return families.family(info.family).load_single_file(cls, info.path, kwargs, dtypes)
    except Exception as exc:
        raise ModelError(
            f"{info.path}: cannot load this single-file checkpoint with the configs of '{config}' "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]}). Offline, those configs must be in the hub "
            "cache, or pass model.single_file_config=<a diffusers folder of the same architecture>.") from None


def load_frozen(cfg: ModelConfig, info: ModelInfo | None = None, dtype: torch.dtype = torch.float32) -> Base:
    """Base model with every weight frozen. `dtype` is the precision of the UNet and text encoders;
    the VAE stays fp32 (it runs once per image when latents are cached, and fp16 VAEs overflow:
    SDXL's produces NaNs)."""
    info = info or locate(cfg)
    pipe = load_pipeline(info, cfg, dtype=dtype)
    scheduler_config = dict(pipe.scheduler.config)
    if cfg.prediction_type != "auto":
        scheduler_config["prediction_type"] = cfg.prediction_type
    kind = families.family(info.family)
    noise_scheduler = kind.training_scheduler(scheduler_config)
    encoder_2 = getattr(pipe, "text_encoder_2", None)
    denoiser = getattr(pipe, kind.denoiser)
    for module in (pipe.vae, pipe.text_encoder, encoder_2, denoiser):
        if module is not None:
            module.requires_grad_(False)
            module.eval()
            if module is not pipe.vae:
                module.to(dtype=dtype)
    return Base(family=info.family, source=info.source, vae=pipe.vae, text_encoder=pipe.text_encoder,
                tokenizer=pipe.tokenizer, unet=denoiser, noise_scheduler=noise_scheduler,
                text_encoder_2=encoder_2, tokenizer_2=getattr(pipe, "tokenizer_2", None), compute_dtype=dtype,
                unconditional_zeros=bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False)))


def fingerprint(info: ModelInfo) -> str:
    """A cheap identity of the weights (names, sizes, and a hash of each file's head and tail),
    used to key caches of things the base model made. Not a full hash: models are gigabytes."""
    import hashlib

    digest = hashlib.sha256()
    files = [info.path] if info.kind == "single_file" else sorted(
        p for p in info.path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json", ".bin", ".txt"))
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.relative_to(info.path.parent if info.kind == 'single_file' else info.path)}:{size}".encode())
        with open(path, "rb") as handle:
            digest.update(handle.read(1 << 16))
            if size > 1 << 17:
                handle.seek(-(1 << 16), os.SEEK_END)
                digest.update(handle.read())
    return digest.hexdigest()
