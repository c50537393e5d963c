"""A procedural, captioned dataset of colored shapes: deterministic, any resolution, ground truth kept.

Each sample is one or two shapes (circle, square, triangle; and, when asked for, the five-pointed star that the
default model never saw, for LoRAs to learn) of a CSS named color on a plain background of another color,
randomly placed, sized and rotated, with a caption that names every shape's color and kind, the
background color and, for two shapes, which is left of which. Sample `i` of a given seed is always the same.

Held-out split: the (shape color, shape kind, background color) triples for which
`(color + 3·kind + 5·background) mod 9 == 4` (indices into COLORS and KINDS) never occur in the train split.
Each of them still has every pair of its parts in training (each color-kind pair is held out with at most one
background, and so on), so the held-out split measures compositional generalization: the model has seen red,
triangles and blue backgrounds, but never a red triangle on blue. `heldout_triples()` lists them.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

from latentgen.errors import UserError, one_of

# CSS named colors
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0), "green": (0, 128, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
    "orange": (255, 165, 0), "purple": (128, 0, 128), "white": (255, 255, 255), "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
KINDS = ("circle", "square", "triangle")  # the default dataset's
NEW_KINDS = ("star",)  # drawn only when a spec asks for them (`ShapesSpec.kinds`): concepts for LoRAs to teach
ALL_KINDS = KINDS + NEW_KINDS
STAR_INNER = 0.5  # a star's inner radius / its outer radius: fat enough to stay a star at 64 px
COLOR_NAMES = tuple(COLORS)
SPLITS = ("train", "heldout")
LANGUAGES = ("en", "zh", "both")

ZH_COLORS = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "orange": "橙色", "purple": "紫色",
             "white": "白色", "black": "黑色", "gray": "灰色"}
ZH_KINDS = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "star": "五角星"}

SUPERSAMPLE = 4  # draw at 4× and box-filter down: anti-aliased edges


def is_heldout(color: str, kind: str, background: str) -> bool:
    c, k, b = COLOR_NAMES.index(color), ALL_KINDS.index(kind), COLOR_NAMES.index(background)
    return (c + 3 * k + 5 * b) % 9 == 4


def heldout_triples(kinds: tuple[str, ...] = KINDS) -> list[tuple[str, str, str]]:
    """Every (color, kind, background) combination that the train split never shows."""
    return [(c, k, b) for c in COLOR_NAMES for k in kinds for b in COLOR_NAMES
            if c != b and is_heldout(c, k, b)]


def train_triples(kinds: tuple[str, ...] = KINDS) -> list[tuple[str, str, str]]:
    return [(c, k, b) for c in COLOR_NAMES for k in kinds for b in COLOR_NAMES
            if c != b and not is_heldout(c, k, b)]


@dataclass
class Shape:
    kind: str
    color: str
    center: tuple[float, float]  # pixels, (x, y)
    radius: float  # circumradius in pixels
    rotation: float  # degrees
    box: tuple[int, int, int, int] = (0, 0, 0, 0)  # (x0, y0, x1, y1), exclusive end, in pixels

    def polygon(self, scale: float = 1.0) -> list[tuple[float, float]]:
        sides = {"square": 4, "triangle": 3, "star": 10}[self.kind]
        cx, cy, r = self.center[0] * scale, self.center[1] * scale, self.radius * scale
        radii = [r, r * STAR_INNER] * 5 if self.kind == "star" else [r] * sides  # a star: points and notches
        start = math.radians(self.rotation) - math.pi / 2  # a vertex points up at rotation 0
        return [(cx + radii[i] * math.cos(start + 2 * math.pi * i / sides),
                 cy + radii[i] * math.sin(start + 2 * math.pi * i / sides)) for i in range(sides)]


@dataclass
class ShapesSample:
    index: int
    split: str
    background: str
    shapes: list[Shape]  # left to right
    resolution: int
    captions: list[str] = field(default_factory=list)  # every phrasing; `text` is the one drawn for this sample
    text: str = ""

    def truth(self) -> dict:
        """The ground truth as plain JSON-able values (what metadata.jsonl keeps)."""
        return {"index": self.index, "split": self.split, "background": self.background,
                "shapes": [asdict(s) for s in self.shapes], "resolution": self.resolution}

    def render(self, layout: bool = False) -> Image.Image:
        """The image; with `layout`, its layout map instead: each shape's silhouette white on black, what the
        default model's ControlNet takes (where each shape goes and what outline it has, not its color)."""
        s = SUPERSAMPLE
        canvas = Image.new("RGB", (self.resolution * s, self.resolution * s),
                           (0, 0, 0) if layout else COLORS[self.background])
        draw = ImageDraw.Draw(canvas)
        for shape in self.shapes:
            fill = (255, 255, 255) if layout else COLORS[shape.color]
            if shape.kind == "circle":
                cx, cy, r = shape.center[0] * s, shape.center[1] * s, shape.radius * s
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
            else:
                draw.polygon(shape.polygon(s), fill=fill)
        return canvas.resize((self.resolution, self.resolution), Image.Resampling.BOX)


