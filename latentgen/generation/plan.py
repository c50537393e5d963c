"""A request fitted to a model (`Request.fit`): what the sampler runs, one prompt, negative prompt and seed per image,
ready to split into batches (or ranks) without checking again, and each image's record for its metadata."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from latentgen.errors import UserError
from latentgen.generation import options
from latentgen.generation.guidance import in_interval

if TYPE_CHECKING:
    from latentgen.generation.request import Request


@dataclass
class Plan:
    """A request fitted to a model: what the sampler runs, one entry per image."""

    request: Request  # checked
    prompts: list[str]
    negative_prompts: list[str]
    seeds: list[int] | None
    generator: torch.Generator | list[torch.Generator] | None
    height: int
    width: int
    image: torch.Tensor | None = None  # (1 or N, 3, H, W) in [-1, 1]
    init_latents: torch.Tensor | None = None  # or already-encoded, scaled latents z0 (1 or N, C, H/f, W/f)
    mask: torch.Tensor | None = None  # (1 or N, 1, H, W) in {0, 1}; 1 = repaint
    clip_skip: int | None = None
    loras: list[tuple[Path, float]] = field(default_factory=list)  # every LoRA file to apply, with its scale
    low_res: torch.Tensor | None = None  # an upscaler's conditioning input (N, C, h, w) (`generation.cascade`)
    noise_levels: torch.Tensor | None = None  # (N,) its noise-augmentation levels
    variation_seeds: list[int] | None = None  # one per image where the request's variation strength is > 0
    # outpainting's original canvas (1, 3, H, W) in [-1, 1] and where the result is kept (1, 1, H, W) in [0, 1]
    overlay: tuple[torch.Tensor, torch.Tensor] | None = None
    controls: list = field(default_factory=list)  # ControlNet units fitted to this size (`control.Active`)

    @property
    def batch_size(self) -> int:
        return len(self.prompts)

    @property
    def has_init(self) -> bool:
        return self.image is not None or self.init_latents is not None

    def cfg_at(self, step: int) -> bool:
        """Whether sampling step `step` is guided (guidance > 1, inside the guidance interval)."""
        r = self.request
        return r.guidance_scale > 1.0 and in_interval(step, r.num_inference_steps, r.guidance_interval)

    def take(self, rows: Sequence[int]) -> "Plan":
        """The plan for some of its images (rows in order), e.g. one batch, or one rank's share."""
        rows = list(rows)
        n = self.batch_size
        if rows == list(range(n)):
            return self
        if self.generator is not None and not isinstance(self.generator, list):
            raise UserError("a request with one shared generator cannot be split; pass seed, or one generator "
                            "per image")
        pick = lambda xs: None if xs is None else [xs[i] for i in rows]  # noqa: E731
        return dataclasses.replace(self, prompts=pick(self.prompts), negative_prompts=pick(self.negative_prompts),
                                   seeds=pick(self.seeds), variation_seeds=pick(self.variation_seeds),
                                   generator=pick(self.generator),
                                   image=_rows(self.image, rows, n), init_latents=_rows(self.init_latents, rows, n),
                                   mask=_rows(self.mask, rows, n), low_res=_rows(self.low_res, rows, n),
                                   noise_levels=_rows(self.noise_levels, rows, n))

    def per_image_request(self, **changes) -> Request:
        """What a second pass over the same images (hires fix, cascade) starts from: this plan's request with one
        prompt, negative prompt, seed and variation seed per image, unchecked, without the options a second pass
        starts without (`resets` in the option table: the init image and mask, the size, the first pass's
        generator, the hires fix and the cascade), with `changes`."""
        resets = options.reset_fields(type(self.request))
        return dataclasses.replace(self.request, prompt=self.prompts, negative_prompt=self.negative_prompts,
                                   num_images_per_prompt=1, seed=self.seeds, variation_seed=self.variation_seeds,
                                   checked=False, **resets | changes)

    def split(self, size: int) -> Iterator["Plan"]:
        """Batches of at most `size` images, in order (a single shared generator keeps one batch)."""
        n = self.batch_size
        if size >= n or (self.generator is not None and not isinstance(self.generator, list)):
            yield self
            return
        for start in range(0, n, size):
            yield self.take(range(start, min(start + size, n)))

    def record(self, i: int, scheduler: str) -> dict[str, Any]:
        """Image i's settings as `Request` fields, under the same names: `Request.from_metadata` replays it."""
        r = self.request
        out = {name: getattr(r, name) for name in type(r).recorded_fields()}
        out = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in out.items()}  # groups: JSON
        out.update(prompt=self.prompts[i], negative_prompt=self.negative_prompts[i],
                   seed=None if self.seeds is None else self.seeds[i], num_images_per_prompt=1, height=self.height,
                   variation_seed=None if self.variation_seeds is None else self.variation_seeds[i],
                   width=self.width, scheduler=scheduler, guidance_interval=list(r.guidance_interval),
                   strength=r.strength if self.has_init else None, clip_skip=self.clip_skip,
                   apg=out["apg"] or False, control=[u.record() for u in r.control] if r.control else None,
                   loras=[[str(p.resolve()), s] for p, s in self.loras[:len(r.loras or [])]] or None)
        return out


def _rows(t: torch.Tensor | None, rows: list[int], n: int) -> torch.Tensor | None:
    """The rows of a per-image tensor; one shared by every image (a single init image) stays as it is."""
    return t if t is None or t.shape[0] != n or n == 1 else t[rows]
