"""One generation request: every setting under one name, with its default, checked once.

`Request` is what the Python API (`LatentPipeline.__call__`), `infer.py`, replay and the server build. Its recorded
fields are the image metadata under the same names, so replaying an image is `Request(**metadata)`, and adding an
option to generation is one field here (plus its use in the sampler).

Checking has two halves, each run once per request:
- `check()` needs no model: types, ranges, prompt syntax, negative prompts, seeds. `infer.py` runs it before a
  model loads, with its flag names (`names`) in the messages.
- `fit(pipe)` needs the loaded model: its step limit, the image size, init images and masks, the memory it takes.
  It returns the `Plan` that the sampler runs: one prompt, negative prompt and seed per image, ready to split into
  batches without checking again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from latentgen import validate
from latentgen.components.schedulers import FLOW_SAMPLERS, is_flow_config, scheduler_names
from latentgen.errors import UserError, one_of
from latentgen.formats import lora
from latentgen.generation import control as controls
from latentgen.generation import options, schedule
from latentgen.generation.cascade import Upscale, second_stage
from latentgen.generation.guidance import Apg, model_apg
from latentgen.generation.hires import Hires
from latentgen.generation.options import option
from latentgen.generation.outpaint import Outpaint
from latentgen.generation.plan import Plan
from latentgen.generation.prompts import has_syntax, parse
from latentgen.generation.regions import Regions
from latentgen.runtime.memory import check_sampling

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class Request:
    """A generation request with diffusers' names and meanings (`StableDiffusionPipeline.__call__`).

    `seed` (one int, or one per image) makes each image reproducible on its own; `generator` keeps diffusers'
    meaning. `variation_seed` and `variation_strength` are AUTOMATIC1111's variation seed: the starting noise turned
    that far (0-1, spherically) towards the variation seed's (a random one when None); `seed_resize_from`, a
    (width, height), is its "resize seed from": each image's noise is drawn at that size and pasted into the middle
    of its noise at the image's size (`sampling.prepare_latents`), so an image keeps much of its composition at
    another size. `image` (+ `strength`) is image-to-image; `image` + `mask_image` (white = repaint) is
    inpainting. `guidance_rescale`, `apg` (adaptive projected guidance: None is the model's own, False plain
    classifier-free guidance), `dynamic_threshold` and `guidance_interval` are `generation.guidance`'s variants;
    `clip_skip` None uses the model's own; `tiling` makes the image tile seamlessly (`components.tiling`); `hires`
    runs AUTOMATIC1111's hires fix (`generation.hires`), `upscale` the model's trained upscaler after it (a
    cascade, `generation.cascade`); `loras` are LoRA files (or names in the pipeline's `loras_dir`) with their
    scales, as are A1111's `<lora:NAME:SCALE>` prompt tags.
    """

    prompt: str | list[str] = field(default="", metadata=option(
        "prompt", flag="--prompt", api="prompt", api_type=str, per_image=True,
        cli={"action": "append", "metavar": "TEXT"},
        help="what the image shows (repeat the flag for several); A1111's weighting (word:1.3), (word), [word], "
             "and <lora:NAME:SCALE>", spelt="A1111 text: its first lines; infer.py: also --prompts-file"))
    negative_prompt: str | list[str] | None = field(default=None, metadata=option(
        "negative prompt", flag="--negative-prompt", api="negative_prompt", api_type=str, api_default="",
        per_image=True,
        cli={"action": "append", "metavar": "TEXT"}, help="what the image should not show: one for all prompts, "
                                                          "or one per prompt", spelt="A1111 text: its own line"))
    num_inference_steps: int = field(default=30, metadata=option(
        "steps", flag="--steps", api="steps", api_default=50, text="Steps", always=True, help="sampling steps"))
    guidance_scale: float = field(default=7.5, metadata=option(
        "guidance", flag="--guidance", api="cfg_scale", api_default=7.0, text="CFG scale", always=True,
        help="classifier-free guidance scale (≤ 1: off)"))
    height: int | None = field(default=None, metadata=option(
        "height", flag="--height", api="height", cli={"type": int}, resets=True,
        help="image height in pixels (default: the model's own size)", spelt="A1111 text: Size (WxH)"))
    width: int | None = field(default=None, metadata=option(
        "width", flag="--width", api="width", cli={"type": int}, resets=True,
        help="image width in pixels (default: the model's own size)", spelt="A1111 text: Size (WxH)"))
    num_images_per_prompt: int = field(default=1, metadata=option(
        "images per prompt", flag="--num-images", help="images per prompt",
        spelt="HTTP: A1111's batch_size × n_iter"))
    seed: int | list[int] | None = field(default=None, metadata=option(
        "seed", flag="--seed", api="seed", api_default=-1, api_type=int, from_api=lambda v: _a1111_seed(v, "seed"),
        text="Seed", always=True, cli={"type": int}, per_image=True,
        help="seed of the first image; image k gets seed+k (default: random; A1111's -1)"))
    variation_seed: int | list[int] | None = field(default=None, metadata=option(
        "variation seed", flag="--variation-seed", api="subseed", api_default=-1, api_type=int,
        from_api=lambda v: _a1111_seed(v, "subseed"), text="Variation seed", cli={"type": int}, per_image=True,
        to_text=lambda v: v, help="A1111's variation seed: image k's noise is turned towards seed S+k's "
                                  "(default: random)"))
    variation_strength: float = field(default=0.0, metadata=option(
        "variation strength", flag="--variation-strength", api="subseed_strength", text="Variation seed strength",
        help="how far, in [0, 1] (0: no variation; 1: the variation seed's own image)"))
    seed_resize_from: tuple[int, int] | None = field(default=None, metadata=option(
        "seed resize from", flag="--seed-resize-from", cli={"metavar": "WxH", "type": str}, text="Seed resize from",
        from_flag=lambda v: validate.size_text(v, "--seed-resize-from"), to_text=lambda v: v and "{}x{}".format(*v),
        from_text=lambda v: validate.size_text(v, "Seed resize from"),
        help="A1111's 'resize seed from': draw each seed's noise at this size, centered in the image's, so an image "
             "made at WxH keeps much of its composition at another size",
        spelt="HTTP: A1111's seed_resize_from_w, seed_resize_from_h"))
    scheduler: str | None = field(default=None, metadata=option(
        "sampler", flag="--scheduler", cli={"choices": scheduler_names(), "metavar": "NAME", "type": str},
        help=f"sampler: {', '.join(scheduler_names())} (default: the model's own)",
        spelt="HTTP: A1111's sampler_name and scheduler; A1111 text: Sampler and Schedule type"))
    eta: float = field(default=0.0, metadata=option(
        "eta", flag="--eta", api="eta", text="Eta", help="the noise DDIM-type samplers add back at each step, in "
                                                         "[0, 1] (0: deterministic DDIM; 1: DDPM's); TCD's gamma "
                                                         "(0.3 in its paper)"))
    strength: float | None = field(default=None, metadata=option(
        "strength", flag="--strength", api="denoising_strength", cli={"type": float}, text="Denoising strength",
        help="how much of the init image to redo, in (0, 1] (default 0.8 for image-to-image, 1 for inpainting)"))
    guidance_rescale: float = field(default=0.0, metadata=option(
        "guidance rescale", flag="--guidance-rescale", api="guidance_rescale", text="CFG Rescale phi",
        help="φ in [0, 1]: the guided prediction's std rescaled towards the conditional one's (Lin et al.; for "
             "zero-terminal-SNR models)"))
    # adaptive projected guidance; False: plain; None: the model's own
    apg: Apg | Mapping | bool | None = field(default=None, metadata=option(
        "APG", api="apg", group=Apg, off_flag="--no-apg", text="APG", to_text=lambda v: Apg.of(v).text() if v else None,
        from_text=Apg.from_text, help="adaptive projected guidance (any of its flags turns it on; none: the "
                                      "model's own)"))
    dynamic_threshold: float | None = field(default=None, metadata=option(
        "dynamic threshold", flag="--dynamic-threshold", api="dynamic_threshold", cli={"type": float},
        text="Dynamic threshold", help="clip x̂0 at this percentile of |x̂0|, e.g. 0.995 (never below 3σ; Imagen)"))
    guidance_interval: tuple[float, float] = field(default=(0.0, 1.0), metadata=option(
        "guidance interval", flag="--guidance-interval", api="guidance_interval", api_type=tuple[float, float],
        cli={"type": float, "nargs": 2, "metavar": ("START", "END")}, from_flag=tuple, text="Guidance interval",
        to_text=lambda v: None if v is None or tuple(v) == (0.0, 1.0) else "{:g}-{:g}".format(*v),
        from_text=lambda v: tuple(float(x) for x in v.split("-")),
        help="guide only in this fraction of the steps (0 = the noisiest; Kynkäänniemi et al.)"))
    true_cfg_scale: float = field(default=1.0, metadata=option(
        "true CFG scale", flag="--true-cfg", api="true_cfg_scale", text="True CFG scale",
        help="Flux (guidance-distilled) only: classifier-free guidance with the negative prompt on top of its "
             "embedded --guidance, diffusers' true_cfg_scale (1: off, one pass a step)"))
    slg_scale: float = field(default=0.0, metadata=option(
        "skip-layer guidance", flag="--slg", api="slg_scale", text="SLG scale", cli={"type": float},
        help="SD3 only: skip-layer guidance, diffusers' skip_layer_guidance_scale (SD3.5 Medium's recipe: 2.8; "
             "0: off) on --slg-layers, in the first fifth of the steps"))
    slg_layers: tuple[int, ...] = field(default=(7, 8, 9), metadata=option(
        "skip-layer guidance layers", flag="--slg-layers", api="slg_layers", api_type=tuple[int, ...],
        cli={"type": int, "nargs": "+", "metavar": "LAYER"}, from_flag=tuple, text="SLG layers",
        to_text=lambda v: None if v is None or tuple(v) == (7, 8, 9) else "-".join(map(str, v)),
        from_text=lambda v: tuple(int(x) for x in v.split("-")),
        help="the transformer blocks --slg skips (default: 7 8 9, SD3.5 Medium's)"))
    max_sequence_length: int | None = field(default=None, metadata=option(
        "T5 sequence length", flag="--max-sequence-length", api="max_sequence_length", cli={"type": int},
        text="T5 tokens", help="SD3/Flux only: how many T5 tokens a prompt may use, up to 512 (default: the "
                               "pipeline's, 256 for SD3 and 512 for Flux)"))
    clip_skip: int | None = field(default=None, metadata=option(
        "clip skip", flag="--clip-skip", cli={"type": int}, from_flag=lambda v: a1111_clip_skip(v, "--clip-skip"),
        text="Clip skip", to_text=lambda v: v + 1 if v else None,
        from_text=lambda v: a1111_clip_skip(int(v), "Clip skip"),
        help="A1111's clip skip: 1 uses the text encoder's last layer, 2 the one before (default: the model's own)",
        spelt="HTTP: A1111's override_settings.CLIP_stop_at_last_layers (or the server's option); A1111's count "
              "everywhere but Python, where 0 is the last layer"))
    tiling: bool = field(default=False, metadata=option(
        "tiling", flag="--tiling", api="tiling", api_type=bool | None, api_default=None, from_api=bool,
        text="Tiling", help="make the image tile seamlessly (A1111's Tiling)"))
    hires: Hires | None = field(default=None, metadata=option(
        "the hires fix", api="hires", group=Hires, resets=True,
        spelt="HTTP: also A1111's enable_hr, hr_scale, hr_second_pass_steps, denoising_strength, hr_upscaler, "
              "hr_resize_x/y; A1111 text: Hires upscale, Hires steps, Hires upscaler, Denoising strength"))
    upscale: Upscale | None = field(default=None, metadata=option(
        "the upscaler", api="upscale", group=Upscale, resets=True,
        spelt="HTTP: also A1111's enable_hr with hr_upscaler 'latentgen upscaler', hr_scale, hr_second_pass_steps; "
              "A1111 text: Hires upscale, Hires steps, Hires upscaler"))
    outpaint: Outpaint | None = field(default=None, metadata=option(
        "outpainting", api="outpaint", group=Outpaint, text="Outpaint", text_fields=True, to_text=lambda v: None,
        help="extend the init image's canvas and paint the new area (latentgen.generation.outpaint)",
        spelt="HTTP: an object on img2img (A1111's outpainting mk2 script arguments are not read)"))
    regions: Regions | None = field(default=None, metadata=option(
        "regions", api="regions", group=Regions, text="RP Active", text_fields=True,
        to_text=lambda v: True if v else None, help="regional prompting (latentgen.generation.regions)",
        spelt="A1111 text: the regional prompter's RP Active, RP Ratios, RP Divide mode, RP Base Ratio; HTTP: an "
              "object (the regional prompter's own script arguments are not read)"))
    loras: list[tuple[str, float]] | None = field(default=None, metadata=option(
        "LoRAs", flag="--lora", cli={"action": "append", "metavar": "PATH[:SCALE]"},
        from_flag=lambda values: [lora.parse_flag(v) for v in values],
        help="apply a LoRA (repeatable; diffusers or kohya/A1111 format); prompts may also hold <lora:NAME:SCALE>",
        spelt="HTTP: <lora:NAME:SCALE> in the prompt (names in the server's --loras-dir only); A1111 text: as "
              "prompt tags"))
    control: list | None = field(default=None, metadata=option(
        "ControlNet", flag="--control", cli={"action": "append", "metavar": "MODEL:IMAGE[:WEIGHT][,KEY=VALUE]"},
        from_flag=lambda values: [controls.parse_flag(v) for v in values],
        help="a ControlNet unit (repeatable): a ControlNet file, folder or name in --controlnets-dir, its control "
             "image and weight; settings start, end (fractions of the steps), mode (balanced, prompt, control), "
             "module (a preprocessor), resize (crop, resize, fill), threshold_a, threshold_b",
        spelt="HTTP: A1111's alwayson_scripts.controlnet.args; A1111 text: ControlNet 0, ControlNet 1, ...; "
              "metadata: each unit with its image's path"))
    ip_adapter: list | None = field(default=None, metadata=option(
        "IP-Adapter", flag="--ip-adapter", recorded=False, cli={"action": "append", "metavar": "MODEL:IMAGE[:SCALE]"},
        from_flag=lambda values: [controls.parse_flag(f"{v},module=ip-adapter_clip") for v in values],
        help="an image prompt (repeatable): an IP-Adapter file (its image_encoder/ folder beside it), the image and "
             "its scale; a ControlNet unit with the ip-adapter_clip preprocessor, as A1111 runs it",
        spelt="HTTP: a unit of A1111's alwayson_scripts.controlnet.args; recorded and written as a ControlNet unit"))
    control_preprocess: list[str] | None = field(default=None, metadata=option(
        "control preprocessor", flag="--control-preprocess", recorded=False,
        cli={"action": "append", "metavar": "MODULE"},
        help="run the control images through a preprocessor: one for every unit, or one per unit (canny, invert, "
             "threshold, blur_gaussian, tile_resample, shuffle; none: as they are)",
        spelt="HTTP and A1111 text: each unit's module"))
    image: Any = field(default=None, metadata=option(
        "an image", flag="--image", cli={"type": str}, recorded=False, resets=True,
        help="init image: image-to-image, or inpainting with --mask",
        spelt="HTTP: img2img's init_images; metadata: the file and its hash"))
    mask_image: Any = field(default=None, metadata=option(
        "a mask", flag="--mask", cli={"type": str}, recorded=False, resets=True,
        help="inpainting mask, same size as --image (white = repaint)",
        spelt="HTTP: img2img's mask; metadata: the file and its hash"))
    generator: Any = field(default=None, metadata=option(
        "generator", recorded=False, resets=True, spelt="Python only (torch.Generator, diffusers' meaning)"))
    output_type: str = field(default="pil", metadata=option(
        "output type", recorded=False, spelt="Python only: pil, np, pt or latent"))
    checked: bool = field(default=False, repr=False, compare=False, metadata={"recorded": False})

    @classmethod
    def recorded_fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)
                if (f.metadata["option"].recorded if "option" in f.metadata else f.metadata.get("recorded", True))]

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], **inputs) -> "Request":
        """The request an image's metadata records (unknown keys, such as the model's name, are left out). Images
        recorded before APG existed were made with plain guidance, whatever their model's default is now."""
        fields = {k: metadata[k] for k in cls.recorded_fields() if k in metadata}
        fields.setdefault("apg", False)
        return cls(**fields, **inputs)

    # --------------------------------------------------------------------------------------------------------
    # Checks that need no model

    def check(self, surface: str | None = None, max_steps: int | None = None) -> "Request":
        """This request with its values checked and normalised (prompt and negative_prompt as lists of equal
        length, seed as one per image, strength filled in, hires as `Hires`); one-line UserErrors otherwise, naming
        each field as `surface` does ("cli": infer.py's flags, "api": the server's fields; None: the option
        table's labels). `max_steps`: the model's number of training noise levels, where known already."""
        if self.checked:
            return self
        name = options.names(type(self), surface)
        prompts = _as_list(self.prompt, "prompt")
        if not prompts:
            raise UserError("no prompt given; pass a prompt string or a non-empty list of prompts")
        negatives = _as_list(self.negative_prompt, "negative_prompt") or [""]
        if len(negatives) == 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise UserError(f"got {len(prompts)} prompts and {len(negatives)} negative prompts; "
                            "give one negative prompt for all or one per prompt")

        steps = self.num_inference_steps if isinstance(self.num_inference_steps, int) else 1  # checked below
        for text in dict.fromkeys(prompts + negatives):  # weighting syntax errors before any work, in every
            for part, _ in schedule.parts(text):  # part and every text its schedule gives
                for _, scheduled in schedule.schedule(part, max(1, steps)):
                    if has_syntax(scheduled):
                        parse(lora.strip_tags(scheduled))
        if len({tuple(lora.tags(p)) for p in prompts}) > 1:
            raise UserError("the prompts of one call name different LoRAs (<lora:...> tags); give them in "
                            "separate calls")
        loras = None
        if self.loras:
            try:
                loras = [(str(file), float(scale)) for file, scale in self.loras]
            except (TypeError, ValueError):
                raise UserError(f"loras must be (file or name, scale) pairs, got {self.loras!r}") from None
            for file, scale in loras:
                validate.in_range(scale, f"the scale of LoRA {file}", -10.0, 10.0)
        validate.steps(self.num_inference_steps, max_steps, what=name["num_inference_steps"])
        guidance = validate.guidance(self.guidance_scale, name["guidance_scale"])
        per_prompt = validate.count(self.num_images_per_prompt, name["num_images_per_prompt"])
        if self.scheduler is not None and self.scheduler not in scheduler_names():
            raise one_of("scheduler", self.scheduler, scheduler_names())
        if self.output_type not in OUTPUT_TYPES:
            raise one_of("output_type", self.output_type, list(OUTPUT_TYPES))
        rescale = validate.in_range(self.guidance_rescale, name["guidance_rescale"], 0.0, 1.0)
        eta = validate.in_range(self.eta, name["eta"], 0.0, 1.0)
        validate.in_range(self.true_cfg_scale, name["true_cfg_scale"], 1.0, 30.0)
        validate.in_range(self.slg_scale, name["slg_scale"], 0.0, 30.0)
        if not self.slg_layers or any(not isinstance(x, int) or x < 0 for x in self.slg_layers):
            raise UserError(f"{name['slg_layers']} must be block numbers ≥ 0, got {self.slg_layers}")
        if self.max_sequence_length is not None:
            validate.in_range(self.max_sequence_length, name["max_sequence_length"], 1, 512)
        interval = _interval(self.guidance_interval)
        if self.dynamic_threshold is not None:
            validate.in_range(self.dynamic_threshold, name["dynamic_threshold"], 0.5, 1.0, True, True)
        if self.mask_image is not None and self.image is None:
            raise UserError(f"{name['mask_image']} needs {name['image']} (the image to inpaint)")
        strength = self.strength
        if strength is None:
            strength = 0.8 if self.image is not None and self.mask_image is None else 1.0
        strength = validate.in_range(strength, name["strength"], 0.0, 1.0, low_open=True)
        if not isinstance(self.tiling, bool):
            raise UserError(f"tiling must be true or false, got {self.tiling!r}")
        if self.clip_skip is not None and (not isinstance(self.clip_skip, int) or self.clip_skip < 0):
            raise UserError(f"clip skip must be an integer ≥ 0 (layers to skip from the end), got {self.clip_skip!r}")
        total = len(prompts) * per_prompt
        seeds = None
        if self.seed is not None:
            if self.generator is not None:
                raise UserError("pass either seed or generator, not both")
            seeds = validate.seeds(self.seed, total, name["seed"])
        if isinstance(self.generator, list) and len(self.generator) != total:
            raise UserError(f"got {len(self.generator)} generators for {total} images")
        variation = validate.in_range(self.variation_strength, name["variation_strength"], 0.0, 1.0)
        variation_seeds = None
        if variation > 0:  # A1111's: a random variation seed unless one is given, each image's the next
            first = validate.random_seed() if self.variation_seed is None else self.variation_seed
            variation_seeds = validate.seeds(first, total, name["variation_seed"])
        seed_resize = self.seed_resize_from
        if seed_resize is not None:
            seed_resize = validate.size(seed_resize, name["seed_resize_from"])
            if seeds is None:  # the noise is drawn from each image's seed twice, at two sizes
                raise UserError(f"{name['seed_resize_from']} needs {name['seed']} (a generator cannot be restarted)")
        apg = self.apg
        if isinstance(apg, (Apg, Mapping)):
            apg = Apg.of(apg, _within(name, "apg"))
        elif apg is not None and apg is not False:
            raise UserError(f"apg must be APG settings, False (plain guidance) or None (the model's own), got {apg!r}")
        hires = self.hires
        if hires is not None:
            hires = validate.settings(Hires, hires, name["hires"], _within(name, "hires"))
            if self.image is not None:
                raise UserError(f"{name['hires']} is for text-to-image; with {name['image']}, resize the image "
                                "instead")
        outpaint = self.outpaint
        if outpaint is not None:
            outpaint = validate.settings(Outpaint, outpaint, name["outpaint"], _within(name, "outpaint"))
            if self.image is None or self.mask_image is not None:
                raise UserError(f"{name['outpaint']} extends {name['image']} and makes its own mask: give an image, "
                                f"without {name['mask_image']}")
        regions = self.regions
        if regions is not None:
            regions = validate.settings(Regions, regions, name["regions"], _within(name, "regions"))
            for prompt in prompts:
                regions.prompts(prompt)  # one prompt per region
            if regions.calc == "attention":
                regions.shape_of(prompts)
        units = [*(self.control or []), *(self.ip_adapter or [])] or None  # image prompts are units (A1111's)
        control = controls.check_all(units, self.control_preprocess, name["control"])
        upscale = self.upscale
        if upscale is not None:
            upscale = validate.settings(Upscale, upscale, name["upscale"], _within(name, "upscale"))
            if control:
                raise UserError(f"{name['upscale']} runs the upscaler, which takes no ControlNet; use "
                                f"{name['hires']} with {name['control']}")
            if self.image is not None or hires is not None:
                raise UserError(f"{name['upscale']} is for text-to-image, without {name['hires']} (both make a "
                                "larger image; choose one)" if hires is not None else
                                f"{name['upscale']} is for text-to-image; with {name['image']}, resize the image "
                                "instead")
        return dataclasses.replace(self, prompt=prompts, negative_prompt=negatives, guidance_scale=guidance,
                                   seed=seeds, variation_seed=variation_seeds, variation_strength=variation,
                                   seed_resize_from=seed_resize,
                                   guidance_rescale=rescale, eta=eta, guidance_interval=interval,
                                   strength=strength, apg=apg, hires=hires, upscale=upscale, regions=regions,
                                   outpaint=outpaint, control=control, control_preprocess=None, ip_adapter=None,
                                   loras=loras,
                                   checked=True)

    @property
    def total(self) -> int:
        """How many images the request makes (after `check`)."""
        return len(self.prompt) * self.num_images_per_prompt

    @property
    def sampling_steps(self) -> int:
        """Sampling steps per image, both passes of a hires or upscale request included (after `check`; an upscale
        whose steps are the upscaler's default counts as many as the first pass)."""
        hires, upscale = self.hires, self.upscale
        second = (hires.steps if hires else upscale.steps if upscale else 0) or self.num_inference_steps
        return self.num_inference_steps + (second if hires or upscale else 0)

    def per_image_values(self) -> dict[str, list | None]:
        """Every per-image option's value for each image, prompt-major (after `check`: prompts are given one per
        prompt, seeds one per image)."""
        n, total = self.num_images_per_prompt, self.total
        out = {}
        for name in options.per_image_fields(type(self)):
            value = getattr(self, name)
            out[name] = value if value is None or len(value) == total else [v for v in value for _ in range(n)]
        return out

    def per_image(self) -> tuple[list[str], list[str], list[int] | None]:
        """One prompt, negative prompt and seed per image, prompt-major (after `check`; the variation seeds, one
        per image in the same order, are `variation_seed`)."""
        n = self.num_images_per_prompt
        return ([p for p in self.prompt for _ in range(n)], [p for p in self.negative_prompt for _ in range(n)],
                self.seed)

    # --------------------------------------------------------------------------------------------------------
    # Checks that need the model

    def fit(self, pipe, batch_size: int | None = None) -> Plan:
        """The plan for `pipe`: the model's limits checked, sizes and init images resolved, and the memory of
        batches of `batch_size` images (default: all at once), including a hires pass, checked."""
        if hasattr(pipe, "fit_request"):  # a flow-matching transformer (generation.flow) fits requests itself
            return pipe.fit_request(self, batch_size)
        for flow_only in ("true_cfg_scale", "max_sequence_length", "slg_scale", "slg_layers"):
            value = getattr(self, flow_only)  # (metadata gives lists for tuples)
            if (tuple(value) if isinstance(value, list) else value) != getattr(Request, flow_only):
                raise UserError(f"{options.names(Request, None)[flow_only]} is for SD3/Flux models; this model is a "
                                "U-Net's")
        max_steps = pipe.scheduler.config.get("num_train_timesteps")
        req = self.check(max_steps=max_steps)
        validate.steps(req.num_inference_steps, max_steps)  # for a request checked before the model loaded
        if req.apg is None:
            req = dataclasses.replace(req, apg=model_apg(pipe))
        if pipe.inpainting_unet and req.mask_image is None:
            raise UserError("this is an inpainting model (9-channel U-Net): give an image and a mask")
        if (req.regions is not None and req.regions.calc == "attention"
                and pipe.unet.config.get("kind") == "mmdit"):  # components.denoisers' MMDiT: no cross-attention
            raise UserError("regional attention splits cross-attention layers, which an MMDiT has none of (its "
                            "attention is joint): use --region-calc latent")
        if is_flow_config(pipe.scheduler.config):  # a flow-matching model of latentgen's (noise.prediction_type flow)
            if req.scheduler is not None and req.scheduler not in FLOW_SAMPLERS:
                raise one_of("scheduler (for a flow model)", req.scheduler, list(FLOW_SAMPLERS))
            if req.dynamic_threshold is not None:
                raise UserError("dynamic thresholding clips an ε/v model's x0 prediction; this model predicts flow "
                                "velocities")
        total, f = req.total, pipe.vae_scale_factor
        height, width, image, mask, init_latents = req.height, req.width, req.image, req.mask_image, None
        overlay = None
        if req.outpaint is not None:
            if pipe.is_latents(image) or not hasattr(image, "convert"):
                raise UserError("outpainting extends an image given in pixels (a PIL image)")
            image, mask = req.outpaint.canvas(image, pipe.vae_scale_factor)
            height, width = mask.height, mask.width
            overlay = (image, mask)
        if pipe.is_latents(image):  # image-to-image from latents, as diffusers' img2img accepts them
            if mask is not None:
                raise UserError("inpainting needs the image in pixels, not latents")
            h, w = image.shape[-2] * f, image.shape[-1] * f
            if (height or h, width or w) != (h, w):
                raise UserError(f"the init latents make {w}×{h} images; height and width cannot differ from that")
            height, width, init_latents, image = h, w, image.float(), None
            if init_latents.shape[0] not in (1, total):
                raise UserError(f"got {init_latents.shape[0]} latents for {total} outputs; give one or one per output")
        if image is not None:
            w, h = _image_size(image)
            if height is None and width is None and (w % f or h % f):
                raise UserError(f"the image is {w}×{h}; its sides must be multiples of {f} "
                                "(resize it, or pass height and width to resize it)")
            height, width = height or h, width or w
            if mask is not None and _image_size(mask) != (w, h):
                mw, mh = _image_size(mask)
                raise UserError(f"the mask is {mw}×{mh} but the image is {w}×{h}; they must be the same size")
        height, width = check_size(height, width, f, pipe.default_size)

        rows = min(total, batch_size or total)
        check_sampling(pipe, height, width, rows, guided=req.guidance_scale > 1.0)
        if req.hires is not None:
            check_sampling(pipe, *req.hires.size(height, width, pipe.size_multiple), rows,
                           guided=req.guidance_scale > 1.0)
        if image is not None:
            image = pipe.image_processor.preprocess(image, height=height, width=width).float()
            if image.shape[0] not in (1, total):
                raise UserError(f"got {image.shape[0]} images for {total} outputs; give one or one per output")
        if mask is not None:
            mask = pipe.mask_processor.preprocess(mask, height=height, width=width).float()
        prompts, negatives, seeds = req.per_image()

        folder, confined = Path(getattr(pipe, "loras_dir", "loras")), getattr(pipe, "loras_confined", False)
        loras = [(lora.resolve(name, folder, confined), scale)
                 for name, scale in (req.loras or []) + lora.tags(prompts[0])]
        if overlay is not None:  # the original pixels, put back where the mask is black (its soft edge blends)
            alpha = torch.from_numpy(np.asarray(overlay[1], dtype=np.float32) / 255)[None, None]  # (1, 1, H, W)
            overlay = (pipe.image_processor.preprocess(overlay[0], height=height, width=width).float(), alpha)
        plan = Plan(req, prompts, negatives, seeds, req.generator, height, width, image, init_latents, mask,
                    pipe.config.clip_skip if req.clip_skip is None else req.clip_skip or None, loras,
                    variation_seeds=req.variation_seed, overlay=overlay,
                    controls=controls.fit(pipe, req.control, height, width) if req.control else [])
        if req.upscale is not None:

            second_stage(pipe, plan)  # the upscaler exists, takes this scale, and its stage fits in memory
        return plan


