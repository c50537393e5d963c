"""Control images: the preprocessors that need no downloaded weights, and AUTOMATIC1111's resize modes.

A ControlNet sees its control image at the generated image's size, as floats in [0, 1] (diffusers'
`StableDiffusionControlNetPipeline` and A1111's ControlNet extension both give it so). Preprocessors take an RGB
image and give the map a ControlNet of that kind was trained on; the names are the A1111 extension's modules
(`/controlnet/module_list`), so its API clients' `module` values work. Preprocessors that need a network's weights
(depth, pose, lineart, ...) are not here: give their maps as they are ("none").

Each preprocessor runs on the image already resized to the generated size, which is A1111's "Pixel Perfect".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter

from latentgen.errors import UserError, one_of

# A1111's "Crop and Resize" is its default
RESIZE_MODES = {"crop": "Crop and Resize", "resize": "Just Resize", "fill": "Resize and Fill"}


@dataclass(frozen=True)
class Preprocessor:
    run: Callable[[Image.Image, float | None, float | None], Image.Image]
    about: str
    threshold_a: tuple[str, float] | None = None  # (what it is, A1111's default)
    threshold_b: tuple[str, float] | None = None


def _canny(image: Image.Image, low: float | None, high: float | None) -> Image.Image:
    import cv2

    edges = cv2.Canny(np.asarray(image.convert("RGB")), int(low), int(high))  # (H, W) uint8, 255 on edges
    return Image.fromarray(edges).convert("RGB")


def _threshold(image: Image.Image, level: float | None, _) -> Image.Image:
    gray = np.asarray(image.convert("L"))
    return Image.fromarray(np.where(gray > level, 255, 0).astype(np.uint8)).convert("RGB")


def _invert(image: Image.Image, *_) -> Image.Image:
    return Image.fromarray(255 - np.asarray(image.convert("RGB")))


def _blur(image: Image.Image, sigma: float | None, _) -> Image.Image:
    return image.convert("RGB").filter(ImageFilter.GaussianBlur(sigma))


def _tile_resample(image: Image.Image, down: float | None, _) -> Image.Image:
    """The tile ControlNet's input: the image at 1/down of its size, back up (A1111's `tile_resample`)."""
    image = image.convert("RGB")
    if down <= 1.0:
        return image
    small = image.resize((max(1, round(image.width / down)), max(1, round(image.height / down))),
                         Image.Resampling.LANCZOS)
    return small.resize(image.size, Image.Resampling.BICUBIC)


def _shuffle(image: Image.Image, *_) -> Image.Image:
    """The shuffle ControlNet's input: the image's pixels moved along a smooth random flow (controlnet-aux's
    ContentShuffleDetector: a random displacement field, blurred), seeded so the same image gives the same map."""
    import cv2

    pixels = np.asarray(image.convert("RGB"))
    h, w = pixels.shape[:2]
    rng = np.random.default_rng(int(pixels.sum()) % 2**32)
    f = 256
    flow = rng.normal(size=(h, w, 2)).astype(np.float32)
    flow = cv2.GaussianBlur(flow, (0, 0), f / 8) * f
    x, y = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    moved = cv2.remap(pixels, (x + flow[..., 0]).clip(0, w - 1), (y + flow[..., 1]).clip(0, h - 1),
                      cv2.INTER_LINEAR)
    return Image.fromarray(moved)


PREPROCESSORS = {
    "none": Preprocessor(lambda image, *_: image.convert("RGB"), "the image as it is (a map made elsewhere)"),
    "canny": Preprocessor(_canny, "Canny edges (OpenCV), white on black", ("low threshold", 100),
                          ("high threshold", 200)),
    "invert": Preprocessor(_invert, "black lines on white to white on black (A1111's 'invert (from white bg & "
                                    "black line)')"),
    "threshold": Preprocessor(_threshold, "white where the grey level is above the threshold", ("threshold", 127)),
    "blur_gaussian": Preprocessor(_blur, "Gaussian blur", ("sigma", 9.0)),
    "tile_resample": Preprocessor(_tile_resample, "downsampled and back, for tile ControlNets", ("down sampling "
                                                                                                  "rate", 1.0)),
    "shuffle": Preprocessor(_shuffle, "content shuffle, for the shuffle ControlNet"),
    "ip-adapter_clip": Preprocessor(lambda image, *_: image.convert("RGB"), "the image as it is, for an "
                                    "IP-Adapter (its CLIP vision encoder reads it)"),
}
ALIASES = {"invert (from white bg & black line)": "invert", "binary": "threshold", "tile": "tile_resample",
           "ip-adapter_clip_sd15": "ip-adapter_clip", "ip-adapter_clip_sdxl": "ip-adapter_clip",
           "ip-adapter_clip_h": "ip-adapter_clip", "ip-adapter_clip_sdxl_plus_vith": "ip-adapter_clip",
           "ip-adapter-auto": "ip-adapter_clip",
           "blur": "blur_gaussian"}


def module_name(name: str, what: str = "the preprocessor") -> str:
    """A preprocessor's name, A1111's long names and aliases resolved; a one-line error names the valid ones."""
    name = ALIASES.get(name, name)
    if name not in PREPROCESSORS:
        raise one_of(what, name, list(PREPROCESSORS))
    return name


def resize(image: Image.Image, width: int, height: int, mode: str) -> Image.Image:
    """`image` at width × height by A1111's resize mode: "resize" stretches it, "crop" scales it to cover and cuts
    the middle, "fill" scales it to fit and pads the sides with black (A1111 pads with the border's colors)."""
    image = image.convert("RGB")
    if image.size == (width, height):
        return image
    if mode == "resize":
        return image.resize((width, height), Image.Resampling.LANCZOS)
    cover = mode == "crop"
    scale = (max if cover else min)(width / image.width, height / image.height)
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    scaled = image.resize((w, h), Image.Resampling.LANCZOS)
    if cover:
        left, top = (w - width) // 2, (h - height) // 2
        return scaled.crop((left, top, left + width, top + height))
    canvas = Image.new("RGB", (width, height))
    canvas.paste(scaled, ((width - w) // 2, (height - h) // 2))
    return canvas


def prepare(image: Image.Image, width: int, height: int, module: str = "none", resize_mode: str = "crop",
            threshold_a: float | None = None, threshold_b: float | None = None) -> Image.Image:
    """The control image a ControlNet sees: resized by `resize_mode`, then through the preprocessor `module`
    with its thresholds (None: A1111's defaults)."""
    if resize_mode not in RESIZE_MODES:
        raise one_of("the resize mode", resize_mode, list(RESIZE_MODES))
    p = PREPROCESSORS[module_name(module)]
    a = threshold_a if threshold_a is not None else (p.threshold_a[1] if p.threshold_a else None)
    b = threshold_b if threshold_b is not None else (p.threshold_b[1] if p.threshold_b else None)
    if module == "canny" and not 0 <= a <= b <= 255:
        raise UserError(f"canny's thresholds must satisfy 0 ≤ low ≤ high ≤ 255, got {a:g} and {b:g}")
    return p.run(resize(image, width, height, resize_mode), a, b)


def to_tensor(image: Image.Image):
    """(1, 3, H, W) float32 in [0, 1], as diffusers' ControlNet pipelines give their control images."""
    import torch

    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
