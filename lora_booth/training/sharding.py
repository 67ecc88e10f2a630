"""launch.sharding=fsdp: the frozen denoiser sharded across the processes with FSDP2.

The processes are started and joined by accelerate as for any run; the denoiser is then sharded
with torch's FSDP2 (`fully_shard`) directly rather than through accelerate's FSDP plugin, because
accelerate 1.15 drops that plugin on CPU processes (it stays MULTI_CPU and wraps the model in DDP),
so the plugin's path could not be run by any test here; `fully_shard` is what the plugin calls.

Each block the family names as a unit (Family.offload_units, the blocks block offload moves)
becomes one FSDP unit: its frozen weights are split across the processes and gathered only while
it runs, in the forward pass and in gradient checkpointing's recomputation, then freed. The
adapters are left out of FSDP (its ignored parameters): every process keeps them whole, so the
optimizer, EMA, checkpoints and the saved files read ordinary tensors exactly as in a one-process
run, and their gradients, a few MB, are averaged here with one all-reduce per optimizer step
(what DDP does for an unsharded run)."""
from __future__ import annotations

import torch

from ..config.sections import Config
from ..io.errors import ConfigError
from ..model import offload


def check_group(cfg: Config, accelerator) -> None:
    """Sharding across one process would save nothing and hide a launch that went wrong."""
    if cfg.launch.sharding == "fsdp" and accelerator.num_processes < 2:
        raise ConfigError("launch.sharding", "is fsdp, but this run has 1 process; sharding splits the frozen "
                          "weights across processes", "set launch.processes=2 or more (one per GPU), start "
                          "lora-booth under accelerate launch / torchrun with 2 or more, or launch.sharding=none")


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard(denoiser: torch.nn.Module, unit_pattern: str, device: torch.device, processes: int) -> None:
    """Shard in place: every block its own FSDP unit, then the rest (embeddings, norms, output
    layer) as the root unit. Called with the denoiser still in host memory: FSDP moves each
    block's weights to the device as it shards them, so no GPU ever holds the whole denoiser."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    blocks = offload.units(denoiser, unit_pattern)
    if not blocks:
        raise ConfigError("launch.sharding", "is fsdp, but this model's denoiser has no block lora-booth can "
                          "shard (its family's offload_units name none)", "use launch.sharding=none")
    trainable = {p for p in denoiser.parameters() if p.requires_grad}
    for param in trainable:                                   # the adapters: whole, on the device
        param.data = param.data.to(device)
    mesh = init_device_mesh(device.type, (processes,))
    # reshard_after_forward: a block's gathered weights are freed after its forward and gathered
    # again for the backward, so only one block is whole at a time
    for _, block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True, ignored_params=trainable)
    fully_shard(denoiser, mesh=mesh, reshard_after_forward=True, ignored_params=trainable)


def average_gradients(processes: int, params: list[torch.nn.Parameter]) -> None:
    """The adapters' gradients, summed over the processes and divided by their number: the mean
    DDP takes. One flat buffer, so one all-reduce whatever the number of adapters."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= processes
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def summary(denoiser: torch.nn.Module, processes: int) -> str | None:
    """The start summary's line: how much of the frozen denoiser this process holds."""
    if not is_sharded(denoiser):
        return None
    from torch.distributed.tensor import DTensor

    held = whole = 0
    for param in denoiser.parameters():
        if param.requires_grad:
            continue
        whole += param.numel()
        held += param.to_local().numel() if isinstance(param, DTensor) else param.numel()
    return (f"sharding     fsdp across {processes} processes: this one holds {held:,} of the "
            f"denoiser's {whole:,} frozen weights ({100 * held / max(1, whole):.0f} %)")
