"""The precisions a config can name, one spelling everywhere (``fp32`` | ``bf16`` | ``fp16``)."""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_of(name: str, key: str) -> torch.dtype:
    """``"bf16"`` -> ``torch.bfloat16``; an unknown name is an error naming the config ``key``."""
    if name not in DTYPES:
        raise ValueError(f"{key} must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]
