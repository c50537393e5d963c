"""Train a text-conditioned U-Net on VAE latents: latent diffusion with classifier-free-guidance dropout.

The objective, the forward process and caption dropout are `latentgen.components.diffusion`'s; the latent cache is
`latentgen.training.cache`; the run around the loop is `training.loop.Run`. What is here: the run's config, loading
its components, and the loop itself, which reads top to bottom in `train_unet`.
"""

from __future__ import annotations

import inspect
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from latentgen.components.diffusion import (
    PREDICTION_TYPES,
    TIMESTEP_SAMPLING,
    NoiseConfig,
    caption_dropout,
    diffusion_loss,
    forward_process,
    scale_latents,
    size_multiple,
    vae_factor,
)
from latentgen.components.schedulers import make_scheduler, scheduler_names
from latentgen.components.text_encoders import load_text_encoder
from latentgen.config import to_yaml
from latentgen.data.sources import build_dataset, check_resolution
from latentgen.errors import UserError, first_line, one_of
from latentgen.formats import lora as lora_file
from latentgen.formats import upscaler
from latentgen.formats.upscaler import UpscalerConfig, check_unet, read
from latentgen.generation.cascade import upscale_latents
from latentgen.generation.outputs import contact_sheet
from latentgen.generation.pipeline import LatentPipeline
from latentgen.io import atomic_file, save_image
from latentgen.runtime.device import set_attention
from latentgen.runtime.memory import check_training, unet_training_bytes
from latentgen.runtime.precision import DTYPES
from latentgen.training.cache import load_or_build_cache
from latentgen.training.loop import (
    Run,
    StepBatches,
    TrainConfig,
    batch_iterator,
    compute_bytes,
    evaluating,
    log_image,
    make_ema,
    make_lr_scheduler,
    make_optimizer,
    step_generator,
)
from latentgen.training.upscaler import low_resolution, training_condition

log = logging.getLogger(__name__)

TEXT_ENCODERS = ("minilm", "hf", "openclip", "pipeline", "scratch")

DEFAULT_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[64, 128, 192],
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=384,
    attention_head_dim=8, norm_num_groups=32,
)


@dataclass
class TextEncoderConfig:
    kind: str = "minilm"  # minilm | hf (a local transformers folder) | openclip | pipeline | scratch
    path: str | None = None  # hf: the folder; openclip: a local checkpoint file (safetensors)
    openclip_model: str = "ViT-B-32"  # openclip: the architecture name
    clip_skip: int | None = None
    max_length: int | None = None  # tokens (default: the tokenizer's)
    train: bool = False  # train it with the U-Net (then embeddings are not cached)
    model: dict = field(default_factory=dict)  # scratch: CLIPTextConfig arguments


@dataclass
class LoraTrainConfig:
    rank: int = 0  # 0: train the whole U-Net; > 0: train a LoRA of this rank on the frozen pretrained U-Net
    alpha: float | None = None  # the LoRA's alpha (scale = alpha / rank); default: the rank (scale 1)
    targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])  # attention layers
    text_encoder: bool = False  # also a LoRA (same rank and alpha) on the frozen text encoder
    text_encoder_targets: list[str] | None = None  # default: its attention projections (CLIP, BERT/MiniLM, T5)
    kohya: bool = False  # also write lora_kohya.safetensors in kohya's format (A1111, ComfyUI, sd-scripts)
    # lora, or LyCORIS's loha or lokr (sd-scripts' `--network_args algo=loha`), with peft's layers; a LoHa or LoKr is
    # written in LyCORIS's file format only (lora.safetensors), which A1111, ComfyUI and `--lora` read
    algo: str = "lora"
    # Keeping what the base model draws: an example whose caption has none of the words in `teaches` (the new
    # concept's) learns `preserve` × the frozen base model's prediction + (1 − preserve) × the true target. The base
    # model is the same U-Net with the adapters off, so this costs one more forward pass (no gradients) of those
    # examples. DreamBooth's prior preservation does the same with images sampled from the base beforehand.
    teaches: list[str] = field(default_factory=list)
    preserve: float = 0.0
    # also the examples whose caption was dropped: the unconditional prediction, which guidance subtracts for every
    # prompt. Measured on the star LoRA: old single shapes held-out +4, but the stars' colors suffer (README)
    preserve_unconditional: bool = False


