"""dtype names: the one table every flag, config file and checkpoint header is read through."""

from __future__ import annotations

from typing import Optional, Union

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
DTYPE_NAMES = ("bfloat16", "bf16", "float16", "fp16", "float32", "fp32")  # what --help lists, long name first


def parse_dtype(name: Union[str, torch.dtype, None], what: str = "dtype") -> Optional[torch.dtype]:
    """'bf16' / 'bfloat16' / 'torch.bfloat16' / torch.bfloat16 -> torch.bfloat16; None stays None."""
    if name is None or isinstance(name, torch.dtype):
        return name
    key = str(name).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"{what} {name!r}: expected one of {', '.join(DTYPE_NAMES)}")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16' (the spelling config.json and the logs use)."""
    return str(dtype).removeprefix("torch.")
