"""Train a text-conditioned U-Net on VAE latents: latent diffusion with classifier-free-guidance dropout.

Per example: z_0 = s·E(x) (s the VAE's scaling factor), ε ~ N(0, I) [+ offset noise], t ~ U{0..T−1},
z_t = sqrt(ᾱ_t)·z_0 + sqrt(1−ᾱ_t)·ε, target ε (or v = sqrt(ᾱ_t)·ε − sqrt(1−ᾱ_t)·z_0), loss ‖ε̂ − target‖²,
optionally weighted by min-SNR-γ. A caption is replaced by the empty prompt with probability `caption_dropout`
so the same network learns the unconditional prediction that guidance needs.

With the VAE and text encoder frozen, latents (the posterior's mean and std) and text embeddings can be
computed once and cached on disk: each step then only runs the U-Net.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.utils import make_image_grid
from tqdm.auto import tqdm

from ..config import to_yaml
from ..data.sources import build_dataset, check_resolution, choose_caption
from ..device import set_attention
from ..distributed import process_state
from ..errors import UserError, first_line, one_of
from ..io import atomic_file, save_image, weights_hash
from ..memory import check_training, unet_training_bytes
from ..schedulers import make_scheduler, scheduler_names
from ..text_encoders import (
    OpenCLIPTextEncoder,
    TransformersTextEncoder,
    clip_tokenizer,
    load_transformers_encoder,
    minilm_path,
)
from .checkpoint import load_checkpoint, resolve_resume
from .common import (
    StepBatches,
    TrainConfig,
    TrainLoop,
    batch_iterator,
    compute_bytes,
    log_image,
    make_accelerator,
    make_ema,
    make_lr_scheduler,
    make_optimizer,
    save_run_config,
    step_generator,
)
from .vae import vae_factor

log = logging.getLogger(__name__)

TEXT_ENCODERS = ("minilm", "hf", "openclip", "pipeline", "scratch")
PREDICTION_TYPES = ("epsilon", "v_prediction")

DEFAULT_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[64, 128, 192],
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=384,
    attention_head_dim=8, norm_num_groups=32,
)


@dataclass
class NoiseConfig:
    """The forward process and the objective; None means: the pretrained pipeline's, else the default shown."""

    num_train_timesteps: int | None = None  # 1000
    beta_schedule: str | None = None  # scaled_linear
    beta_start: float | None = None  # 0.00085
    beta_end: float | None = None  # 0.012
    prediction_type: str | None = None  # epsilon or v_prediction
    zero_terminal_snr: bool | None = None  # rescale betas so ᾱ_T = 0 (Lin et al. 2023); pair with v_prediction
    snr_gamma: float = 0.0  # min-SNR-γ loss weighting (Hang et al. 2023; 5.0 there); 0 = off
    offset_noise: float = 0.0  # ε += offset·N(0, I) per (image, channel): lets the model change mean brightness


NOISE_DEFAULTS = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                      prediction_type="epsilon", zero_terminal_snr=False)


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
    save_dtype: str = "fp32"  # fp32, fp16 or bf16 weights in the final pipeline

    def check(self) -> None:
        super().check()
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
        if self.sampler not in scheduler_names():
            raise one_of("sampler", self.sampler, scheduler_names())
        if self.save_dtype not in ("fp32", "fp16", "bf16"):
            raise one_of("save_dtype", self.save_dtype, ["fp32", "fp16", "bf16"])
        if not (self.vae_path or self.vae_model or self.pretrained_pipeline):
            raise UserError("no VAE: set vae_path (a train_vae.py output) or pretrained_pipeline")
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
    clip_skip: int | None = None


