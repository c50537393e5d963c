"""Hires fix, as AUTOMATIC1111 does it with one model: generate at the base size, upscale, then image-to-image at
the larger size, so the model adds detail at a size it would compose badly from noise.

Upscalers: "latent" interpolates the latents (A1111's "Latent": no decode/encode round trip, needs a denoising
strength of about 0.5 or more to clean the interpolation's blur), "lanczos" decodes, resizes the pixels with
Lanczos and encodes again (keeps more of the first image at low strengths).
"""

from __future__ import annotations

from dataclasses import dataclass

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


def size_multiple(pipe) -> int:
    """Pixel sizes the pipeline takes: the VAE factor times what the U-Net's levels halve."""
    return pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)


def generate(pipe, hires: Hires, prompt, *, height: int | None = None, width: int | None = None,
             num_inference_steps: int = 30, on_step=None, **options):
    """The two passes for the prompts of one call; the output's info describes the first pass plus `hires`."""
    multiple = size_multiple(pipe)
    first = pipe(prompt, height=height, width=width, num_inference_steps=num_inference_steps, on_step=on_step,
                 output_type="latent" if hires.upscaler == "latent" else "pt", **options)
    h, w = hires.size(first.info["height"], first.info["width"], multiple)
    if hires.upscaler == "latent":
        f = pipe.vae_scale_factor
        init = F.interpolate(first.images, size=(h // f, w // f), mode="bilinear")  # (N, C, h/f, w/f)
    else:
        from PIL import Image

        resized = [pipe.image_processor.pt_to_numpy(im[None])[0] for im in first.images.cpu()]
        init = torch.stack([torch.from_numpy(_lanczos(Image, x, w, h)) for x in resized]).permute(0, 3, 1, 2)
    seeds = first.seeds  # the same noise seeds for the second pass: replayable from the first pass's
    options = {k: v for k, v in options.items() if k not in ("seed", "generator", "image", "mask_image", "strength")}
    second = pipe(prompt, image=init, strength=hires.denoise, num_inference_steps=hires.steps or num_inference_steps,
                  on_step=on_step, seed=seeds, **options)
    second.info = first.info | hires.info() | {"hires_height": h, "hires_width": w}
    return second


def _lanczos(Image, array, width: int, height: int):
    """An (H, W, 3) float array in [0, 1], resized with Lanczos, back as a float32 array in [0, 1]."""
    import numpy as np

    image = Image.fromarray((array * 255).round().clip(0, 255).astype("uint8"))
    return np.asarray(image.resize((width, height), Image.Resampling.LANCZOS), dtype=np.float32) / 255
