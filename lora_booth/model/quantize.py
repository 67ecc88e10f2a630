"""Frozen denoiser weights stored in fewer bits (train.base_weights): fp8 (fp8.py), or int8 / nf4
through bitsandbytes, which runs on CUDA and, more slowly, on the CPU (its CPU kernels fetched
from a hub repository are never asked for: the slow path computes the same numbers).

int8 is LLM.int8 (Dettmers et al. 2022): weights per output row in int8, activations per row in
int8 at run time, the input columns with a value above 6 kept in 16 bit. nf4 is QLoRA's 4-bit
NormalFloat (Dettmers et al. 2023) in blocks of 64 weights, the block scales quantized again.

The layers are swapped one by one, each quantized where it will run, so neither host RAM nor the
GPU ever holds a second full copy of the denoiser. Called after the adapters are added: peft's
wrapper keeps its `base_layer`, which is what is swapped, so the adapters (trained in the compute
precision) keep their names and load on the unquantized base."""
from __future__ import annotations

import logging
import re

import torch

from . import fp8

# bitsandbytes' Linear8bitLt: input columns with a value above this stay in 16 bit (the paper's 6.0)
OUTLIER_THRESHOLD = 6.0
NF4_BLOCK = 64


def store(denoiser: torch.nn.Module, weights: str, compute_dtype: torch.dtype, keep: tuple[str, ...] | None,
          device: torch.device) -> int:
    """train.base_weights for the denoiser; returns the number of layers stored otherwise
    (0 for "compute"). `device`: where the layers will run (bitsandbytes quantizes when a layer
    moves there)."""
    if weights == "compute":
        return 0
    if weights == "fp8":
        return fp8.store_in_fp8(denoiser, compute_dtype, keep)
    layers = chosen_layers(denoiser, keep)
    make = {"int8": _int8_layer, "nf4": _nf4_layer}[weights]
    bnb = _bitsandbytes()
    for name, layer in layers:
        parent, _, attribute = name.rpartition(".")
        owner = denoiser.get_submodule(parent) if parent else denoiser
        quantized = make(bnb, layer, compute_dtype, device)
        quantized.register_forward_hook(_as_linear_would)
        setattr(owner, attribute, quantized)
        del layer
    return len(layers)


def chosen_layers(denoiser: torch.nn.Module, keep: tuple[str, ...] | None) -> list[tuple[str, torch.nn.Linear]]:
    """The linear layers stored in fewer bits: every one outside the family's kept patterns
    (Family.fp8_keep: embedders, norms) and outside the adapters."""
    if keep is None:
        keep = tuple(getattr(denoiser, "_skip_layerwise_casting_patterns", None) or ("norm",))
    skip = (*keep, r"(^|\.)lora_")
    return [(name, module) for name, module in denoiser.named_modules()
            if type(module) is torch.nn.Linear and not any(re.search(pattern, name) for pattern in skip)]


def _bitsandbytes():
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # it warns about GPU kernels it does not need here
    import bitsandbytes

    return bitsandbytes


def _int8_layer(bnb, layer: torch.nn.Linear, compute_dtype: torch.dtype, device: torch.device):
    with torch.device("meta"):
        quantized = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                        has_fp16_weights=False, threshold=OUTLIER_THRESHOLD)
    quantized.weight = bnb.nn.Int8Params(layer.weight.detach(), requires_grad=False, has_fp16_weights=False)
    _copy_bias(quantized, layer, compute_dtype)
    return quantized.to(device)  # Int8Params quantizes as it moves


def _as_linear_would(layer, args, output):
    """The output in the dtype torch.nn.Linear would give: the autocast dtype under autocast, else
    the input's. bitsandbytes returns fp16 from int8 without gradients, and the input's dtype from
    nf4 even under autocast (an fp32 time embedding then meets bf16 norms in sample grids)."""
    device = output.device.type
    if torch.is_autocast_enabled(device):
        return output.to(torch.get_autocast_dtype(device))
    return output.to(args[0].dtype)


def _nf4_layer(bnb, layer: torch.nn.Linear, compute_dtype: torch.dtype, device: torch.device):
    with torch.device("meta"):
        quantized = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True)
    quantized.weight = bnb.nn.Params4bit(layer.weight.detach(), requires_grad=False, quant_type="nf4",
                                         blocksize=NF4_BLOCK, compress_statistics=True, module=quantized)
    _copy_bias(quantized, layer, compute_dtype)
    # bitsandbytes repacks a CPU layer's weight in place for inference (eval, no grad: sample grids),
    # which fails on a layer narrower than a block and would leave training a changed layout
    quantized.support_avx512bf16_for_cpu = False
    return quantized.to(device)  # Params4bit quantizes as it moves


def _copy_bias(quantized, layer: torch.nn.Linear, compute_dtype: torch.dtype) -> None:
    if layer.bias is not None:
        quantized.bias = torch.nn.Parameter(layer.bias.detach().to(compute_dtype), requires_grad=False)


def stored_bytes(weights: str, shape: torch.Size) -> int:
    """Bytes one linear weight of `shape` takes stored as `weights` (the planner prices with this):
    int8: a byte a weight and an fp32 scale per row; nf4: half a byte a weight, a byte of block
    scale per 64 weights and an fp32 second-level scale per 256 blocks."""
    out_features, in_features = shape[0], shape[1]
    count = out_features * in_features
    if weights == "int8":
        return count + 4 * out_features
    if weights == "nf4":
        blocks = -(-count // NF4_BLOCK)
        return count // 2 + blocks + 4 * -(-blocks // 256)
    raise ValueError(weights)