# ----------------------------------------------------------------------------------------------------------------
# Captions

EN_ONE = ("a {c} {k} on a {b} background", "a {c} {k} against a {b} background", "{c} {k}, {b} background",
          "a {b} background with a {c} {k}", "a picture of a {c} {k} on {b}")
EN_TWO = ("a {c1} {k1} to the left of a {c2} {k2} on a {b} background",
          "a {c2} {k2} to the right of a {c1} {k1} on a {b} background",
          "on a {b} background, a {c1} {k1} left of a {c2} {k2}")
ZH_ONE = ("{b}背景上的{c}{k}", "{b}背景，一个{c}{k}")
ZH_TWO = ("{b}背景上，{c1}{k1}在{c2}{k2}的左边", "{b}背景上，{c2}{k2}在{c1}{k1}的右边")


# The canonical English phrasings: what the evaluation's prompts say, and what a Chinese student is taught to mean
# (`latentgen.training.text_student`)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def single_prompt(color: str, kind: str, background: str) -> str:
    return f"{_article(color)} {color} {kind} on {_article(background)} {background} background"


def pair_prompt(left: tuple[str, str], right: tuple[str, str], background: str) -> str:
    return (f"{_article(left[0])} {left[0]} {left[1]} to the left of {_article(right[0])} {right[0]} {right[1]} "
            f"on {_article(background)} {background} background")


def zh_prompt(template: str, background: str, shapes, short_color: bool = False, short_kind: bool = False) -> str:
    """A Chinese phrasing of a scene (`shapes`: (color, kind) pairs, left to right) by a template with {b} and {c}
    {k} (one shape) or {c1} {k1} {c2} {k2}; `short_color`: 红 for 红色, `short_kind`: 圆 for 圆形."""
    color = lambda c: ZH_COLORS[c][:-1] if short_color else ZH_COLORS[c]  # noqa: E731
    kind = lambda k: ZH_KINDS[k][:-1] if short_kind and ZH_KINDS[k].endswith("形") else ZH_KINDS[k]  # noqa: E731
    names = {"b": color(background)}
    for i, (c, k) in enumerate(shapes, 1):
        suffix = "" if len(shapes) == 1 else str(i)
        names |= {f"c{suffix}": color(c), f"k{suffix}": kind(k)}
    return template.format(**names)


def captions_for(background: str, shapes: list[Shape], language: str) -> list[str]:
    """Every phrasing of a sample's caption (`shapes` ordered left to right)."""
    out = []
    for lang in (("en", "zh") if language == "both" else (language,)):
        if lang == "en":
            names = lambda s: (s.color, s.kind)  # noqa: E731
            b, one, two = background, EN_ONE, EN_TWO
        else:
            names = lambda s: (ZH_COLORS[s.color], ZH_KINDS[s.kind])  # noqa: E731
            b, one, two = ZH_COLORS[background], ZH_ONE, ZH_TWO
        if len(shapes) == 1:
            c, k = names(shapes[0])
            texts = [t.format(c=c, k=k, b=b) for t in one]
        else:
            (c1, k1), (c2, k2) = names(shapes[0]), names(shapes[1])
            texts = [t.format(c1=c1, k1=k1, c2=c2, k2=k2, b=b) for t in two]
        out += [re.sub(r"\ba (?=[aeiou])", "an ", t) for t in texts] if lang == "en" else texts
    return out


# ----------------------------------------------------------------------------------------------------------------
# Sampling


