"""One training step: noise the latents at random t, predict with the denoiser + adapters, back-propagate
instance loss + λ · prior loss into the adapters; and what the step needs (Setup), which the
validation loss shares (the conditioning, the prior-by-prediction rows and targets)."""
from __future__ import annotations

import dataclasses
from contextlib import ExitStack
from dataclasses import dataclass

import torch

from ..config.sections import Config
from ..data import batches as data
from ..data import rows as data_rows
from ..io.errors import LoraBoothError
from ..model import loading as models, lora, objective, text
from ..model.pivotal import Pivotal
from . import sharding


class TrainingError(LoraBoothError):
    """The run cannot go on (a non-finite loss, an interrupted run)."""


@dataclass
class Setup:
    """Everything the loop needs, built once."""
    base: models.Base
    accelerator: object
    optimizer: torch.optim.Optimizer
    params: dict[str, list[torch.nn.Parameter]]
    batches: data.DreamBoothBatches
    prompt_cache: text.PromptCache | None
    model: object = None       # the UNet as accelerate prepared it (DDP-wrapped with several processes)
    text_models: dict | None = None  # part → (tokenizer, text encoder as prepared), when not cached
    trained_models: list = dataclasses.field(default_factory=list)  # the UNet and trained text encoders, as prepared
    pivotal: Pivotal | None = None  # new trigger-token embeddings (pivotal=true)
    ema: object = None         # diffusers EMAModel of every trained tensor (train.ema > 0)
    poisoned: bool = False     # a non-finite loss in the current optimizer step (on_nan=skip)
    skipped: int = 0           # optimizer steps skipped for non-finite losses
    skips_seen: int = 0        # of those, the ones the loop has already accounted for
    skip_reason: str = ""
    micro_steps: int = 0       # micro-batches drawn so far: where the data streams stand (skips included)
    checkpointed_step: int = -1  # the step of the newest checkpoint on disk, -1 for none
    next_step: int = 1         # the optimizer step being attempted (for messages)
    trained_on: dict = dataclasses.field(default_factory=dict)  # data.fingerprint of the photos and class images
    counts: tuple[int, int] = (0, 0)  # instance photos and class images, for the adapter's metadata
    started: float = 0.0       # time.time() at the start of this process, for the adapter's metadata
    # validation.HeldOut, the fixed rows of the validation loss (validate.every); validation builds on
    # this module (conditioning, prior-by-prediction rows), so the type is not imported here
    held_out: object = None
    threads: str = ""          # CPU threads and why, for the start summary


def training_step(setup: Setup, micro_step: int, cfg: Config) -> objective.Losses:
    """One micro-batch: noise the latents at random t, predict with UNet + adapters, and back-propagate
    instance loss + λ · prior loss into the adapters."""
    base, accelerator = setup.base, setup.accelerator
    batch = setup.batches(micro_step)                           # instance rows, then class rows
    if cfg.prior.by_prediction:                                 # class rows: the instance rows, class prompt
        batch = with_prediction_rows(batch, cfg.prior.class_prompt)
    dropout_stream = micro_step * accelerator.num_processes + accelerator.process_index
    torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=data_rows.derived_generator(
        cfg.train.seed, "dropout", dropout_stream))))           # adapter dropout masks
    with accelerator.accumulate(*setup.trained_models):          # every DDP-wrapped model: UNet, text encoders
        latents = batch.latents.to(accelerator.device)          # (B, 4, H/8, W/8)
        generators = [data_rows.derived_generator(cfg.train.seed, f"noise-{stream}", position)
                      for stream, position in batch.slots]
        kind, scheduler = base.kind, base.noise_scheduler      # the family: DDPM's ε/v, or FLUX.1's flow
        noise, timesteps = kind.sample_noise(scheduler, latents, generators, cfg.objective)
        noisy, target = kind.noisy_and_target(scheduler, latents, noise, timesteps)
        if cfg.prior.by_prediction:                             # the class rows' target: the frozen base's prediction
            target = with_base_predictions(setup, batch, noisy, timesteps, target, cfg.objective.guidance)
        weights = objective.snr_weights(scheduler, timesteps, cfg.objective.min_snr_gamma)
        huber_c = objective.huber_c(scheduler, kind.timestep_index(scheduler, timesteps), cfg.objective)  # None: mse
        is_prior = batch.is_prior.to(latents.device)
        mask = objective.mask_weights(batch.masks, cfg.objective.unmasked_weight, latents.device)  # None: data.masks=none
        passes = row_passes(batch, cfg.train.split_prior)      # all rows at once, or instance then class rows
        parts = []
        for index, rows in enumerate(passes):
            # several processes: gradients are averaged once, after the last pass. DDP decides at
            # forward time whether a backward all-reduces, so the whole pass runs unsynchronised
            with unsynchronised(setup, last=index == len(passes) - 1):
                conditioning = text.unconditional(condition(setup, [batch.prompts[i] for i in rows]),
                                                  None if batch.dropped is None else batch.dropped[rows],
                                                  base.unconditional_zeros)  # (b, 77, D) (+ pooled (b, P))
                with accelerator.autocast():
                    pred = kind.predict(base, setup.model, noisy[rows], timesteps[rows], conditioning,
                                        batch.sizes[rows], cfg.objective.guidance)
                part = objective.dreambooth_loss(pred, target[rows], is_prior[rows], cfg.prior.weight,
                                                 None if weights is None else weights[rows], cfg.objective.loss,
                                                 None if huber_c is None else huber_c[rows],
                                                 None if mask is None else mask[rows])
                parts.append(part)
                if not all_finite(accelerator, part.total):
                    setup.poisoned = True
                    if cfg.train.on_nan == "stop":  # before the optimizer step: the adapters stay finite
                        losses = objective.add(parts)
                        raise TrainingError(
                            f"step {setup.next_step}: the loss is {losses.total.item()} (instance "
                            f"{losses.instance.item()}, prior {losses.prior.item()}). Lower optim.lr, or use "
                            "train.mixed_precision=bf16/no instead of fp16; train.on_nan=skip skips such steps. "
                            "The last checkpoint is kept.")
                    continue
                accelerator.backward(part.total)
            del pred, part
        losses = objective.add(parts)
        if accelerator.sync_gradients and setup.poisoned:  # on_nan=skip: drop the whole optimizer step
            setup.optimizer.zero_grad(set_to_none=True)
            setup.poisoned = False
            setup.skipped += 1
            return losses
        sharded = sharding.is_sharded(setup.model)
        if accelerator.sync_gradients and sharded:             # no DDP: the adapters' mean gradient, here
            sharding.average_gradients(accelerator.num_processes, trained_tensors(setup))
        if accelerator.sync_gradients and cfg.optim.max_grad_norm:
            if sharded:  # whole tensors in every process: accelerate's FSDP clipping would look for shards
                accelerator.unscale_gradients()
                torch.nn.utils.clip_grad_norm_(trained_tensors(setup), cfg.optim.max_grad_norm)
            else:
                accelerator.clip_grad_norm_(trained_tensors(setup), cfg.optim.max_grad_norm)
        setup.optimizer.step()
        setup.optimizer.zero_grad(set_to_none=True)
    return losses