def _noise_settings(config: UNetTrainConfig, pretrained_scheduler_config) -> dict[str, Any]:
    base = dict(NOISE_DEFAULTS)
    if pretrained_scheduler_config is not None:
        for key in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type"):
            base[key] = pretrained_scheduler_config.get(key, base[key])
        base["zero_terminal_snr"] = bool(pretrained_scheduler_config.get("rescale_betas_zero_snr", False))
    chosen = {k: v for k, v in asdict(config.noise).items() if k in NOISE_DEFAULTS and v is not None}
    return base | chosen


def noise_scheduler_config(settings: dict[str, Any]) -> dict[str, Any]:
    """diffusers scheduler config of the forward process (shared by training and every sampler)."""
    return dict(num_train_timesteps=settings["num_train_timesteps"], beta_schedule=settings["beta_schedule"],
                beta_start=settings["beta_start"], beta_end=settings["beta_end"],
                prediction_type=settings["prediction_type"], rescale_betas_zero_snr=settings["zero_terminal_snr"],
                timestep_spacing="trailing", steps_offset=1, clip_sample=False)


def _load_text_encoder(config: UNetTrainConfig, pipe) -> tuple[Any, Any, Any]:
    """(tokenizer, module, backend) for the configured text encoder."""
    tc = config.text_encoder
    if tc.kind == "pipeline":
        tokenizer, model = pipe.tokenizer, pipe.text_encoder
        clip_skip = tc.clip_skip or pipe.config.get("clip_skip")
        return tokenizer, model, TransformersTextEncoder(tokenizer, model, clip_skip, tc.max_length)
    if tc.kind == "minilm":
        tokenizer, model = load_transformers_encoder(minilm_path(), max_length=tc.max_length)
    elif tc.kind == "hf":
        if not Path(tc.path).is_dir():
            raise UserError(f"text_encoder.path {tc.path} is not a folder")
        try:
            tokenizer, model = load_transformers_encoder(tc.path, max_length=tc.max_length)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot load the text encoder in {tc.path}: {first_line(err)}") from None
    elif tc.kind == "openclip":
        import open_clip

        if not Path(tc.path).is_file():
            raise UserError(f"text_encoder.path {tc.path} is not an open_clip checkpoint file")
        model = open_clip.create_model(tc.openclip_model, pretrained=tc.path)
        backend = OpenCLIPTextEncoder(model, layer="penultimate" if tc.clip_skip else "last")
        return backend.tokenizer, model, backend
    else:  # scratch: a new CLIP text transformer with OpenAI's tokenizer
        from transformers import CLIPTextConfig, CLIPTextModel

        args = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                    pad_token_id=49407) | tc.model
        model = CLIPTextModel(CLIPTextConfig(**args))
        tokenizer = clip_tokenizer(max_length=tc.max_length or 77)
    return tokenizer, model, TransformersTextEncoder(tokenizer, model, tc.clip_skip, tc.max_length)


