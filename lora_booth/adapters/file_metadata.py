"""What an adapter file says about itself: lora-booth's own keys, kohya's `ss_*` training metadata
and ModelSpec's `modelspec.*` keys (rebuilt by one rule wherever a kohya file is written), and the
weight hashes A1111 shows."""
from __future__ import annotations

import datetime
import hashlib
import io
import json
import math
import re
import time
from pathlib import Path

import torch

from .. import families
from ..data import files as data_files
from ..data.trigger import candidates
from ..io.errors import LoraBoothError
from ..io.version import __version__
from ..model.pivotal import rewrite
from .neutral import Adapter, Module, adapter_kind


def weight_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    from safetensors.torch import save

    # only the training (ss_*) metadata enters the hash, so user edits of other fields keep it stable
    data = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_length = int.from_bytes(data[:8], "little")
    body = data[8 + header_length:]
    legacy = io.BytesIO(data)
    legacy.seek(0x100000)
    return {"sshs_model_hash": hashlib.sha256(body).hexdigest(),
            "sshs_legacy_hash": hashlib.sha256(legacy.read(0x10000)).hexdigest()[:8]}


# The diffusers file's metadata key that says each module's alpha/rank was multiplied into its first
# factor (fold_scale), with the trained alphas per part, so lora-booth reads the trained adapter back.
FOLDED_KEY = "lora_booth.alpha_folded"
FOLDED_NOTE = ("each module's alpha/rank is multiplied into lora_B (LoHa: hada_w1_a; LoKr: lokr_w1 or lokr_w1_a) "
               "and lora_alpha = r, so diffusers (lora_adapter_metadata) and loaders that take the strength from "
               ".alpha tensors or else 1 (ComfyUI, Forge) apply the trained update; 'trained' holds the alphas trained")


# keys no rewritten file may carry over: peft's own header (rewritten), and hashes of the old file's bytes
STALE_KEYS = ("format", "lora_adapter_metadata", "modelspec.hash_sha256", FOLDED_KEY)


def carried_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """The metadata a rewritten adapter keeps from its source: everything but peft's header and
    the hashes of the source file's bytes."""
    return {k: v for k, v in metadata.items() if k not in STALE_KEYS and not k.startswith("sshs_")}


def _pivotal_prompt(cfg) -> str:
    """The instance prompt as the adapter must be prompted: with pivotal tuning, the new tokens."""
    return rewrite(cfg.data.instance_prompt, cfg.pivotal)


def run_metadata(cfg, base, step: int, counts: tuple[int, int] | None = None, started: float | None = None,
                 finished: float | None = None) -> dict[str, str]:
    """What a user (or `merge`, or a later `convert to=kohya`) needs to know about the adapter
    without its config file: every kohya ss_* key and ModelSpec key is rebuilt from these."""
    metadata = {
        "lora_booth.version": __version__,
        "lora_booth.name": output_name(cfg),
        "lora_booth.base_model": cfg.model.source,
        "lora_booth.family": base.family,
        **({"lora_booth.variant": base.variant} if getattr(base, "variant", "") else {}),  # FLUX.1: dev or schnell
        "lora_booth.prediction_type": base.prediction_type,
        "lora_booth.trigger_prompt": _pivotal_prompt(cfg),
        "lora_booth.trigger_phrase": trigger_phrase(cfg),
        "lora_booth.class_prompt": cfg.prior.class_prompt,
        "lora_booth.type": cfg.lora.type,
        "lora_booth.rank": str(cfg.lora.rank),
        "lora_booth.alpha": str(cfg.lora.rank if cfg.lora.alpha is None else cfg.lora.alpha),
        "lora_booth.steps": str(step),
        "lora_booth.resolution": str(cfg.data.resolution),
        "lora_booth.config": json.dumps(cfg.to_dict(), sort_keys=True),
    }
    if counts is not None:
        metadata["lora_booth.instance_images"], metadata["lora_booth.class_images"] = map(str, counts)
        metadata["lora_booth.dataset"] = json.dumps(dataset_summary(cfg, counts[1]), sort_keys=True)
    if started is not None:
        metadata["lora_booth.started"] = str(started)
    if finished is not None:
        metadata["lora_booth.finished"] = str(finished)
    legacy = legacy_model_hash(cfg.model.source)
    if legacy:
        metadata["lora_booth.base_model_hash"] = legacy
    return metadata


