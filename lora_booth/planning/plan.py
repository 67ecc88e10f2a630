"""`lora-booth plan`: peak accelerator memory and FLOPs of one training step, before any weights
are downloaded. The model is built from its configs on the `meta` device, its tensors are swapped
for fake ones (shapes and dtypes, no memory), and one real step of the training code's own
pieces — UNet + adapters forward, the DreamBooth loss, backward, optimizer step — runs under a
dispatch mode that counts the bytes of every live tensor storage. No formula to drift from the
code: change the code and the plan follows."""
from __future__ import annotations

import dataclasses
import json
from contextlib import nullcontext
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .. import families
from ..config.sections import Config, ModelConfig
from ..families.tiny import TINY_NAMES
from ..io.errors import ConfigError
from ..model import loading as models, lora, objective, offload, pivotal, precision, text
from ..model.fp8 import store_in_fp8
from . import sharding, stand_ins
from ..model.loading import detect_folder_family, quiet_libraries
from ..model.lora import adapters_disabled

GiB = 2**30
# The CUDA context (driver, cuBLAS/cuDNN handles and workspaces) takes 0.3–0.6 GiB before the
# first tensor, depending on GPU and driver; PyTorch's caching allocator adds fragmentation on
# top of the live bytes, typically well under 10 % for a fixed-shape training loop.
CONTEXT_BYTES = int(0.5 * GiB)
FRAGMENTATION = 0.10
# Dense FP16/BF16 tensor-core peaks with FP32 accumulation, from NVIDIA's spec sheets and
# architecture whitepapers (GA102/GA106, AD102, A100, H100 SXM). Real training reaches a fraction.
GPUS = [("RTX 3060 12 GB", 12, 25.6e12), ("RTX 3090 24 GB", 24, 71e12), ("RTX 4090 24 GB", 24, 165.2e12),
        ("A100 80 GB", 80, 312e12), ("H100 SXM 80 GB", 80, 989e12)]
UTILIZATION = 0.35  # assumed fraction of peak a diffusion UNet training step achieves
# the configs shipped in lora_booth/configs: each family's, and other members' (flux2-klein-9b)
BUILTIN = tuple(dict.fromkeys([*(f.plan_configs for f in families.FAMILIES.values()),
                               *sorted(p.name for p in (resources.files("lora_booth") / "configs").iterdir() if p.is_dir())]))


@dataclass
class Plan:
    model: str
    resolution: int
    rows: int
    parts: dict[str, int] = field(default_factory=dict)   # name → bytes at the peak
    tracked_peak: int = 0
    flops: float | None = 0.0   # None: not counted (estimate(flops=False), which traces twice as fast)
    adapter: str = "lora rank 16"   # kind and rank: what the adapter and optimizer-state lines price
    host: dict[str, int] = field(default_factory=dict)   # host RAM at its peak (the load), by part
    offloaded: int = 0          # bytes of frozen blocks that stay in host RAM (train.offload_blocks)

    @property
    def host_peak(self) -> int:
        return sum(self.host.values())

    @property
    def total(self) -> int:
        return int(self.tracked_peak * (1 + FRAGMENTATION)) + CONTEXT_BYTES

    def fits(self, budget: int) -> bool:
        return self.total <= budget

    def text(self, budget: int | None = None) -> str:
        lines = [f"plan for {self.model} at {self.resolution} px, {self.rows} rows per step, {self.adapter} "
                 "(fake-tensor trace)"]
        lines += [f"  {name:<34} {size / GiB:7.2f} GiB" for name, size in self.parts.items() if size]
        lines += [f"  {'tracked peak of the step':<34} {self.tracked_peak / GiB:7.2f} GiB",
                  f"  {'+ allocator fragmentation (10 %)':<34} {self.tracked_peak * FRAGMENTATION / GiB:7.2f} GiB",
                  f"  {'+ CUDA context (0.5 GiB)':<34} {CONTEXT_BYTES / GiB:7.2f} GiB",
                  f"  {'= planned peak':<34} {self.total / GiB:7.2f} GiB"]
        if self.host:
            lines.append("host RAM")
            lines += [f"  {name:<34} {size / GiB:7.2f} GiB" for name, size in self.host.items() if size]
            lines.append(f"  {'= planned host-RAM peak (loading)':<34} {self.host_peak / GiB:7.2f} GiB")
            if self.offloaded:
                lines.append(f"  {'of which stays: offloaded blocks':<34} {self.offloaded / GiB:7.2f} GiB")
        if self.flops is not None:
            lines.append(f"FLOPs per optimizer step: {self.flops / 1e12:.2f} TFLOP; at {UTILIZATION:.0%} of peak:")
            for name, memory, peak in GPUS:
                verdict = "fits" if self.total <= memory * GiB * 0.9 else "does not fit"
                lines.append(f"  {name:<16} {self.flops / (peak * UTILIZATION):7.2f} s/step  ({peak / 1e12:g} TFLOPS, "
                             f"{verdict})")
        if budget is not None:
            lines.append(f"{'fits' if self.fits(budget) else 'does NOT fit'} in {budget / GiB:.1f} GiB")
        return "\n".join(lines)


