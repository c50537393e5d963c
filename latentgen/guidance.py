"""Classifier-free guidance and its variants, each a small function over the two model predictions."""

from __future__ import annotations

import torch


def classifier_free_guidance(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """ε̃ = ε(x_t, ∅) + w·(ε(x_t, c) − ε(x_t, ∅))  (Ho & Salimans 2022); the same for v-prediction."""
    return uncond + scale * (cond - uncond)
