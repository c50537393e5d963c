"""Prompt adherence: generate for a prompt set with known answers, read each image back, score per attribute."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field

from latentgen.data.shapes import (
    COLOR_NAMES,
    KINDS,
    ZH_ONE,
    ZH_TWO,
    heldout_triples,
    is_heldout,
    pair_prompt,
    single_prompt,
    train_triples,
    zh_prompt,
)
from latentgen.eval.analyzer import Analysis, analyze


@dataclass(frozen=True)
class Target:
    """What a prompt asks for: shapes (color, kind) left to right on a background."""

    prompt: str
    background: str
    shapes: tuple[tuple[str, str], ...]
    heldout: bool  # some (color, kind, background) of it never occurs in the train split

    @property
    def group(self) -> str:
        return f"{'two' if len(self.shapes) == 2 else 'one'}-{'heldout' if self.heldout else 'seen'}"


# Chinese phrasings: the dataset's own; ones no training caption used, by word order, 的/在/上 and the like, and the
# dataset's phrasing in traditional characters ("unseen", what #50's target is on); and ones with words the student
# never read in a caption (位于, 右侧, 画, 有个: "new-words", for the record), for `python -m latentgen.eval adherence
# --language zh --phrasing ...`
ZH_PHRASINGS = {
    "dataset": ((ZH_ONE[0],), (ZH_TWO[0],)),
    "unseen": (("{c}的{k}，背景是{b}", "在{b}的背景上，一个{c}的{k}", "{c}{k}在{b}背景上", "traditional"),
               ("左边一个{c1}{k1}，右边一个{c2}{k2}，{b}背景", "{c1}{k1}在左边，{c2}{k2}在右边，背景是{b}",
                "traditional")),
    "new-words": (("画一个{c}{k}，{b}的背景", "{b}背景中有个{c}{k}"),
                  ("{b}背景中，{c2}{k2}位于{c1}{k1}的右侧", "{c1}{k1}位于左侧，{c2}{k2}位于右侧，{b}底")),
}


def in_chinese(targets: list[Target], phrasing: str = "dataset") -> list[Target]:
    """The targets with Chinese prompts, the phrasings taken in turn ("traditional": the dataset's phrasing in
    traditional characters, by OpenCC's tables)."""
    one, two = ZH_PHRASINGS[phrasing]
    out = []
    for i, t in enumerate(targets):
        templates = one if len(t.shapes) == 1 else two
        template = templates[i % len(templates)]
        if template == "traditional":
            from opencc import OpenCC

            text = OpenCC("s2t").convert(zh_prompt((ZH_ONE if len(t.shapes) == 1 else ZH_TWO)[0], t.background,
                                                   t.shapes))
        else:
            text = zh_prompt(template, t.background, t.shapes)
        out.append(dataclasses.replace(t, prompt=text))
    return out


def prompt_set(per_group: int = 27, seed: int = 0, kinds: tuple[str, ...] = KINDS) -> list[Target]:
    """Single-shape prompts (held-out triples, up to `per_group`, and as many seen ones) and two-shape prompts, of
    shapes of `kinds` (the default dataset's; ("star",) asks for what a LoRA taught)."""
    rng = random.Random(seed)
    held = heldout_triples(kinds)
    seen = train_triples(kinds)
    targets = [Target(single_prompt(c, k, b), b, ((c, k),), True) for c, k, b in held[:per_group]]
    targets += [Target(single_prompt(c, k, b), b, ((c, k),), False)
                for c, k, b in rng.sample(seen, min(per_group, len(seen)))]
    for want_heldout in (False, True):
        made = 0
        while made < per_group:
            b = rng.choice(COLOR_NAMES)
            shapes = tuple((rng.choice([c for c in COLOR_NAMES if c != b]), rng.choice(kinds)) for _ in range(2))
            heldout = any(is_heldout(c, k, b) for c, k in shapes)
            if heldout == want_heldout:
                targets.append(Target(pair_prompt(shapes[0], shapes[1], b), b, shapes, heldout))
                made += 1
    return targets


@dataclass
class Scores:
    """Per-attribute accuracies over a group of images."""

    counts: dict[str, int] = field(default_factory=dict)
    total: int = 0

    def add(self, **hits: bool) -> None:
        self.total += 1
        for k, v in hits.items():
            self.counts[k] = self.counts.get(k, 0) + int(bool(v))

    def rates(self) -> dict[str, float]:
        return {k: v / self.total for k, v in self.counts.items()} if self.total else {}


def score(target: Target, analysis: Analysis) -> dict[str, bool]:
    """Which attributes of `target` the image got right."""
    bg = analysis.background == target.background
    if len(target.shapes) == 1:
        (color, kind), = target.shapes
        main = max(analysis.shapes, key=lambda s: s.area) if analysis.shapes else None
        shape = main is not None and main.kind == kind
        shape_color = main is not None and main.color == color
        return {"background": bg, "shape": shape, "shape_color": shape_color, "all": bg and shape and shape_color}
    found = analysis.shapes
    count = len(found) == 2
    wanted = set(target.shapes)
    got = {(s.color, s.kind) for s in found}
    both = count and got == wanted  # both shapes present with the right color and kind (binding)
    colors = count and sorted(s.color for s in found) == sorted(c for c, _ in target.shapes)
    kinds = count and sorted(s.kind for s in found) == sorted(k for _, k in target.shapes)
    relation = count and tuple((s.color, s.kind) for s in found) == target.shapes
    return {"background": bg, "two_shapes": count, "colors": colors, "kinds": kinds, "binding": both,
            "relation": relation, "all": bg and relation}


def strict_score(target: Target, analysis: Analysis) -> dict[str, bool]:
    """`score` with the strict shape reading (rectangle fill, convexity, corners), as `strict_*` attributes."""
    got = score(target, analysis.strict())
    keys = ("shape", "all") if len(target.shapes) == 1 else ("kinds", "binding", "relation", "all")
    return {f"strict_{k}": got[k] for k in keys}


def evaluate_images(targets: list[Target], images: list) -> dict[str, dict]:
    """{group: {attribute: accuracy, "n": images}} for images generated from `targets` (in order): the lenient
    reading and the strict one (`strict_*`). One-shape groups also give "by_kind": {kind: {"strict_shape": accuracy,
    "n": images}}, which kinds the strict reading fails."""
    groups: dict[str, Scores] = {}
    kinds: dict[str, dict[str, Scores]] = {}
    for target, image in zip(targets, images):
        analysis = analyze(image)
        strict = strict_score(target, analysis)
        groups.setdefault(target.group, Scores()).add(**score(target, analysis), **strict)
        if len(target.shapes) == 1:
            kind = target.shapes[0][1]
            kinds.setdefault(target.group, {}).setdefault(kind, Scores()).add(strict_shape=strict["strict_shape"])
    out = {g: s.rates() | {"n": s.total} for g, s in sorted(groups.items())}
    for g, per_kind in kinds.items():
        out[g]["by_kind"] = {k: s.rates() | {"n": s.total} for k, s in sorted(per_kind.items())}
    return out