def _within(names: Mapping[str, str], group: str) -> dict[str, str]:
    """A group's fields' names ("hires.scale" -> "scale")."""
    return {k.split(".", 1)[1]: v for k, v in names.items() if k.startswith(f"{group}.")}


def _a1111_seed(value: int, name: str) -> int | None:
    """A1111's seed: -1 is a random one (None here); no other negative one means anything."""
    if value < -1:
        raise UserError(f"{name} must be -1 (a random seed) or an integer ≥ 0, got {value}")
    return None if value == -1 else value


def a1111_clip_skip(value: int, name: str) -> int:
    """A1111's clip skip (1: the last layer, 2: the one before) as diffusers counts it (0: the last layer)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} counts as A1111 does: 1 is the text encoder's last layer, 2 the one before; got "
                        f"{value!r}")
    return value - 1


def _as_list(value: str | Sequence[str] | None, what: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    values = list(value)
    if not all(isinstance(v, str) for v in values):
        raise UserError(f"{what} must be a string or a list of strings")
    return values


def _interval(value) -> tuple[float, float]:
    try:
        start, end = (float(v) for v in value)
    except (TypeError, ValueError):
        raise UserError(f"guidance interval must be two numbers (start, end), got {value!r}") from None
    if not 0.0 <= start < end <= 1.0:
        raise UserError(f"guidance interval must satisfy 0 ≤ start < end ≤ 1, got {start}, {end}")
    return start, end


def _image_size(image) -> tuple[int, int]:
    """(width, height) of a PIL image, an (H, W, C) array or a (B, C, H, W) / (C, H, W) tensor."""
    if hasattr(image, "size") and not callable(image.size):
        return image.size
    shape = tuple(image.shape)
    if isinstance(image, torch.Tensor):
        return shape[-1], shape[-2]
    return shape[1], shape[0]


def check_size(height: int | None, width: int | None, factor: int, default: int) -> tuple[int, int]:
    """Image height and width (defaults filled in), each a positive multiple of the VAE's factor."""
    height = default if height is None else height
    width = default if width is None else width
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or isinstance(v, bool) or v < factor or v % factor:
            raise UserError(f"{name} must be a positive multiple of {factor} (the VAE's downsampling factor), "
                            f"got {v!r}")
    return height, width
