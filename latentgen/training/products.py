"""What a `train_unet.py` run makes: a pipeline (the U-Net trained whole), a LoRA, or an upscaler. The loop asks its
product how to adapt the U-Net, what the frozen base is, how to condition a batch, what to validate on, and how to
save; here also the validation grid and the LoRA's peft layers."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from latentgen.components.diffusion import (
    scale_latents,
)
from latentgen.components.schedulers import make_scheduler
from latentgen.config import to_yaml
from latentgen.errors import UserError, first_line
from latentgen.formats import lora as lora_file
from latentgen.formats import upscaler
from latentgen.generation.cascade import upscale_latents
from latentgen.generation.outputs import contact_sheet
from latentgen.generation.pipeline import LatentPipeline
from latentgen.io import atomic_file
from latentgen.runtime.precision import DTYPES
from latentgen.training.loop import (
    evaluating,
)
from latentgen.training.unet_config import LoraTrainConfig, UNetTrainConfig
from latentgen.training.unet_parts import Components, by_pipeline_name
from latentgen.training.upscaler import low_resolution, training_condition

log = logging.getLogger(__name__)

class Product:
    """A text-to-image pipeline: the U-Net trained whole (and the text encoder with `text_encoder.train`)."""

    folder = "pipeline"

    def __init__(self, config: UNetTrainConfig, parts: Components):
        self.config, self.parts = config, parts

    @property
    def target(self) -> Path:
        return Path(self.config.output_dir) / self.folder

    def adapt(self, unet) -> None:
        """Make `unet` (and the text encoder) what the run trains."""

    def base(self, unet):
        """The frozen base model a preservation loss compares with (None: no such loss)."""
        return None

    def condition(self, low, g) -> tuple[Any, Any]:
        """The U-Net's extra input and class labels for a batch (`low`: an upscaler's low-resolution latents)."""
        return None, None

    def examples(self, dataset, device):
        """What validation shows besides the config's prompts (None: the prompts only)."""
        return None

    def save(self, unet, target: Path) -> None:
        save_pipeline(self.config, self.parts, unet, target)


class LoraProduct(Product):
    """A LoRA, LoHa or LoKr file on the frozen U-Net (and text encoder with `lora.text_encoder`)."""

    folder = "lora.safetensors"

    def adapt(self, unet) -> None:
        add_lora(unet, self.config.lora)
        for text_model in self.parts.text_models if self.config.lora.text_encoder else ():
            add_text_encoder_lora(text_model, self.config.lora)

    def base(self, unet):
        return _base_unet(unet) if self.config.lora.preserve else None

    def save(self, unet, target: Path) -> None:
        save_lora(self.config, unet, self.parts.text_models if self.config.lora.text_encoder else [], target,
                  self.parts.is_sdxl)


class UpscalerProduct(Product):
    """A cascade's upscaler folder: a U-Net on noisy latents beside the augmented low-resolution ones."""

    folder = "upscaler"

    def condition(self, low, g) -> tuple[Any, Any]:
        return training_condition(self.parts.noise_scheduler, low, self.config.upscaler, g)

    def examples(self, dataset, device):
        return _upscaler_examples(dataset, self.config, self.parts, device)

    def save(self, unet, target: Path) -> None:
        save_upscaler(self.config, self.parts, unet, target)


def product(config: UNetTrainConfig, parts: Components) -> Product:
    if config.lora.rank:
        return LoraProduct(config, parts)
    return UpscalerProduct(config, parts) if config.upscaler.scale else Product(config, parts)


def _base_unet(unet):
    """`unet` with its adapters off: the frozen base model a LoRA is trained on."""

    def base(*args, **kwargs):
        unet.disable_adapters()
        try:
            return unet(*args, **kwargs)
        finally:
            unet.enable_adapters()

    return base


def _pipeline(parts: Components, unet, sampler: str):

    pipe = LatentPipeline(vae=parts.vae, text_encoder=parts.text_model, tokenizer=parts.tokenizer, unet=unet,
                          scheduler=make_scheduler(sampler, parts.noise_scheduler.config), clip_skip=parts.clip_skip,
                          apg=parts.apg, text_encoder_2=parts.text_model_2, tokenizer_2=parts.tokenizer_2)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def validation_grid(config: UNetTrainConfig, parts: Components, unet, autocast, examples=None):
    """Samples of the validation prompts; for an upscaler, rows of (the low-resolution image, enlarged; the
    upscaler's image; the data's image) for a few data examples."""

    pipe = _pipeline(parts, unet, config.sampler)
    if examples is not None:

        low, captions, truth = examples
        pipe.upscaler_config = config.upscaler
        with evaluating(unet), autocast(), torch.no_grad():
            images = upscale_latents(pipe, low, captions, list(range(len(captions))),
                                     steps=config.validation_steps).images
            small = pipe.image_processor.postprocess(pipe.decode(low), output_type="pil")
        size = images[0].size
        cells = [im for row in zip(small, images, truth) for im in (row[0].resize(size), row[1], row[2])]
        labels = [t for c in captions for t in (f"input: {c}", "upscaled", "data")]
        return contact_sheet(cells, labels, columns=3)
    with evaluating(unet), autocast():
        images = pipe(config.validation_prompts, num_inference_steps=config.validation_steps,
                      guidance_scale=config.validation_guidance, seed=list(range(len(config.validation_prompts))),
                      output_type="pil").images
    return contact_sheet(images, config.validation_prompts, columns=len(images))


