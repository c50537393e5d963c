"""Seamless tiling, AUTOMATIC1111's "Tiling": every 2-D convolution of the U-Net and the VAE pads circularly for
the call, so the image wraps around at its edges and tiles without a seam (textures, patterns).

A1111 does it the same way, by setting `padding_mode` on every `Conv2d` of the model; diffusers has no such
option. Circular padding makes a fully convolutional network equivariant to circular shifts (attention has no
positions and group norms are global), so a shifted start gives the shifted image: `tests/test_tiling.py`
checks exactly that. The compiled U-Net (`latentgen.compiled`) is built with zero padding; tiled calls run the
U-Net's own forward.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def circular(*modules: torch.nn.Module | None, enabled: bool = True) -> Iterator[None]:
    """Within the block, the zero-padded 2-D convolutions of `modules` pad circularly; restored after, also on an
    error. Convolutions already circular (a block inside another) are left to the outer one."""
    convs = [] if not enabled else [
        m for module in modules if module is not None for m in module.modules()
        if isinstance(m, torch.nn.Conv2d) and m.padding_mode == "zeros" and any(p > 0 for p in m.padding)]
    for conv in convs:
        conv.padding_mode = "circular"
    try:
        yield
    finally:
        for conv in convs:
            conv.padding_mode = "zeros"
