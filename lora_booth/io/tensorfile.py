"""Safetensors written one tensor at a time. A merged SD 1.5 UNet is 3.4 GB in fp32: building the
whole state dict before writing would hold it (and its source) in memory twice over. The header
is computed from shapes alone, then each tensor is produced, written and dropped."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

import torch

from . import atomic

DTYPE_CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
               torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


def write_streamed(final: Path, entries: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
                   produce: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write `final` atomically; `produce(name)` is called once per entry, in order, and must
    return a tensor of the announced shape and dtype."""
    entries = list(entries)
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, shape, dtype in entries:
        size = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data section to 8 bytes
    with atomic.atomic_path(final) as temporary, open(temporary, "wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little"))
        handle.write(encoded)
        for name, shape, dtype in entries:
            tensor = produce(name)
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise ValueError(f"{name}: produced {tuple(tensor.shape)} {tensor.dtype}, announced {shape} {dtype}")
            # reshape(-1): a 0-d tensor (a batch norm's num_batches_tracked) has no byte view of its own
            handle.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def header_of(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Names, shapes and dtypes of a safetensors file, without reading its tensors."""
    return {name: (shape, dtype) for name, (shape, dtype, _) in _layout(path).items()}


def _layout(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype, tuple[int, int]]]:
    """name → (shape, dtype, absolute byte range), checked against the file's real size."""
    size = Path(path).stat().st_size
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if length > min(size - 8, 100 * 2**20):  # a header larger than the file, or absurdly large
            raise ValueError(f"{path}: header of {length} bytes in a {size}-byte file: not a valid safetensors file")
        header = json.loads(handle.read(length))
    layout = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        start, end = entry["data_offsets"]
        if end > size - 8 - length:
            raise ValueError(f"{path}: tensor {name} lies past the end of the file (truncated?)")
        layout[name] = (tuple(entry["shape"]), CODE_DTYPES[entry["dtype"]], (8 + length + start, 8 + length + end))
    return layout


class Reader:
    """Reads one tensor at a time with plain file reads. Unlike a memory map, whose touched pages
    stay resident until it closes, each tensor's memory is freed as soon as it is dropped."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.layout = _layout(self.path)
        self.handle = open(self.path, "rb")

    def get_tensor(self, name: str) -> torch.Tensor:
        shape, dtype, (start, end) = self.layout[name]
        self.handle.seek(start)
        data = bytearray(self.handle.read(end - start))
        if not data:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(shape)

    def close(self) -> None:
        self.handle.close()
