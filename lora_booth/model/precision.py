"""The one place that decides the precision the frozen base computes in. Storage may differ
(train.fp8_base keeps UNet weights in e4m3 and upcasts them per layer), so a module's own
`.dtype` is never the answer: inputs cast to fp8 lose 2 % of their value, and SDXL's size numbers
(768, 1024) saturate at e4m3's maximum of 448 (issue #21)."""
from __future__ import annotations

import torch

COMPUTE_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def compute_dtype(mixed_precision: str) -> torch.dtype:
    """train.mixed_precision → the dtype of the UNet's and text encoders' weights as they compute,
    and so of every tensor fed to them."""
    return COMPUTE_DTYPES[mixed_precision]


def autocast_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """Autocast to the compute dtype when it is a half precision; None (off) for fp32."""
    return None if dtype == torch.float32 else dtype
