"""Read a shapes image back into words: background color, each shape's color and kind, left to right.

Deterministic and model-free: every pixel is labelled with its nearest palette color; the background is the
most common label on the border; shapes are the connected regions of other labels. A region's kind follows from
how much of its enclosing circle it fills (area / π·r_max², r_max the largest distance from its centroid):
a circle fills all of it, a square 2/π ≈ 0.64, an equilateral triangle 3√3/4π ≈ 0.41; a star (the new kind that
LoRAs teach) is the one with deep notches, convexity (solidity) below 0.8 and nine or more corners. That reading
is lenient:
a square pinched into a four-pointed blob still fills ~0.64 of its circle. The strict reading (`strict_kind`)
asks what a person does: the fill of the minimum-area rotated rectangle, convexity (solidity) and corners,
measured on a sub-pixel outline.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy import ndimage

from latentgen.data.shapes import COLORS
from latentgen.errors import UserError

PALETTE = np.array(list(COLORS.values()), dtype=np.float32)  # (9, 3)
NAMES = list(COLORS)
FILL_CIRCLE, FILL_SQUARE = 0.80, 0.54  # thresholds between circle / square / triangle fill ratios
STAR_SOLIDITY, STAR_CORNERS = 0.80, 9  # below / from: a star (five notches; a square pinched into four has 8)
# The strict reading (`Detected.strict_kind`): (rect fill range, least solidity, corner counts) per kind. On the
# dataset's own images (tests/test_eval.py) squares fill 0.93-0.99 of their rectangle, circles 0.78-0.80 (π/4),
# triangles 0.52-0.57 (1/2 plus rounding), all with solidity ≥ 0.95; a square pinched into a four-pointed star
# fills less and is not convex, a rounded triangle fills more.
# Corners allow rounding (a rounded corner can simplify to two vertices): the fill and convexity decide.
# Stars (STAR_INNER 0.5) fill 0.45-0.52 of their rectangle with solidity 0.65-0.73 and 10-12 corners.
STRICT = {"square": ((0.90, 1.01), (0.93, 1.01), (4, 5, 6)),
          "circle": ((0.74, 0.84), (0.96, 1.01), tuple(range(6, 13))),
          "triangle": ((0.46, 0.62), (0.92, 1.01), (3, 4, 5, 6)),
          "star": ((0.38, 0.60), (0.58, 0.80), tuple(range(9, 14)))}


@dataclass
class Detected:
    color: str
    kind: str
    centroid: tuple[float, float]  # (x, y) pixels
    area: int
    fill: float  # area / area of the enclosing circle
    rect_fill: float = 0.0  # area / area of the minimum-area rotated rectangle
    solidity: float = 0.0  # area / area of the convex hull: 1 for convex shapes, less for pinched sides
    corners: int = 0  # vertices of the outline simplified to within 8% of its size (cv2.approxPolyDP)
    mask: np.ndarray | None = field(default=None, repr=False, compare=False)  # (H, W) bool: its pixels

    @property
    def strict_kind(self) -> str:
        """The kind a person would see: a square only with straight sides and four sharp corners, ...;
        'malformed' when the outline is none of them."""
        for kind, ((low, high), (least, most), corners) in STRICT.items():
            if low <= self.rect_fill <= high and least <= self.solidity <= most and self.corners in corners:
                return kind
        return "malformed"


@dataclass
class Analysis:
    background: str
    shapes: list[Detected] = field(default_factory=list)  # left to right, largest regions only

    def strict(self) -> "Analysis":
        """The same reading with each shape's strict kind."""
        return Analysis(self.background, [dataclasses.replace(s, kind=s.strict_kind) for s in self.shapes])

    def words(self) -> str:
        body = " and ".join(f"{s.color} {s.kind}" for s in self.shapes) or "nothing"
        return f"{body} on {self.background}"


