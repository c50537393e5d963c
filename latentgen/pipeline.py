"""LatentPipeline: text -> image by latent diffusion with classifier-free guidance, in diffusers' folder layout.

A call reads as numbered stages: check the request, encode the prompts, prepare the sampler, prepare the
latents, denoise, decode. `from_pretrained`/`save_pretrained` come from diffusers' `DiffusionPipeline`, so
Stable Diffusion folders load as they are and ours load in diffusers' `StableDiffusionPipeline`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from .errors import UserError, first_line, one_of
from .guidance import classifier_free_guidance
from .io import atomic_dir
from .schedulers import make_scheduler, scheduler_name_of, scheduler_names, step_kwargs
from .text_encoders import (EncodedPrompts, TextEncoder, clip_tokenizer, openclip_to_transformers,
                            text_encoder_for)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


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

    @property
    def batch_size(self) -> int:
        return len(self.prompts) * self.num_images_per_prompt

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale > 1.0


@dataclass
class GenerationOutput:
    images: Any  # list of PIL images, (N, H, W, 3) float array in [0, 1], (N, 3, H, W) tensor, or latents
    seeds: list[int] | None = None
    scheduler: str = ""
    info: dict[str, Any] = field(default_factory=dict)


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


class LatentPipeline(DiffusionPipeline):
    """Text-to-image latent diffusion: VAE + text encoder + cross-attention U-Net + scheduler."""

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

    # ------------------------------------------------------------------------------------------------------------
    # Loading and saving

    @classmethod
    def from_pretrained(cls, folder: str | Path, torch_dtype: torch.dtype | None = None, allow_pickle: bool = False,
                        dtype: torch.dtype | None = None, **kwargs) -> "LatentPipeline":
        """Load a diffusers pipeline folder (ours or Stable Diffusion's), offline.

        Weights must be safetensors unless `allow_pickle=True`, which loads `.bin` files with
        `torch.load(weights_only=True)` (no code runs, but prefer converting them).
        """
        folder = Path(folder)
        check_pipeline_folder(folder, allow_pickle=allow_pickle)
        kwargs.setdefault("local_files_only", True)
        try:
            pipe = super().from_pretrained(folder, dtype=dtype or torch_dtype, use_safetensors=None if allow_pickle else True,
                                           **kwargs)
        except UserError:
            raise
        except Exception as err:  # diffusers/transformers/safetensors errors name no file the user can act on
            raise UserError(f"cannot load the model in {folder}: {first_line(err)}") from err
        return pipe

    def save_pretrained(self, folder: str | Path, **kwargs) -> None:
        """Write the diffusers folder layout atomically, readable by `StableDiffusionPipeline.from_pretrained`."""
        folder = Path(folder)
        kwargs.setdefault("safe_serialization", True)
        with atomic_dir(folder) as tmp:
            super().save_pretrained(tmp, **kwargs)
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

    def check_request(self, prompt, negative_prompt, num_inference_steps, guidance_scale, height, width,
                      num_images_per_prompt, generator, seed, scheduler, output_type, eta) -> Request:
        prompts = _as_list(prompt, "prompt")
        if not prompts:
            raise UserError("no prompt given; pass a prompt string or a non-empty list of prompts")
        negatives = _as_list(negative_prompt, "negative_prompt") or [""]
        if len(negatives) == 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise UserError(f"got {len(prompts)} prompts and {len(negatives)} negative prompts; "
                            "give one negative prompt for all or one per prompt")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise UserError(f"steps must be an integer ≥ 1, got {num_inference_steps!r}")
        if not isinstance(guidance_scale, (int, float)) or guidance_scale < 0 or guidance_scale != guidance_scale:
            raise UserError(f"guidance must be a number ≥ 0, got {guidance_scale!r}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise UserError(f"images per prompt must be an integer ≥ 1, got {num_images_per_prompt!r}")
        height, width = check_size(height, width, self.vae_scale_factor, self.default_size)
        if scheduler is not None and scheduler not in scheduler_names():
            raise one_of("scheduler", scheduler, scheduler_names())
        if output_type not in OUTPUT_TYPES:
            raise one_of("output_type", output_type, list(OUTPUT_TYPES))
        total = len(prompts) * num_images_per_prompt
        seeds = None
        if seed is not None:
            if generator is not None:
                raise UserError("pass either seed or generator, not both")
            seeds = [seed + k for k in range(total)] if isinstance(seed, int) else list(seed)
            if len(seeds) != total or not all(isinstance(s, int) and s >= 0 for s in seeds):
                raise UserError(f"seed must be an integer ≥ 0 or a list of {total} of them (one per image)")
        if isinstance(generator, list) and len(generator) != total:
            raise UserError(f"got {len(generator)} generators for {total} images")
        return Request(prompts, negatives, num_inference_steps, float(guidance_scale), height, width,
                       num_images_per_prompt, generator, seeds, scheduler, output_type, eta)

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B,) prompts -> (B, T, D) hidden states in the U-Net's dtype."""
        encoded: EncodedPrompts = self.text_encoder_backend.encode(prompts)
        return encoded.hidden_states.to(device=self.unet.device, dtype=self.unet.dtype)

    def prepare_scheduler(self, request: Request):
        """A fresh sampler for this call (schedulers keep per-run state), with its timesteps set."""
        if request.scheduler is None:
            scheduler = type(self.scheduler).from_config(self.scheduler.config)
        else:
            scheduler = make_scheduler(request.scheduler, self.scheduler.config)
        scheduler.set_timesteps(request.num_inference_steps, device=self.unet.device)
        return scheduler

    def prepare_latents(self, request: Request, scheduler, generator) -> torch.Tensor:
        """x_T ~ N(0, σ_max² I): (N, C, H/f, W/f), each image's noise from its own generator when seeded."""
        f = self.vae_scale_factor
        shape = (request.batch_size, self.unet.config.in_channels, request.height // f, request.width // f)
        latents = randn_tensor(shape, generator=generator, device=self.unet.device, dtype=self.unet.dtype)
        return latents * scheduler.init_noise_sigma

    def denoise(self, latents: torch.Tensor, context: torch.Tensor, request: Request, scheduler,
                generator, on_step: Callable[[int], None] | None = None) -> torch.Tensor:
        """Run the sampler from x_T to x_0; with guidance, one U-Net call per step on [uncond; cond]."""
        extra = step_kwargs(scheduler, generator, request.eta)
        for i, t in enumerate(self.progress_bar(scheduler.timesteps)):
            x_in = torch.cat([latents] * 2) if request.do_cfg else latents  # (2N or N, C, h, w)
            x_in = scheduler.scale_model_input(x_in, t)
            pred = self.unet(x_in, t, encoder_hidden_states=context, return_dict=False)[0]
            if request.do_cfg:
                pred_uncond, pred_cond = pred.chunk(2)
                pred = classifier_free_guidance(pred_uncond, pred_cond, request.guidance_scale)
            latents = scheduler.step(pred, t, latents, **extra, return_dict=False)[0]
            last = i == len(scheduler.timesteps) - 1
            if on_step is not None and (last or (i + 1) % scheduler.order == 0):  # once per sampling step
                on_step(i // scheduler.order)
        return latents

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """z (N, C, h, w) -> image (N, 3, H, W) in [-1, 1]."""
        cfg = self.vae.config
        z = latents / cfg.scaling_factor
        if getattr(cfg, "shift_factor", None):
            z = z + cfg.shift_factor
        return self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]

    # ------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                 num_inference_steps: int = 30, guidance_scale: float = 7.5, height: int | None = None,
                 width: int | None = None, num_images_per_prompt: int = 1,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 seed: int | Sequence[int] | None = None, scheduler: str | None = None,
                 output_type: str = "pil", eta: float = 0.0,
                 on_step: Callable[[int], None] | None = None) -> GenerationOutput:
        """Generate images; `seed` (one int, or one per image) makes each image reproducible on its own,
        `generator` keeps diffusers' meaning, `on_step(i)` is called after each sampling step."""
        # 1. Check the request.
        req = self.check_request(prompt, negative_prompt, num_inference_steps, guidance_scale, height, width,
                                 num_images_per_prompt, generator, seed, scheduler, output_type, eta)
        if req.seeds is not None:
            generator = [torch.Generator("cpu").manual_seed(s) for s in req.seeds]

        # 2. Encode the prompts: (N, T, D), or (2N, T, D) as [uncond; cond] with guidance.
        n = req.num_images_per_prompt
        context = self.encode_prompts(req.prompts).repeat_interleave(n, dim=0)
        if req.do_cfg:
            uncond = self.encode_prompts(req.negative_prompts).repeat_interleave(n, dim=0)
            context = torch.cat([uncond, context])

        # 3. Prepare the sampler and 4. the initial latents.
        sampler = self.prepare_scheduler(req)
        latents = self.prepare_latents(req, sampler, generator)

        # 5. Denoise.
        latents = self.denoise(latents, context, req, sampler, generator, on_step)

        # 6. Decode.
        if req.output_type == "latent":
            images = latents
        else:
            images = self.image_processor.postprocess(self.decode(latents), output_type=req.output_type)
        return GenerationOutput(images=images, seeds=req.seeds,
                                scheduler=req.scheduler or scheduler_name_of(self.scheduler))


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
        index = json.loads(index_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{index_path} is not valid JSON ({err})") from err
    for name in COMPONENTS:
        entry = index.get(name)
        if not entry or entry[0] is None or not (folder / name).is_dir():
            raise UserError(f"{folder} is missing the component '{name}' (a folder {name}/ listed in "
                            f"model_index.json); a pipeline needs {', '.join(COMPONENTS)}")
    for name in WEIGHT_COMPONENTS:
        files = [f for f in (folder / name).iterdir() if f.is_file()]
        if any(f.suffix == ".safetensors" for f in files):
            continue
        pickles = [f.name for f in files if f.suffix in PICKLE_SUFFIXES]
        if not pickles:
            raise UserError(f"{folder / name} holds no weights (expected a .safetensors file)")
        if not allow_pickle:
            raise UserError(f"{folder / name}/{pickles[0]} is a pickle file, which can run code when loaded; "
                            "convert it to safetensors, or allow it explicitly with --allow-pickle "
                            "(allow_pickle=True), which loads it with torch.load(weights_only=True)")