def load_components(config: UNetTrainConfig) -> Components:
    """VAE, U-Net, text encoder and forward process; mismatches are one-line errors before training."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    pipe = None
    if config.pretrained_pipeline:
        from ..pipeline import LatentPipeline

        pipe = LatentPipeline.from_pretrained(config.pretrained_pipeline)
    if config.vae_path:
        path = Path(config.vae_path)
        if not (path / "config.json").is_file():
            raise UserError(f"vae_path {path} is not an AutoencoderKL folder (no config.json)")
        vae = AutoencoderKL.from_pretrained(path, use_safetensors=True)
    elif pipe is not None:
        vae = pipe.vae
    else:
        vae = AutoencoderKL(**config.vae_model)
    if pipe is not None:
        unet = pipe.unet
    else:
        try:
            unet = UNet2DConditionModel(**config.unet)
        except (TypeError, ValueError) as err:
            raise UserError(f"bad unet config: {first_line(err)}") from None
    tokenizer, text_model, encoder = _load_text_encoder(config, pipe)
    settings = _noise_settings(config, pipe.scheduler.config if pipe is not None else None)
    noise_scheduler = DDPMScheduler.from_config(noise_scheduler_config(settings))

    if vae.config.latent_channels != unet.config.in_channels:
        raise UserError(f"the VAE makes {vae.config.latent_channels}-channel latents but the U-Net takes "
                        f"in_channels={unet.config.in_channels}; make them equal")
    if encoder.hidden_size != unet.config.cross_attention_dim:
        raise UserError(f"the text encoder's width is {encoder.hidden_size} but the U-Net has "
                        f"cross_attention_dim={unet.config.cross_attention_dim}; make them equal")
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    check_resolution(config.data.resolution, factor, "the VAE")
    latent = config.data.resolution // factor
    down = 2 ** (len(unet.config.block_out_channels) - 1)
    if latent % down:
        raise UserError(f"resolution {config.data.resolution} gives {latent}×{latent} latents, which the U-Net's "
                        f"{len(unet.config.block_out_channels)} levels cannot halve evenly; use a multiple of "
                        f"{factor * down}")
    return Components(vae, unet, tokenizer, text_model, encoder, noise_scheduler, config.text_encoder.clip_skip)


# ----------------------------------------------------------------------------------------------------------------
# The objective


def scale_latents(vae, z: torch.Tensor) -> torch.Tensor:
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (z - shift) * vae.config.scaling_factor


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ: w_t = min(SNR_t, γ)/SNR_t for ε-prediction, min(SNR_t, γ)/(SNR_t + 1) for v-prediction."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    clipped = snr.clamp(max=gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return torch.where(snr > 0, clipped / snr.clamp_min(1e-12), torch.ones_like(snr))  # SNR_T = 0: weight 1


def diffusion_loss(unet, noise_scheduler, latents: torch.Tensor, context: torch.Tensor, generator: torch.Generator,
                   noise_config: NoiseConfig) -> torch.Tensor:
    """Per-example loss (B,) of the denoising objective for z_0 = `latents` (B, C, h, w)."""
    b = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_config.offset_noise:
        noise = noise + noise_config.offset_noise * torch.randn(
            (b, latents.shape[1], 1, 1), generator=generator, device=latents.device, dtype=latents.dtype)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), generator=generator,
                      device=latents.device)
    z_t = noise_scheduler.add_noise(latents, noise, t)  # sqrt(ᾱ_t)·z_0 + sqrt(1−ᾱ_t)·ε
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, t)  # sqrt(ᾱ_t)·ε − sqrt(1−ᾱ_t)·z_0
    else:
        target = noise
    pred = unet(z_t, t, encoder_hidden_states=context, return_dict=False)[0]
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if noise_config.snr_gamma:
        loss = loss * min_snr_weights(noise_scheduler, t, noise_config.snr_gamma)
    return loss


def drop_captions(texts: list[str], p: float, generator: torch.Generator) -> list[str]:
    """Replace each caption by "" with probability p (the unconditional branch for guidance)."""
    if p <= 0:
        return texts
    keep = torch.rand(len(texts), generator=generator, device=generator.device) >= p
    return [t if k else "" for t, k in zip(texts, keep.tolist())]


# ----------------------------------------------------------------------------------------------------------------
# Cache


class CachedData:
    """Cached latents (posterior mean and std) and unique-caption embeddings, served like a dataset."""

    def __init__(self, tensors: dict[str, torch.Tensor], texts: list[str]):
        self.mean, self.std = tensors["mean"], tensors["std"]  # (N, C, h, w)
        self.offsets, self.caption_rows = tensors["offsets"], tensors["caption_rows"]  # (N+1,), (M,)
        self.embeddings = tensors.get("embeddings")  # (U, T, D) or None when the text encoder trains
        self.texts = texts  # U unique captions; row 0 is "" (the unconditional prompt)

    def __len__(self) -> int:
        return self.mean.shape[0]

    def item(self, index: int, epoch: int = 0, seed: int = 0) -> dict[str, Any]:
        rows = self.caption_rows[self.offsets[index]:self.offsets[index + 1]].tolist()
        row = rows[0] if len(rows) == 1 else choose_caption(rows, seed, epoch, index)
        return {"mean": self.mean[index], "std": self.std[index], "text_row": row, "index": index}


def cache_key(config: UNetTrainConfig, parts: Components, with_embeddings: bool) -> str:
    # diffusers' private config keys ('_use_default_values' is a set turned list) vary with the hash seed, so
    # they would give each process of a launch its own key.
    vae_config = {k: v for k, v in parts.vae.config.items() if not k.startswith("_")}
    vae_hash = weights_hash(config.vae_path) if config.vae_path else json.dumps(vae_config, sort_keys=True,
                                                                                  default=str)
    identity = {"data": asdict(config.data), "vae": vae_hash, "scaling": parts.vae.config.scaling_factor,
                "text": asdict(config.text_encoder) if with_embeddings else None,
                "pipeline": config.pretrained_pipeline, "seed": config.seed if config.vae_model else None}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


@torch.no_grad()
def build_cache(dataset, parts: Components, with_embeddings: bool, batch_size: int, device,
                autocast) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Encode every image once (the un-augmented view) and every distinct caption once."""
    means, stds = [], []
    for start in tqdm(range(0, len(dataset), batch_size), desc="caching latents", leave=False):
        x = torch.stack([dataset.item(i, 0, 0)["pixel_values"] for i in
                         range(start, min(start + batch_size, len(dataset)))]).to(device)
        with autocast():
            dist = parts.vae.encode(x).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    texts, rows_of, offsets, caption_rows = [""], {"": 0}, [0], []
    for i in range(len(dataset)):
        for caption in dataset.captions(i):
            caption_rows.append(rows_of.setdefault(caption, len(texts)))
            if caption_rows[-1] == len(texts):
                texts.append(caption)
        offsets.append(len(caption_rows))
    tensors = {"mean": torch.cat(means), "std": torch.cat(stds), "offsets": torch.tensor(offsets),
               "caption_rows": torch.tensor(caption_rows)}
    if with_embeddings:
        chunks = []
        for start in tqdm(range(0, len(texts), 256), desc="caching text embeddings", leave=False):
            with autocast():
                chunks.append(parts.encoder.encode(texts[start:start + 256]).hidden_states.float().cpu())
        tensors["embeddings"] = torch.cat(chunks)
    return tensors, texts


