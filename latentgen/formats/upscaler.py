"""The upscaler folder (a cascade's second model, `latentgen.generation.cascade`): `unet/`, `scheduler/` and
`upscaler.json` (its scale and sampling defaults), shipped inside the model's folder it was trained for as
`upscaler/`; it borrows that model's VAE and text encoder.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from latentgen import validate
from latentgen.errors import UserError, first_line
from latentgen.io import atomic_dir

CONFIG_NAME = "upscaler.json"
FOLDER = "upscaler"  # inside a model's folder


@dataclass
class UpscalerConfig:
    """train_unet.py's `upscaler:` section (scale > 0 trains an upscaler), and what `upscaler.json` keeps."""

    scale: int = 0  # 0: a text-to-image U-Net; 2 or 4: an upscaler of the latents by this factor
    max_noise_level: int = 350  # training draws the augmentation level uniformly from [0, this]
    noise_level: int = 100  # sampling defaults, stored with the upscaler
    steps: int = 20
    guidance: float = 1.0
    strength: float = 1.0  # the part of the schedule run, from the upsampled first-stage latents noised to its start

    def check(self) -> "UpscalerConfig":
        if self.scale not in (0, 2, 4):
            raise UserError(f"upscaler.scale must be 0 (off), 2 or 4, got {self.scale!r}")
        check_level(self.max_noise_level, "upscaler.max_noise_level")
        check_level(self.noise_level, "upscaler.noise_level")
        validate.steps(self.steps, what="upscaler.steps")
        validate.guidance(self.guidance, "upscaler.guidance")
        validate.in_range(self.strength, "upscaler.strength", 0.0, 1.0, low_open=True)
        return self


def check_level(value, what: str) -> int:
    """A noise-augmentation level: a forward-process timestep, 0 (none) to 999."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 999:
        raise UserError(f"{what} must be a whole number in [0, 999] (a noise level), got {value!r}")
    return value


def is_upscaler_unet(unet, latent_channels: int) -> bool:
    """A U-Net that takes the low-resolution latents beside the noisy ones, and the augmentation level."""
    cfg = unet.config
    return cfg.in_channels == 2 * latent_channels and cfg.get("class_embed_type") == "timestep"


def check_unet(unet, latent_channels: int) -> None:
    cfg = unet.config
    if cfg.in_channels != 2 * latent_channels or cfg.out_channels != latent_channels:
        raise UserError(f"an upscaler U-Net takes the noisy and the low-resolution latents: in_channels must be "
                        f"{2 * latent_channels} and out_channels {latent_channels}, got {cfg.in_channels} and "
                        f"{cfg.out_channels}")
    if cfg.get("class_embed_type") != "timestep":
        raise UserError("an upscaler U-Net takes its noise-augmentation level as a class label: set "
                        "class_embed_type: timestep in the unet config")


def save(folder: Path, unet, scheduler, config: UpscalerConfig, weights_dtype: torch.dtype | None = None) -> None:
    """Write an upscaler folder atomically (U-Net weights in `weights_dtype`, safetensors)."""
    with atomic_dir(folder) as tmp:
        original = next(unet.parameters()).dtype
        try:
            unet.to(weights_dtype or original).save_pretrained(tmp / "unet", safe_serialization=True)
        finally:
            unet.to(original)
        scheduler.save_pretrained(tmp / "scheduler")
        (tmp / CONFIG_NAME).write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")


def folder_of(pipe) -> Path | None:
    """The upscaler shipped inside the pipeline's folder, when there is one."""
    source = pipe.config.get("_name_or_path")
    if not source:
        return None
    folder = Path(source) / FOLDER
    return folder if (folder / CONFIG_NAME).is_file() else None


def read_config(folder: Path, what: str = "") -> UpscalerConfig:
    """The checked `upscaler.json` of an upscaler folder; `what` names the setting that gave the folder, in errors."""
    if not (folder / CONFIG_NAME).is_file():
        raise UserError(f"{what}{folder} is not an upscaler folder (no {CONFIG_NAME}); train one with "
                        "train_unet.py and an upscaler: section")
    try:
        return UpscalerConfig(**json.loads((folder / CONFIG_NAME).read_text())).check()
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"cannot load the upscaler in {what}{folder}: {first_line(err)}") from None


def read(folder: Path, dtype: torch.dtype, what: str = "") -> tuple[UpscalerConfig, torch.nn.Module]:
    """The checked `upscaler.json` and the U-Net (in `dtype`) of an upscaler folder (`read_config`)."""
    from diffusers import UNet2DConditionModel

    config = read_config(folder, what)
    try:
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype, use_safetensors=True,
                                                    local_files_only=True)
    except Exception as err:
        raise UserError(f"cannot load the upscaler in {what}{folder}: {first_line(err)}") from None
    return config, unet
