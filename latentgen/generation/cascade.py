"""Cascades: a second, super-resolution diffusion model that adds detail to the first model's image, as Imagen and
the cascaded models in the seeds do, here in latent space (as Stable Diffusion's ×2 latent upscaler does).

The upscaler is a U-Net whose input is the noisy high-resolution latents concatenated with the low-resolution
latents, noised to an augmentation level a and upsampled (nearest) to the high resolution; a goes in as the U-Net's
class label (`class_embed_type: timestep`), and the text conditions it too. Training draws a uniformly from
[0, max_noise_level] (Imagen's noise conditioning augmentation), so at sampling time a small a tells the model to
trust the low-resolution latents and a larger one lets it repair what the first model drew badly.

Here: the request option (`Upscale`), the upscaler loaded beside a model, and the cascade's sampling; the folder
format is `latentgen.formats.upscaler`, the training maths `latentgen.training.upscaler`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F

from latentgen import validate
from latentgen.components import tiling
from latentgen.errors import UserError, first_line
from latentgen.formats.upscaler import check_level, check_unet, read
from latentgen.generation.options import option, table
from latentgen.generation.sampling import decode, encode_images

A1111_NAME = "latentgen upscaler"  # its name among A1111's hires upscalers: in infotexts and the server's lists


@dataclass(frozen=True)
class Upscale:
    """A request's cascade stage: `scale` must be the upscaler's; 0 / None take the upscaler's defaults."""

    scale: int = field(default=2, metadata=option(
        "upscale", flag="--upscale", api="scale",
        help="run the model's trained upscaler after it (a cascade: e.g. 64 -> 128 px with 2); the default model "
             "ships one"))
    steps: int = field(default=0, metadata=option(
        "upscale steps", flag="--upscale-steps", api="steps", help="upscaler steps (0: the upscaler's own)"))
    noise_level: int | None = field(default=None, metadata=option(
        "upscale noise level", flag="--upscale-noise", api="noise_level", cli={"type": int},
        help="the noise-augmentation level of the first image, 0-999 (higher: the upscaler redraws more; default: "
             "the upscaler's)"))
    guidance: float | None = field(default=None, metadata=option(
        "upscale guidance", flag="--upscale-guidance", api="guidance", cli={"type": float},
        help="the upscaler's guidance scale (default: its own)"))
    strength: float | None = field(default=None, metadata=option(
        "upscale strength", flag="--upscale-strength", api="strength", cli={"type": float},
        help="the part of the upscaler's schedule to run, in (0, 1], from the first image upsampled and noised (1: "
             "from pure noise; default: the upscaler's)"))

    def check(self, names: Mapping[str, str] | None = None) -> "Upscale":
        name = {f.name: opt.label for f, opt in table(Upscale)} | dict(names or {})
        if self.scale not in (2, 4):
            raise UserError(f"{name['scale']} must be 2 or 4 (an upscaler's factor), got {self.scale!r}")
        if self.steps:
            validate.steps(self.steps, what=name["steps"])
        if self.noise_level is not None:
            check_level(self.noise_level, name["noise_level"])
        if self.guidance is not None:
            validate.guidance(self.guidance, name["guidance"])
        if self.strength is not None:
            validate.in_range(self.strength, name["strength"], 0.0, 1.0, low_open=True)
        return self


def augment(noise_scheduler, low: torch.Tensor, levels: torch.Tensor, noise: torch.Tensor, scale: int) -> torch.Tensor:
    """Low-resolution latents (N, C, h, w), noised to `levels` (N,) by the forward process, upsampled (nearest) to
    (N, C, h·scale, w·scale): the upscaler's conditioning input."""
    noised = noise_scheduler.add_noise(low, noise, levels.to(low.device))
    return F.interpolate(noised, scale_factor=scale, mode="nearest")


