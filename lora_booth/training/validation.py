"""Validation loss (validate.every, issue #18): the training objective, without gradients and with
the adapters on (with train.ema their average: what every checkpoint and the final file hold), on a
fixed set of held-out rows: instance photos and, with prior preservation,
class rows, each with a flip, latent sample, timestep and noise of its own. All of those come from
random streams training never draws from (data.derived_generator, "validate-…" names), and the
latents from the run's own cache or encoder, so evaluating changes no training number.

DreamBooth trains on a handful of photos, so the held-out rows are those photos again: what is
held out is the noise. The same draws every time make a smooth curve that compares steps; its
minimum is where the fit stopped improving, and val_prior_loss climbing shows the class drifting."""
from __future__ import annotations

import contextlib

import torch

from ..data import batches as data
from ..data import rows as data_rows
from ..model import objective
from ..config.sections import Config
from . import ema
from .step import condition, trained_tensors, with_base_predictions, with_prediction_rows

Group = tuple[list[data_rows.Row], list[tuple[str, int]], tuple[int, int]]  # rows, slots, size


def held_out_rows(cfg: Config, batches: data.DreamBoothBatches) -> list[Group]:
    """validate.rows instance rows (the distinct photos in an order drawn from the seed, cycled
    when there are fewer) and as many class images, drawn alike; class row j is cut to instance
    row j's size (its bucket), and rows of one size make one group. With prior.mode=prediction the
    class rows are made from the instance rows when evaluated (step.with_prediction_rows)."""
    count, seed = cfg.validate.rows, cfg.train.seed
    photos: dict = {}
    for row in batches.instances:                   # each photo once, though repeats list it more often
        photos.setdefault(row.path, row)

    def drawn(rows: list[data_rows.Row], stream: str) -> list[data_rows.Row]:
        order = torch.randperm(len(rows), generator=data_rows.derived_generator(seed, f"validate-{stream}-order", 0))
        return [rows[int(order[i % len(rows)])] for i in range(count)]
    instances = drawn(list(photos.values()), "instance")
    classes = drawn(batches.classes, "class") if batches.classes else []
    sizes = [row.size or batches.square for row in instances]
    groups = []
    for size in sorted(set(sizes)):
        mine = [i for i, s in enumerate(sizes) if s == size]
        rows = [instances[i] for i in mine] + [classes[i] for i in mine if classes]
        slots = [("validate-instance", i) for i in mine] + [("validate-class", i) for i in mine if classes]
        groups.append((rows, slots, size))
    return groups


def due(cfg: Config, step: int) -> bool:
    """Every validate.every steps, and at the last one."""
    every = cfg.validate.every
    return bool(every) and (step % every == 0 or step == cfg.train.max_steps)


@contextlib.contextmanager
def evaluating(modules: list[torch.nn.Module]):
    """Every submodule in eval mode (no adapter dropout), each put back as it was."""
    modes = [(module, module.training) for model in modules for module in model.modules()]
    for model in modules:
        model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


class HeldOut:
    """The fixed validation rows of a run (none while validate.every=0)."""

    def __init__(self, cfg: Config, batches: data.DreamBoothBatches) -> None:
        self.cfg, self.latent_source = cfg, batches.latent_source
        self.groups = held_out_rows(cfg, batches) if cfg.validate.every else []
        self.batches: list[data.Batch] | None = None  # the groups' latents, encoded once, on first use

    def latent_keys(self) -> list[data.Key]:
        """(image, mirrored?, size) of every held-out row: what the latent cache must also hold."""
        keys = set()
        for rows, slots, size in self.groups:
            _, flips = self.latent_source.augmentations(slots)
            keys.update((row.path, flip, size) for row, flip in zip(rows, flips))
        return sorted(keys)

    def _batches(self) -> list[data.Batch]:
        if self.batches is None:
            self.batches = []
            for rows, slots, size in self.groups:
                latents, sizes, masks = self.latent_source.latents(rows, slots, size)
                batch = data.Batch(latents=latents, prompts=[row.prompt for row in rows],
                                   is_prior=torch.tensor([row.is_prior for row in rows]), slots=slots,
                                   sizes=sizes, masks=masks)
                self.batches.append(with_prediction_rows(batch, self.cfg.prior.class_prompt)
                                    if self.cfg.prior.by_prediction else batch)
        return self.batches

    def losses(self, setup, step: int) -> dict[str, float]:
        """{"val_instance_loss": …, "val_prior_loss": …} at the steps validate.every names (the
        prior term only when there are class rows), else {}. Every process evaluates the same rows
        (nothing to wait for, no collective out of step); only the main one logs."""
        if not due(self.cfg, step):
            return {}
        totals = {"instance": torch.zeros(()), "prior": torch.zeros(())}
        counts = {"instance": 0, "prior": 0}
        base = setup.base
        trained = [base.unet] + [encoder for _, encoder in base.text_encoders.values() if encoder is not None]
        # the adapters as they are saved: with train.ema the average, put back to the live values after
        with torch.no_grad(), evaluating(trained), ema.averaged(setup.ema, trained_tensors(setup)):
            for batch in self._batches():
                part = self._loss(setup, batch)
                n_prior = int(batch.is_prior.sum())
                for kind, n, value in (("instance", len(batch.prompts) - n_prior, part.instance),
                                       ("prior", n_prior, part.prior)):
                    totals[kind] += value.float().cpu() * n
                    counts[kind] += n
        return {f"val_{kind}_loss": (totals[kind] / counts[kind]).item() for kind in totals if counts[kind]}

    def _loss(self, setup, batch: data.Batch) -> objective.Losses:
        """One group through the training step's own functions, forward only."""
        cfg, base, accelerator = self.cfg, setup.base, setup.accelerator
        kind, scheduler = base.kind, base.noise_scheduler
        latents = batch.latents.to(accelerator.device)          # (b, C, h, w)
        generators = [data_rows.derived_generator(cfg.train.seed, f"noise-{stream}", position)
                      for stream, position in batch.slots]     # "noise-validate-…": never a training stream
        noise, timesteps = kind.sample_noise(scheduler, latents, generators, cfg.objective)
        noisy, target = kind.noisy_and_target(scheduler, latents, noise, timesteps)
        if cfg.prior.by_prediction:
            target = with_base_predictions(setup, batch, noisy, timesteps, target, cfg.objective.guidance)
        conditioning = condition(setup, batch.prompts)
        with accelerator.autocast():                            # the plain denoiser: no DDP hooks without a backward
            pred = kind.predict(base, base.unet, noisy, timesteps, conditioning, batch.sizes, cfg.objective.guidance)
        return objective.dreambooth_loss(
            pred, target, batch.is_prior.to(latents.device), cfg.prior.weight,
            objective.snr_weights(scheduler, timesteps, cfg.objective.min_snr_gamma), cfg.objective.loss,
            objective.huber_c(scheduler, kind.timestep_index(scheduler, timesteps), cfg.objective),
            objective.mask_weights(batch.masks, cfg.objective.unmasked_weight, latents.device))
