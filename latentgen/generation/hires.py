"""Hires fix, as AUTOMATIC1111 does it with one model: generate at the base size, upscale, then image-to-image at
the larger size, so the model adds detail at a size it would compose badly from noise.

Upscalers: "latent" interpolates the latents (A1111's "Latent": no decode/encode round trip, needs a denoising
strength of about 0.5 or more to clean the interpolation's blur), "lanczos" decodes, resizes the pixels with
Lanczos and encodes again (keeps more of the first image at low strengths).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from latentgen import validate
from latentgen.errors import one_of
from latentgen.generation.options import option, table

UPSCALERS = {"latent": "Latent", "lanczos": "Lanczos"}  # ours -> A1111's `Hires upscaler` names


@dataclass(frozen=True)
class Hires:
    scale: float = field(metadata=option(
        "hires scale", flag="--hires-scale", cli={"type": float}, text="Hires upscale", to_text=lambda v: f"{v:g}",
        help="hires fix: generate, upscale by this factor, then image-to-image at the larger size (A1111's "
             "'Hires upscale')"))
    steps: int = field(default=0, metadata=option(
        "hires steps", flag="--hires-steps", text="Hires steps", always=True,
        help="second-pass steps (0: as many as the first pass)"))
    denoise: float = field(default=0.5, metadata=option(
        "hires denoising strength", flag="--hires-denoise", text="Denoising strength", always=True,
        help="the second pass's denoising strength, in (0, 1]"))
    upscaler: str = field(default="latent", metadata=option(
        "hires upscaler", flag="--hires-upscaler", cli={"choices": list(UPSCALERS)}, text="Hires upscaler",
        always=True, to_text=UPSCALERS.get, from_text={v: k for k, v in UPSCALERS.items()}.get,
        help="upscale the latents (latent) or the decoded pixels (lanczos)"))

    def check(self, names: Mapping[str, str] | None = None) -> "Hires":
        name = {f.name: opt.label for f, opt in table(Hires)} | dict(names or {})
        validate.in_range(self.scale, name["scale"], 1.0, 8.0, low_open=True)
        if self.steps:
            validate.steps(self.steps, what=name["steps"])
        validate.in_range(self.denoise, name["denoise"], 0.0, 1.0, low_open=True)
        if self.upscaler not in UPSCALERS:
            raise one_of(name["upscaler"], self.upscaler, list(UPSCALERS))
        return self

    def size(self, height: int, width: int, multiple: int) -> tuple[int, int]:
        """The second pass's (height, width): scale × the base, rounded to the model's size multiple."""
        return tuple(max(multiple, round(v * self.scale / multiple) * multiple) for v in (height, width))


def generate(pipe, plan, on_step=None, on_latents=None):
    """The two passes of a fitted request (`request.Plan`) whose `hires` is set. The second pass uses the same
    seeds, so it replays from the first pass's metadata; the output's metadata describes the request as asked."""
    hires, req = plan.request.hires, plan.request
    # ControlNet units act in the passes their `hr` option names (A1111's hr_option)
    controls = [a for a in plan.controls if a.unit.acts_in(1)]
    first = pipe.run_plan(dataclasses.replace(plan, controls=controls, request=dataclasses.replace(
        req, output_type="latent" if hires.upscaler == "latent" else "pt")), on_step, on_latents)
    h, w = hires.size(plan.height, plan.width, pipe.size_multiple)
    if hires.upscaler == "latent":
        f = pipe.vae_scale_factor
        init = F.interpolate(first.images, size=(h // f, w // f), mode="bilinear")  # (N, C, h/f, w/f)
    else:  # (N, 3, H, W) in [0, 1] -> PIL, Lanczos, back to (N, 3, h, w) in [0, 1]
        resized = [lanczos(image, w, h) for image in pipe.image_processor.pt_to_numpy(first.images.cpu())]
        init = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2)
    units = [u for u in req.control or [] if u.acts_in(2)] or None
    second = plan.per_image_request(image=init, strength=hires.denoise, control=units,
                                    num_inference_steps=hires.steps or req.num_inference_steps)
    out = pipe.run_plan(second.fit(pipe), on_step, on_latents)
    out.info = first.info | {"hires_height": h, "hires_width": w} | {
        k: v for k, v in out.info.items() if k == "fp32_retry"}
    out.metadata = first.metadata
    return out


def lanczos(array: np.ndarray, width: int, height: int) -> np.ndarray:
    """An (H, W, 3) float array in [0, 1], resized with Lanczos, as a float32 array in [0, 1]."""
    from PIL import Image

    image = Image.fromarray((array * 255).round().clip(0, 255).astype("uint8"))
    return np.asarray(image.resize((width, height), Image.Resampling.LANCZOS), dtype=np.float32) / 255
