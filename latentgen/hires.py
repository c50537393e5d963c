"""Hires fix, as AUTOMATIC1111 does it with one model: generate at the base size, upscale, then image-to-image at
the larger size, so the model adds detail at a size it would compose badly from noise.

Upscalers: "latent" interpolates the latents (A1111's "Latent": no decode/encode round trip, needs a denoising
strength of about 0.5 or more to clean the interpolation's blur), "lanczos" decodes, resizes the pixels with
Lanczos and encodes again (keeps more of the first image at low strengths).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import validate
from .errors import one_of

UPSCALERS = {"latent": "Latent", "lanczos": "Lanczos"}  # ours -> A1111's `Hires upscaler` names


@dataclass(frozen=True)
class Hires:
    scale: float  # the second pass is scale × the base size
    steps: int = 0  # second-pass steps; 0: the first pass's
    denoise: float = 0.5  # the second pass's strength
    upscaler: str = "latent"

    def check(self) -> "Hires":
        validate.in_range(self.scale, "--hires-scale", 1.0, 8.0, low_open=True)
        if self.steps:
            validate.steps(self.steps, what="--hires-steps")
        validate.in_range(self.denoise, "--hires-denoise", 0.0, 1.0, low_open=True)
        if self.upscaler not in UPSCALERS:
            raise one_of("hires upscaler", self.upscaler, list(UPSCALERS))
        return self

    def size(self, height: int, width: int, multiple: int) -> tuple[int, int]:
        """The second pass's (height, width): scale × the base, rounded to the model's size multiple."""
        return tuple(max(multiple, round(v * self.scale / multiple) * multiple) for v in (height, width))

    def info(self) -> dict:
        """The image metadata of the second pass (replayed by `Hires(**...)`)."""
        return {"hires_scale": self.scale, "hires_steps": self.steps, "hires_denoise": self.denoise,
                "hires_upscaler": self.upscaler}


def generate(pipe, hires: Hires, prompt, *, height: int | None = None, width: int | None = None,
             num_inference_steps: int = 30, on_step=None, **options):
    """The two passes for the prompts of one call; the output's info describes the first pass plus `hires`."""
    first = pipe(prompt, height=height, width=width, num_inference_steps=num_inference_steps, on_step=on_step,
                 output_type="latent" if hires.upscaler == "latent" else "pt", **options)
    h, w = hires.size(first.info["height"], first.info["width"], pipe.size_multiple)
    if hires.upscaler == "latent":
        f = pipe.vae_scale_factor
        init = F.interpolate(first.images, size=(h // f, w // f), mode="bilinear")  # (N, C, h/f, w/f)
    else:  # (N, 3, H, W) in [0, 1] -> PIL, Lanczos, back to (N, 3, h, w) in [0, 1]
        resized = [_lanczos(image, w, h) for image in pipe.image_processor.pt_to_numpy(first.images.cpu())]
        init = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2)
    seeds = first.seeds  # the same noise seeds for the second pass: replayable from the first pass's
    options = {k: v for k, v in options.items() if k not in ("seed", "generator", "image", "mask_image", "strength")}
    second = pipe(prompt, image=init, strength=hires.denoise, num_inference_steps=hires.steps or num_inference_steps,
                  on_step=on_step, seed=seeds, **options)
    second.info = first.info | hires.info() | {"hires_height": h, "hires_width": w}
    return second


def _lanczos(array: np.ndarray, width: int, height: int) -> np.ndarray:
    """An (H, W, 3) float array in [0, 1], resized with Lanczos, as a float32 array in [0, 1]."""
    from PIL import Image

    image = Image.fromarray((array * 255).round().clip(0, 255).astype("uint8"))
    return np.asarray(image.resize((width, height), Image.Resampling.LANCZOS), dtype=np.float32) / 255
