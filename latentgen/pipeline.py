"""LatentPipeline: text -> image by latent diffusion with classifier-free guidance, in diffusers' folder layout.

A call reads as numbered stages: check the request, encode the prompts, prepare the sampler, prepare the
latents (noise, or a noised init image for image-to-image and inpainting), denoise, decode.
`from_pretrained`/`save_pretrained` come from diffusers' `DiffusionPipeline`, so Stable Diffusion folders load
as they are and ours load in diffusers' `StableDiffusionPipeline`.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from . import validate
from .errors import UserError, first_line, one_of
from .guidance import alpha_sigma, classifier_free_guidance, clip_x0, in_interval, rescale_guidance
from .io import atomic_dir
from .memory import check_sampling
from .prompts import ChunkedEncoder, has_syntax, parse
from .schedulers import make_scheduler, scheduler_name_of, scheduler_names, step_kwargs
from .text_encoders import TextEncoder, clip_tokenizer, openclip_to_transformers, text_encoder_for

log = logging.getLogger("latentgen")

# Linear multistep samplers that extrapolate strongly guided predictions too far (see schedulers.py).
UNSTABLE_WITH_GUIDANCE = ("PNDMScheduler", "LMSDiscreteScheduler")
_warned: set[str] = set()

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
PROMPT_CACHE_SIZE = 512


@dataclass
class Request:
    """One generation call, checked: B prompts × n images each."""

    prompts: list[str]
    negative_prompts: list[str]
    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int
    num_images_per_prompt: int
    generator: torch.Generator | list[torch.Generator] | None
    seeds: list[int] | None
    scheduler: str | None
    output_type: str
    eta: float = 0.0
    image: torch.Tensor | None = None  # (1 or N, 3, H, W) in [-1, 1]
    init_latents: torch.Tensor | None = None  # or already-encoded, scaled latents z0 (1 or N, C, H/f, W/f)
    mask: torch.Tensor | None = None  # (1 or N, 1, H, W) in {0, 1}; 1 = repaint
    strength: float = 1.0
    guidance_rescale: float = 0.0
    dynamic_threshold: float | None = None  # x̂0 percentile ratio, e.g. 0.995
    threshold_max: float = 3.0
    guidance_interval: tuple[float, float] = (0.0, 1.0)

    @property
    def batch_size(self) -> int:
        return len(self.prompts) * self.num_images_per_prompt

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    def cfg_at(self, step: int) -> bool:
        return self.do_cfg and in_interval(step, self.num_inference_steps, self.guidance_interval)


@dataclass
class GenerationOutput:
    images: Any  # list of PIL images, (N, H, W, 3) float array in [0, 1], (N, 3, H, W) tensor, or latents
    seeds: list[int] | None = None
    scheduler: str = ""
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    """Text conditioning for the U-Net: the conditional rows, and [uncond; cond] for guided steps."""

    cond: torch.Tensor  # (N, T, D)
    cond_mask: torch.Tensor | None  # (N, T), only when prompts have different lengths
    both: torch.Tensor | None = None  # (2N, T', D)
    both_mask: torch.Tensor | None = None

    def for_step(self, guided: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        return (self.both, self.both_mask) if guided else (self.cond, self.cond_mask)


def _pad_tokens(tensors: list[torch.Tensor], masks: list[torch.Tensor | None]):
    """Pad (N, T_i, D) tensors to a common T (zeros, masked out); masks only when lengths differ."""
    longest = max(t.shape[1] for t in tensors)
    if all(t.shape[1] == longest for t in tensors) and all(m is None for m in masks):
        return tensors, None
    out, out_masks = [], []
    for t, m in zip(tensors, masks):
        n, length = t.shape[:2]
        m = torch.ones(n, length, dtype=torch.bool, device=t.device) if m is None else m
        out.append(F.pad(t, (0, 0, 0, longest - length)))
        out_masks.append(F.pad(m, (0, longest - length)))
    return out, torch.cat(out_masks)


def _as_list(value: str | Sequence[str] | None, what: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    values = list(value)
    if not all(isinstance(v, str) for v in values):
        raise UserError(f"{what} must be a string or a list of strings")
    return values


def _is_openclip(module: Any) -> bool:
    return all(hasattr(module, a) for a in ("transformer", "ln_final", "token_embedding", "attn_mask"))


def _image_size(image) -> tuple[int, int]:
    """(width, height) of a PIL image, an (H, W, C) array or a (B, C, H, W) / (C, H, W) tensor."""
    if hasattr(image, "size") and not callable(image.size):
        return image.size
    shape = tuple(image.shape)
    if isinstance(image, torch.Tensor):
        return shape[-1], shape[-2]
    return shape[1], shape[0]


class LatentPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """Text-to-image latent diffusion: VAE + text encoder + cross-attention U-Net + scheduler.

    LoRAs load with diffusers' own loader (`load_lora_weights`, `set_adapters`, `fuse_lora`, ...: diffusers'
    meaning, through peft), in diffusers/peft format or kohya/A1111's (converted by diffusers);
    `latentgen.lora` wraps it with one-line errors and A1111's names.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"

    def __init__(self, vae: AutoencoderKL, text_encoder: nn.Module, tokenizer: Any, unet: UNet2DConditionModel,
                 scheduler: Any, clip_skip: int | None = None):
        super().__init__()
        if _is_openclip(text_encoder):
            # An open_clip tower becomes the equivalent CLIPTextModel (as SD 2 did), so the folder stays diffusers'.
            text_encoder = openclip_to_transformers(text_encoder)
            tokenizer = clip_tokenizer(max_length=text_encoder.config.max_position_embeddings, pad_token="!")
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        self.register_to_config(clip_skip=clip_skip)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.mask_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_normalize=False,
                                                do_binarize=True, do_convert_grayscale=True)

    # ------------------------------------------------------------------------------------------------------------
    # Loading and saving

    @classmethod
    def from_pretrained(cls, folder: str | Path, torch_dtype: torch.dtype | str | None = None,
                        allow_pickle: bool = False, dtype: torch.dtype | str | None = None,
                        **kwargs) -> "LatentPipeline":
        """Load a diffusers pipeline folder (ours or Stable Diffusion's), offline.

        `torch_dtype` None or "auto" picks the fast precision for this machine (bf16 on CPUs with bf16 matrix
        units, fp16/bf16 on CUDA, else fp32); pass `torch.float32` for diffusers' exact numbers.
        Weights must be safetensors unless `allow_pickle=True`, which loads `.bin` files with
        `torch.load(weights_only=True)` (no code runs, but prefer converting them).
        """
        from .device import resolve_device, resolve_dtype

        folder = Path(folder)
        check_pipeline_folder(folder, allow_pickle=allow_pickle)
        kwargs.setdefault("local_files_only", True)
        target = dtype or torch_dtype
        if target is None or target == "auto":
            target = resolve_dtype("auto", resolve_device("auto"))
        try:
            pipe = super().from_pretrained(folder, dtype=target, use_safetensors=None if allow_pickle else True,
                                           **kwargs)
        except UserError:
            raise
        except Exception as err:  # diffusers/transformers/safetensors errors name no file the user can act on
            raise UserError(f"cannot load the model in {folder}: {first_line(err)}") from err
        pipe.keep_vae_safe()
        pipe.choose_memory_format()
        return pipe

    def compile_unet(self, mode: str | None = None) -> float:
        """torch.compile the U-Net in place and warm it up at the default size; returns the seconds it took.

        Later calls with other batch sizes or image sizes may compile again (once per shape).
        """
        import time

        self.unet.compile(mode=mode)
        f = self.vae_scale_factor
        size = self.default_size // f
        x = torch.zeros(2, self.unet.config.in_channels, size, size, device=self.unet.device, dtype=self.unet.dtype)
        hidden, _ = self.encode_prompts(["", ""])
        start = time.perf_counter()
        with torch.no_grad():
            self.unet(x, torch.tensor([1, 1], device=x.device), encoder_hidden_states=hidden)
        return time.perf_counter() - start

    def choose_memory_format(self) -> None:
        """channels_last in reduced precision for U-Nets that work on 32×32 latents or more (Stable Diffusion's
        64×64): oneDNN's channels-last bf16 convolutions measured 12% faster for the U-Net and 19% for the VAE
        decode of a Stable-Diffusion-shaped model here; on the default model's 16×16 latents they are slower.
        fp32 keeps diffusers' layout, and with it diffusers' exact numbers."""
        if self.unet.dtype != torch.float32 and self.unet.config.sample_size >= 32:
            self.unet.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)

    def keep_vae_safe(self) -> None:
        """An fp16 VAE overflows in its decoder (the black-image bug of SD's VAE); keep it in fp32 then.

        bf16 has fp32's range, so a bf16 VAE stays bf16.
        """
        if self.vae.dtype == torch.float16:
            self.vae.to(torch.float32)

    def save_pretrained(self, folder: str | Path, weights_dtype: torch.dtype | None = None, **kwargs) -> None:
        """Write the diffusers folder layout atomically, readable by `StableDiffusionPipeline.from_pretrained`.

        `weights_dtype` (e.g. torch.float16) stores smaller weights; the folder still declares fp32 as its compute
        dtype, so loaders that default to the stored dtype (transformers' "auto") and loaders that default to
        fp32 (diffusers) agree, and diffusers' default load does not mix fp16 and fp32 components.
        """
        folder = Path(folder)
        kwargs.setdefault("safe_serialization", True)
        with atomic_dir(folder) as tmp:
            if weights_dtype is None:
                super().save_pretrained(tmp, **kwargs)
            else:
                original = {name: next(getattr(self, name).parameters()).dtype for name in WEIGHT_COMPONENTS}
                try:
                    for name in WEIGHT_COMPONENTS:
                        getattr(self, name).to(weights_dtype)
                    super().save_pretrained(tmp, **kwargs)
                finally:
                    for name, dtype in original.items():
                        getattr(self, name).to(dtype)
                encoder_config = tmp / "text_encoder" / "config.json"
                config = json.loads(encoder_config.read_text())
                for key in ("dtype", "torch_dtype"):
                    if key in config:
                        config[key] = "float32"
                encoder_config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            index_path = tmp / "model_index.json"
            index = json.loads(index_path.read_text())
            # Name a diffusers class so `DiffusionPipeline.from_pretrained` and other tools recognise the folder;
            # the components StableDiffusionPipeline knows but we do not have are declared absent.
            index["_class_name"] = "StableDiffusionPipeline"
            index.update(safety_checker=[None, None], feature_extractor=[None, None], image_encoder=[None, None],
                         requires_safety_checker=False)
            if index.get("clip_skip") is None:
                index.pop("clip_skip", None)
            index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    # ------------------------------------------------------------------------------------------------------------
    # Stages

    @property
    def text_encoder_backend(self) -> TextEncoder:
        return text_encoder_for(self.tokenizer, self.text_encoder, clip_skip=self.config.clip_skip)

    @property
    def default_size(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def size_multiple(self) -> int:
        """Image sides that every level of the U-Net halves evenly: the VAE factor × 2^(levels − 1)."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def is_latents(self, image) -> bool:
        """True for a (N, C, h, w) tensor with the VAE's latent channels: already-encoded, scaled latents."""
        return (isinstance(image, torch.Tensor) and image.ndim == 4
                and image.shape[1] == self.vae.config.latent_channels != 3)

    @property
    def inpainting_unet(self) -> bool:
        """A 9-channel U-Net (SD inpainting): noisy latents + mask + masked-image latents."""
        return self.unet.config.in_channels == 2 * self.vae.config.latent_channels + 1

    def check_request(self, prompt, negative_prompt=None, num_inference_steps=30, guidance_scale=7.5, height=None,
                      width=None, num_images_per_prompt=1, generator=None, seed=None, scheduler=None,
                      output_type="pil", eta=0.0, image=None, mask_image=None, strength=None,
                      guidance_rescale=0.0, dynamic_threshold=None, guidance_interval=(0.0, 1.0)) -> Request:
        prompts = _as_list(prompt, "prompt")
        if not prompts:
            raise UserError("no prompt given; pass a prompt string or a non-empty list of prompts")
        negatives = _as_list(negative_prompt, "negative_prompt") or [""]
        if len(negatives) == 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise UserError(f"got {len(prompts)} prompts and {len(negatives)} negative prompts; "
                            "give one negative prompt for all or one per prompt")
        for text in dict.fromkeys(prompts + negatives):
            if has_syntax(text):
                parse(text)  # weighting syntax errors before any work
        validate.steps(num_inference_steps, self.scheduler.config.get("num_train_timesteps"))
        validate.guidance(guidance_scale)
        validate.count(num_images_per_prompt, "images per prompt")
        if scheduler is not None and scheduler not in scheduler_names():
            raise one_of("scheduler", scheduler, scheduler_names())
        if output_type not in OUTPUT_TYPES:
            raise one_of("output_type", output_type, list(OUTPUT_TYPES))
        validate.in_range(guidance_rescale, "guidance rescale", 0.0, 1.0)
        validate.in_range(eta, "eta", 0.0, 1.0)
        start, end = guidance_interval
        if not 0.0 <= start < end <= 1.0:
            raise UserError(f"guidance interval must satisfy 0 ≤ start < end ≤ 1, got {start}, {end}")
        if dynamic_threshold is not None:
            validate.in_range(dynamic_threshold, "dynamic threshold (a percentile ratio)", 0.5, 1.0, True, True)
        if mask_image is not None and image is None:
            raise UserError("a mask needs an image to inpaint")
        if strength is None:
            strength = 0.8 if image is not None and mask_image is None else 1.0
        validate.in_range(strength, "strength", 0.0, 1.0, low_open=True)
        if self.inpainting_unet and mask_image is None:
            raise UserError("this is an inpainting model (9-channel U-Net): give an image and a mask")
        total = len(prompts) * num_images_per_prompt
        init, mask, init_latents = None, None, None
        if self.is_latents(image):  # image-to-image from latents, as diffusers' img2img accepts them
            if mask_image is not None:
                raise UserError("inpainting needs the image in pixels, not latents")
            f = self.vae_scale_factor
            h, w = image.shape[-2] * f, image.shape[-1] * f
            if (height or h, width or w) != (h, w):
                raise UserError(f"the init latents make {w}×{h} images; height and width cannot differ from that")
            height, width, init_latents, image = h, w, image.float(), None
            if init_latents.shape[0] not in (1, total):
                raise UserError(f"got {init_latents.shape[0]} latents for {total} outputs; give one or one per output")
        if image is not None:
            w, h = _image_size(image)
            if height is None and width is None and (w % self.vae_scale_factor or h % self.vae_scale_factor):
                raise UserError(f"the image is {w}×{h}; its sides must be multiples of {self.vae_scale_factor} "
                                "(resize it, or pass height and width to resize it)")
            height, width = height or h, width or w
            if mask_image is not None and _image_size(mask_image) != (w, h):
                mw, mh = _image_size(mask_image)
                raise UserError(f"the mask is {mw}×{mh} but the image is {w}×{h}; they must be the same size")
        height, width = check_size(height, width, self.vae_scale_factor, self.default_size)
        check_sampling(self, height, width, total, guided=float(guidance_scale) > 1.0)
        if image is not None:
            init = self.image_processor.preprocess(image, height=height, width=width).float()
            if init.shape[0] not in (1, total):
                raise UserError(f"got {init.shape[0]} images for {total} outputs; give one or one per output")
        if mask_image is not None:
            mask = self.mask_processor.preprocess(mask_image, height=height, width=width).float()
        seeds = None
        if seed is not None:
            if generator is not None:
                raise UserError("pass either seed or generator, not both")
            seeds = validate.seeds(seed, total) if isinstance(seed, int) else validate.seed_list(seed, total)
        if isinstance(generator, list) and len(generator) != total:
            raise UserError(f"got {len(generator)} generators for {total} images")
        return Request(prompts, negatives, num_inference_steps, float(guidance_scale), height, width,
                       num_images_per_prompt, generator, seeds, scheduler, output_type, eta, init, init_latents, mask,
                       float(strength), float(guidance_rescale), dynamic_threshold, 3.0,
                       (float(start), float(end)))

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B,) prompts -> hidden states (B, T, D) in the U-Net's dtype, and a (B, T) mask or None.

        Each distinct prompt is encoded alone (weighting, windows of the encoder's length) and kept in a small
        cache, so an embedding never depends on which other prompts share the call. Prompts of different
        lengths are padded and the padding masked out of cross-attention.
        """
        device, dtype = self.unet.device, self.unet.dtype
        key = (id(self.text_encoder), self.config.clip_skip, str(device), str(dtype))
        cache = self.__dict__.setdefault("_prompt_cache", OrderedDict())
        encoder = None
        for prompt in dict.fromkeys(prompts):
            if (key, prompt) in cache:
                cache.move_to_end((key, prompt))
                continue
            encoder = encoder or ChunkedEncoder(self.text_encoder_backend)
            cache[(key, prompt)] = encoder.encode(prompt).to(device=device, dtype=dtype)
            while len(cache) > PROMPT_CACHE_SIZE:
                cache.popitem(last=False)
        rows = [cache[(key, p)] for p in prompts]
        padded, mask = _pad_tokens([r[None] for r in rows], [None] * len(rows))
        return torch.cat(padded), mask

    def clear_prompt_cache(self) -> None:
        """Forget cached prompt embeddings (after changing the text encoder's weights in place)."""
        self.__dict__.pop("_prompt_cache", None)

    def prepare_context(self, req: Request) -> Context:
        n = req.num_images_per_prompt
        cond, cond_mask = self.encode_prompts(req.prompts)
        ctx = Context(cond.repeat_interleave(n, 0), None if cond_mask is None else cond_mask.repeat_interleave(n, 0))
        if req.do_cfg:
            uncond, uncond_mask = self.encode_prompts(req.negative_prompts)
            uncond_mask = None if uncond_mask is None else uncond_mask.repeat_interleave(n, 0)
            hidden, ctx.both_mask = _pad_tokens([uncond.repeat_interleave(n, 0), ctx.cond],
                                                [uncond_mask, ctx.cond_mask])
            ctx.both = torch.cat(hidden)
        return ctx

    def prepare_scheduler(self, req: Request):
        """A fresh sampler for this call (schedulers keep per-run state), with its timesteps set."""
        if req.scheduler is None:
            scheduler = type(self.scheduler).from_config(self.scheduler.config)
        else:
            scheduler = make_scheduler(req.scheduler, self.scheduler.config)
        scheduler.set_timesteps(req.num_inference_steps, device=self.unet.device)
        name = type(scheduler).__name__
        if name in UNSTABLE_WITH_GUIDANCE and req.guidance_scale > 4 and name not in _warned:
            _warned.add(name)  # once per process, not once per batch
            log.warning("%s is a 4th-order multistep sampler and can diverge at guidance %g; "
                        "dpm++ or euler are stable there", name, req.guidance_scale)
        return scheduler

    def timesteps_for(self, req: Request, scheduler) -> torch.Tensor:
        """All timesteps, or for image-to-image the last `strength` fraction of them (SDEdit)."""
        if (req.image is None and req.init_latents is None) or req.strength >= 1.0:
            return scheduler.timesteps
        n = req.num_inference_steps
        start = (n - min(int(n * req.strength), n)) * scheduler.order
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start)
        return scheduler.timesteps[start:]

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> scaled latents z0 (N, C, H/f, W/f), the posterior mean."""
        cfg = self.vae.config
        z = self.vae.encode(images.to(self.vae.device, self.vae.dtype)).latent_dist.mode().float()
        return (z - (getattr(cfg, "shift_factor", None) or 0.0)) * cfg.scaling_factor

    def prepare_latents(self, req: Request, scheduler, timesteps, generator) -> tuple[torch.Tensor, dict]:
        """x_T ~ N(0, σ_max² I) (N, C, h, w), each image's noise from its own generator when seeded; or an init
        image noised to the first timestep. Latents stay fp32 whatever the U-Net's dtype: the same seed gives
        the same starting noise in every precision, and the sampler's arithmetic keeps full precision."""
        f = self.vae_scale_factor
        shape = (req.batch_size, self.vae.config.latent_channels, req.height // f, req.width // f)
        noise = randn_tensor(shape, generator=generator, device=self.unet.device, dtype=torch.float32)
        known: dict[str, torch.Tensor] = {"noise": noise}
        if req.image is None and req.init_latents is None:
            return noise * scheduler.init_noise_sigma, known
        z0 = req.init_latents.to(noise.device) if req.init_latents is not None else self.encode_images(req.image)
        z0 = z0.expand(req.batch_size, -1, -1, -1)
        known["z0"] = z0
        if req.mask is not None:
            mask = F.interpolate(req.mask, size=shape[-2:]).to(noise.device)  # (N or 1, 1, h, w)
            known["mask"] = mask.expand(req.batch_size, -1, -1, -1)
            if self.inpainting_unet:
                masked = req.image * (req.mask < 0.5)
                known["masked_z0"] = self.encode_images(masked).expand(req.batch_size, -1, -1, -1)
        if req.strength >= 1.0:
            return noise * scheduler.init_noise_sigma, known
        if len(timesteps) == 0:  # strength so small that no step remains: the image itself
            return z0.clone(), known
        return scheduler.add_noise(z0, noise, timesteps[:1].repeat(req.batch_size)), known

    def predict(self, x: torch.Tensor, t, ctx: Context, req: Request, step: int, scheduler,
                known: dict) -> torch.Tensor:
        """The (guided) model prediction at x_t; one batched U-Net call on [uncond; cond] when guiding."""
        guided = req.cfg_at(step)
        hidden, mask = ctx.for_step(guided)
        x_t = scheduler.scale_model_input(x, t)  # the VP form sqrt(ᾱ_t)·z0 + sqrt(1−ᾱ_t)·ε, (N, C, h, w)
        x_in = torch.cat([x_t] * 2) if guided else x_t  # (2N or N, C, h, w)
        if "masked_z0" in known:  # 9-channel inpainting U-Net input
            extra = torch.cat([known["mask"], known["masked_z0"]], dim=1)
            x_in = torch.cat([x_in, torch.cat([extra] * 2) if guided else extra], dim=1)
        pred = self.run_unet(x_in.to(hidden.dtype), t, hidden, mask, rows_per_image=2 if guided else 1)
        if guided:
            uncond, cond = pred.chunk(2)
            pred = rescale_guidance(classifier_free_guidance(uncond, cond, req.guidance_scale), cond,
                                    req.guidance_rescale)
        if req.dynamic_threshold:
            alpha, sigma = alpha_sigma(scheduler.alphas_cumprod, t)
            pred = clip_x0(pred, x_t, alpha, sigma, scheduler.config.prediction_type, req.dynamic_threshold,
                           req.threshold_max)
        return pred

    def run_unet(self, x_in: torch.Tensor, t, hidden: torch.Tensor, mask: torch.Tensor | None,
                 rows_per_image: int) -> torch.Tensor:
        """One U-Net evaluation of all rows, fp32 out.

        An image's result must not depend on the batch it is in. In bf16 the CPU kernels are batch-invariant
        (tests/test_reliability.py checks it), so the rows go in one call. In fp32, oneDNN and MKL choose their
        convolution and small-matrix algorithms by batch size, so each image's rows ([uncond_i; cond_i]) go in a
        call of their own: the same shapes for every image, whatever the batch.
        """
        def call(rows):
            return self.unet(x_in[rows], t, encoder_hidden_states=hidden[rows],
                             encoder_attention_mask=None if mask is None else mask[rows], return_dict=False)[0]

        n = x_in.shape[0] // rows_per_image
        if x_in.dtype != torch.float32 or n == 1:
            return call(slice(None)).float()
        out = torch.empty_like(x_in[:, :self.unet.config.out_channels])
        for i in range(n):
            rows = [i + k * n for k in range(rows_per_image)]  # image i in each of the [uncond; cond] halves
            out[rows] = call(rows)
        return out

    def denoise(self, latents: torch.Tensor, ctx: Context, req: Request, scheduler, timesteps, known: dict,
                generator, on_step: Callable[[int], None] | None = None) -> torch.Tensor:
        """Run the sampler over `timesteps`; with a 4-channel U-Net and a mask, the known region is put back
        (noised to the next timestep) after every step, so only the masked region is generated."""
        extra = step_kwargs(scheduler, generator, req.eta)
        offset = (len(scheduler.timesteps) - len(timesteps)) // scheduler.order  # steps skipped by img2img
        blend = "mask" in known and "masked_z0" not in known
        for i, t in enumerate(self.progress_bar(timesteps)):
            pred = self.predict(latents, t, ctx, req, offset + i // scheduler.order, scheduler, known)
            latents = scheduler.step(pred, t, latents, **extra, return_dict=False)[0]
            if blend:
                if i + 1 < len(timesteps):
                    keep = scheduler.add_noise(known["z0"], known["noise"], timesteps[i + 1:i + 2])
                else:
                    keep = known["z0"]
                latents = known["mask"] * latents + (1 - known["mask"]) * keep
            last = i == len(timesteps) - 1
            if on_step is not None and (last or (i + 1) % scheduler.order == 0):  # once per sampling step
                on_step(i // scheduler.order)
        return latents

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """z (N, C, h, w) -> image (N, 3, H, W) in [-1, 1], one image per call: the VAE's attention kernels are
        not batch-invariant, and one decode per image costs little next to the sampling steps."""
        cfg = self.vae.config
        z = latents / cfg.scaling_factor
        if getattr(cfg, "shift_factor", None):
            z = z + cfg.shift_factor
        z = z.to(self.vae.dtype)
        return torch.cat([self.vae.decode(z[i:i + 1], return_dict=False)[0] for i in range(z.shape[0])])

    # ------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                 num_inference_steps: int = 30, guidance_scale: float = 7.5, height: int | None = None,
                 width: int | None = None, num_images_per_prompt: int = 1,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 seed: int | Sequence[int] | None = None, scheduler: str | None = None,
                 output_type: str = "pil", eta: float = 0.0, image=None, mask_image=None,
                 strength: float | None = None, guidance_rescale: float = 0.0,
                 dynamic_threshold: float | None = None, guidance_interval: tuple[float, float] = (0.0, 1.0),
                 on_step: Callable[[int], None] | None = None) -> GenerationOutput:
        """Generate images.

        `seed` (one int, or one per image) makes each image reproducible on its own; `generator` keeps
        diffusers' meaning. `image` (+ `strength`) is image-to-image; `image` + `mask_image` (white = repaint)
        is inpainting. Prompts may use A1111's weighting syntax and be longer than the encoder's window.
        `guidance_rescale`, `dynamic_threshold` and `guidance_interval` are the guidance variants of
        `latentgen.guidance`; `on_step(i)` is called after each sampling step.
        """
        # 1. Check the request.
        req = self.check_request(prompt, negative_prompt, num_inference_steps, guidance_scale, height, width,
                                 num_images_per_prompt, generator, seed, scheduler, output_type, eta, image,
                                 mask_image, strength, guidance_rescale, dynamic_threshold, guidance_interval)
        generators = _generator_factory(req, generator)
        info_extra: dict[str, Any] = {}

        # 2-5. Encode the prompts, prepare the sampler and the latents, denoise; in fp32 again if the low
        # precision overflowed (NaN/Inf latents would decode to a black image).
        latents, retried = _finite_or_fp32(
            lambda retry: self.sample(req, generators(), None if retry else on_step), (self.unet, self.text_encoder),
            warning="NaN/Inf in the latents sampled in {dtype}; sampling again in fp32",
            fatal="the model produced NaN/Inf latents even in fp32; its weights may be damaged")
        if retried:
            info_extra["fp32_retry"] = "unet"

        # 6. Decode, with the same guard for the VAE.
        if req.output_type == "latent":
            images = latents
        else:
            decoded, retried = _finite_or_fp32(
                lambda retry: self.decode(latents), (self.vae,),
                warning="NaN/Inf in the image decoded in {dtype}; decoding again in fp32",
                fatal="the VAE decoded NaN/Inf pixels even in fp32; its weights may be damaged")
            if retried:
                info_extra["fp32_retry"] = "vae"
            images = self.image_processor.postprocess(decoded, output_type=req.output_type)
        name = req.scheduler or scheduler_name_of(self.scheduler)
        return GenerationOutput(images=images, seeds=req.seeds, scheduler=name,
                                info=self.describe(req, name) | info_extra)

    def sample(self, req: Request, generator, on_step: Callable[[int], None] | None) -> torch.Tensor:
        """Stages 2-5: the final latents z0 (N, C, h, w), fp32."""
        ctx = self.prepare_context(req)
        sampler = self.prepare_scheduler(req)
        timesteps = self.timesteps_for(req, sampler)
        latents, known = self.prepare_latents(req, sampler, timesteps, generator)
        return self.denoise(latents, ctx, req, sampler, timesteps, known, generator, on_step)

    def describe(self, req: Request, scheduler: str) -> dict[str, Any]:
        """The settings that made the images (for image metadata and replay)."""
        info = {"steps": req.num_inference_steps, "guidance": req.guidance_scale, "scheduler": scheduler,
                "height": req.height, "width": req.width, "dtype": str(self.unet.dtype).removeprefix("torch."),
                "eta": req.eta}
        if req.image is not None or req.init_latents is not None:
            info["strength"] = req.strength
        if req.guidance_rescale:
            info["guidance_rescale"] = req.guidance_rescale
        if req.dynamic_threshold:
            info["dynamic_threshold"] = req.dynamic_threshold
        if req.guidance_interval != (0.0, 1.0):
            info["guidance_interval"] = list(req.guidance_interval)
        if self.config.clip_skip:
            info["clip_skip"] = self.config.clip_skip
        return info


def _generator_factory(req: Request, generator):
    """A function giving the call's generators in their initial state, each time it is called (for a retry)."""
    if req.seeds is not None:
        return lambda: [torch.Generator("cpu").manual_seed(s) for s in req.seeds]
    gens = generator if isinstance(generator, list) else [generator] if generator is not None else []
    states = [g.get_state() for g in gens]

    def fresh():
        for g, state in zip(gens, states):
            g.set_state(state)
        return generator

    return fresh


def _finite_or_fp32(run: Callable[[bool], torch.Tensor], modules: tuple[nn.Module, ...], warning: str,
                    fatal: str) -> tuple[torch.Tensor, bool]:
    """`run(False)`; if its result holds NaN/Inf (a low-precision overflow), `run(True)` with `modules` in fp32,
    after a warning. Already fp32 and still not finite: a UserError. Returns the result and whether it retried."""
    out = run(False)
    retried = not torch.isfinite(out).all()
    if retried:
        dtype = next(modules[0].parameters()).dtype
        if dtype == torch.float32:
            raise UserError(fatal)
        log.warning(warning.format(dtype=str(dtype).removeprefix("torch.")))
        with _in_fp32(*modules):
            out = run(True)
    return out, retried


@contextlib.contextmanager
def _in_fp32(*modules: nn.Module):
    """Run modules in fp32 for a while; back to their dtype afterwards (bf16/fp16 -> fp32 -> back is exact)."""
    dtypes = [next(m.parameters()).dtype for m in modules]
    try:
        for m in modules:
            m.to(torch.float32)
        yield
    finally:
        for m, dtype in zip(modules, dtypes):
            m.to(dtype)


def check_size(height: int | None, width: int | None, factor: int, default: int) -> tuple[int, int]:
    """Image height and width (defaults filled in), each a positive multiple of the VAE's factor."""
    height = default if height is None else height
    width = default if width is None else width
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or v < factor or v % factor:
            raise UserError(f"{name} must be a positive multiple of {factor} (the VAE's downsampling factor), "
                            f"got {v!r}")
    return height, width


def folder_geometry(folder: Path) -> tuple[int, int]:
    """(VAE downsampling factor, default image size) read from a pipeline folder's configs, without loading it."""
    vae = json.loads((folder / "vae" / "config.json").read_text())
    unet = json.loads((folder / "unet" / "config.json").read_text())
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    return factor, int(unet["sample_size"]) * factor


def check_pipeline_folder(folder: Path, allow_pickle: bool = False) -> None:
    """One-line errors for the folder mistakes users make, before diffusers reads anything."""
    if not folder.exists():
        raise UserError(f"model folder {folder} does not exist")
    if not folder.is_dir():
        raise UserError(f"model {folder} is a file; give a diffusers pipeline folder (with model_index.json)")
    index_path = folder / "model_index.json"
    if not index_path.exists():
        raise UserError(f"{folder} is not a diffusers pipeline folder: it has no model_index.json")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{index_path} is not valid JSON ({first_line(err)}); re-save or re-download it") from None
    if not isinstance(index, dict):
        raise UserError(f"{index_path} is not a diffusers model index (a JSON object of components)")
    for name in COMPONENTS:
        entry = index.get(name)
        if not entry or entry[0] is None or not (folder / name).is_dir():
            raise UserError(f"{folder} is missing the component '{name}' (a folder {name}/ listed in "
                            f"model_index.json); a pipeline needs {', '.join(COMPONENTS)}")
        for config in sorted((folder / name).glob("*.json")):
            try:
                json.loads(config.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                raise UserError(f"{config} is not valid JSON ({first_line(err)}); re-save or re-download it") \
                    from None
    for name in WEIGHT_COMPONENTS:
        files = [f for f in (folder / name).iterdir() if f.is_file()]
        if any(f.suffix == ".safetensors" for f in files):
            check_weights(folder, name, index[name])
            continue
        pickles = [f.name for f in files if f.suffix in PICKLE_SUFFIXES]
        if not pickles:
            raise UserError(f"{folder / name} holds no weights (expected a .safetensors file)")
        if not allow_pickle:
            raise UserError(f"{folder / name}/{pickles[0]} is a pickle file, which can run code when loaded; "
                            "convert it to safetensors, or allow it explicitly with --allow-pickle "
                            "(allow_pickle=True), which loads it with torch.load(weights_only=True)")


def _strip(key: str) -> str:
    return key.removeprefix("text_model.")  # transformers 4 nests CLIP's text model; 5 does not


def check_weights(folder: Path, name: str, entry: list) -> None:
    """Each safetensors file of a component is complete, and its tensors have the shapes its config implies.

    Reads only the files' headers and builds the model on the meta device (no memory, no weights), so a
    truncated download or weights saved for another config are named precisely instead of failing deep inside
    diffusers or transformers.
    """
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted((folder / name).glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt") as sf:
                shapes.update({_strip(k): tuple(sf.get_slice(k).get_shape()) for k in sf.keys()})
        except Exception as err:  # safetensors raises its own error type for every kind of damage
            raise UserError(f"{f} is corrupt or truncated ({first_line(err)}); re-save or re-download it") \
                from None
    expected = _expected_shapes(folder / name, entry)
    if expected is None:
        return
    for key, shape in expected.items():
        if key in shapes and shapes[key] != shape:
            raise UserError(f"{folder / name}: weight {key} has shape {list(shapes[key])} but {name}/config.json "
                            f"needs {list(shape)}; the weights and the config do not belong together")


def _expected_shapes(path: Path, entry: list) -> dict[str, tuple[int, ...]] | None:
    """{parameter: shape} of the component's class built from its config on the meta device; None if unknown."""
    import importlib

    from accelerate import init_empty_weights

    library, class_name = entry
    try:
        cls = getattr(importlib.import_module(library), class_name)
        with init_empty_weights():
            if library == "diffusers":
                model = cls.from_config(cls.load_config(path))
            else:
                model = cls._from_config(cls.config_class.from_pretrained(path))
    except Exception:  # an unusual class or config: leave the check to the loader
        return None
    return {_strip(k): tuple(v.shape) for k, v in model.state_dict().items()}
