"""Read a shapes image back into words: background color, each shape's color and kind, left to right.

Deterministic and model-free: every pixel is labelled with its nearest palette color; the background is the
most common label on the border; shapes are the connected regions of other labels. A region's kind follows from
how much of its enclosing circle it fills (area / π·r_max², r_max the largest distance from its centroid):
a circle fills all of it, a square 2/π ≈ 0.64, an equilateral triangle 3√3/4π ≈ 0.41.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy import ndimage

from ..data.shapes import COLORS

PALETTE = np.array(list(COLORS.values()), dtype=np.float32)  # (9, 3)
NAMES = list(COLORS)
FILL_CIRCLE, FILL_SQUARE = 0.80, 0.54  # thresholds between circle / square / triangle fill ratios


@dataclass
class Detected:
    color: str
    kind: str
    centroid: tuple[float, float]  # (x, y) pixels
    area: int
    fill: float  # area / area of the enclosing circle


@dataclass
class Analysis:
    background: str
    shapes: list[Detected] = field(default_factory=list)  # left to right, largest regions only

    def words(self) -> str:
        body = " and ".join(f"{s.color} {s.kind}" for s in self.shapes) or "nothing"
        return f"{body} on {self.background}"


def label_pixels(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) index of the nearest palette color."""
    d = ((image[..., None, :].astype(np.float32) - PALETTE) ** 2).sum(-1)
    return d.argmin(-1)


def _kind(fill: float) -> str:
    return "circle" if fill >= FILL_CIRCLE else "square" if fill >= FILL_SQUARE else "triangle"


def analyze(image: Image.Image | np.ndarray, max_shapes: int = 2) -> Analysis:
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    h, w = arr.shape[:2]
    labels = label_pixels(arr)
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    bg = int(np.bincount(border, minlength=len(NAMES)).argmax())
    # Edge pixels blend a shape with the background; only count pixels close to a palette color.
    d_best = np.sqrt(((arr.astype(np.float32) - PALETTE[labels]) ** 2).sum(-1))
    foreground = labels != bg
    regions, n = ndimage.label(foreground)
    min_area = max(6, int(0.003 * h * w))
    found = []
    for r in range(1, n + 1):
        mask = regions == r
        area = int(mask.sum())
        if area < min_area:
            continue
        ys, xs = np.nonzero(mask)
        cx, cy = xs.mean(), ys.mean()
        r_max = np.sqrt((xs - cx) ** 2 + (ys - cy) ** 2).max() + 0.5  # pixel centers -> pixel edges
        fill = float(area / (np.pi * r_max**2))
        core = mask & (d_best < 60)
        votes = np.bincount(labels[core if core.any() else mask], minlength=len(NAMES))
        votes[bg] = 0
        found.append(Detected(NAMES[int(votes.argmax())], _kind(fill), (float(cx), float(cy)), area, fill))
    found = sorted(found, key=lambda s: -s.area)[:max_shapes]
    return Analysis(NAMES[bg], sorted(found, key=lambda s: s.centroid[0]))