def subject_words(cfg) -> list[str]:
    """The words that name the subject: the trigger words and the class prompt's last word
    (["sks", "dog"] of "a photo of sks dog" / "a photo of dog")."""
    words = [w.strip(",.;:()") for w in candidates(cfg)]
    class_word = cfg.prior.class_prompt.split()[-1].strip(",.;:()") if cfg.prior.class_prompt.split() else ""
    return [w for w in [*words, class_word] if w]


def trigger_phrase(cfg) -> str:
    """The words that call up the subject (trigger + class word, "sks dog"), for ModelSpec's
    trigger_phrase, which front-ends may add to a prompt; with pivotal tuning, its new tokens."""
    phrase = " ".join(subject_words(cfg)) or cfg.data.instance_prompt
    if cfg.pivotal.enabled:
        return rewrite(phrase, cfg.pivotal)
    return phrase


def dataset_summary(cfg, class_images: int) -> dict:
    """What kohya records of the photos: per folder its repeats and image count (ss_dataset_dirs,
    keyed by folder name as kohya keys them), how often each comma-separated tag of the captions
    occurs, once per image (ss_tag_frequency; an image without a caption file counts its prompt),
    and the rows of one epoch with repeats (ss_num_train_images). Read off the folder: captions only."""
    try:
        folder = data_files.resolve_dir(cfg.data.instance_dir)
        sources = data_files.image_sources(folder, "data.instance_dir", cfg.data.caption_ext, cfg.data.instance_prompt,
                                     cfg.data.repeats)
        dirs: dict[str, dict[str, int]] = {}
        tags: dict[str, dict[str, int]] = {}
        for path, prompt, repeats in sources:
            entry = dirs.setdefault(path.parent.name, {"n_repeats": repeats, "img_count": 0})
            entry["img_count"] += 1
            caption = data_files.caption_for(path, cfg.data.caption_ext)
            counted = tags.setdefault(path.parent.name, {})
            for tag in (data_files.read_caption(caption) if caption else prompt).split(","):
                if tag.strip():
                    counted[tag.strip()] = counted.get(tag.strip(), 0) + 1
    except (LoraBoothError, OSError):  # the photos moved since training: the summary is a convenience
        return {}
    class_dir = Path(cfg.prior.class_dir).name if cfg.prior.class_dir else "class_images"
    return {"dirs": dirs, "tags": tags, "rows": sum(n for _, _, n in sources),
            "reg_dirs": {class_dir: {"n_repeats": 1, "img_count": class_images}} if class_images else {}}


def legacy_model_hash(source: str) -> str:
    """kohya's ss_sd_model_hash, A1111's old model hash: SHA-256 of the 64 KiB at 1 MiB of a
    single-file checkpoint, 8 hex digits (cheap). Folders and hub ids have none, as in kohya."""
    path = Path(source).expanduser()
    if not path.is_file():
        return ""
    try:
        with open(path, "rb") as handle:
            handle.seek(0x100000)
            return hashlib.sha256(handle.read(0x10000)).hexdigest()[:8]
    except OSError:
        return ""


# kohya's ss_base_model_version and ModelSpec's architecture ids (sd-scripts library/model_util.py,
# sdxl_model_util.py, sai_model_spec.py). Every adapter kind gets "/lora": sd-scripts writes that for
# LyCORIS networks too, and Forge matches "stable-diffusion-xl-v1-base/lora" exactly.
MODELSPEC_VERSION = "1.0.1"


