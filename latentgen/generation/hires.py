"""Hires fix, as AUTOMATIC1111 does it with one model: generate at the base size, upscale, then image-to-image at
the larger size, so the model adds detail at a size it would compose badly from noise.

Upscalers: "latent" interpolates the latents (A1111's "Latent": no decode/encode round trip, needs a denoising
strength of about 0.5 or more to clean the interpolation's blur), "lanczos" decodes, resizes the pixels with
Lanczos and encodes again (keeps more of the first image at low strengths).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from latentgen import validate
from latentgen.errors import one_of

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


def generate(pipe, plan, on_step=None, on_latents=None):
    """The two passes of a fitted request (`request.Plan`) whose `hires` is set. The second pass uses the same
    seeds, so it replays from the first pass's metadata; the output's metadata describes the request as asked."""
    hires, req = plan.request.hires, plan.request
    first = pipe.run_plan(dataclasses.replace(plan, request=dataclasses.replace(
        req, output_type="latent" if hires.upscaler == "latent" else "pt")), on_step, on_latents)
    h, w = hires.size(plan.height, plan.width, pipe.size_multiple)
    if hires.upscaler == "latent":
        f = pipe.vae_scale_factor
        init = F.interpolate(first.images, size=(h // f, w // f), mode="bilinear")  # (N, C, h/f, w/f)
    else:  # (N, 3, H, W) in [0, 1] -> PIL, Lanczos, back to (N, 3, h, w) in [0, 1]
        resized = [_lanczos(image, w, h) for image in pipe.image_processor.pt_to_numpy(first.images.cpu())]
        init = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2)
    second = plan.per_image_request(generator=None, image=init, mask_image=None, height=None, width=None,
                                    strength=hires.denoise, hires=None,
                                    num_inference_steps=hires.steps or req.num_inference_steps)
    out = pipe.run_plan(second.fit(pipe), on_step, on_latents)
    out.info = first.info | {"hires_height": h, "hires_width": w} | {
        k: v for k, v in out.info.items() if k == "fp32_retry"}
    out.metadata = first.metadata
    return out


def _lanczos(array: np.ndarray, width: int, height: int) -> np.ndarray:
    """An (H, W, 3) float array in [0, 1], resized with Lanczos, as a float32 array in [0, 1]."""
    from PIL import Image

    image = Image.fromarray((array * 255).round().clip(0, 255).astype("uint8"))
    return np.asarray(image.resize((width, height), Image.Resampling.LANCZOS), dtype=np.float32) / 255