def load_or_build_cache(config: UNetTrainConfig, dataset, parts: Components, with_embeddings: bool, accelerator):
    """The cache for this data, VAE and text encoder: built by each machine's main process (machines of a
    multi-node run need not share a disk), read by every process."""
    from safetensors.torch import load_file, save_file

    root = Path(config.cache_dir or Path(config.output_dir) / "cache")
    key = cache_key(config, parts, with_embeddings)
    tensors_path, texts_path = root / f"{key}.safetensors", root / f"{key}.texts.json"
    with accelerator.local_main_process_first():
        if not (tensors_path.is_file() and texts_path.is_file()):
            if not accelerator.is_local_main_process:  # pragma: no cover - local_main_process_first wrote it
                raise RuntimeError("the cache was not written by this machine's main process")
            tensors, texts = build_cache(dataset, parts, with_embeddings, config.train_batch_size * 4,
                                         accelerator.device, accelerator.autocast)
            with atomic_file(texts_path) as tmp:
                tmp.write_text(json.dumps(texts, ensure_ascii=False))
            with atomic_file(tensors_path) as tmp:
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
            accelerator.print(f"cached {len(dataset)} latents and {len(texts)} captions in {tensors_path}")
        tensors = load_file(str(tensors_path))
        texts = json.loads(texts_path.read_text())
    return CachedData(tensors, texts)


# ----------------------------------------------------------------------------------------------------------------
# Training