# keys an older lora-booth wrote that kohya never writes: the first two say what ss_base_model_version
# and ss_text_encoder_lr already say, the third was written empty
NOT_KOHYA_KEYS = ("ss_v_parameterization", "ss_network_train_unet_only", "ss_new_sd_model_hash")


def kohya_file_metadata(adapter: Adapter, source: dict[str, str], family: str = "", title: str = "",
                        now: float | None = None) -> dict[str, str]:
    """The whole metadata of a kohya file written from `adapter` (train, convert, resize, combine):
    `source`'s keys carried (not peft's, not the old hashes); the ss_* training keys rebuilt from
    lora-booth's own keys when the source has them (lora_booth.*, the config JSON), else the
    source's ss_* keys kept; the network keys (module, dim, alpha, args) from the adapter itself,
    so a resized or combined adapter states its own rank; base model version and ModelSpec from
    the family. A1111 and Forge sort a LoRA under SD 1/SD 2/SDXL by these keys."""
    metadata = {k: v for k, v in carried_metadata(source).items() if k not in NOT_KOHYA_KEYS}
    family = family or source.get("lora_booth.family") or adapter.family()
    v_prediction = source.get("lora_booth.prediction_type") == "v_prediction" or \
        str(source.get("ss_base_model_version", "")).endswith("_v") or source.get("ss_v_parameterization") == "True"
    config = _config_json(source)
    if config:
        try:
            metadata.update(_training_keys(config, source, family))
        except (TypeError, ValueError, OverflowError, OSError, KeyError, AttributeError):
            config = {}  # the file's config JSON is not what lora-booth writes: keep its own ss_* keys instead
    metadata.pop("ss_network_args", None)
    metadata.update(_network_keys(adapter, config, source))
    kind = families.get(family)
    if kind is None:  # a test-sized model of no known family: no family keys
        return metadata
    metadata["ss_base_model_version"] = kind.base_model_version(v_prediction)
    metadata["ss_v2"] = str(kind.base_model_version(False).startswith("sd_v2"))
    timestamp = _timestamp(source.get("lora_booth.finished") or source.get("ss_training_finished_at"),
                           now if now is not None else time.time())
    resolution = _resolution(config, source) or kind.default_resolution
    spec = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": kind.modelspec_architecture(v_prediction, source.get("lora_booth.variant", "")),
        "modelspec.implementation": kind.modelspec_implementation,
        "modelspec.title": source.get("modelspec.title") or source.get("lora_booth.name")
                           or source.get("ss_output_name") or title or "LoRA",
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": source.get("modelspec.date") or datetime.datetime.fromtimestamp(int(timestamp)).isoformat(),
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
    }
    if source.get("lora_booth.trigger_phrase"):
        spec["modelspec.trigger_phrase"] = source["lora_booth.trigger_phrase"]
    metadata.update(spec)
    return metadata


def _config_json(source: dict[str, str]) -> dict:
    """The lora_booth.config JSON of a file's metadata when it has a config's shape (sections of
    keys), else {}."""
    try:
        config = json.loads(source.get("lora_booth.config") or "{}")
    except (ValueError, RecursionError):  # not JSON, or nested deep enough to exhaust the parser
        return {}
    return config if isinstance(config, dict) and all(isinstance(v, dict) for v in config.values()) else {}


