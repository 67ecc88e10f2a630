"""What the plan's fake-tensor trace puts in place of things that need real memory to exist:
int8/nf4 layers (bitsandbytes quantizes real numbers only), and the host-RAM side of a run."""
from __future__ import annotations

import torch

from ..model import quantize

GiB = 2**30
# The interpreter and the libraries: 0.4 GiB of RSS measured after importing torch (CPU build),
# diffusers, transformers, peft and bitsandbytes; the CUDA build maps its kernels (cuBLAS, cuDNN)
# on top, about 1 GiB more.
PROCESS_BYTES = {False: int(0.5 * GiB), True: int(1.5 * GiB)}   # by whether CUDA is used


class _QuantizedLinear(torch.autograd.Function):
    """A bitsandbytes layer as memory sees it: the stored bytes live, a compute-precision weight made
    for the product and dropped (in the backward pass again), nothing of it saved between them."""

    @staticmethod
    def forward(ctx, inputs, stored, bias, shape, dtype):
        ctx.shape, ctx.dtype = shape, dtype
        ctx.save_for_backward(stored)
        return torch.nn.functional.linear(inputs, torch.zeros(shape, dtype=dtype), bias)

    @staticmethod
    def backward(ctx, grad_output):
        weight = torch.zeros(ctx.shape, dtype=ctx.dtype)
        return grad_output.to(ctx.dtype) @ weight, None, None, None, None


def store_stand_ins(denoiser: torch.nn.Module, weights: str, dtype: torch.dtype, keep) -> int:
    """The layers quantize.store would swap get a uint8 tensor of their stored size in place of the
    weight, and a forward that prices the transient full-precision weight."""
    layers = quantize.chosen_layers(denoiser, keep)
    for _, layer in layers:
        shape = layer.weight.shape
        layer._parameters["weight"] = torch.nn.Parameter(
            torch.empty(quantize.stored_bytes(weights, shape), dtype=torch.uint8, device=layer.weight.device),
            requires_grad=False)

        def forward(inputs, layer=layer, shape=shape):
            return _QuantizedLinear.apply(inputs.to(dtype), layer.weight, layer.bias, shape, dtype)

        layer.forward = forward
    return len(layers)


def tensor_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def host_parts(loaded: dict[str, int], largest_layer: int, offloaded: int,
               on_gpu: bool) -> tuple[dict[str, int], int]:
    """Host RAM at its peak, which is the load: every part is read into RAM in the training
    precision (the VAE in fp32) and stored in fewer bits layer by layer (one layer's transient)
    before it moves to the GPU. The offloaded blocks stay in RAM after (pinned, copied block by
    block): within the load's peak, shown apart so the reader sees what stays."""
    parts = {f"{name} weights as loaded": size for name, size in loaded.items()}
    parts["one layer being stored or pinned"] = largest_layer
    parts["interpreter and libraries"] = PROCESS_BYTES[on_gpu]
    return parts, offloaded