def config_folder(source: str) -> Path:
    """A folder with the model's configs: shipped ones (sd15, sd21, sdxl), the tiny models, a diffusers
    folder, or the configs of a hub id (only the JSON files are fetched)."""
    if source in BUILTIN:
        return Path(str(resources.files("lora_booth") / "configs" / source))

    path = Path(source).expanduser()
    if path.is_file():
        family = models.detect_single_file_family(path, allow_pickle=False)
        return config_folder(families.family(family).plan_configs)
    if source in TINY_NAMES or source == "toyworld" or path.is_dir():  # the built-in models are folders too
        return models.locate(ModelConfig(source=source)).path
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(source, allow_patterns=["*.json", "*.txt"]))
    except Exception:
        raise ConfigError("model", f"{source!r}: its configs are neither shipped ({', '.join(BUILTIN)}) nor "
                          "in the local hub cache", "use model=sd15, sd21 or sdxl, or a local folder") from None


def base_resolution(source: str) -> int:
    """The training size a run on `source` takes when data.resolution is unset."""
    folder = config_folder(source)
    return models.native_resolution(models.ModelInfo("folder", folder, models.detect_folder_family(folder), source))


class _TotalsOnly:
    """Stands in for FlopCounterMode's per-module tracker: only the total is needed, and that
    tracker's hooks on output tensors keep activations alive after their backward (under gradient
    checkpointing the traced peak doubled), so the memory trace would overstate the step."""
    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages alive at each op; remembers the peak. A storage counts
    from the op that made it until it is freed: PyTorch keeps one Python object per storage for as
    long as the storage lives (also when only autograd holds it for backward), so a finalizer on
    that object says exactly when it dies. No polling: the cost per op is constant."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: dict[int, int] = {}
        self.live = self.peak = 0

    def track(self, tensor: torch.Tensor, permanent: bool = False) -> None:
        import weakref

        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.sizes:
            return
        self.sizes[key] = storage.nbytes()
        self.live += self.sizes[key]
        self.peak = max(self.peak, self.live)
        if not permanent:  # weights live through the whole step
            weakref.finalize(storage, self._freed, key)

    def _freed(self, key: int) -> None:
        self.live -= self.sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_map_only

        result = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self.track, result)
        return result


def _fake_attention_flops() -> None:
    """FlopCounterMode knows the CUDA attention kernels; on fake CPU tensors SDPA runs the CPU
    flash kernel, which has the same FLOPs."""
    import torch.utils.flop_counter as fc

    aten = torch.ops.aten
    if aten._scaled_dot_product_flash_attention_for_cpu in fc.flop_registry:
        return

    @fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

    @fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


_MEMO: dict[str, Plan] = {}
# keys that cannot change the step's memory or FLOPs
_IRRELEVANT = {"train": ("gpu_memory", "force", "resume", "log_every", "seed", "device", "max_steps"),
               "save": ("output_dir", "overwrite", "checkpoint_every", "keep", "formats", "name", "dtype"),
               "data": ("instance_dir", "instance_prompt"), "prior": ("class_dir", "class_prompt")}


