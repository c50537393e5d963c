"""What a `train_unet.py` run trains with: the VAE, the U-Net, the text encoder and the forward process, loaded and
checked against each other before any work."""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from latentgen.components.denoisers import build_denoiser, text_width_key
from latentgen.components.diffusion import (
    forward_process,
    size_multiple,
    takes_sizes,
    vae_factor,
)
from latentgen.components.text_encoders import load_text_encoder
from latentgen.data.sources import check_resolution
from latentgen.errors import UserError
from latentgen.formats.upscaler import check_unet, read
from latentgen.generation.pipeline import LatentPipeline
from latentgen.training.unet_config import UNetTrainConfig

log = logging.getLogger(__name__)

@dataclass
class Components:
    vae: Any
    unet: Any
    tokenizer: Any
    text_model: Any  # the torch module (CLIPTextModel, T5EncoderModel, open_clip model, ...)
    encoder: Any  # the TextEncoder backend over (tokenizer, text_model)
    noise_scheduler: Any  # DDPMScheduler: the forward process
    clip_skip: int | None = None  # the encoder's: what the saved pipeline must use to give the same embeddings
    apg: dict | None = None  # the pretrained pipeline's own guidance (model_index.json `apg`), kept by its fine-tune
    tokenizer_2: Any = None  # SDXL's second encoder (OpenCLIP bigG in transformers' form); `encoder` reads both
    text_model_2: Any = None

    @property
    def text_models(self) -> list[Any]:
        return [self.text_model] + ([self.text_model_2] if self.text_model_2 is not None else [])

    @property
    def named_text_models(self) -> dict[str, Any]:
        """The text models by their names in a pipeline folder (`text_encoder`, SDXL's `text_encoder_2`)."""
        return by_pipeline_name(self.text_models)

    @property
    def is_sdxl(self) -> bool:
        """SDXL's U-Net: its added embedding takes the pooled text and the size conditioning (`time_ids`)."""
        return takes_sizes(self.unet)


def by_pipeline_name(text_models: list[Any]) -> dict[str, Any]:
    """Text models (none, one, or SDXL's two) by their names in a pipeline folder."""
    return dict(zip(("text_encoder", "text_encoder_2"), text_models))


def load_components(config: UNetTrainConfig) -> Components:
    """VAE, U-Net, text encoder and forward process; mismatches are one-line errors before training. When the
    U-Net is the pretrained pipeline's, `config.unet` becomes its architecture, so the run's recorded config says
    what was trained."""
    from diffusers import AutoencoderKL

    pipe = None
    if config.pretrained_pipeline:

        # fp32 weights to train (mixed precision gives bf16/fp16 compute); "auto" would load bf16 on this CPU
        pipe = LatentPipeline.from_pretrained(config.pretrained_pipeline, torch_dtype=torch.float32)
    if config.vae_path:
        path = Path(config.vae_path)
        if not (path / "config.json").is_file():
            raise UserError(f"vae_path {path} is not an AutoencoderKL folder (no config.json)")
        vae = AutoencoderKL.from_pretrained(path, use_safetensors=True)
    elif pipe is not None:
        vae = pipe.vae
    else:
        vae = AutoencoderKL(**config.vae_model)
    if vae.config.scaling_factor is None:
        raise UserError("the VAE has no scaling_factor in its config")
    if pipe is not None and not config.upscaler.scale:
        unet = pipe.unet
        config.unet = architecture(unet)  # what the run trains, recorded in train_config.yaml; not the defaults
    elif config.pretrained_upscaler:
        unet = pretrained_upscaler_unet(config.pretrained_upscaler, config.upscaler.scale)
        config.unet = architecture(unet)
    else:
        unet = build_denoiser(config.backbone, config.unet, config.transformer)
        if config.backbone != "unet":
            config.transformer = dict(unet.config.transformer_config)  # recorded in train_config.yaml
    sdxl = pipe is not None and pipe.is_sdxl
    if sdxl and (config.text_encoder.kind != "pipeline" or config.upscaler.scale or config.lcm.enabled
                 or config.controlnet.enabled):
        raise UserError("an SDXL pipeline trains with its own two text encoders (text_encoder.kind: pipeline); "
                        "its U-Net or LoRA only, not an upscaler, lcm or controlnet run yet")
    tokenizer, text_model, encoder = load_text_encoder(config.text_encoder, pipe)
    noise_scheduler = forward_process(config.noise, pipe.scheduler.config if pipe is not None else None)

    if config.upscaler.scale:

        check_unet(unet, vae.config.latent_channels)
        check_resolution(config.data.resolution // config.upscaler.scale, vae_factor(vae),
                         f"the VAE at 1/{config.upscaler.scale} of data.resolution")
    elif vae.config.latent_channels != unet.config.in_channels:
        raise UserError(f"the VAE makes {vae.config.latent_channels}-channel latents but the U-Net takes "
                        f"in_channels={unet.config.in_channels}; make them equal")
    if encoder.hidden_size != unet.config.cross_attention_dim:
        takes = (f"the U-Net has cross_attention_dim={unet.config.cross_attention_dim}" if config.backbone == "unet"
                 else f"the {config.backbone} takes {unet.config.cross_attention_dim}-wide text "
                      f"(transformer.{text_width_key(config.backbone)})")
        raise UserError(f"the text encoder's width is {encoder.hidden_size} but {takes}; make them equal")
    check_resolution(config.data.resolution, vae_factor(vae), "the VAE")
    multiple = size_multiple(vae, unet)
    if config.data.resolution % multiple:
        latent = config.data.resolution // vae_factor(vae)
        raise UserError(f"resolution {config.data.resolution} gives {latent}×{latent} latents, which the U-Net's "
                        f"{len(unet.config.block_out_channels)} levels cannot halve evenly; use a multiple of "
                        f"{multiple}")
    if config.data.buckets and config.data.bucket_step % multiple:
        raise UserError(f"data.bucket_step {config.data.bucket_step} must be a multiple of {multiple}, the sides the "
                        f"VAE and the {config.backbone} take")
    clip_skip = getattr(encoder, "clip_skip", None) or (1 if getattr(encoder, "layer", "") == "penultimate" else None)
    apg = pipe.config.get("apg") if pipe is not None else None
    second = (pipe.tokenizer_2, pipe.text_encoder_2) if sdxl else (None, None)
    return Components(vae, unet, tokenizer, text_model, encoder, noise_scheduler, clip_skip, apg, *second)


def pretrained_upscaler_unet(folder: str, scale: int):
    """The fp32 U-Net of the upscaler folder `folder` (`latentgen.formats.upscaler.save`'s layout), made for `scale`."""

    made_for, unet = read(Path(folder), torch.float32, what="pretrained_upscaler ")
    if made_for.scale != scale:
        raise UserError(f"pretrained_upscaler {folder} makes {made_for.scale}× latents but upscaler.scale is {scale}")
    return unet


def architecture(model) -> dict:
    """The constructor arguments of a diffusers model that differ from its class's defaults (enough to build it
    again: `type(model)(**architecture(model))`)."""
    defaults = {name: p.default for name, p in inspect.signature(type(model).__init__).parameters.items()}

    def same(value, default):
        if isinstance(value, (list, tuple)) and isinstance(default, (list, tuple)):
            return list(value) == list(default)
        return value == default

    return {key: list(value) if isinstance(value, tuple) else value for key, value in model.config.items()
            if not key.startswith("_") and not (key in defaults and same(value, defaults[key]))}
