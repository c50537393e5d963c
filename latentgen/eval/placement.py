"""Placement with a layout ControlNet: does each shape land where its silhouette was drawn, with the prompt's color
and kind? `python -m latentgen.eval control --controlnet FOLDER`.

Held-out samples of the shapes dataset give the prompts (canonical English phrasing), the layout maps (each
shape's silhouette, white on black) and the regions to compare with. Each image is read back by the analyzer; the
strict scores are the adherence eval's (shape, color, background; binding and left/right relation for two shapes),
and placement is, per drawn shape, the IoU of the detected region nearest to it with its silhouette and the
distance between their centres. Images made from the same prompts and seeds without the control give the base
model's figures beside them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from latentgen.data.shapes import ShapesSpec, make_sample, pair_prompt, single_prompt
from latentgen.eval.adherence import Target, evaluate_images
from latentgen.eval.analyzer import analyze
from latentgen.generation.control import Control

IOU_GOOD = 0.8  # #46's bar: placement IoU ≥ 0.8


@dataclass
class LayoutTarget:
    target: Target
    layout: Image.Image  # white silhouettes on black
    regions: list[np.ndarray]  # (H, W) bool per shape, left to right


def layout_targets(count: int, resolution: int = 64, seed: int = 7) -> list[LayoutTarget]:
    """`count` held-out samples, half with one shape and half with two (their shapes' silhouettes as regions)."""
    out = []
    for two in (False, True):
        spec = ShapesSpec(split="heldout", resolution=resolution, seed=seed, max_shapes=2,
                          two_shape_fraction=1.0 if two else 0.0)
        for i in range(count // 2 if two else count - count // 2):
            sample = make_sample(spec, i)
            shapes = tuple((s.color, s.kind) for s in sample.shapes)
            prompt = single_prompt(*shapes[0], sample.background) if len(shapes) == 1 else \
                pair_prompt(shapes[0], shapes[1], sample.background)
            regions = []
            for shape in sample.shapes:  # each silhouette alone
                alone = make_sample(spec, i)
                alone.shapes = [shape]
                regions.append(np.asarray(alone.render(layout=True).convert("L")) >= 128)
            out.append(LayoutTarget(Target(prompt, sample.background, shapes, True), sample.render(layout=True),
                                    regions))
    return out


def placement(image, regions: list[np.ndarray]) -> list[tuple[float, float]]:
    """(IoU, centre distance in px) of each drawn region against the detected shape whose centre is nearest to it
    (IoU 0 and the image's diagonal where nothing was detected)."""
    found = analyze(image).shapes
    arr = np.asarray(image)
    diagonal = float(np.hypot(*arr.shape[:2]))
    out = []
    for region in regions:
        ys, xs = np.nonzero(region)
        centre = np.array([xs.mean(), ys.mean()])
        if not found:
            out.append((0.0, diagonal))
            continue
        nearest = min(found, key=lambda s: np.hypot(*(np.array(s.centroid) - centre)))
        inter = np.logical_and(nearest.mask, region).sum()
        union = np.logical_or(nearest.mask, region).sum()
        out.append((float(inter / union), float(np.hypot(*(np.array(nearest.centroid) - centre)))))
    return out


def evaluate(pipe, controlnet, count: int = 64, seeds: int = 2, steps: int = 20, guidance: float = 7.5,
             weight: float = 1.0) -> dict[str, dict]:
    """{"with": {...}, "without": {...}}: each the adherence groups' strict scores and, for placement, the share of
    drawn shapes placed with IoU ≥ 0.8, the mean IoU and the mean centre error."""
    samples = layout_targets(count, pipe.default_size)
    targets = [t for t in samples for _ in range(seeds)]
    results = {}
    for name, controlled in (("with", True), ("without", False)):
        images = []
        for i, t in enumerate(samples):  # one call per sample: a unit's control image serves the call's images
            control = [Control(controlnet, t.layout, weight)] if controlled else None
            images += pipe([t.target.prompt] * seeds, seed=[2000 + i * seeds + k for k in range(seeds)],
                           num_inference_steps=steps, guidance_scale=guidance, control=control).images
        scores = evaluate_images([t.target for t in targets], images)
        placed = [p for t, image in zip(targets, images) for p in placement(image, t.regions)]
        ious = np.array([iou for iou, _ in placed])
        scores["placement"] = {"iou_at_least_0.8": float((ious >= IOU_GOOD).mean()), "mean_iou": float(ious.mean()),
                               "mean_centre_error_px": float(np.mean([d for _, d in placed])), "n": len(placed)}
        results[name] = scores
        results[name + "_images"] = images
    return results


def table(results: dict[str, dict]) -> str:
    """The report's table: strict adherence and placement, with and without the layout."""
    rows = ["| | one shape strict | two shapes: strict binding | strict relation | placement IoU ≥ 0.8 | "
            "mean IoU | centre error px |", "|---|---|---|---|---|---|---|"]
    for name in ("with", "without"):
        r = results[name]
        one, two, p = r.get("one-heldout", {}), r.get("two-heldout", {}), r["placement"]
        rows.append(f"| {name} the layout | {one.get('strict_all', 0):.0%} | {two.get('strict_binding', 0):.0%} | "
                    f"{two.get('strict_relation', 0):.0%} | {p['iou_at_least_0.8']:.0%} | {p['mean_iou']:.2f} | "
                    f"{p['mean_centre_error_px']:.1f} |")
    return "\n".join(rows)