def load(pipe, folder: str | Path):
    """The upscaler in `folder` as a LatentPipeline that shares `pipe`'s VAE, text encoder, tokenizer and prompt
    cache; its `upscaler_config` holds the scale and the sampling defaults."""
    import diffusers

    folder = Path(folder)
    config, unet = read(folder, pipe.unet.dtype)
    try:
        scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    except Exception as err:
        raise UserError(f"cannot load the upscaler in {folder}: {first_line(err)}") from None
    latent_channels = pipe.vae.config.latent_channels
    check_unet(unet, latent_channels)
    width = pipe.text_encoder_backend().hidden_size
    if unet.config.cross_attention_dim != width:
        raise UserError(f"the upscaler in {folder} was trained for a {unet.config.cross_attention_dim}-wide text "
                        f"encoder; this model's is {width} wide")
    up = sharing(pipe, unet, scheduler)
    up.upscaler_config, up.upscaler_folder = config, folder
    return up


def sharing(pipe, unet, scheduler, text_encoders: tuple[str, ...] = ()):
    """A LatentPipeline of `unet` and `scheduler` with `pipe`'s VAE, text encoder, tokenizer and prompt cache (and
    the further encoders named in `text_encoders`, where `pipe` has them), progress bars off."""
    extra = {k: getattr(pipe, k) for k in text_encoders if getattr(pipe, k, None) is not None}
    out = type(pipe)(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                     unet=unet.to(pipe.execution_device), scheduler=scheduler, clip_skip=pipe.config.clip_skip, **extra)
    out.prompt_encoder = pipe.prompt_encoder  # keyed by the text encoder: sharing it is safe
    out.set_progress_bar_config(disable=True)
    return out


STUDENT = "lcm"  # the few-step student's folder inside a model folder


def load_student(pipe):
    """The student in `{pipe's folder}/lcm` (`unet/`, `scheduler/`) as a LatentPipeline sharing `pipe`'s VAE, text
    encoders, tokenizers and prompt cache; None when there is none."""
    import diffusers

    source = pipe.config.get("_name_or_path")
    folder = Path(source) / STUDENT if source else None
    if folder is None or not (folder / "unet" / "config.json").is_file():
        return None
    try:
        unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=pipe.unet.dtype,
                                                              use_safetensors=True, local_files_only=True)
        scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    except Exception as err:
        raise UserError(f"cannot load the few-step student in {folder}: {first_line(err)}") from None
    if unet.config.cross_attention_dim != pipe.unet.config.cross_attention_dim:
        raise UserError(f"the student in {folder} takes {unet.config.cross_attention_dim}-wide text; this model's "
                        f"encoder is {pipe.unet.config.cross_attention_dim} wide")
    student = sharing(pipe, unet, scheduler, ("text_encoder_2", "tokenizer_2", "text_encoder_zh", "tokenizer_zh"))
    student.loras_dir, student.loras_confined = pipe.loras_dir, pipe.loras_confined
    student.student_folder = folder
    student.choose_memory_format()
    return student


# ----------------------------------------------------------------------------------------------------------------
# Sampling


def _noise_generators(plan) -> list[torch.Generator] | torch.Generator | None:
    """The augmentation noise's generators: one per image from a seed derived from the image's seed (its own
    seed would draw the same numbers as the upscaler's starting noise), or the request's generator."""
    if plan.seeds is None:
        return plan.generator
    return [torch.Generator("cpu").manual_seed(int(torch.randint(0, 2**62, (1,), generator=torch.Generator(
        "cpu").manual_seed(seed)))) for seed in plan.seeds]


def initial(up, low: torch.Tensor, scale: int) -> torch.Tensor:
    """Where the upscaler's sampling starts when its strength is below 1: the first stage's image (decoded),
    enlarged bicubically and encoded again, then noised by the sampler to the first timestep it runs (as
    image-to-image starts, and as A1111's hires fix does with a pixel upscaler). The latents themselves upsampled
    (bilinear) are not an enlarged image: decoded, the small shapes of two-shape pictures lose their kind
    (the default model's held-out binding 85% -> 31%, `python bench/probes.py upscale-start`), and 6 of 20 steps
    did not repair them (README, Cascade).
    One image per VAE call, as `sampling.decode` does, so an image is the same made alone or in a batch."""
    pixels = decode(up, low.to(up.execution_device)).float()
    big = F.interpolate(pixels, scale_factor=scale, mode="bicubic").clamp(-1, 1)
    return torch.cat([encode_images(up, big[i:i + 1]) for i in range(big.shape[0])])


