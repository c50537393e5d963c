"""Training an upscaler (a cascade's second model, `latentgen.generation.cascade`): its low-resolution input and
Imagen's noise conditioning augmentation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from latentgen.formats.upscaler import UpscalerConfig
from latentgen.generation.cascade import augment


def training_condition(noise_scheduler, low: torch.Tensor, config: UpscalerConfig,
                       generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch's conditioning input and its augmentation levels (N,), each drawn from
    [0, max_noise_level]."""
    n = low.shape[0]
    levels = torch.randint(0, config.max_noise_level + 1, (n,), generator=generator, device=low.device)
    noise = torch.randn(low.shape, generator=generator, device=low.device, dtype=low.dtype)
    return augment(noise_scheduler, low, levels, noise, config.scale), levels


def low_resolution(pixels: torch.Tensor, scale: int) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 3, H/scale, W/scale) by averaging (a box filter, as the shapes are anti-aliased)."""
    return F.avg_pool2d(pixels, scale)
