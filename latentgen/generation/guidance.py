"""Classifier-free guidance and its variants, each a small function over the model's predictions.

- `classifier_free_guidance`: ε̃ = ε∅ + w·(εc − ε∅) (Ho & Salimans 2022).
- adaptive projected guidance (APG, Sadat et al. 2024): the update w·(εc − ε∅) split into its parts parallel and
  orthogonal to εc, the parallel part (which over-saturates) weighted by η, the update's norm capped, optionally
  averaged over the steps with a (negative) momentum. diffusers' `normalized_guidance`, its
  `AdaptiveProjectedGuidance` guider's arithmetic.
- guidance rescale (Lin et al. 2023, §3.4): pull the guided prediction's std back toward the conditional one's;
  it fixes the over-exposure that guidance causes with zero-terminal-SNR models. diffusers' `rescale_noise_cfg`.
- a guidance interval: guidance only for the steps in a fraction [start, end) of the trajectory
  (Kynkäänniemi et al. 2024); outside it the step uses the conditional prediction and skips the unconditional pass.
- dynamic thresholding (Imagen, Saharia et al. 2022) clips the predicted x̂0 at its p-th |value| percentile s
  (s ≥ 1) and divides by s, which pulls saturated pixels back into [-1, 1]. That is only valid in pixel space:
  latents have no fixed range, and dividing them by s (≈ 2.8 for unit-variance latents at p = 99.5%) rescales
  the whole latent and wrecks the image; diffusers' schedulers implement exactly Imagen's rule, so they are not
  used for it. What stays valid for latents is the clipping half: x̂0 is clipped per image to ±max(s, floor),
  `floor` in the latent's own unit-variance scale (default 3σ), without the division, so only the outliers that
  strong guidance creates are cut. It works on the prediction itself, so with every sampler.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from latentgen import validate
from latentgen.errors import UserError
from latentgen.generation.options import option, table

DYNAMIC_THRESHOLD_FLOOR = 3.0  # x̂0 is never clipped inside ±3σ of the unit-variance latents


def classifier_free_guidance(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """ε̃ = ε(x_t, ∅) + w·(ε(x_t, c) − ε(x_t, ∅)); the same for v-prediction."""
    return uncond + scale * (cond - uncond)


@dataclass(frozen=True)
class Apg:
    """Adaptive projected guidance's settings (diffusers' `AdaptiveProjectedGuidance`: `eta`,
    `adaptive_projected_guidance_rescale`, `adaptive_projected_guidance_momentum`)."""

    # cap on each image's update norm (L2 over C, H, W) before w; 0: none
    norm_threshold: float = field(default=0.0, metadata=option(
        "APG threshold", flag="--apg-threshold", cli={"metavar": "R"},
        help="adaptive projected guidance: cap each image's guidance update at L2 norm R (over the latent's C×H×W; "
             "0: no cap); the default model keeps its squares square at 7.5 with 1"))
    # weight of the update's part parallel to εc: 0 drops it (the paper's choice), 1 keeps it
    eta: float = field(default=0.0, metadata=option(
        "APG eta", flag="--apg-eta", cli={"metavar": "ETA"},
        help="APG: weight of the update's part parallel to the conditional prediction"))
    # β of the running update Δ_t + β·Δ_{t−1} over the steps (the paper: −0.5); 0: none
    momentum: float = field(default=0.0, metadata=option(
        "APG momentum", flag="--apg-momentum", cli={"metavar": "BETA"},
        help="APG: running update over the steps, Δ + β·previous (0: none; the paper: -0.5)"))

    @classmethod
    def of(cls, settings, names: Mapping[str, str] | None = None) -> "Apg":
        """Settings given as an Apg or a mapping of its fields (a request's JSON, a model's `model_index.json`),
        checked."""
        return validate.settings(cls, settings, "APG", names)

    def check(self, names: Mapping[str, str] | None = None) -> "Apg":
        name = {f.name: opt.label for f, opt in table(Apg)} | dict(names or {})
        validate.in_range(self.norm_threshold, name["norm_threshold"], 0.0, 1e6)
        validate.in_range(self.eta, name["eta"], 0.0, 1.0)
        validate.in_range(self.momentum, name["momentum"], -1.0, 1.0, low_open=True, high_open=True)
        return self

    def text(self) -> str:
        """As an A1111 text value: 'threshold 1, eta 0, momentum 0'."""
        return f"threshold {self.norm_threshold:g}, eta {self.eta:g}, momentum {self.momentum:g}"

    @classmethod
    def from_text(cls, text: str) -> "Apg":
        try:
            values = dict(part.split() for part in text.split(","))
            return cls(norm_threshold=float(values["threshold"]), eta=float(values["eta"]),
                       momentum=float(values["momentum"]))
        except (KeyError, ValueError):
            raise UserError(f"APG must read 'threshold R, eta E, momentum B', got {text!r}") from None


def model_apg(pipe) -> Apg | bool:
    """A model's own guidance: the APG settings its folder's `model_index.json` holds (key `apg`), else False
    (plain classifier-free guidance)."""
    own = pipe.config.get("apg")
    return Apg.of(own) if own else False


def guide(uncond: torch.Tensor, cond: torch.Tensor, scale: float, apg: Apg | None, state: dict) -> torch.Tensor:
    """The guided prediction: classifier-free guidance, or APG where `apg` is set. `state` is the call's own dict
    (APG's momentum lives there from step to step)."""
    if apg is None:
        return classifier_free_guidance(uncond, cond, scale)
    momentum = None
    if apg.momentum:
        momentum = state.setdefault("apg_momentum", MomentumBuffer(apg.momentum))
    # The original formulation, εc + (w − 1)·update, is the paper's: with η = 1, no cap and no momentum it is
    # classifier-free guidance (diffusers' other one, ε∅ + w·update, drops the parallel part of εc − ε∅ itself).
    return normalized_guidance(cond, uncond, scale - 1.0, momentum, apg.eta, apg.norm_threshold,
                               use_original_formulation=True)


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """φ·ε̃·std(εc)/std(ε̃) + (1 − φ)·ε̃, per image."""
    return rescale_noise_cfg(guided, cond, guidance_rescale=phi) if phi > 0 else guided


def in_interval(step: int, steps: int, interval: tuple[float, float]) -> bool:
    """Whether step `step` of `steps` (0 = the noisiest) lies in the fraction interval [start, end)."""
    start, end = interval
    return start <= step / steps < end


def alpha_sigma(alphas_cumprod: torch.Tensor, t: torch.Tensor | float) -> tuple[float, float]:
    """(α_t, σ_t) = (sqrt(ᾱ_t), sqrt(1 − ᾱ_t)) at a possibly fractional timestep, interpolated in
    σ_t/α_t as the k-diffusion-style samplers (Euler, Heun, LMS, ...) do."""
    import numpy as np

    acp = alphas_cumprod.double().cpu().numpy()
    k = np.interp(float(t), np.arange(len(acp)), np.sqrt((1 - acp) / acp))
    abar = 1.0 / (1.0 + k * k)
    return abar**0.5, (1 - abar) ** 0.5


def x0_from_prediction(pred: torch.Tensor, x_t: torch.Tensor, alpha: float, sigma: float,
                       prediction_type: str) -> torch.Tensor:
    """The x̂0 a prediction at x_t = α·x0 + σ·ε implies: ε: (x_t − σ·ε)/α; v: α·x_t − σ·v; "sample": itself."""
    if prediction_type == "epsilon":
        return (x_t - sigma * pred) / alpha
    if prediction_type == "v_prediction":
        return alpha * x_t - sigma * pred
    return pred


def clip_x0(pred: torch.Tensor, x_t: torch.Tensor, alpha: float, sigma: float, prediction_type: str,
            ratio: float, floor: float) -> torch.Tensor:
    """The latent-valid half of dynamic thresholding, applied to a model prediction at x_t (VP form).

    x̂0 from the prediction (ε: (x_t − σ·ε)/α; v: α·x_t − σ·v), clipped per image to ±max(percentile, floor),
    then back to the prediction's parametrization.
    """
    x0 = x0_from_prediction(pred, x_t, alpha, sigma, prediction_type)
    s = torch.quantile(x0.abs().flatten(1).float(), ratio, dim=1).clamp_min(floor).view(-1, 1, 1, 1)
    x0 = torch.maximum(torch.minimum(x0, s), -s)
    if prediction_type == "epsilon":
        return (x_t - alpha * x0) / sigma
    if prediction_type == "v_prediction":
        return (alpha * x_t - x0) / sigma
    return x0