def _pipeline(parts: Components, unet, sampler: str, noise_config: dict[str, Any]):
    from ..pipeline import LatentPipeline

    pipe = LatentPipeline(vae=parts.vae, text_encoder=parts.text_model, tokenizer=parts.tokenizer, unet=unet,
                          scheduler=make_scheduler(sampler, noise_config), clip_skip=parts.clip_skip)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def validation_grid(config: UNetTrainConfig, parts: Components, unet, noise_config, autocast):
    was_training = unet.training
    unet.eval()
    pipe = _pipeline(parts, unet, config.sampler, noise_config)
    with autocast():
        images = pipe(config.validation_prompts, num_inference_steps=config.validation_steps,
                      guidance_scale=config.validation_guidance, seed=list(range(len(config.validation_prompts))),
                      output_type="pil").images
    unet.train(was_training)
    return make_image_grid(images, rows=1, cols=len(images))


def _check_batch_fits(size: int, config: UNetTrainConfig, world: int) -> None:
    StepBatches(size, config.train_batch_size, world, 0, config.seed)  # raises the one-line error


def train_unet(config: UNetTrainConfig) -> Path:
    """Run the training; returns the final pipeline folder (`{output_dir}/pipeline`)."""
    # 1. Components and data, checked before any training starts.
    state = process_state()  # first: this rank joins the launch's process group (latentgen.distributed)
    resume = resolve_resume(config.output_dir, config.resume_from)
    torch.manual_seed(config.seed)  # the initial weights
    parts = load_components(config)
    dataset = build_dataset(config.data)
    _check_batch_fits(len(dataset), config, state.num_processes)
    kernel = set_attention(parts.unet, config.attention, state.device, training=True)
    latent_size = config.data.resolution // vae_factor(parts.vae)
    check_training(lambda b: unet_training_bytes(parts.unet, latent_size, b, compute_bytes(config), kernel == "math"),
                   config.train_batch_size, state.device, f"the U-Net at {config.data.resolution} px")
    accelerator = make_accelerator(config, "train_unet")
    save_run_config(accelerator, config)
    device = accelerator.device
    noise_config = dict(parts.noise_scheduler.config)
    train_text = config.text_encoder.train

    # 2. Frozen parts in eval mode on the device (autocast gives them bf16/fp16 compute); cache.
    parts.vae.requires_grad_(False).eval().to(device)
    parts.text_model.requires_grad_(train_text).train(train_text).to(device)
    if parts.vae.config.scaling_factor is None:
        raise UserError("the VAE has no scaling_factor in its config")
    data = load_or_build_cache(config, dataset, parts, not train_text, accelerator) if config.cache else dataset
    uncond = None
    if config.cache and not train_text:
        data.embeddings = data.embeddings.to(device)
        uncond = data.embeddings[0:1]  # row 0: the empty prompt

    # 3. The U-Net, optimizer, schedule, EMA.
    unet = parts.unet
    unet.train()
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = list(unet.parameters()) + (list(parts.text_model.parameters()) if train_text else [])
    optimizer = make_optimizer(params, config)
    lr_scheduler = make_lr_scheduler(optimizer, config)
    ema = make_ema(unet, config) if config.ema else None
    # A trained text encoder stays unwrapped (the backends need its attributes); with several processes its
    # gradients are averaged by hand below, which is what DDP would do.
    unet, optimizer = accelerator.prepare(unet, optimizer)
    raw_unet = accelerator.unwrap_model(unet)
    if ema is not None:
        ema.to(device)

    # 4. Resume.
    models = {"unet": raw_unet} | ({"text_encoder": parts.text_model} if train_text else {})
    states = {"optimizer": optimizer.optimizer, "lr_scheduler": lr_scheduler, "ema": ema,
              "scaler": accelerator.scaler}
    start = 0
    if resume is not None:
        start = load_checkpoint(resume, models, states)["step"]
        accelerator.print(f"resumed from {resume} at step {start}")

    # 5. Train.
    accum = config.gradient_accumulation_steps
    batches = batch_iterator(data, config, accelerator.num_processes, accelerator.process_index, start * accum)
    loop = TrainLoop(config, accelerator, "train_unet", models, states, lr_scheduler, ema, raw_unet,
                     lambda step: _validate(config, parts, raw_unet, ema, noise_config, accelerator, step))
    for step in loop.run(start):
        for micro in range(accum):
            g = step_generator(config.seed, step, micro, accelerator.process_index, device)
            batch = next(batches)
            with accelerator.accumulate(unet):
                with accelerator.autocast():
                    latents, context = _latents_and_context(batch, data, parts, config, uncond, g, device)
                    loss = diffusion_loss(unet, parts.noise_scheduler, latents, context, g, config.noise).mean()
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    if train_text and accelerator.num_processes > 1:
                        for p in parts.text_model.parameters():
                            if p.grad is not None:
                                p.grad = accelerator.reduce(p.grad, reduction="mean")
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loop.averages.add(loss=loss.item())

    # 6. The final pipeline, with EMA weights when on.
    target = Path(config.output_dir) / "pipeline"
    if loop.finish(config.train_batch_size * accum * accelerator.num_processes):
        if ema is not None:
            ema.copy_to(raw_unet.parameters())
        _validate(config, parts, raw_unet, None, noise_config, accelerator, config.max_steps)
        save_pipeline(config, parts, raw_unet, noise_config, target)
        accelerator.print(f"wrote {target}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return target


def _latents_and_context(batch, data, parts: Components, config: UNetTrainConfig, uncond, g, device):
    """z_0 (B, C, h, w), scaled, and the text context (B, T, D), with caption dropout applied."""
    if "mean" in batch:  # cached posterior: z = μ + σ·n, as latent_dist.sample() would draw it
        mean, std = batch["mean"].to(device), batch["std"].to(device)
        z = mean + std * torch.randn(mean.shape, generator=g, device=device, dtype=mean.dtype)
    else:
        with torch.no_grad():
            z = parts.vae.encode(batch["pixel_values"].to(device)).latent_dist.sample(generator=g)
    latents = scale_latents(parts.vae, z.float())
    if uncond is not None:  # cached embeddings
        rows = batch["text_row"].to(device)
        drop = torch.rand(rows.shape[0], generator=g, device=device) < config.caption_dropout
        context = data.embeddings[torch.where(drop, torch.zeros_like(rows), rows)]
        return latents, context
    texts = [data.texts[r] for r in batch["text_row"].tolist()] if "text_row" in batch else list(batch["text"])
    texts = drop_captions(texts, config.caption_dropout, g)
    with torch.set_grad_enabled(config.text_encoder.train):
        context = parts.encoder.encode(texts).hidden_states
    return latents, context


def _validate(config, parts, unet, ema, noise_config, accelerator, step: int) -> None:
    if ema is not None:
        ema.store(unet.parameters())
        ema.copy_to(unet.parameters())
    grid = validation_grid(config, parts, unet, noise_config, accelerator.autocast)
    if ema is not None:
        ema.restore(unet.parameters())
    save_image(grid, Path(config.output_dir) / "validation" / f"step-{step:07d}.png")
    log_image(accelerator, "validation/samples", grid, step)


def save_pipeline(config: UNetTrainConfig, parts: Components, unet, noise_config, target: Path) -> None:
    """The LatentPipeline folder `infer.py --model` loads (weights in `save_dtype`)."""
    from ..device import DTYPES

    pipe = _pipeline(parts, unet, config.sampler, noise_config)
    dtype = DTYPES[config.save_dtype]
    pipe.save_pretrained(target, weights_dtype=None if dtype == torch.float32 else dtype)
    with atomic_file(target / "train_config.yaml") as tmp:
        tmp.write_text(to_yaml(config))
