"""Aspect-ratio buckets, as kohya's sd-scripts makes them (`library/model_util.make_bucket_resolutions` and its
`BucketManager`): instead of cropping every image to a square, each goes to the bucket (a width × height of about
`resolution²` pixels, both sides multiples of `step`) nearest its aspect ratio, is scaled to cover it and cropped
by what the table's granularity leaves, and every batch holds images of one bucket. datasets and diffusers have
no bucketing.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

# SDXL's size conditioning of a training image, as diffusers' and sd-scripts' SDXL trainers take it from the data:
# the original (height, width) and the crop's top-left corner (top, left) in the resized image; the target size is
# the crop's own
Sizes = tuple[int, int, int, int]


def bucket_sizes(resolution: int, min_side: int, max_side: int, step: int) -> list[tuple[int, int]]:
    """(width, height) of every bucket: kohya's set (for SD 1.5: 512², 256 ≤ sides ≤ 1024, step 64), the square
    of about `resolution²` pixels and, for each width from `min_side` to `max_side`, the tallest height within
    the pixel budget, in both orientations."""
    area = resolution * resolution
    side = math.isqrt(area) // step * step
    sizes = {(side, side)}
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, area // width // step * step)
        if height >= min_side:
            sizes |= {(width, height), (height, width)}
    return sorted(sizes)


def nearest(size: tuple[int, int], buckets: list[tuple[int, int]]) -> int:
    """The index of the bucket whose aspect ratio is nearest the image's (w, h), on a log scale (so that 2:1 and
    1:2 are equally far from 1:1; kohya compares plain ratios)."""
    w, h = size
    return int(np.argmin([abs(math.log((bw / bh) / (w / h))) for bw, bh in buckets]))


def fit(image: Image.Image, bucket: tuple[int, int], rng: np.random.Generator, random_crop: bool,
        hflip: float = 0.0) -> tuple[Image.Image, Sizes]:
    """`image` scaled to cover `bucket` (keeping its aspect ratio), cropped to it (in the middle or at random) and
    flipped with probability `hflip`; with its SDXL size conditioning (`Sizes`)."""
    bw, bh = bucket
    w, h = image.size
    scale = max(bw / w, bh / h)
    nw, nh = max(bw, round(w * scale)), max(bh, round(h * scale))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=None)
    if random_crop:
        left, top = int(rng.integers(nw - bw + 1)), int(rng.integers(nh - bh + 1))
    else:
        left, top = (nw - bw) // 2, (nh - bh) // 2
    image = image.crop((left, top, left + bw, top + bh))
    if hflip and rng.random() < hflip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = nw - bw - left  # the crop's corner in the flipped image
    return image, (h, w, top, left)