def estimate(cfg: Config, fake: bool = True, flops: bool = True) -> Plan:
    """Peak memory and FLOPs of one optimizer step under `cfg` (memoised per relevant settings:
    preset=auto and the advice try several). flops=False skips counting them: the trace takes half
    the time, for callers that ask only whether it fits."""
    if str(cfg.train.offload_blocks).strip().lower() == "auto":
        raise ConfigError("train.offload_blocks", "is auto, which the plan resolves for a GPU size",
                          "pass train.gpu_memory=16GiB (lora-booth plan), or a number of blocks")
    if cfg.data.resolution is None:  # the base's own size, as training takes it
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, resolution=base_resolution(cfg.model.source)))
    relevant = cfg.to_dict()
    for section, names in _IRRELEVANT.items():
        for name in names:
            relevant[section].pop(name, None)
    counted = json.dumps([relevant, fake, True], sort_keys=True, default=str)
    if counted in _MEMO:  # a counted plan answers an uncounted question too
        return _MEMO[counted]
    key = json.dumps([relevant, fake, flops], sort_keys=True, default=str)
    if key not in _MEMO:
        _MEMO[key] = _trace(cfg, fake, flops)
    return _MEMO[key]


def _trace(cfg: Config, fake: bool, flops: bool = True) -> Plan:
    """One optimizer step traced on fake tensors. With fake=False the same trace runs on real
    tensors (random weights) on the CPU: the check that the fake trace is right."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    build = torch.device("meta") if fake else torch.device("cpu")
    folder, family, dtype, (unet, encoders, vae) = _build(cfg, build)
    scheduler = family.training_scheduler(json.loads((folder / "scheduler" / "scheduler_config.json").read_text()))
    codec = family.latent_codec(vae)
    loaded, largest_layer = _loaded(family, unet, encoders, vae)
    # what lora.add_adapters and the family's predict ask of a base
    holder = type("B", (), {"unet": unet, "kind": family, "compute_dtype": dtype,
                            "vae_channels": codec.channels, **encoders})()
    params = lora.add_adapters(holder, cfg.lora, 0)
    if cfg.train.stored_weights == "fp8":
        store_in_fp8(unet, dtype, family.fp8_keep)
    elif cfg.train.stored_weights != "compute":  # int8 / nf4: their stored bytes, their transient weight
        stand_ins.store_stand_ins(unet, cfg.train.stored_weights, dtype, family.fp8_keep)
    wrappers = []
    if cfg.pivotal.enabled:  # the trigger's new rows in every encoder; ids 0..n-1 stand in for <s0><s1>...
        for encoder in encoders.values():
            with build:
                rows = torch.nn.Parameter(torch.zeros(cfg.pivotal.tokens, encoder.config.hidden_size))
            wrappers.append(pivotal.EmbeddingWithNewRows(encoder.get_input_embeddings(),
                                                         list(range(cfg.pivotal.tokens)), rows))
            encoder.set_input_embeddings(wrappers[-1])
    trained = family.trainable_text_parts() if cfg.lora.text_encoder else ()  # as recipe.prepare_optimization
    if cfg.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for part in trained:
            models.checkpoint_activations(encoders[part])
    unet.train()
    for part, encoder in encoders.items():
        encoder.train(part in trained)
    _no_module_dropout_draw(unet, *encoders.values())
    resident = {family.denoiser: unet}
    if not text.caches_prompts(cfg):
        resident.update(encoders)
    if not cfg.data.cache_latents:
        resident["vae"] = vae

    # the scheduler's small real tables (alphas_cumprod) may meet fake tensors
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
    if fake:
        for module in resident.values():
            _swap_for_fakes(module, lambda t: FakeTensor(mode, t.detach().to("meta"), torch.device("cpu")))
        params = {part: [p for p in resident[part].parameters() if p.requires_grad] for part in params}
        for wrapper in wrappers:
            wrapper.new_rows[0] = torch.nn.Parameter(
                FakeTensor(mode, wrapper.new_rows[0].detach().to("meta"), torch.device("cpu")))
    if wrappers:
        params["embeddings"] = [wrapper.new_rows[0] for wrapper in wrappers]
    # block offload: the real hooks, on the fake weights; their copies are allocations the trace sees
    held = offload.install(unet, family.offload_units, cfg.train.offload_blocks, torch.device("cpu"))
    kept_on_host = held.held() if held is not None else set()
    _fake_attention_flops()
    tracker, counter = LiveBytes(), FlopCounterMode(display=False) if flops else nullcontext()
    if flops:
        counter.mod_tracker = _TotalsOnly()
    rows = cfg.train.batch_size * (2 if cfg.prior.weight > 0 else 1)
    side = cfg.data.resolution // family.vae_downsampling(vae.config)
    parts = {}
    with (mode or nullcontext()), tracker, counter:
        for name, module in resident.items():
            before = tracker.live
            for tensor in [*module.parameters(), *module.buffers()]:
                if id(tensor) not in kept_on_host:
                    tracker.track(tensor, permanent=True)
            # the adapters priced by their own tensors, the frozen weights by what the tracker saw: a
            # tied weight (T5's shared token embedding, 0.25 GiB) is one storage, counted once
            adapters = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
            parts[f"{name} weights (frozen)" + (", resident" if name == family.denoiser and held else "")] = \
                tracker.live - before - adapters
            parts[f"{name} adapters"] = adapters
        for wrapper in wrappers:
            tracker.track(wrapper.new_rows[0], permanent=True)
        if wrappers:
            parts["pivotal embedding rows"] = sum(w.new_rows[0].numel() * w.new_rows[0].element_size() for w in wrappers)
        optimizer = _optimizer(params, cfg)
        before_step = tracker.live
        autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else nullcontext()
        split = cfg.train.split_prior and cfg.prior.weight > 0  # instance rows, then class rows, apart
        passes = [(cfg.train.batch_size, False), (cfg.train.batch_size, True)] if split else \
            [(rows, cfg.prior.weight > 0)]
        for _ in range(cfg.train.grad_accum):
            # prior.mode=prediction: the class rows are the instance rows again, their target the base
            # model's prediction: one more UNet forward over batch_size rows, adapters off, no gradients
            prior_target = _base_prediction(holder, resident, family, scheduler, cfg.train.batch_size, side, dtype,
                                            autocast, cfg.objective.guidance) if cfg.prior.by_prediction else None
            for pass_rows, with_prior in passes:
                copies = len(prior_target) if prior_target is not None and with_prior else 0  # instance latents again
                if "vae" in resident and pass_rows > copies:
                    with torch.no_grad():
                        pixels = torch.randn(pass_rows - copies, 3, cfg.data.resolution, cfg.data.resolution)
                        latents = codec.normalize(codec.distribution(vae, pixels)[0])
                    if copies:
                        latents = torch.cat([latents, latents[:copies]])
                else:
                    latents = torch.randn(pass_rows, codec.channels, side, side)
                with autocast:
                    if "text_encoder" in resident:
                        with torch.set_grad_enabled(cfg.lora.text_encoder or cfg.pivotal.enabled):
                            ids, masks = family.planned_tokens(pass_rows)
                            encoded = text.encode_ids(list(encoders.values()), ids, family, masks)
                    else:
                        encoded = family.planned_conditioning(pass_rows, encoders, family.context_width(unet.config), dtype)
                    hidden, pooled = encoded.hidden.to(dtype), None if encoded.pooled is None else encoded.pooled.to(dtype)
                    noise = torch.randn_like(latents)
                    timesteps = family.planned_time(scheduler, pass_rows)
                    noisy, target = family.noisy_and_target(scheduler, latents, noise, timesteps)
                    pred = family.predict(holder, unet, noisy, timesteps, text.Conditioning(hidden, pooled, encoded.mask),
                                          torch.ones(pass_rows, 6, dtype=dtype), cfg.objective.guidance)
                if copies:                                  # the class rows' target: the base's prediction
                    target = torch.cat([target[:pass_rows - copies], prior_target.to(target.dtype)])
                if split:
                    is_prior = torch.full((pass_rows,), with_prior)
                else:
                    is_prior = torch.arange(pass_rows) >= cfg.train.batch_size if with_prior else \
                        torch.zeros(pass_rows, dtype=torch.bool)
                losses = objective.dreambooth_loss(pred, target, is_prior, cfg.prior.weight, None, cfg.objective.loss,
                                                   objective.huber_c(scheduler, family.timestep_index(scheduler, timesteps),
                                                                     cfg.objective))
                (losses.total / cfg.train.grad_accum).backward()
                del pred, target, noisy, hidden, pooled, latents, noise, losses
            del prior_target
        optimizer.step()  # gradients and the freshly made Adam state are alive together here
        optimizer.zero_grad(set_to_none=True)
    tensors, up = [p for group in params.values() for p in group], lora.up_matrices(holder)
    trainable = sum(p.numel() for part, group in params.items() if part != "embeddings" for p in group)
    if cfg.optim.optimizer == "adamw":  # measured: the trace ran torch's AdamW
        state = sum(s.untyped_storage().nbytes() for slots in optimizer.state.values()
                    for s in slots.values() if isinstance(s, torch.Tensor))
    else:                               # priced from the library's layout, added to the peak below
        state = optimizer_state_bytes(cfg.optim.optimizer, tensors, up)
    parts[f"optimizer state ({cfg.optim.optimizer})"] = state
    extra = state if cfg.optim.optimizer != "adamw" else 0
    if cfg.train.ema:
        parts["EMA copy of the trained tensors"] = sum(4 * p.numel() for p in tensors)
        extra += parts["EMA copy of the trained tensors"]
    parts["gradients + activations (peak)"] = tracker.peak - before_step
    if cfg.launch.sharding == "fsdp":  # a GPU's share of the frozen denoiser (training/sharding.py)
        extra -= sharding.price(parts, f"{family.denoiser} weights (frozen)",
                                sharding.unit_bytes(offload.units(unet, family.offload_units)), cfg.launch.processes)
    host, offloaded = stand_ins.host_parts(loaded, largest_layer, held.host_bytes() if held else 0, True)
    return Plan(model=cfg.model.source, resolution=cfg.data.resolution, rows=rows, parts=parts,
                host=host, offloaded=offloaded,
                adapter=f"{cfg.lora.type} rank {cfg.lora.rank}: {trainable:,} adapter parameters",
                tracked_peak=tracker.peak + extra, flops=float(counter.get_total_flops()) if flops else None)


def _base_prediction(holder, resident: dict, family, scheduler, rows: int, side: int, dtype: torch.dtype,
                     autocast, guidance: float) -> torch.Tensor:
    """prior.mode=prediction's extra forward, as recipe.with_base_predictions runs it: the class
    prompt through the text encoders (when not cached) and the UNet, every adapter off, no gradients."""
    unet = resident[family.denoiser]
    encoders = {part: getattr(holder, part) for part in family.text_parts}
    with torch.no_grad(), adapters_disabled(holder), autocast:
        if "text_encoder" in resident:
            ids, masks = family.planned_tokens(rows)
            encoded = text.encode_ids(list(encoders.values()), ids, family, masks)
        else:
            encoded = family.planned_conditioning(rows, encoders, family.context_width(unet.config), dtype)
        latents = torch.randn(rows, holder.vae_channels, side, side)
        timesteps = family.planned_time(scheduler, rows)
        noisy, _ = family.noisy_and_target(scheduler, latents, torch.randn_like(latents), timesteps)
        conditioning = text.Conditioning(encoded.hidden.to(dtype), None if encoded.pooled is None else encoded.pooled.to(dtype),
                                         encoded.mask)
        return family.predict(holder, unet, noisy, timesteps, conditioning, torch.ones(rows, 6, dtype=dtype), guidance)


def _no_module_dropout_draw(*models: torch.nn.Module) -> None:
    """peft's LoHa/LoKr layers draw torch.rand(1) in training mode to decide module dropout, a
    data-dependent branch a fake tensor cannot take. With module_dropout 0 (lora-booth never sets
    it) eval mode computes the same thing, so their adapter layers trace in eval mode."""
    from peft.tuners.lycoris_utils import LycorisLayer

    for model in models:
        for module in model.modules():
            if isinstance(module, LycorisLayer):
                module.training = False


def _swap_for_fakes(module: torch.nn.Module, make) -> None:
    for owner in module.modules():
        for name, param in list(owner._parameters.items()):
            if param is not None:
                owner._parameters[name] = torch.nn.Parameter(make(param), requires_grad=param.requires_grad)
        for name, buffer in list(owner._buffers.items()):
            if buffer is not None:
                owner._buffers[name] = make(buffer)


def _optimizer(params, cfg: Config):
    """AdamW as training builds it. The other optimizers need real memory (8-bit kernels) or real
    numbers (Prodigy calls .item()), so their state is priced from their layout (below) and a
    stateless SGD stands in for the trace."""
    groups = [{"params": tensors} for tensors in params.values() if tensors]
    if cfg.optim.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.optim.lr)
    return torch.optim.SGD(groups, lr=cfg.optim.lr)  # no state: the library's state is added separately


def optimizer_state_bytes(name: str, tensors: list, up: frozenset[int]) -> int:
    """Optimizer state of the libraries' layouts, in bytes, for the fp32 trained tensors.
    prodigy (prodigyopt 1.1): exp_avg, exp_avg_sq, s and the initial copy p0 per tensor — p0 is a
    scalar for tensors that start at zero (LoRA's B). adafactor (transformers, beta1=None):
    one row and one column vector per matrix, a full vector per 1-D tensor."""
    count = sum(p.numel() for p in tensors)
    if name == "adamw":
        return 2 * 4 * count
    if name == "adamw8bit":
        return _eight_bit_state_bytes(count)
    if name == "prodigy":
        return sum(4 * (3 * p.numel() + (1 if id(p) in up else p.numel())) for p in tensors)
    if name == "adafactor":
        return sum(4 * ((p.shape[-1] + p.numel() // p.shape[-1]) if p.dim() >= 2 else p.numel()) + 8 for p in tensors)
    raise ValueError(f"no state layout for optimizer {name!r}")


def _eight_bit_state_bytes(parameters: int) -> int:
    """bitsandbytes AdamW8bit: two uint8 moments per parameter plus one fp32 absmax per
    2048-value block and moment (blockwise quantisation)."""
    return 2 * parameters + 2 * 4 * -(-parameters // 2048)



def _build(cfg: Config, build: torch.device):
    """The frozen parts from their configs on `build` (meta: no memory), denoiser and text encoders
    in the training precision, the VAE in fp32, as training loads them."""
    import diffusers
    import transformers
    from transformers import AutoConfig

    quiet_libraries()
    folder = config_folder(cfg.model.source)
    family = families.family(detect_folder_family(folder))
    dtype = precision.compute_dtype(cfg.train.mixed_precision)
    with build:
        unet = getattr(diffusers, family.denoiser_class).from_config(  # the UNet, or FLUX.1's transformer
            json.loads((folder / family.denoiser / "config.json").read_text()))
        encoders = {part: getattr(transformers, kind)(AutoConfig.from_pretrained(folder / part))
                    for part, kind in zip(family.text_parts, family.text_encoder_classes)}
        vae = getattr(diffusers, family.vae_class).from_config(json.loads((folder / "vae" / "config.json").read_text()))
    for module in (unet, *encoders.values(), vae):
        module.requires_grad_(False)
    for module in (unet, *encoders.values()):
        module.to(dtype)
    return folder, family, dtype, (unet, encoders, vae)


def _loaded(family, unet, encoders: dict, vae) -> tuple[dict[str, int], int]:
    """Bytes of each part as loaded, and of the largest single layer."""
    loaded = {name: stand_ins.tensor_bytes(module) for name, module in [(family.denoiser, unet), *encoders.items(),
                                                                         ("vae", vae)]}
    largest_layer = max(stand_ins.tensor_bytes(module) for part in (unet, *encoders.values())
                        for module in part.modules() if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)))
    return loaded, largest_layer


def host_estimate(cfg: Config, on_gpu: bool) -> dict[str, int]:
    """The host-RAM peak by part (the load), without tracing a step: what `train` checks before
    loading on any device."""
    _, family, _, (unet, encoders, vae) = _build(cfg, torch.device("meta"))
    loaded, largest_layer = _loaded(family, unet, encoders, vae)
    return stand_ins.host_parts(loaded, largest_layer, 0, on_gpu)[0]


_UNITS: dict[tuple[str, str], int] = {}


def offload_total(cfg: Config) -> int:
    """How many blocks train.offload_blocks chooses from (Family.offload_units of the denoiser)."""
    import diffusers

    folder = config_folder(cfg.model.source)
    family = families.family(detect_folder_family(folder))
    key = (str(folder), family.offload_units)
    if key not in _UNITS:
        with torch.device("meta"):
            denoiser = getattr(diffusers, family.denoiser_class).from_config(
                json.loads((folder / family.denoiser / "config.json").read_text()))
        _UNITS[key] = len(offload.units(denoiser, family.offload_units))
    return _UNITS[key]