def condition(up, low: torch.Tensor, plan, noise_level: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The upscaler's conditioning input for the first stage's latents `low` (N, C, h, w), and the levels (N,)."""
    from diffusers import DDPMScheduler
    from diffusers.utils.torch_utils import randn_tensor

    forward = DDPMScheduler.from_config(up.scheduler.config)
    noise = randn_tensor(tuple(low.shape), generator=_noise_generators(plan), device=low.device,
                         dtype=torch.float32)
    levels = torch.full((low.shape[0],), noise_level, dtype=torch.long, device=low.device)
    return augment(forward, low.float(), levels, noise, up.upscaler_config.scale), levels


def second_stage(pipe, plan):
    """The upscaler (a LatentPipeline) and the plan of the cascade's second stage, fitted and checked before the
    first stage runs; its conditioning is added once the first stage's latents exist (`generate`)."""
    want = plan.request.upscale
    up = pipe.upscaler()
    cfg = up.upscaler_config
    if want.scale != cfg.scale:
        raise UserError(f"this model's upscaler makes {cfg.scale}× images; an upscale of {want.scale} is not "
                        f"available")
    # the upscaler is another model: the first model's sampler, guidance variants and LoRAs are not its
    second = plan.per_image_request(
        height=plan.height * cfg.scale, width=plan.width * cfg.scale, num_inference_steps=want.steps or cfg.steps,
        guidance_scale=cfg.guidance if want.guidance is None else want.guidance, scheduler=None,
        strength=cfg.strength if want.strength is None else want.strength,
        guidance_rescale=0.0, apg=False, dynamic_threshold=None, guidance_interval=(0.0, 1.0), loras=None)
    return up, second.fit(up)


def generate(pipe, plan, on_step=None, on_latents=None):
    """The cascade for a fitted request whose `upscale` is set: the first model's latents, then the upscaler's."""
    up, second = second_stage(pipe, plan)
    want = plan.request.upscale
    first = pipe.run_plan(dataclasses.replace(plan, request=dataclasses.replace(plan.request, output_type="latent")),
                          on_step, on_latents)
    level = up.upscaler_config.noise_level if want.noise_level is None else want.noise_level
    low, levels = condition(up, first.images, plan, level)
    init = initial(up, first.images, up.upscaler_config.scale) if second.request.strength < 1 else None
    with tiling.circular(up.unet, up.vae, enabled=second.request.tiling):
        out = up.run_plan(dataclasses.replace(second, low_res=low, noise_levels=levels, init_latents=init), on_step,
                          on_latents)
    out.info = first.info | {"upscale_height": second.height, "upscale_width": second.width,
                             "upscale_noise_level": level} | {k: v for k, v in out.info.items() if k == "fp32_retry"}
    # the settings the upscaler ran with, its defaults filled in: a replay stays the same image when they change
    ran = dataclasses.replace(want, steps=second.request.num_inference_steps, noise_level=level,
                              guidance=second.request.guidance_scale, strength=second.request.strength)
    out.metadata = [meta | {"upscale": dataclasses.asdict(ran)} for meta in first.metadata]
    return out


@torch.no_grad()
def upscale_latents(up, low: torch.Tensor, prompts: list[str], seeds: list[int], steps: int | None = None,
                    noise_level: int | None = None, guidance: float | None = None, strength: float | None = None,
                    output_type: str = "pil"):
    """The upscaler alone on given low-resolution latents (N, C, h, w) (e.g. the data's own): validation and
    evaluation."""
    cfg = up.upscaler_config
    f = up.vae_scale_factor
    plan = up.check_request(list(prompts), seed=list(seeds), num_inference_steps=steps or cfg.steps,
                            guidance_scale=cfg.guidance if guidance is None else guidance,
                            height=low.shape[-2] * f * cfg.scale, width=low.shape[-1] * f * cfg.scale,
                            strength=cfg.strength if strength is None else strength, output_type=output_type)
    low = low.to(up.execution_device)
    cond, levels = condition(up, low, plan, cfg.noise_level if noise_level is None else noise_level)
    init = initial(up, low, cfg.scale) if plan.request.strength < 1 else None
    return up.run_plan(dataclasses.replace(plan, low_res=cond, noise_levels=levels, init_latents=init))
