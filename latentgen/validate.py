"""The one check of each kind of generation input, shared by infer.py (before a model loads), the Python API
(`Request.check`) and the evaluation: a value that passes here cannot fail deeper down."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from latentgen.errors import UserError

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit integer


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def guidance(value, what: str = "guidance") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise UserError(f"{what} must be a finite number ≥ 0, got {value!r}")
    return float(value)


def steps(value, limit: int | None = None, what: str = "steps") -> int:
    """Sampling steps: ≥ 1, and at most the model's number of training noise levels when known (a sampler cannot
    take more distinct steps than the levels the model was trained on)."""
    if not _is_int(value) or value < 1 or (limit is not None and value > limit):
        bound = f"in [1, {limit}] (the model was trained on {limit} noise levels)" if limit else "≥ 1"
        raise UserError(f"{what} must be an integer {bound}, got {value!r}")
    return value


def random_seed() -> int:
    """A seed for a run given none: below 2**32, as AUTOMATIC1111 draws it, so the seeds of the run's images
    (seed + k) stay far below MAX_SEED. From the OS's entropy, not `random`'s state, which a library may have
    seeded."""
    import random

    return random.SystemRandom().randrange(2**32)


def seeds(value, count: int, what: str = "seed") -> list[int]:
    """One valid torch seed for each of `count` images: `value` is the first (image k gets value + k) or a list
    of one per image."""
    if isinstance(value, (list, tuple)):
        if len(value) != count or not all(_is_int(s) and 0 <= s <= MAX_SEED for s in value):
            raise UserError(f"{what} must be an integer in [0, {MAX_SEED}] or a list of {count} of them (one per "
                            "image)")
        return list(value)
    if not _is_int(value) or value < 0 or value + count - 1 > MAX_SEED:
        raise UserError(f"{what} must be an integer in [0, {MAX_SEED - count + 1}] for {count} image(s), "
                        f"got {value!r}")
    return [value + k for k in range(count)]


MAX_SIDE = 16384  # pixels: a seed-resize size beyond any model's (its noise is drawn at that size)


def size(value, what: str) -> tuple[int, int]:
    """A (width, height) in pixels, each a whole number in [1, MAX_SIDE]."""
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_int(v) and 1 <= v <= MAX_SIDE
                                                                          for v in value)):
        raise UserError(f"{what} must be a width and a height in pixels, each in [1, {MAX_SIDE}], got {value!r}")
    return int(value[0]), int(value[1])


def size_text(text: str, what: str) -> tuple[int, int]:
    """'WIDTHxHEIGHT' (as A1111's infotext writes a size, e.g. '512x768') as a checked (width, height)."""
    parts = str(text).lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise UserError(f"{what} must be WIDTHxHEIGHT in pixels (e.g. 512x768), got {text!r}")
    return size((int(parts[0]), int(parts[1])), what)


def in_range(value, what: str, low: float, high: float, low_open: bool = False, high_open: bool = False) -> float:
    """A finite number in [low, high], or (low, ...) / (..., high) where open."""
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and (value > low if low_open else value >= low) and (value < high if high_open else value <= high))
    if not ok:
        raise UserError(f"{what} must be in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}, "
                        f"got {value!r}")
    return float(value)


def count(value, what: str) -> int:
    if not _is_int(value) or value < 1:
        raise UserError(f"{what} must be ≥ 1 (a whole number), got {value!r}")
    return value


def settings(cls, value, what: str, names: Mapping[str, str] | None = None):
    """A settings dataclass (`Apg`, `Hires`, `Upscale`) given as itself or as a mapping of its fields (a request's
    JSON, a model's `model_index.json`), checked by its own `check(names)` (`names`: what a surface calls its
    fields)."""
    if isinstance(value, cls):
        return value.check(names)
    fields = dataclasses.fields(cls)
    known = [f.name for f in fields]
    required = {f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    if not isinstance(value, Mapping) or set(value) - set(known) or required - set(value):
        need = f" ({', '.join(sorted(required))} required)" if required else ""
        raise UserError(f"{what} settings are {', '.join(known)}{need}; got {value!r}")
    return cls(**value).check(names)