def _number_or(value, default: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return number if math.isfinite(number) else default


LATEST_TIMESTAMP = 4e9  # a file's dates are untrusted: anything past 2096 (or before 1970) is not a date


def _timestamp(value, default: float) -> float:
    number = _number_or(value, default)
    return number if 0 <= number < LATEST_TIMESTAMP else default


def _resolution(config: dict, source: dict[str, str]) -> int | None:
    if isinstance(config.get("data", {}).get("resolution"), int):
        return config["data"]["resolution"]
    found = re.findall(r"\d+", str(source.get("ss_resolution", "")))
    return int(found[0]) if found else None


def _training_keys(config: dict, source: dict[str, str], family: str) -> dict[str, str]:
    """kohya train_network.py's ss_* keys, from a lora-booth run's config and metadata. Keys kohya
    writes only for things lora-booth does not do (a separate VAE, a dataset .toml's ss_datasets,
    aspect-bucket statistics) are left out rather than filled with made-up values."""
    section = lambda name: config.get(name) or {}  # noqa: E731
    lora, data, prior, optim, train = (section(n) for n in ("lora", "data", "prior", "optim", "train"))
    model, objective, launch = section("model"), section("objective"), section("launch")
    dataset = _json_or(source.get("lora_booth.dataset"), {})
    per_step = int(train.get("batch_size", 1)) * int(train.get("grad_accum", 1)) * int(launch.get("processes", 1))
    rows = int(dataset.get("rows") or _number_or(source.get("lora_booth.instance_images"), 0) * data.get("repeats", 1))
    steps = int(_number_or(source.get("lora_booth.steps"), 0))
    lr = optim.get("lr")
    te_lr = optim.get("text_encoder_lr") if optim.get("text_encoder_lr") is not None else lr
    source_name = str(model.get("source", ""))
    keys = {
        "ss_network_dropout": str(lora.get("dropout", 0.0)),
        "ss_sd_model_name": Path(source_name).name if Path(source_name).expanduser().exists() else source_name,
        "ss_resolution": f"({data.get('resolution')}, {data.get('resolution')})",
        "ss_max_train_steps": str(train.get("max_steps")),
        "ss_steps": str(steps),
        "ss_num_train_images": str(rows),
        "ss_num_reg_images": str(source.get("lora_booth.class_images", 0)),
        "ss_prior_loss_weight": str(prior.get("weight")),
        "ss_learning_rate": str(lr),
        "ss_unet_lr": str(lr),
        "ss_text_encoder_lr": str(te_lr if lora.get("text_encoder") else 0.0),
        "ss_lr_scheduler": str(optim.get("schedule")),
        "ss_lr_warmup_steps": str(optim.get("warmup_steps")),
        "ss_optimizer": str(optim.get("optimizer")),
        "ss_max_grad_norm": str(optim.get("max_grad_norm")),
        "ss_mixed_precision": str(train.get("mixed_precision")),
        "ss_gradient_checkpointing": str(bool(train.get("gradient_checkpointing"))),
        "ss_gradient_accumulation_steps": str(train.get("grad_accum")),
        "ss_batch_size_per_device": str(train.get("batch_size")),
        "ss_total_batch_size": str(per_step),
        "ss_min_snr_gamma": str(objective.get("min_snr_gamma")),
        "ss_noise_offset": str(objective.get("noise_offset")),
        "ss_seed": str(train.get("seed")),
        "ss_cache_latents": str(bool(data.get("cache_latents"))),
        "ss_enable_bucket": str(bool(data.get("buckets"))),
        "ss_flip_aug": str(bool(data.get("flip"))),
        "ss_random_crop": str(data.get("crop") == "random"),
        # SD 1.x/2.x condition on the text encoder's last layer (diffusers' SD 2 encoder is OpenCLIP's
        # penultimate already); SDXL's penultimate layer is fixed, and kohya writes None for it
        "ss_clip_skip": (families.get(family) or families.SD1).clip_skip,
        "ss_output_name": source.get("lora_booth.name") or str(source.get("ss_output_name", "")),
        "ss_training_comment": f"trigger: {source.get('lora_booth.trigger_prompt', data.get('instance_prompt', ''))}"
                               + (f"; class: {prior.get('class_prompt')}" if float(prior.get("weight") or 0) > 0 else ""),
    }
    if rows:
        batches = math.ceil(rows / max(1, int(train.get("batch_size", 1)) * int(launch.get("processes", 1))))
        keys["ss_num_batches_per_epoch"] = str(batches)
        keys["ss_num_epochs"] = str(math.ceil(int(train.get("max_steps") or 0) * per_step / rows))
        keys["ss_epoch"] = str(math.ceil(steps * per_step / rows))
    if dataset.get("dirs"):
        keys["ss_dataset_dirs"] = json.dumps(dataset["dirs"])
        keys["ss_reg_dataset_dirs"] = json.dumps(dataset.get("reg_dirs", {}))
        keys["ss_tag_frequency"] = json.dumps(dataset.get("tags", {}))
    for ours, theirs in (("lora_booth.started", "ss_training_started_at"),
                         ("lora_booth.finished", "ss_training_finished_at")):
        if source.get(ours):
            keys[theirs] = source[ours]
    if source.get("lora_booth.started"):  # kohya: one random id per training launch; here, per run start
        name = f"{source.get('lora_booth.name')}|{source['lora_booth.started']}"
        keys["ss_session_id"] = str(int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))
    if source.get("lora_booth.base_model_hash"):
        keys["ss_sd_model_hash"] = source["lora_booth.base_model_hash"]
    return keys


