"""Frozen UNet weights stored in float8 (e4m3) and upcast, layer by layer, just before each layer
runs: half the weight memory of fp16. The layers chosen are those diffusers' layerwise casting
picks (linear and convolution layers outside normalisation). The upcasting is our own: diffusers'
hook converts parameters in place, which changes the very tensor autograd saved for the backward
pass (wrong gradients, or a dtype error); here each forward gets a fresh upcast copy and the fp8
tensor is put back afterwards, so backward uses exactly the weights forward used."""
from __future__ import annotations

import re

import torch

STORAGE = torch.float8_e4m3fn


def store_in_fp8(unet: torch.nn.Module, compute_dtype: torch.dtype, keep: tuple[str, ...] | None = None) -> int:
    """Returns the number of layers now stored in fp8. Call after the adapters are added: peft
    creates adapter weights in its base layer's dtype, so adapters added to fp8 layers would
    start from fp8-rounded values; the adapters' own layers (lora_A/lora_B) are never touched."""
    if keep is None:  # `keep`: the family's own patterns of layers kept in the compute precision
        keep = tuple(getattr(unet, "_skip_layerwise_casting_patterns", None) or ("norm",))
    skip = (*keep, r"(^|\.)lora_")
    layers = [(name, module) for name, module in unet.named_modules()
              if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
              and not any(re.search(pattern, name) for pattern in skip)]
    for _, module in layers:
        _store(module, compute_dtype)
    return len(layers)


def _store(module: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    module._parameters["weight"] = torch.nn.Parameter(module.weight.detach().to(STORAGE), requires_grad=False)
    if module._parameters.get("bias") is not None:  # biases are tiny: kept in the compute precision
        module._parameters["bias"] = torch.nn.Parameter(module.bias.detach().to(compute_dtype), requires_grad=False)

    # the fp8 tensor is whatever sits in the slot when the layer starts (the planner swaps it for a
    # fake one after this runs), kept aside while the upcast copy takes its place
    held = {}

    def upcast(layer, args):
        held["fp8"] = layer._parameters["weight"]
        layer._parameters["weight"] = torch.nn.Parameter(held["fp8"].detach().to(compute_dtype), requires_grad=False)

    def restore(layer, args, output):
        layer._parameters["weight"] = held.pop("fp8")

    module.register_forward_pre_hook(upcast)
    module.register_forward_hook(restore)
