"""Block offload (train.offload_blocks): the frozen weights of some of the denoiser's blocks live in
host memory (pinned on CUDA) and are copied to the accelerator just ahead of each use, then
dropped. The adapters (trainable) never move. A block is a unit that gradient checkpointing
recomputes as a whole (a FLUX.1 transformer block, a UNet resnet or attention transformer block:
Family.offload_units), so its hooks fire again in the recomputation of the backward pass and the
weights come back for it. The copy of the next block starts when a block starts (on a side CUDA
stream, so it overlaps the compute), following the order seen in the previous pass.

A recomputation may stop early, once it has remade what the backward pass needs (torch's
non-reentrant checkpoint does): the block's forward hook then never runs. Blocks run one after the
other, so the arrival of the next one (or of the next forward pass) sends such a block back.

Each use gets fresh Parameter objects in the layer slots and the host ones are put back after:
autograd keeps what forward used for the backward pass (without checkpointing), so the numbers
are exactly those without offload. A copy is a copy also where host and device are one (the CPU):
the mechanism is the same there, which is what the tests check."""
from __future__ import annotations

import re

import torch

from ..config.checks import offload_amount
from ..io.errors import ConfigError


class BlockOffload:
    """The host copies of the chosen blocks' frozen parameters, and the hooks that move them."""

    def __init__(self, units: list[tuple[str, torch.nn.Module]], device: torch.device, trace: list | None = None):
        self.device = device
        self.units = dict(units)
        self.trace = trace               # ("prefetch" | "in" | "out", block name), for tests and the GPU check
        self.host: dict[str, list[tuple[torch.nn.Module, str, torch.nn.Parameter]]] = {}
        self.pending: tuple[str, list] | None = None      # the next block's copies, made ahead
        self.previous: tuple[str | None, str | None] = (None, None)
        self.successor: dict[tuple[str | None, str | None], str] = {}  # (before, now) → next, as last seen
        self.present: set[str] = set()   # blocks whose device copies are in the layers now
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        for name, unit in units:
            self.host[name] = [(owner, slot, _to_host(param, device)) for owner, slot, param in _frozen(unit)]
            for owner, slot, param in self.host[name]:
                owner._parameters[slot] = param
            unit.register_forward_pre_hook(self._arrive(name))
            unit.register_forward_hook(self._leave(name))

    def host_bytes(self) -> int:
        return sum(_bytes(param) for held in self.host.values() for _, _, param in held)

    def held(self) -> set[int]:
        """ids of the host-side Parameters: what placement leaves where it is."""
        return {id(param) for held in self.host.values() for _, _, param in held}

    def _record(self, event: str, name: str) -> None:
        if self.trace is not None:
            self.trace.append((event, name))

    def _copies(self, name: str) -> list:
        return [(owner, slot, _copy(param, self.device)) for owner, slot, param in self.host[name]]

    def _arrive(self, name: str):
        def hook(unit, args):
            if self.pending is not None and self.pending[0] == name:
                copies = self.pending[1]
                if self.stream is not None:  # the side stream's copy must be done before the compute reads it
                    current = torch.cuda.current_stream(self.device)
                    current.wait_stream(self.stream)
                    for _, _, copy in copies:
                        copy.record_stream(current)
            else:
                copies = self._copies(name)
            for other in sorted(self.present - {name}):  # a recomputation that stopped early
                self._send_back(other)
            self.present.add(name)
            self.pending = None
            for owner, slot, copy in copies:
                owner._parameters[slot] = copy
            self._record("in", name)
            before = self.previous[1]
            if before is not None:
                self.successor[self.previous] = name
            self.previous = (before, name)
            ahead = self.successor.get(self.previous)
            if ahead is not None and ahead != name:
                self._prefetch(ahead)
        return hook

    def _prefetch(self, name: str) -> None:
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                self.pending = (name, self._copies(name))
        else:
            self.pending = (name, self._copies(name))
        self._record("prefetch", name)

    def _leave(self, name: str):
        def hook(unit, args, output):
            self._send_back(name)
        return hook

    def _send_back(self, name: str) -> None:
        for owner, slot, param in self.host[name]:
            owner._parameters[slot] = param
        self.present.discard(name)
        self._record("out", name)

    def settle(self, *args) -> None:
        """Every block back in host memory (the last one a stopped recomputation left), and the copy
        made ahead for a block that did not come dropped."""
        self.pending = None
        for name in sorted(self.present):
            self._send_back(name)


