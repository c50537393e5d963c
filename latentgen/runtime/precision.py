"""Precision, named once: "fp32" / "bf16" / "fp16" everywhere a user or a file names one (CLI, configs, image
metadata), torch dtypes inside, and `auto` picking what runs fastest on the hardware without losing quality."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from latentgen.errors import UserError, one_of

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True when the CPU multiplies bf16 matrices natively (AMX or AVX-512-BF16), so bf16 beats fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in (" amx_bf16", " avx512_bf16"))


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: fp16 on CUDA (bf16 where supported), bf16 on CPUs with native bf16 units, else fp32."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    if name not in DTYPES:
        raise one_of("dtype", name, ["auto", *DTYPES])
    return DTYPES[name]


def name_of(dtype: torch.dtype) -> str:
    """"fp32", "bf16" or "fp16" for a torch dtype."""
    return {v: k for k, v in DTYPES.items()}[dtype]


def mixed_precision(choice: str, cpu: bool) -> tuple[str, str]:
    """The training run's compute precision as accelerate names it ("no", "bf16" or "fp16"), and where it came from.

    The training config wins where the user set it (anything but "auto"); else what `accelerate launch` was told
    by its flag or its config file (passed on as ACCELERATE_MIXED_PRECISION); else `resolve_dtype`'s choice for
    the hardware.
    """
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if choice != "auto":
        source = "mixed_precision in the training config"
        if launched and launched != {"fp32": "no"}.get(choice, choice):
            source += f"; accelerate launch asked for {launched!r}"
    elif launched:
        choice, source = {"no": "fp32"}.get(launched, launched), "accelerate launch"
    else:
        source = "auto, for this hardware"
    if choice == "fp16" and cpu:
        raise UserError("mixed_precision fp16 needs a CUDA GPU; on the CPU use bf16 or fp32")
    name = name_of(resolve_dtype(choice, torch.device("cpu" if cpu else "cuda")))
    return {"fp32": "no"}.get(name, name), source