@dataclass
class UNetTrainConfig(TrainConfig):
    output_dir: str = "runs/unet"
    pretrained_pipeline: str | None = None  # fine-tune the U-Net of this pipeline folder (and use its parts)
    vae_path: str | None = None  # an AutoencoderKL folder (train_vae.py's output)
    vae_model: dict = field(default_factory=dict)  # or a new, untrained VAE (smoke tests only)
    unet: dict = field(default_factory=lambda: dict(DEFAULT_UNET))  # UNet2DConditionModel arguments
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    caption_dropout: float = 0.1
    cache: bool = True  # cache latents (and embeddings, when the text encoder is frozen) on disk
    cache_dir: str | None = None  # default: {output_dir}/cache
    sampler: str = "dpm++"  # the scheduler saved with the pipeline (and used for validation)
    validation_prompts: list[str] = field(default_factory=lambda: [
        "a red circle on a blue background", "a yellow square on a black background",
        "a green triangle on a white background",
        "a purple circle to the left of an orange square on a gray background"])
    validation_steps: int = 20
    validation_guidance: float = 7.5
    save_dtype: str = "fp32"  # fp32, fp16 or bf16 weights in the final pipeline (or LoRA)
    lora: LoraTrainConfig = field(default_factory=LoraTrainConfig)
    upscaler: UpscalerConfig = field(default_factory=UpscalerConfig)  # scale > 0: train a cascade's upscaler
    pretrained_upscaler: str | None = None  # an upscaler folder whose U-Net the run fine-tunes (else a new one)

    @property
    def trains_text(self) -> bool:
        """The text encoder (or a LoRA of it) learns: prompts are encoded every step, not cached."""
        return self.text_encoder.train or self.lora.text_encoder

    def check(self) -> None:
        super().check()
        if self.lora.rank < 0 or (self.lora.alpha is not None and self.lora.alpha <= 0):
            raise UserError(f"lora.rank must be ≥ 0 and lora.alpha > 0, got {self.lora.rank} and {self.lora.alpha}")
        if self.lora.rank and not self.pretrained_pipeline:
            raise UserError("lora.rank > 0 trains a LoRA of a pretrained model: set pretrained_pipeline")
        if self.lora.rank and (self.ema or self.text_encoder.train):
            raise UserError("a LoRA run trains only LoRAs: set ema: false and text_encoder.train: false "
                            "(lora.text_encoder: true trains a LoRA of the text encoder)")
        if self.lora.algo not in LORA_ALGOS:
            raise one_of("lora.algo", self.lora.algo, LORA_ALGOS)
        if self.lora.text_encoder and not self.lora.rank:
            raise UserError("lora.text_encoder: true needs lora.rank > 0")
        if not 0 <= self.lora.preserve <= 1:
            raise UserError(f"lora.preserve must be in [0, 1], got {self.lora.preserve}")
        if self.lora.preserve and not (self.lora.rank and self.lora.teaches):
            raise UserError("lora.preserve needs lora.rank > 0 and lora.teaches (the new concept's words; captions "
                            "without them keep the base model's predictions)")
        if self.lora.preserve and self.lora.text_encoder:
            raise UserError("lora.preserve keeps the base U-Net's predictions for a frozen text encoder: "
                            "set lora.text_encoder: false")
        if self.text_encoder.kind not in TEXT_ENCODERS:
            raise one_of("text_encoder.kind", self.text_encoder.kind, list(TEXT_ENCODERS))
        if self.text_encoder.kind == "pipeline" and not self.pretrained_pipeline:
            raise UserError("text_encoder.kind 'pipeline' needs pretrained_pipeline")
        if self.text_encoder.kind in ("hf", "openclip") and not self.text_encoder.path:
            raise UserError(f"text_encoder.kind '{self.text_encoder.kind}' needs text_encoder.path")
        if self.noise.prediction_type is not None and self.noise.prediction_type not in PREDICTION_TYPES:
            raise one_of("noise.prediction_type", self.noise.prediction_type, list(PREDICTION_TYPES))
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise UserError(f"caption_dropout is a probability in [0, 1], got {self.caption_dropout}")
        if self.noise.snr_gamma < 0 or self.noise.offset_noise < 0:
            raise UserError("noise.snr_gamma and noise.offset_noise must be ≥ 0")
        if self.noise.timestep_sampling not in TIMESTEP_SAMPLING:
            raise one_of("noise.timestep_sampling", self.noise.timestep_sampling, list(TIMESTEP_SAMPLING))
        if not self.noise.logit_std > 0:
            raise UserError(f"noise.logit_std must be > 0, got {self.noise.logit_std}")
        if self.sampler not in scheduler_names():
            raise one_of("sampler", self.sampler, scheduler_names())
        if self.save_dtype not in ("fp32", "fp16", "bf16"):
            raise one_of("save_dtype", self.save_dtype, ["fp32", "fp16", "bf16"])
        if not (self.vae_path or self.vae_model or self.pretrained_pipeline):
            raise UserError("no VAE: set vae_path (a train_vae.py output) or pretrained_pipeline")
        self.upscaler.check()
        if self.upscaler.scale and (self.lora.rank or self.text_encoder.train or self.data.streaming):
            raise UserError("an upscaler run trains a new U-Net on a map-style dataset: set lora.rank: 0, "
                            "text_encoder.train: false and data.streaming: false")
        if self.pretrained_upscaler and not self.upscaler.scale:
            raise UserError("pretrained_upscaler fine-tunes a cascade's upscaler: set upscaler.scale (2 or 4)")
        if self.cache and (self.data.random_crop or self.data.hflip):
            raise UserError("cache=true stores one view of each image; set data.random_crop=false and "
                            "data.hflip=0, or cache=false to augment every step")


