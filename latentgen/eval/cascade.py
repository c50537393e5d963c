"""The cascade's evaluation (`python -m latentgen.eval upscale`): does the upscaler keep what the first stage drew
(the analyzer's adherence on the upscaled images against the 64 px ones), does it make edges sharper than a
bicubic upscale (edge width), and what its noise-augmentation level does (the sweep Imagen shows)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from latentgen.data.shapes import ShapesSpec, make_sample
from latentgen.eval.adherence import Target, evaluate_images, prompt_set
from latentgen.eval.analyzer import edge_width
from latentgen.generation.cascade import upscale_latents
from latentgen.generation.outputs import contact_sheet
from latentgen.io import save_image

GROUPS = ("one-heldout", "one-seen", "two-heldout", "two-seen")


def mean_edge_width(images, targets: list[Target]) -> float:
    """Mean edge width (pixels) over the images whose prompt asks for one shape, weighted by outline length."""
    widths = [edge_width(image, 1) for image, t in zip(images, targets) if len(t.shapes) == 1]
    total = sum(length for _, length in widths)
    return sum(w * length for w, length in widths) / total if total else float("nan")


@torch.no_grad()
def first_stage(pipe, targets: list[Target], seeds: list[int], steps: int, guidance: float, batch_size: int = 32):
    """The first stage's latents (N, C, h, w) and its images."""
    latents = []
    for i in range(0, len(targets), batch_size):
        latents.append(pipe([t.prompt for t in targets[i:i + batch_size]], seed=seeds[i:i + batch_size],
                            num_inference_steps=steps, guidance_scale=guidance, output_type="latent").images)
    latents = torch.cat(latents)
    images = []
    for i in range(0, len(latents), batch_size):
        images += pipe.image_processor.postprocess(pipe.decode(latents[i:i + batch_size]), output_type="pil")
    return latents, images


def upscaled(up, latents, targets: list[Target], seeds: list[int], level: int, steps: int | None,
             strength: float | None, batch_size: int = 32) -> list:

    images = []
    for i in range(0, len(targets), batch_size):
        images += upscale_latents(up, latents[i:i + batch_size], [t.prompt for t in targets[i:i + batch_size]],
                                  seeds[i:i + batch_size], steps=steps, noise_level=level,
                                  strength=strength).images
    return images


def row(name: str, results: dict, width: float) -> str:
    cells = []
    for g in GROUPS:
        r = results.get(g, {})
        if g.startswith("one"):
            cells.append(f"{r.get('all', 0):.0%} / {r.get('strict_all', 0):.0%}")
        else:
            cells.append(f"{r.get('binding', 0):.0%} / {r.get('relation', 0):.0%}")
    return f"| {name} | " + " | ".join(cells) + f" | {width:.2f} |"


def evaluate(pipe, seeds: int, levels: list[int], steps: int, up_steps: int | None, guidance: float,
             out: Path | None = None, per_group: int = 27, strength: float | None = None) -> str:
    """The report: adherence and edge width of the first stage, bicubic ×s and the upscaler at each level, over
    `per_group` prompts of each group × `seeds`."""

    up = pipe.upscaler()
    scale = up.upscaler_config.scale
    targets = [t for t in prompt_set(per_group) for _ in range(seeds)]
    seed_list = [1000 + i for i in range(len(targets))]
    latents, small = first_stage(pipe, targets, seed_list, steps, guidance)
    size = small[0].size[0] * scale
    bicubic = [im.resize((size, size), Image.Resampling.BICUBIC) for im in small]
    real = [make_sample(ShapesSpec(split="heldout", resolution=size, max_shapes=1), i).render() for i in range(64)]
    real_width = float(np.mean([edge_width(im, 1)[0] for im in real]))
    header = ("| images | one held-out: all (lenient / strict) | one seen | two held-out: binding / relation | "
              "two seen | edge width (px at the large size) |")
    lines = [header, "|---|---|---|---|---|---|",
             row(f"first stage, {small[0].size[0]} px", evaluate_images(targets, small),
                 mean_edge_width(small, targets) * scale),
             row(f"bicubic ×{scale}", evaluate_images(targets, bicubic), mean_edge_width(bicubic, targets))]
    sheets = {}
    for level in levels:
        images = upscaled(up, latents, targets, seed_list, level, up_steps, strength)
        sheets[level] = images
        lines.append(row(f"upscaler, noise level {level}", evaluate_images(targets, images),
                         mean_edge_width(images, targets)))
    lines.append(f"| the data at {size} px (reference) | | | | | {real_width:.2f} |")
    sampler = type(up.scheduler).__name__
    text = (f"## Cascade: {small[0].size[0]} -> {size} px ({len(targets)} images, {seeds} seeds per prompt; first "
            f"stage {steps} steps at guidance {guidance:g}; upscaler {up_steps or up.upscaler_config.steps} steps, "
            f"{sampler}, guidance {up.upscaler_config.guidance:g}, strength "
            f"{up.upscaler_config.strength if strength is None else strength:g})\n\n" + "\n".join(lines))
    if out is not None:
        singles = [i for i, t in enumerate(targets) if len(t.shapes) == 1 and t.heldout][::seeds][:6]
        doubles = [i for i, t in enumerate(targets) if len(t.shapes) == 2 and t.heldout][::seeds][:2]
        level = levels[len(levels) // 2]
        cells, captions = [], []
        for i in singles + doubles:
            cells += [small[i].resize((size, size), Image.Resampling.NEAREST), bicubic[i], sheets[level][i]]
            captions += [f"{small[0].size[0]} px: {targets[i].prompt}", f"bicubic x{scale}",
                         f"upscaler (level {level})"]

        save_image(contact_sheet(cells, captions, columns=6, min_cell=size), out / "side-by-side.png")
    return text