@dataclass(frozen=True)
class ShapesSpec:
    """What a shapes dataset draws from."""

    split: str = "train"
    resolution: int = 64
    seed: int = 0
    max_shapes: int = 2
    two_shape_fraction: float = 0.3
    language: str = "en"
    kinds: tuple[str, ...] = KINDS  # the shape kinds drawn (ALL_KINDS has the new ones)
    # how often each of `kinds` is drawn, relatively, in the train split; empty: every (color, kind) alike
    kind_weights: tuple[float, ...] = ()

    def check(self) -> "ShapesSpec":
        if self.split not in SPLITS:
            raise one_of("shapes split", self.split, list(SPLITS))
        if self.language not in LANGUAGES:
            raise one_of("caption language", self.language, list(LANGUAGES))
        if not isinstance(self.resolution, int) or self.resolution < 16:
            raise UserError(f"shapes resolution must be an integer ≥ 16, got {self.resolution!r}")
        if self.max_shapes not in (1, 2):
            raise UserError(f"max_shapes must be 1 or 2, got {self.max_shapes!r}")
        if not 0.0 <= self.two_shape_fraction <= 1.0:
            raise UserError(f"two_shape_fraction must be in [0, 1], got {self.two_shape_fraction!r}")
        for kind in self.kinds:
            if kind not in ALL_KINDS:
                raise one_of("shape kind", kind, list(ALL_KINDS))
        if not self.kinds:
            raise UserError(f"kinds is empty; give some of {', '.join(ALL_KINDS)}")
        if self.kind_weights and (len(self.kind_weights) != len(self.kinds) or min(self.kind_weights) < 0
                                  or not sum(self.kind_weights) > 0):
            raise UserError(f"kind_weights must be {len(self.kinds)} numbers ≥ 0 (one per kind: "
                            f"{', '.join(self.kinds)}), not all 0; got {list(self.kind_weights)}")
        return self


def _rng(spec: ShapesSpec, index: int) -> np.random.Generator:
    # One stream per (seed, split, index): sample i never depends on how many others were drawn.
    return np.random.default_rng([spec.seed, SPLITS.index(spec.split), index])


def _place(rng: np.random.Generator, spec: ShapesSpec, count: int) -> list[tuple[tuple[float, float], float]]:
    """Centers and circumradii: one shape anywhere; two shapes in the left and right halves, never touching."""
    res = spec.resolution
    if count == 1:
        r = rng.uniform(0.14, 0.26) * res
        return [((rng.uniform(r, res - r), rng.uniform(r, res - r)), r)]
    placed = []
    for half in (0, 1):
        r = rng.uniform(0.11, 0.17) * res
        lo, hi = half * res / 2 + r + 0.02 * res, (half + 1) * res / 2 - r - 0.02 * res
        placed.append(((rng.uniform(lo, hi), rng.uniform(r, res - r)), r))
    return placed


def _box(center: tuple[float, float], radius: float, res: int) -> tuple[int, int, int, int]:
    x, y = center
    return (max(0, math.floor(x - radius)), max(0, math.floor(y - radius)),
            min(res, math.ceil(x + radius)), min(res, math.ceil(y + radius)))


def _pick(rng: np.random.Generator, options: list) -> object:
    return options[int(rng.integers(len(options)))]


def make_sample(spec: ShapesSpec, index: int) -> ShapesSample:
    """Sample `index` of the dataset `spec`: always the same sample for the same arguments."""
    rng = _rng(spec, index)
    count = 2 if spec.max_shapes == 2 and rng.random() < spec.two_shape_fraction else 1
    if spec.split == "train":
        # a background, then each shape's (color, kind) among the train triples with that background
        background = _pick(rng, list(COLOR_NAMES))
        allowed = [(c, k) for c, k, b in train_triples(tuple(spec.kinds)) if b == background]
        if spec.kind_weights:
            weight = dict(zip(spec.kinds, spec.kind_weights))
            p = np.array([weight[k] for _, k in allowed])
            parts = [allowed[i] for i in rng.choice(len(allowed), size=count, p=p / p.sum())]
        else:
            parts = [_pick(rng, allowed) for _ in range(count)]
    else:
        # at least one held-out triple; a second shape may be anything on that background
        c, k, background = _pick(rng, heldout_triples(tuple(spec.kinds)))
        others = [(c2, k2) for c2 in COLOR_NAMES for k2 in spec.kinds if c2 != background]
        parts = [(c, k)] + [_pick(rng, others) for _ in range(count - 1)]
        if count == 2 and rng.random() < 0.5:
            parts.reverse()
    shapes = []
    for (color, kind), (center, radius) in zip(parts, _place(rng, spec, count)):
        rotation = float(rng.uniform(0, 360)) if kind != "circle" else 0.0
        shapes.append(Shape(kind, color, (float(center[0]), float(center[1])), float(radius), rotation,
                            _box(center, radius, spec.resolution)))
    captions = captions_for(background, shapes, spec.language)
    return ShapesSample(index, spec.split, background, shapes, spec.resolution, captions,
                        captions[int(rng.integers(len(captions)))])


def iter_samples(spec: ShapesSpec, count: int, start: int = 0) -> Iterator[ShapesSample]:
    for i in range(start, start + count):
        yield make_sample(spec, i)
