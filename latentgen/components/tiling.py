"""Seamless tiling, AUTOMATIC1111's "Tiling": every 2-D convolution of the U-Net and the VAE pads circularly for
the call, so the image wraps around at its edges and tiles without a seam (textures, patterns).

A1111 does it the same way, by setting `padding_mode` on every `Conv2d` of the model; diffusers has no such
option. A1111 stops there, which leaves the VAE encoder's downsamplers zero-padded: diffusers' `Downsample2D` with
`padding=0` pads right and bottom by one pixel itself, before an unpadded stride-2 convolution; here that pad
wraps too, so an image-to-image start from a tile has no seam either. Circular padding makes a fully
convolutional network equivariant to circular shifts (attention has no positions and group norms are global;
shifts by whole strides where it downsamples), so a shifted start gives the shifted image: `tests/test_tiling.py`
checks exactly that. The compiled U-Net (`latentgen.runtime.compiled`) is built with zero padding; tiled calls run the
U-Net's own forward. A LyCORIS LoHa or LoKr on a convolution (`latentgen.formats.lora`) is a peft layer that adds its
update with `F.conv2d` and zero padding beside the base convolution; within the block that update goes through
the base convolution's own (circular) padding instead. A LoRA's or LoCon's convolutions are `Conv2d` modules and
follow the rest.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F

_SELF_PADDED = -1  # a Downsample2D's `padding` while its own pad is replaced: any value but 0 skips that pad


def _wrap_right_bottom(_conv: torch.nn.Module, args: tuple) -> tuple:
    return (F.pad(args[0], (0, 1, 0, 1), mode="circular"),) + args[1:]


def _update_through_base_padding(layer: torch.nn.Module):
    """A peft LoHa/LoKr convolution layer's `_get_delta_activations` (inference only: no rank dropout), with the
    base convolution's padding mode rather than `F.conv2d`'s zeros."""
    base = layer.get_base_layer()

    def delta(adapter_name: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        weight = layer.get_delta_weight(adapter_name)
        return base._conv_forward(x.to(weight.dtype), weight, None)

    return delta


@contextlib.contextmanager
def circular(*modules: torch.nn.Module | None, enabled: bool = True) -> Iterator[None]:
    """Within the block, the zero-padded 2-D convolutions of `modules` pad circularly, and so do the one-pixel pads
    of diffusers' `Downsample2D`; restored after, also on an error. Convolutions already circular (a block inside
    another) are left to the outer one."""
    from diffusers.models.downsampling import Downsample2D

    found = [] if not enabled else [m for module in modules if module is not None for m in module.modules()]
    convs = [m for m in found
             if isinstance(m, torch.nn.Conv2d) and m.padding_mode == "zeros" and any(p > 0 for p in m.padding)]
    downs = [m for m in found if isinstance(m, Downsample2D) and m.use_conv and m.padding == 0]
    wrapped = {id(conv) for conv in convs}
    updates = [m for m in found if hasattr(m, "_get_delta_activations") and id(m.get_base_layer()) in wrapped]
    for conv in convs:
        conv.padding_mode = "circular"
    hooks = []
    try:
        for layer in updates:
            layer._get_delta_activations = _update_through_base_padding(layer)
        for down in downs:
            down.padding = _SELF_PADDED
            hooks.append(down.conv.register_forward_pre_hook(_wrap_right_bottom))
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for down in downs:
            down.padding = 0
        for conv in convs:
            conv.padding_mode = "zeros"
        for layer in updates:
            layer.__dict__.pop("_get_delta_activations", None)