def _upscaler_examples(dataset, config: UNetTrainConfig, parts: Components, device, count: int = 4):
    """The first `count` data examples as (low-resolution latents (n, C, h, w), captions, images)."""

    items = [dataset.item(i, 0, 0) for i in range(min(count, len(dataset)))]
    pixels = torch.stack([item["pixel_values"] for item in items]).to(device)
    with torch.no_grad():
        small = low_resolution(pixels, config.upscaler.scale)
        low = scale_latents(parts.vae, parts.vae.encode(small).latent_dist.mode())
    from diffusers.image_processor import VaeImageProcessor

    images = VaeImageProcessor().postprocess(pixels.float().cpu(), output_type="pil")
    return low.float(), [item["text"] for item in items], images


def save_pipeline(config: UNetTrainConfig, parts: Components, unet, target: Path) -> None:
    """The LatentPipeline folder `infer.py --model` loads (weights in `save_dtype`)."""

    pipe = _pipeline(parts, unet, config.sampler)
    dtype = DTYPES[config.save_dtype]
    pipe.save_pretrained(target, weights_dtype=None if dtype == torch.float32 else dtype)
    with atomic_file(target / "train_config.yaml") as tmp:
        tmp.write_text(to_yaml(config))


def save_upscaler(config: UNetTrainConfig, parts: Components, unet, target: Path) -> None:
    """The upscaler folder (`latentgen.formats.upscaler`): its U-Net, sampler and defaults; it uses the VAE and text
    encoder of the model it was trained with (`pretrained_pipeline`), and goes into that model's folder as
    `upscaler/`."""

    dtype = DTYPES[config.save_dtype]
    upscaler.save(target, unet, make_scheduler(config.sampler, parts.noise_scheduler.config), config.upscaler,
                  None if dtype == torch.float32 else dtype)
    with atomic_file(target / "train_config.yaml") as tmp:
        tmp.write_text(to_yaml(config))


# ----------------------------------------------------------------------------------------------------------------
# LoRA




def adapter_config(lora: LoraTrainConfig, targets: list[str]):
    """peft's config for `lora.algo` on `targets`: a LoRA (Gaussian A, zero B, as diffusers' LoRA scripts), or a
    LoHa or LoKr with peft's own start (the second factor zero, so training starts from the base model too)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    alpha = lora.alpha or lora.rank
    if lora.algo == "loha":
        return LoHaConfig(r=lora.rank, alpha=alpha, target_modules=targets)
    if lora.algo == "lokr":
        return LoKrConfig(r=lora.rank, alpha=alpha, target_modules=targets)
    return LoraConfig(r=lora.rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets)


def add_lora(unet, lora: LoraTrainConfig) -> None:
    """Freeze the U-Net and give its attention layers a trainable LoRA, LoHa or LoKr (peft, as diffusers' LoRA
    scripts do for a LoRA)."""
    unet.requires_grad_(False)
    try:
        unet.add_adapter(adapter_config(lora, list(lora.targets)))
    except ValueError as err:  # peft: no module matched
        raise UserError(f"lora.targets {lora.targets}: {first_line(err)}") from None


def add_text_encoder_lora(text_model, lora: LoraTrainConfig) -> None:
    """A trainable LoRA (LoHa, LoKr) on the frozen text encoder's attention projections. peft injects it:
    transformers' `add_adapter` (what diffusers' scripts call) refuses the peft that pip has for this transformers."""
    from peft import inject_adapter_in_model

    targets = lora.text_encoder_targets or _attention_projections(text_model)
    try:
        inject_adapter_in_model(adapter_config(lora, list(targets)), text_model)
    except ValueError as err:  # peft: no module matched
        raise UserError(f"lora.text_encoder_targets {targets}: {first_line(err)}") from None


TEXT_ATTENTION = (["q_proj", "k_proj", "v_proj", "out_proj"],  # CLIP, OpenCLIP as transformers builds it
                  ["query", "key", "value"],  # BERT, MiniLM
                  ["q", "k", "v", "o"])  # T5


def _attention_projections(text_model) -> list[str]:
    names = {name.rpartition(".")[2] for name, _ in text_model.named_modules()}
    for targets in TEXT_ATTENTION:
        if set(targets) <= names:
            return targets
    raise UserError(f"no attention projections known for {type(text_model).__name__}; set "
                    "lora.text_encoder_targets to its layer names")


def save_lora(config: UNetTrainConfig, unet, text_models: list, target: Path, sdxl: bool = False) -> None:
    """The trained adapters (of the U-Net and of `text_models`, none, one, or SDXL's two) as a LoRA file
    (`latentgen.formats.lora.write`): diffusers' format, and kohya's beside it with `lora.kohya`; a LoHa or LoKr
    in LyCORIS's."""
    from peft.utils import get_peft_model_state_dict

    dtype = DTYPES[config.save_dtype]
    parts = {"unet": unet} | by_pipeline_name(text_models)
    layers = {name: {k: v.detach().to(dtype).contiguous().cpu() for k, v in get_peft_model_state_dict(m).items()}
              for name, m in parts.items()}
    configs = {name: m.peft_config["default"].to_dict() for name, m in parts.items()}
    lora_file.write(target, layers, configs, algo=config.lora.algo, rank=config.lora.rank,
                    alpha=float(config.lora.alpha or config.lora.rank), kohya=config.lora.kohya,
                    text_model=text_models[0] if text_models else None, steps=config.max_steps,
                    unet_config=unet.config if sdxl else None)