# ----------------------------------------------------------------------------------------------------------------
# Components


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


def load_components(config: UNetTrainConfig) -> Components:
    """VAE, U-Net, text encoder and forward process; mismatches are one-line errors before training. When the
    U-Net is the pretrained pipeline's, `config.unet` becomes its architecture, so the run's recorded config says
    what was trained."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

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
        try:
            unet = UNet2DConditionModel(**config.unet)
        except (TypeError, ValueError) as err:
            raise UserError(f"bad unet config: {first_line(err)}") from None
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
        raise UserError(f"the text encoder's width is {encoder.hidden_size} but the U-Net has "
                        f"cross_attention_dim={unet.config.cross_attention_dim}; make them equal")
    check_resolution(config.data.resolution, vae_factor(vae), "the VAE")
    multiple = size_multiple(vae, unet)
    if config.data.resolution % multiple:
        latent = config.data.resolution // vae_factor(vae)
        raise UserError(f"resolution {config.data.resolution} gives {latent}×{latent} latents, which the U-Net's "
                        f"{len(unet.config.block_out_channels)} levels cannot halve evenly; use a multiple of "
                        f"{multiple}")
    clip_skip = getattr(encoder, "clip_skip", None) or (1 if getattr(encoder, "layer", "") == "penultimate" else None)
    apg = pipe.config.get("apg") if pipe is not None else None
    return Components(vae, unet, tokenizer, text_model, encoder, noise_scheduler, clip_skip, apg)


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


# ----------------------------------------------------------------------------------------------------------------
# Training


def train_unet(config: UNetTrainConfig) -> Path:
    """Run the training; returns the final pipeline folder (`{output_dir}/pipeline`)."""
    # 1. Components and data, checked before any training starts.
    run = Run(config, "train_unet")
    parts = load_components(config)
    dataset = build_dataset(config.data)
    StepBatches(len(dataset), config.train_batch_size, run.state.num_processes, 0, config.seed)  # fits one step
    kernel = set_attention(parts.unet, config.attention, run.state.device, training=True)
    latent_size = config.data.resolution // vae_factor(parts.vae)
    check_training(lambda b: unet_training_bytes(parts.unet, latent_size, b, compute_bytes(config), kernel == "math"),
                   config.train_batch_size, run.state.device, f"the U-Net at {config.data.resolution} px")
    accelerator = run.launch()
    device = accelerator.device
    train_text = config.trains_text

    # 2. Frozen parts in eval mode on the device (autocast gives them bf16/fp16 compute); cache.
    parts.vae.requires_grad_(False).eval().to(device)
    parts.text_model.requires_grad_(config.text_encoder.train).train(config.text_encoder.train).to(device)
    data = load_or_build_cache(config, dataset, parts, not train_text, accelerator) if config.cache else dataset
    if config.cache and not train_text:
        data.embeddings = data.embeddings.to(device)  # row 0: the empty prompt

    # 3. What the run makes (a pipeline, a LoRA or an upscaler); the U-Net (or its LoRA), optimizer, schedule, EMA.
    made = product(config, parts)
    unet = parts.unet
    made.adapt(unet)
    unet.train()
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    params += [p for p in parts.text_model.parameters() if p.requires_grad] if train_text else []
    optimizer = make_optimizer(params, config)
    lr_scheduler = make_lr_scheduler(optimizer, config)
    ema = make_ema(unet, config) if config.ema else None
    # A trained text encoder stays unwrapped (the backends need its attributes); with several processes its
    # gradients are averaged by hand below, which is what DDP would do.
    unet, optimizer = accelerator.prepare(unet, optimizer)
    raw_unet = accelerator.unwrap_model(unet)
    if ema is not None:
        ema.to(device)

    base = made.base(raw_unet)
    base_weights = _base_weights(data, config.lora)

    # 4. Resume, then train.
    models = {"unet": raw_unet} | ({"text_encoder": parts.text_model} if train_text else {})
    states = {"optimizer": optimizer.optimizer, "lr_scheduler": lr_scheduler, "ema": ema,
              "scaler": accelerator.scaler}
    examples = made.examples(dataset, device)
    start = run.resume(models, states,
                       lambda step: _validate(config, parts, raw_unet, ema, accelerator, step, examples))
    accum = config.gradient_accumulation_steps
    batches = batch_iterator(data, config, accelerator.num_processes, accelerator.process_index, start * accum)
    for step in range(start, config.max_steps):
        for micro in range(accum):
            g = step_generator(config.seed, step, micro, accelerator.process_index, device)
            batch = next(batches)
            with accelerator.accumulate(unet):
                with accelerator.autocast():
                    latents, context, low, dropped = _latents_and_context(batch, data, parts, config, g, device)
                    extra, levels = made.condition(low, g)
                    loss = diffusion_loss(unet, parts.noise_scheduler, latents, context, g, config.noise, extra,
                                          levels, base, base_weights(batch, dropped)).mean()
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    if train_text:
                        _average_gradients(parts.text_model, accelerator)
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            run.averages.add(loss=loss.item())
        lr_scheduler.step()
        if ema is not None:
            ema.step(raw_unet.parameters())
        run.end_step(step + 1)

    # 5. What the run makes, with EMA weights when on.
    target = made.target
    if run.finish(config.train_batch_size * accum * accelerator.num_processes):
        if ema is not None:
            ema.copy_to(raw_unet.parameters())
        _validate(config, parts, raw_unet, None, accelerator, config.max_steps, examples)
        made.save(raw_unet, target)
        accelerator.print(f"wrote {target}")
    run.close()
    return target


def _average_gradients(model, accelerator) -> None:
    """The mean of each parameter's gradient over the processes: what DDP does for the U-Net, done by hand for a
    trained text encoder, which stays unwrapped (its backends need its attributes)."""
    if accelerator.num_processes > 1:
        for p in model.parameters():
            if p.grad is not None:
                p.grad = accelerator.reduce(p.grad, reduction="mean")


# ----------------------------------------------------------------------------------------------------------------
# What a run makes: a pipeline (the U-Net trained whole), a LoRA, or an upscaler. The loop asks its product how to
# adapt the U-Net, what the frozen base is, how to condition a batch, what to validate on, and how to save.


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
        if self.config.lora.text_encoder:
            add_text_encoder_lora(self.parts.text_model, self.config.lora)

    def base(self, unet):
        return _base_unet(unet) if self.config.lora.preserve else None

    def save(self, unet, target: Path) -> None:
        save_lora(self.config, unet, self.parts.text_model if self.config.lora.text_encoder else None, target)


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


def _base_weights(data, lora: LoraTrainConfig):
    """A function (batch, dropped) -> (B,) weights: lora.preserve for the examples whose caption (before dropout:
    it describes the image) names none of lora.teaches, and with lora.preserve_unconditional for those whose caption
    was dropped (`dropped`, (B,) bool: caption dropout's draw), else 0; None when nothing is preserved. Captions are
    read once per cached text row, not once per step."""
    if not lora.preserve:
        return lambda batch, dropped: None
    # whole words in Latin scripts ("star" is not in "start"), substrings in scripts without spaces (中文)
    names = re.compile("|".join(f"(?<![a-z0-9]){re.escape(w.lower())}(?![a-z0-9])" for w in lora.teaches))
    is_old = lambda texts: torch.tensor([names.search(t.lower()) is None for t in texts])  # noqa: E731
    rows_old = is_old(data.texts) if hasattr(data, "texts") else None  # a cache: one caption per text row

    def weights(batch, dropped: torch.Tensor) -> torch.Tensor:
        old = rows_old[batch["text_row"]] if "text_row" in batch else is_old(batch["text"])
        old = old.to(dropped.device)
        return (old | dropped if lora.preserve_unconditional else old).float() * lora.preserve

    return weights


def _latents_and_context(batch, data, parts: Components, config: UNetTrainConfig, g, device):
    """z_0 (B, C, h, w), scaled; the text context (B, T, D), with caption dropout applied; for an upscaler the
    low-resolution latents (B, C, h/s, w/s), scaled, else None; and which captions were dropped, (B,) bool."""
    scale = config.upscaler.scale
    if "mean" in batch:  # cached posterior: z = μ + σ·n, as latent_dist.sample() would draw it
        mean, std = batch["mean"].to(device), batch["std"].to(device)
        z = mean + std * torch.randn(mean.shape, generator=g, device=device, dtype=mean.dtype)
        low = None
        if scale:
            mean, std = batch["low_mean"].to(device), batch["low_std"].to(device)
            low = mean + std * torch.randn(mean.shape, generator=g, device=device, dtype=mean.dtype)
    else:

        with torch.no_grad():
            pixels = batch["pixel_values"].to(device)
            z = parts.vae.encode(pixels).latent_dist.sample(generator=g)
            low = parts.vae.encode(low_resolution(pixels, scale)).latent_dist.sample(generator=g) if scale else None
    latents = scale_latents(parts.vae, z.float())
    low = None if low is None else scale_latents(parts.vae, low.float())
    rows = batch["text_row"].to(device) if "text_row" in batch else None
    dropped = caption_dropout(len(batch["text_row"] if rows is not None else batch["text"]),
                              config.caption_dropout, g)
    if getattr(data, "embeddings", None) is not None:  # cached embeddings; row 0 is the empty prompt
        return latents, data.embeddings[torch.where(dropped, torch.zeros_like(rows), rows)], low, dropped
    texts = [data.texts[r] for r in rows.tolist()] if rows is not None else list(batch["text"])
    texts = ["" if d else t for t, d in zip(texts, dropped.tolist())]
    with torch.set_grad_enabled(config.trains_text):
        context = parts.encoder.encode(texts).hidden_states
    return latents, context, low, dropped


# ----------------------------------------------------------------------------------------------------------------
# Validation and the saved pipeline


def _pipeline(parts: Components, unet, sampler: str):

    pipe = LatentPipeline(vae=parts.vae, text_encoder=parts.text_model, tokenizer=parts.tokenizer, unet=unet,
                          scheduler=make_scheduler(sampler, parts.noise_scheduler.config), clip_skip=parts.clip_skip,
                          apg=parts.apg)
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


def _validate(config, parts, unet, ema, accelerator, step: int, examples=None) -> None:
    if ema is not None:
        ema.store(unet.parameters())
        ema.copy_to(unet.parameters())
    grid = validation_grid(config, parts, unet, accelerator.autocast, examples)
    if ema is not None:
        ema.restore(unet.parameters())
    save_image(grid, Path(config.output_dir) / "validation" / f"step-{step:07d}.png")
    log_image(accelerator, "validation/samples", grid, step)


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


LORA_ALGOS = ("lora", "loha", "lokr")


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


def save_lora(config: UNetTrainConfig, unet, text_model, target: Path) -> None:
    """The trained adapters as a LoRA file (`latentgen.formats.lora.write`): diffusers' format, and kohya's beside
    it with `lora.kohya`; a LoHa or LoKr in LyCORIS's."""
    from peft.utils import get_peft_model_state_dict

    dtype = DTYPES[config.save_dtype]
    parts = {"unet": unet} | ({"text_encoder": text_model} if text_model is not None else {})
    layers = {name: {k: v.detach().to(dtype).contiguous().cpu() for k, v in get_peft_model_state_dict(m).items()}
              for name, m in parts.items()}
    configs = {name: m.peft_config["default"].to_dict() for name, m in parts.items()}
    lora_file.write(target, layers, configs, algo=config.lora.algo, rank=config.lora.rank,
                    alpha=float(config.lora.alpha or config.lora.rank), kohya=config.lora.kohya,
                    text_model=text_model, steps=config.max_steps)
