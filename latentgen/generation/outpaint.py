"""Outpainting on top of inpainting: the init image's canvas extended on any side, the new area filled (A1111's
"outpainting mk2" fills it with noise of the image's own colors; also the edge pixels stretched, or the mean
color), masked white with a blurred edge, inpainted, and the original pixels put back where the mask is black (as
A1111's overlay does), so they come out as they went in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from latentgen.errors import UserError, one_of
from latentgen.generation.options import option, table

FILLS = ("noise", "edge", "mean")
SIDES = ("left", "right", "top", "bottom")


@dataclass(frozen=True)
class Outpaint:
    sides: str = field(default="0", metadata=option(
        "outpaint", flag="--outpaint", text="Outpaint", always=True, cli={"metavar": "SIDE=PX,..."},
        help="extend --image's canvas and paint the new area: 'right=64', 'left=32,top=32', or '64' for every side"))
    fill: str = field(default="noise", metadata=option(
        "outpaint fill", flag="--outpaint-fill", text="Outpaint fill", always=True, cli={"choices": list(FILLS)},
        help="what the new area starts as: noise of the image's colors (A1111's outpainting mk2), the edge pixels "
             "stretched, or the mean color"))
    blur: int = field(default=8, metadata=option(
        "outpaint mask blur", flag="--outpaint-blur", text="Mask blur", always=True,
        help="the new area blends into the original over this many pixels (A1111's mask blur)"))

    def check(self, names: Mapping[str, str] | None = None) -> "Outpaint":
        name = {f.name: opt.label for f, opt in table(Outpaint)} | dict(names or {})
        self.amounts(name["sides"])
        if self.fill not in FILLS:
            raise one_of(name["fill"], self.fill, list(FILLS))
        if isinstance(self.blur, bool) or not isinstance(self.blur, int) or not 0 <= self.blur <= 64:
            raise UserError(f"{name['blur']} must be a whole number of pixels in [0, 64], got {self.blur!r}")
        return self

    def amounts(self, what: str = "outpaint") -> dict[str, int]:
        """Pixels added on each side."""
        text = str(self.sides).strip()
        if re.fullmatch(r"\d+", text):
            return dict.fromkeys(SIDES, int(text))
        out = dict.fromkeys(SIDES, 0)
        for item in filter(None, (p.strip() for p in text.split(","))):
            side, _, px = item.partition("=")
            if side.strip() not in SIDES or not px.strip().isdigit():
                raise UserError(f"{what} takes SIDE=PIXELS for sides {', '.join(SIDES)} (e.g. right=64,top=32) or "
                                f"one number for every side, got {self.sides!r}")
            out[side.strip()] = int(px)
        if not any(out.values()):
            raise UserError(f"{what} adds no pixels ({self.sides!r}); give a side and a number, e.g. right=64")
        return out

    def canvas(self, image, multiple: int):
        """(the extended canvas, the mask: white where painted, with its blurred edge, the overlay's alpha: the
        same mask, 1 where the result is kept), as PIL images; the canvas's sides rounded up to `multiple`."""
        from PIL import Image

        image = image.convert("RGB")
        a = self.amounts()
        w, h = image.width + a["left"] + a["right"], image.height + a["top"] + a["bottom"]
        extra_w, extra_h = -w % multiple, -h % multiple  # to the VAE's size: added on the right and bottom
        w, h = w + extra_w, h + extra_h
        pixels = np.asarray(image, dtype=np.float32)
        box = (a["left"], a["top"], a["left"] + image.width, a["top"] + image.height)
        if self.fill == "edge":
            padded = np.pad(pixels, ((a["top"], a["bottom"] + extra_h), (a["left"], a["right"] + extra_w), (0, 0)),
                            mode="edge")
        else:
            mean, std = pixels.reshape(-1, 3).mean(0), pixels.reshape(-1, 3).std(0)
            rng = np.random.default_rng(0)  # the fill is part of the request: the same every time
            noise = rng.standard_normal((h, w, 3)) * std if self.fill == "noise" else 0.0
            padded = np.clip(mean + noise, 0, 255) * np.ones((h, w, 3))
            padded[box[1]:box[3], box[0]:box[2]] = pixels
        canvas = Image.fromarray(padded.round().astype(np.uint8))
        # the mask: 1 on the new area, falling linearly to 0 over `blur` px into the original from each side that
        # grew, 0 beyond (where the overlay keeps the original exactly)
        alpha = np.ones((h, w), dtype=np.float32)
        x0, y0, x1, y1 = box
        inside = np.zeros((y1 - y0, x1 - x0), dtype=np.float32)
        if self.blur:
            ys, xs = np.mgrid[0:y1 - y0, 0:x1 - x0].astype(np.float32)
            reach = {"left": xs, "right": (x1 - x0 - 1) - xs, "top": ys, "bottom": (y1 - y0 - 1) - ys}
            for side, distance in reach.items():
                grew = a[side] > 0 or (side == "right" and extra_w) or (side == "bottom" and extra_h)
                if grew:
                    inside = np.maximum(inside, np.clip(1 - (distance + 0.5) / self.blur, 0, 1))
        alpha[y0:y1, x0:x1] = inside
        return canvas, Image.fromarray((alpha * 255).round().astype(np.uint8))