def label_pixels(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) index of the nearest palette color."""
    d = ((image[..., None, :].astype(np.float32) - PALETTE) ** 2).sum(-1)
    return d.argmin(-1)


def _kind(fill: float, solidity: float, corners: int) -> str:
    if solidity < STAR_SOLIDITY and corners >= STAR_CORNERS:
        return "star"
    return "circle" if fill >= FILL_CIRCLE else "square" if fill >= FILL_SQUARE else "triangle"


def outline(arr: np.ndarray, mask: np.ndarray, color: str, background: str, scale: int = 8) -> tuple[float, float, int]:
    """(rect fill, solidity, corners) of a region: what a person checks to call a shape a square, a triangle or a
    circle. Measured on the region's outline at sub-pixel precision: each pixel's share of the shape's color
    against the background's (what anti-aliasing leaves at the edges), upsampled `scale`× bilinearly and cut at
    one half, so that a 10-pixel square still has straight sides and sharp corners."""
    try:
        import cv2
    except ImportError:
        raise UserError("the shapes analyzer needs OpenCV: pip install 'latentgen[eval]'") from None

    c, b = PALETTE[NAMES.index(color)], PALETTE[NAMES.index(background)]
    share = ((arr.astype(np.float32) - b) @ (c - b)) / max(float((c - b) @ (c - b)), 1.0)
    near = ndimage.binary_dilation(mask, iterations=2)
    share = np.where(near, np.clip(share, 0.0, 1.0), 0.0).astype(np.float32)
    big = cv2.resize(share, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR) > 0.5
    contours, _ = cv2.findContours(big.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return 0.0, 0.0, 0
    contour = max(contours, key=cv2.contourArea)
    area = cv2.contourArea(contour)
    (_, _), (w, h), _ = cv2.minAreaRect(contour)
    hull = cv2.contourArea(cv2.convexHull(contour))
    poly = cv2.approxPolyDP(contour, 0.08 * np.sqrt(area), True)
    return area / max(w * h, 1.0), area / max(hull, 1.0), len(poly)


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
        color = NAMES[int(votes.argmax())]
        rect_fill, solidity, corners = outline(arr, mask, color, NAMES[bg])
        found.append(Detected(color, _kind(fill, solidity, corners), (float(cx), float(cy)), area, fill, rect_fill,
                              solidity, corners, mask))
    found = sorted(found, key=lambda s: -s.area)[:max_shapes]
    return Analysis(NAMES[bg], sorted(found, key=lambda s: s.centroid[0]))


def edge_width(image: Image.Image | np.ndarray, max_shapes: int = 2) -> tuple[float, float]:
    """How wide the shapes' edges are, in pixels: the pixels between 10% and 90% of the way from the background's
    color to the shape's (each measured in the image itself), per pixel of outline length; and that outline length.
    A step edge, anti-aliased, is about 1 pixel wide; blur widens it. Returns (0, 0) when no shape stands out."""
    try:
        import cv2
    except ImportError:
        raise UserError("the shapes analyzer needs OpenCV: pip install 'latentgen[eval]'") from None

    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image).astype(np.float32)
    h, w = arr.shape[:2]
    labels = label_pixels(arr)
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    bg = int(np.bincount(border, minlength=len(NAMES)).argmax())
    b = np.median(np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]]), axis=0)
    regions, n = ndimage.label(labels != bg)
    sizes = ndimage.sum(np.ones_like(regions), regions, range(1, n + 1)) if n else np.zeros(0)
    transition, length = 0.0, 0.0
    for r in np.argsort(-sizes)[:max_shapes] + 1:
        mask = regions == r
        if mask.sum() < max(6, 0.003 * h * w):
            continue
        core = ndimage.binary_erosion(mask, iterations=2)
        c = np.median(arr[core if core.any() else mask], axis=0)
        if np.linalg.norm(c - b) < 60:  # too little contrast to see an edge
            continue
        share = ((arr - b) @ (c - b)) / float((c - b) @ (c - b))
        band = ndimage.binary_dilation(mask, iterations=3) & ~ndimage.binary_erosion(mask, iterations=3)
        transition += float((band & (share > 0.1) & (share < 0.9)).sum())
        scale = 8
        big = cv2.resize(np.where(band | mask, share, 0).astype(np.float32), None, fx=scale, fy=scale,
                         interpolation=cv2.INTER_LINEAR) > 0.5
        contours, _ = cv2.findContours(big.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        length += sum(cv2.arcLength(k, True) for k in contours) / scale
    return (transition / length if length else 0.0), length