def _frozen(unit: torch.nn.Module):
    for owner in unit.modules():
        for slot, param in owner._parameters.items():
            if param is not None and not param.requires_grad:
                yield owner, slot, param


def _to_host(param: torch.nn.Parameter, device: torch.device) -> torch.nn.Parameter:
    tensor = param.detach().to("cpu")
    if device.type == "cuda":
        tensor = tensor.pin_memory()  # what lets the copy to the GPU run asynchronously
    return torch.nn.Parameter(tensor, requires_grad=False)


def _copy(param: torch.nn.Parameter, device: torch.device) -> torch.nn.Parameter:
    # no detach() first (nothing to detach from: frozen): a view of the host storage would be one more
    # tensor on it, which the plan's trace would count as device memory
    if param.device == device:  # the CPU: still a copy of its own, so that the host tensor is never what computes
        return torch.nn.Parameter(param.clone(), requires_grad=False)
    return torch.nn.Parameter(param.to(device, non_blocking=True), requires_grad=False)


def _bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def units(denoiser: torch.nn.Module, pattern: str) -> list[tuple[str, torch.nn.Module]]:
    """The denoiser's blocks that may be offloaded (Family.offload_units), in module order."""
    return [(name, module) for name, module in denoiser.named_modules() if re.fullmatch(pattern, name)]


def count(amount: int | float | str, total: int) -> int:
    """train.offload_blocks as a number of blocks out of `total` ("auto" is resolved by the planner)."""
    if amount == "all":
        return total
    if isinstance(amount, float):
        return max(1, round(amount * total))
    return min(int(amount), total)


def install(denoiser: torch.nn.Module, pattern: str, setting: str, device: torch.device,
            trace: list | None = None) -> BlockOffload | None:
    """Offload the first N blocks of `denoiser` (train.offload_blocks; "auto" must be resolved
    before). Call after the adapters are added and the base weights stored, before placement."""
    amount = offload_amount(setting)
    if amount == "auto":
        raise ValueError("train.offload_blocks=auto is resolved by the planner before install")
    candidates = units(denoiser, pattern)
    if amount and not candidates:  # offload asked for, none possible: refuse rather than train unsaved
        raise ConfigError("train.offload_blocks", f"is {setting}, but this model's {type(denoiser).__name__} has no "
                          "blocks lora-booth can offload", "set train.offload_blocks=0 and use "
                          "train.base_weights=fp8 (or int8/nf4) to save memory")
    chosen = candidates[:count(amount, len(candidates))] if amount else []
    if not chosen:
        return None
    offload = BlockOffload(chosen, device, trace)
    denoiser.register_forward_pre_hook(offload.settle)
    denoiser._block_offload = offload  # to_device() asks for it
    return offload


def to_device(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """module.to(device), except for the parameters block offload keeps in host memory. Identity of
    every moved parameter is kept (as Module.to does), so an optimizer built before still holds them."""
    offload = getattr(module, "_block_offload", None)
    if offload is None:
        return module.to(device)
    held = offload.held()
    for owner in module.modules():
        for slot, param in owner._parameters.items():
            if param is not None and id(param) not in held:
                param.data = param.data.to(device)
        for slot, buffer in owner._buffers.items():
            if buffer is not None:
                owner._buffers[slot] = buffer.to(device)
    return module