def _json_or(text, default):
    try:
        value = json.loads(text) if text else default
    except (ValueError, RecursionError):
        return default
    return value if isinstance(value, type(default)) else default


def _network_keys(adapter: Adapter, config: dict, source: dict[str, str]) -> dict[str, str]:
    """ss_network_module/dim/alpha/args of `adapter`: networks.lora for LoRA (conv_dim/conv_alpha
    when it adapts 3×3 convolutions, kohya's LoCon), LyCORIS's module and algo otherwise, as
    LyCORIS's kohya plugin records them; other arguments of the source's own network (same module
    and algo) stay. dim/alpha: the denoiser's (UNet's, transformer's) most common rank and alpha."""
    from collections import Counter

    kind = adapter_kind(adapter.modules.values())
    lora = config.get("lora") or {}
    if kind in ("loha", "lokr") and lora.get("rank"):  # the rank trained; a LoKr factor's size says little
        rank, alpha = int(lora["rank"]), float(lora.get("alpha") or lora["rank"])
    else:
        pairs = [(int(m.rank), float(m.alpha)) for (part, _), m in adapter.modules.items()
                 if part in families.denoisers()] or \
                [(int(m.rank), float(m.alpha)) for m in adapter.modules.values()]
        rank, alpha = Counter(pairs).most_common(1)[0][0] if pairs else (0, 0.0)
    spatial = [m for m in adapter.modules.values()
               if isinstance(m, Module) and m.down.ndim == 4 and tuple(m.down.shape[2:]) != (1, 1)]
    conv = {"conv_dim": str(spatial[0].rank), "conv_alpha": str(float(spatial[0].alpha))} if spatial else {}
    module = "networks.lora" if kind == "lora" else "lycoris.kohya"
    if kind == "lora":
        args = conv
    elif kind == "dora":
        axis = next(m.magnitude_axis for m in adapter.modules.values())
        args = {"algo": "lora", "dora_wd": "True", "wd_on_output": str(axis == "out"), **conv}
    else:
        args = {"algo": kind, **conv}
    before = _json_or(source.get("ss_network_args"), {})
    if source.get("ss_network_module") == module and before.get("algo") == args.get("algo"):
        args = {**before, **args}
    keys = {"ss_network_module": module, "ss_network_dim": str(rank), "ss_network_alpha": str(alpha)}
    return {**keys, "ss_network_args": json.dumps(args)} if args else keys


def output_name(cfg) -> str:
    """The kohya file's name, which A1111 shows as <lora:NAME:1>: save.name, else the subject the
    prompts name (trigger + class word: "sks_dog"), else the output folder's name."""
    subject = "_".join(subject_words(cfg))
    return file_stem(cfg.save.name or subject or Path(cfg.save.output_dir).expanduser().resolve().name or "lora")


def file_stem(name: str) -> str:
    """A name safe as a file name and as A1111's <lora:NAME:1>."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "lora"