def with_prediction_rows(batch: data.Batch, class_prompt: str) -> data.Batch:
    """prior.mode=prediction: every instance row once more, as a class row heard with the class
    prompt (as OneTrainer's prior prediction and ai-toolkit's differential output preservation
    do). The copy keeps the row's slot, so it draws the same noise and timestep: the same noisy
    latent. No class images exist; the copy's caption is never dropped, nor its loss masked."""
    rows = len(batch.prompts)
    dropped = batch.dropped if batch.dropped is not None else torch.zeros(rows, dtype=torch.bool)
    return dataclasses.replace(batch, latents=torch.cat([batch.latents, batch.latents]),
                               prompts=batch.prompts + [class_prompt] * rows,
                               is_prior=torch.cat([batch.is_prior, torch.ones(rows, dtype=torch.bool)]),
                               slots=batch.slots + batch.slots, sizes=torch.cat([batch.sizes, batch.sizes]),
                               dropped=torch.cat([dropped, torch.zeros(rows, dtype=torch.bool)]),
                               masks=None if batch.masks is None else torch.cat([batch.masks,
                                                                                 torch.ones_like(batch.masks)]))


def with_base_predictions(setup: Setup, batch: data.Batch, noisy: torch.Tensor, timesteps: torch.Tensor,
                          target: torch.Tensor, guidance: float) -> torch.Tensor:
    """The target with its class rows replaced by the frozen base model's own prediction for them:
    every adapter off (UNet and text encoders), no gradients, and the adapters' requires_grad flags
    put back exactly (lora.adapters_disabled). The base UNet runs unwrapped: no DDP hooks for a
    forward that has no backward."""
    base = setup.base
    rows = torch.arange(len(batch.prompts))[batch.is_prior]
    with torch.no_grad(), lora.adapters_disabled(base):
        conditioning = condition(setup, [batch.prompts[i] for i in rows])  # the class prompt, base encoder
        with setup.accelerator.autocast():
            prediction = base.kind.predict(base, base.unet, noisy[rows], timesteps[rows], conditioning,
                                           batch.sizes[rows], guidance)
    target = target.clone()
    target[rows.to(target.device)] = prediction.to(target.dtype)
    return target


def unsynchronised(setup: Setup, last: bool):
    """No gradient all-reduce in any trained model during a pass that is not the step's last."""
    stack = ExitStack()
    if not last and setup.accelerator.num_processes > 1:
        for model in setup.trained_models:
            stack.enter_context(setup.accelerator.no_sync(model))
    return stack


def row_passes(batch: data.Batch, split_prior: bool) -> list:
    """Which rows go through the UNet together: all of them, or (train.split_prior) the instance rows
    and then the class rows, each pass back-propagated before the next, so only half the
    activations are alive at once. The gradient is the same sum either way."""
    rows = torch.arange(len(batch.prompts))
    if not split_prior or not batch.is_prior.any() or batch.is_prior.all():
        return [rows]
    return [rows[~batch.is_prior], rows[batch.is_prior]]


def all_finite(accelerator, loss: torch.Tensor) -> bool:
    """With several processes all decide together, or DDP's all-reduce would hang."""
    finite = torch.isfinite(loss)
    if accelerator.num_processes > 1:
        finite = accelerator.reduce((~finite).float(), "sum") == 0
    return bool(finite)


def condition(setup: Setup, prompts: list[str]) -> text.Conditioning:
    base = setup.base
    if setup.prompt_cache is not None:
        return setup.prompt_cache(prompts, setup.accelerator.device, base.compute_dtype)
    with setup.accelerator.autocast():
        encoded = text.encode_prompts(setup.text_models, prompts, setup.accelerator.device, base.variant)
    return encoded.to(setup.accelerator.device, base.compute_dtype)


def trained_tensors(setup: Setup) -> list[torch.nn.Parameter]:
    return [p for group in setup.params.values() for p in group]
