"""LatentPipeline: text -> image by latent diffusion with classifier-free guidance, in diffusers' folder layout.

A call builds a `Request` (`latentgen.generation.request`), fits it to the model once (`Request.fit` -> `Plan`), and
runs the plan's stages in `latentgen.generation.sampling`; the hires fix (`generation.hires`) and the cascade
(`generation.cascade`) are two such plans. Folder checks live in `latentgen.formats.folders`.
`from_pretrained`/`save_pretrained` come from diffusers' `DiffusionPipeline`, so Stable Diffusion folders load as
they are and ours load in diffusers' `StableDiffusionPipeline`. A pipeline may be shared by concurrent callers: a
call changes none of its modules, and the prompt cache is locked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import (
    StableDiffusionLoraLoaderMixin,
    StableDiffusionXLLoraLoaderMixin,
    TextualInversionLoaderMixin,
)
from torch import nn

from latentgen.components import chinese, diffusion, tiling
from latentgen.components.schedulers import SCHEDULERS, scheduler_name_of
from latentgen.components.text_encoders import (
    SDXLTextEncoder,
    TextEncoder,
    clip_tokenizer,
    is_openclip,
    openclip_to_transformers,
    text_encoder_for,
)
from latentgen.errors import UserError, first_line
from latentgen.formats import ip_adapter, lllite, lora, single_file
from latentgen.formats import upscaler as upscaler_folder
from latentgen.formats.folders import WEIGHT_COMPONENTS, check_pipeline_folder
from latentgen.generation import cascade, control, hires, sampling
from latentgen.generation import regions as regional
from latentgen.generation.conditioning import Conditioning, PromptEncoder
from latentgen.generation.plan import Plan
from latentgen.generation.request import Request
from latentgen.io import atomic_dir
from latentgen.runtime import compiled, threads
from latentgen.runtime.device import resolve_device
from latentgen.runtime.precision import name_of, resolve_dtype

log = logging.getLogger("latentgen")
OFFLOAD_MODES = ("model", "sequential")  # `LatentPipeline.offload`, infer.py's --offload


@dataclass
class GenerationOutput:
    images: Any  # list of PIL images, (N, H, W, 3) float array in [0, 1], (N, 3, H, W) tensor, or latents
    seeds: list[int] | None = None
    scheduler: str = ""
    info: dict[str, Any] = field(default_factory=dict)  # what the call did: size, dtype, fp32 retries, ...
    metadata: list[dict[str, Any]] = field(default_factory=list)  # per image: its Request fields (replayable)

    RECORDED_INFO = ("dtype", "fp32_retry", "threads")  # what of `info` an image's metadata keeps, for its replay

    def recorded_info(self) -> dict[str, Any]:
        return {k: v for k, v in self.info.items() if k in self.RECORDED_INFO}


class LatentPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin, TextualInversionLoaderMixin):
    """Text-to-image latent diffusion: VAE + text encoder + cross-attention U-Net + scheduler.

    LoRAs load with diffusers' own loader (`load_lora_weights`, `set_adapters`, `fuse_lora`, ...: diffusers'
    meaning, through peft), in diffusers/peft format or kohya/A1111's (converted by diffusers); textual-inversion
    embeddings with diffusers' `load_textual_inversion` (latentgen.formats.embeddings adds A1111's folder and checks).
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet->vae"
    _optional_components = ["text_encoder_2", "tokenizer_2", "text_encoder_zh", "tokenizer_zh"]

    def __init__(self, vae: AutoencoderKL, text_encoder: nn.Module, tokenizer: Any, unet: UNet2DConditionModel,
                 scheduler: Any, text_encoder_2: nn.Module | None = None, tokenizer_2: Any = None,
                 text_encoder_zh: nn.Module | None = None, tokenizer_zh: Any = None,
                 clip_skip: int | None = None, apg: dict | None = None):
        super().__init__()
        if is_openclip(text_encoder):
            # An open_clip tower becomes the equivalent CLIPTextModel (as SD 2 did), so the folder stays diffusers'.
            text_encoder = openclip_to_transformers(text_encoder)
            tokenizer = clip_tokenizer(max_length=text_encoder.config.max_position_embeddings, pad_token="!")
        if (text_encoder_2 is None) != (tokenizer_2 is None):
            raise UserError("an SDXL pipeline needs both text_encoder_2 and tokenizer_2")
        if (text_encoder_zh is None) != (tokenizer_zh is None):
            raise UserError("a Chinese text encoder needs both text_encoder_zh and tokenizer_zh")
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                              text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                              text_encoder_zh=text_encoder_zh, tokenizer_zh=tokenizer_zh)
        # The model's own sampling defaults beyond its scheduler: clip skip, and adaptive projected guidance's
        # settings (`generation.guidance.Apg`) where the model samples better with it than with plain guidance.
        self.register_to_config(clip_skip=clip_skip, apg=apg)
        f = self.vae_scale_factor
        self.image_processor = VaeImageProcessor(vae_scale_factor=f)
        self.mask_processor = VaeImageProcessor(vae_scale_factor=f, do_normalize=False, do_binarize=True,
                                                do_convert_grayscale=True)
        self.prompt_encoder = PromptEncoder()
        self.warned: set[str] = set()  # warnings given once per pipeline
        self.loras_dir = Path("loras")  # where <lora:NAME:...> and named LoRAs are looked up
        self.loras_confined = False  # True (a server): LoRA names resolve only inside loras_dir (`lora.resolve`)
        self.controlnets_dir = Path("controlnets")  # where --control finds a ControlNet by name (confined alike)
        self.lora_lock = threading.RLock()  # requests with different LoRAs, or tiled ones, take turns on the U-Net

    # ------------------------------------------------------------------------------------------------------------
    # LoRAs: diffusers' SD loader, and for an SDXL pipeline its SDXL loader, which also loads the second text
    # encoder's part (kohya's `lora_te2_…`, diffusers' `text_encoder_2.…`)

    _lora_loadable_modules = ["unet", "text_encoder", "text_encoder_2"]

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name=None, hotswap=False, **kwargs):
        loader = StableDiffusionXLLoraLoaderMixin if self.is_sdxl else StableDiffusionLoraLoaderMixin
        return loader.load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name=adapter_name,
                                        hotswap=hotswap, **kwargs)

    def fuse_lora(self, components=None, **kwargs):
        """diffusers' fuse_lora; by default into every LoRA-loadable model the pipeline has."""
        return super().fuse_lora(components=components or self._lora_models(), **kwargs)

    def unfuse_lora(self, components=None, **kwargs):
        return super().unfuse_lora(components=components or self._lora_models(), **kwargs)

    def _lora_models(self) -> list[str]:
        return [name for name in self._lora_loadable_modules if getattr(self, name, None) is not None]

    # ------------------------------------------------------------------------------------------------------------
    # Loading and saving

    @classmethod
    def from_pretrained(cls, folder: str | Path, torch_dtype: torch.dtype | str | None = None,
                        allow_pickle: bool = False, dtype: torch.dtype | str | None = None,
                        prediction_type: str | None = None, **kwargs) -> "LatentPipeline":
        """Load a diffusers pipeline folder (ours or Stable Diffusion's), offline.

        `torch_dtype` None or "auto" picks the fast precision for this machine (bf16 on CPUs with bf16 matrix
        units, fp16/bf16 on CUDA, else fp32); pass `torch.float32` for diffusers' exact numbers.
        Weights must be safetensors unless `allow_pickle=True`, which loads `.bin` files with
        `torch.load(weights_only=True)` (no code runs, but prefer converting them).
        """

        folder = Path(folder)
        if folder.is_file():
            return cls.from_single_file(folder, torch_dtype=dtype or torch_dtype, allow_pickle=allow_pickle,
                                        prediction_type=prediction_type)
        if prediction_type:
            raise UserError("a prediction type is given for single-file checkpoints; a folder's scheduler config "
                            "says it")
        check_pipeline_folder(folder, allow_pickle=allow_pickle)
        kwargs.setdefault("local_files_only", True)
        target = _target_dtype(dtype or torch_dtype)
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

    @classmethod
    def from_single_file(cls, path: str | Path, torch_dtype: torch.dtype | str | None = None,
                         allow_pickle: bool = False, prediction_type: str | None = None) -> "LatentPipeline":
        """Load a single-file SD 1.x / 2.x / SDXL checkpoint (A1111's and ComfyUI's format), offline: the
        architecture is read from the weights (latentgen.formats.single_file). `.ckpt` pickles only with
        `allow_pickle=True` (read with torch.load(weights_only=True)). `prediction_type` ("epsilon" or
        "v_prediction") overrides what the file says, for 768-v SD 2.x files that say nothing."""

        path = Path(path)
        state, metadata = single_file.read(path, allow_pickle)
        kind = single_file.layout(state, str(path))
        prediction = prediction_type or single_file.prediction_type(path, state, metadata)
        if prediction not in ("epsilon", "v_prediction"):
            raise UserError(f"prediction type must be epsilon or v_prediction, got {prediction!r}")
        try:
            parts = single_file.components(state, metadata, kind, prediction)
        except UserError:
            raise
        except Exception as err:  # an architecture diffusers/transformers cannot build from what the file shows
            raise UserError(f"{path}: cannot build the {kind.upper()} model its weights describe "
                            f"({first_line(err)})") from None
        del state
        target = _target_dtype(torch_dtype)
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            if name in parts and next(parts[name].parameters()).dtype != target:
                parts[name].to(target)
        pipe = cls(**parts)
        pipe.keep_vae_safe()
        pipe.choose_memory_format()
        return pipe

    def save_single_file(self, path: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write this pipeline as one .safetensors checkpoint in the SD 1.x / 2.x / SDXL layout that A1111 and
        ComfyUI load, with latentgen's configs in its metadata (loading it here gives this pipeline back
        exactly). `dtype=torch.float16` halves the file."""

        return single_file.write(self, path, dtype)

    def compile_unet(self, mode: str | None = None, report: Callable[[str], None] | None = None) -> None:
        """Compile the U-Net for inference. On the CPU: ahead of time with AOTInductor, once per input shape at
        its first call, cached on disk so later processes load it in milliseconds (`latentgen.runtime.compiled`;
        `report(message)` hears each compile and load). On CUDA: `torch.compile(mode=mode)` in place, by default
        in `reduce-overhead` mode (CUDA graphs: each step's kernels launched as one graph, 3× diffusers at one
        image per call on an H200, README), and the VAE decoder with `torch.compile` too (at 512 px its GroupNorms
        and SiLUs over full-resolution activations fuse), in the default mode whatever `mode` is: the pipeline
        decodes image by image and keeps each image, which CUDA graphs' replays would overwrite. `report` hears
        that the compile comes with the first call."""
        if self.__dict__.get("offloaded"):
            raise UserError("--compile and --offload do not go together: the offload hooks move the weights "
                            "between the calls a compiled graph would replay; use one of them")
        if self.unet.device.type == "cpu":
            compiled.install(self.unet, report)
        else:
            self.unet.compile(mode=mode or "reduce-overhead")
            self.vae.decoder.compile()
            if report is not None:  # torch.compile compiles lazily: say why the first image takes long
                report("the U-Net and the VAE decoder compile on the first call (44-50 s for SD's U-Net on an H200)")

    def offload(self, mode: str, device: torch.device | str) -> None:
        """Keep the models in main memory and run them on `device` (a GPU), for models larger than its memory:
        "model" moves each whole model there when it is called and back when the next one is (diffusers'
        `enable_model_cpu_offload`: the GPU holds the U-Net's weights, not the text encoders' and the VAE's as
        well; a little slower), "sequential" each layer (`enable_sequential_cpu_offload`: one layer's weights at a
        time; several times slower). The memory guard counts what stays on the GPU (`runtime.memory`)."""
        self.__dict__["offloaded"] = mode  # before diffusers' `to("cpu")`: the layout is the GPU's
        self.__dict__["offload_device"] = torch.device(device)
        offload_hooks(self, mode, device)

    @property
    def execution_device(self) -> torch.device:
        """Where the models run, and the request's tensors are made: the U-Net's device, or with `offload` the
        device the offload hooks move the models to (diffusers' `_execution_device`)."""
        if self.__dict__.get("offloaded"):
            return self._execution_device
        # not `self.unet.device`: diffusers' walks every submodule for group-offloading hooks (about 1 ms for the
        # default model's U-Net, several times a call)
        return next(self.unet.parameters()).device

    def to(self, *args, **kwargs):
        """diffusers' `to`, then the memory layout for the device and precision it leaves (`choose_memory_format`)."""
        super().to(*args, **kwargs)
        self.choose_memory_format()
        cache_processor_signatures(self.unet)
        return self

    def choose_memory_format(self) -> None:
        """channels_last on the CPU in reduced precision for U-Nets that work on 32×32 latents or more (Stable
        Diffusion's 64×64): oneDNN's channels-last bf16 convolutions measured 12% faster for the U-Net and 19% for
        the VAE decode of a Stable-Diffusion-shaped model here; on the default model's 16×16 latents they are
        slower. Elsewhere the contiguous layout: on CUDA, PyTorch's GroupNorm works only in it (`native_group_norm`
        makes its input contiguous off the CPU), so channels-last pays a conversion around each of the VAE's and
        U-Net's GroupNorms. fp32 keeps diffusers' layout, and with it diffusers' exact numbers."""
        device = self.__dict__.get("offload_device") or next(self.unet.parameters()).device
        fast = device.type == "cpu" and self.unet.dtype != torch.float32 and self.unet.config.sample_size >= 32
        layout = torch.channels_last if fast else torch.contiguous_format
        self.unet.to(memory_format=layout)
        self.vae.to(memory_format=layout)

    def keep_vae_safe(self) -> None:
        """An fp16 VAE overflows in its decoder (the black-image bug of SD's VAE, certain with SDXL's); keep it in
        fp32 then, as diffusers' SDXL pipeline does, unless its config says it was made for fp16 (`force_upcast:
        false`, as madebyollin's sdxl-vae-fp16-fix declares). A decode that overflows all the same is redone in
        fp32 (`sampling.finite_or_fp32`). bf16 has fp32's range, so a bf16 VAE stays bf16.
        """
        if self.vae.dtype == torch.float16 and getattr(self.vae.config, "force_upcast", True):
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
                names = WEIGHT_COMPONENTS + tuple(n for n in ("text_encoder_2", "text_encoder_zh")
                                                  if getattr(self, n, None) is not None)
                original = {name: next(getattr(self, name).parameters()).dtype for name in names}
                try:
                    for name in names:
                        getattr(self, name).to(weights_dtype)
                    super().save_pretrained(tmp, **kwargs)
                finally:
                    for name, dtype in original.items():
                        getattr(self, name).to(dtype)
                for encoder_config in (tmp / name / "config.json" for name in names if name.startswith("text")):
                    config = json.loads(encoder_config.read_text())
                    for key in ("dtype", "torch_dtype"):
                        if key in config:
                            config[key] = "float32"
                    encoder_config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            index_path = tmp / "model_index.json"
            index = json.loads(index_path.read_text())
            # Name a diffusers class so `DiffusionPipeline.from_pretrained` and other tools recognise the folder;
            # the components StableDiffusionPipeline knows but we do not have are declared absent.
            if self.is_sdxl:
                index["_class_name"] = "StableDiffusionXLPipeline"
                index.update(image_encoder=[None, None], feature_extractor=[None, None],
                             force_zeros_for_empty_prompt=False)  # latentgen encodes "" as A1111 does
            else:
                index["_class_name"] = "StableDiffusionPipeline"
                index.update(safety_checker=[None, None], feature_extractor=[None, None], image_encoder=[None, None],
                             requires_safety_checker=False)
            for name in self._optional_components:  # absent ones are not listed (diffusers: [null, null])
                if getattr(self, name, None) is None:
                    index.pop(name, None)
            for key in ("clip_skip", "apg"):
                if index.get(key) is None:
                    index.pop(key, None)
            index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def upscaler(self) -> "LatentPipeline":
        """The model's trained upscaler (`generation.cascade`): the one `load_upscaler` gave it, else the one in its
        folder's `upscaler/`, loaded on first use."""
        up = self.__dict__.get("upscaler_pipeline")
        if up is None:
            folder = upscaler_folder.folder_of(self)
            if folder is None:
                raise UserError("this model has no upscaler (no upscaler/ folder in its model folder); pass one "
                                "(--upscaler FOLDER, or load_upscaler), or use the hires fix")
            up = self.load_upscaler(folder)
        return up

    def student(self) -> "LatentPipeline | None":
        """The model's few-step student: `lcm/` in its folder (a consistency-distilled U-Net with its guidance as an
        input, and its LCMScheduler; `train_unet.py` with an `lcm:` section makes one), sharing this pipeline's VAE
        and text encoders, loaded on first use; None when the folder has none."""
        if "student_pipeline" not in self.__dict__:
            with self.lora_lock:
                self.__dict__["student_pipeline"] = cascade.load_student(self)
        return self.__dict__["student_pipeline"]

    def load_upscaler(self, folder: str | Path) -> "LatentPipeline":
        """Use the upscaler in `folder` (`train_unet.py` with an `upscaler:` section writes one) for `upscale`."""
        with self.lora_lock:
            self.__dict__["upscaler_pipeline"] = up = cascade.load(self, folder)
        return up

    # ------------------------------------------------------------------------------------------------------------
    # What the model is

    @property
    def vae_scale_factor(self) -> int:
        return diffusion.vae_factor(self.vae)

    @property
    def default_size(self) -> int:
        return diffusion.default_size(self.vae, self.unet)

    @property
    def size_multiple(self) -> int:
        return diffusion.size_multiple(self.vae, self.unet)

    def is_latents(self, image) -> bool:
        """True for a (N, C, h, w) tensor with the VAE's latent channels: already-encoded, scaled latents."""
        return (isinstance(image, torch.Tensor) and image.ndim == 4
                and image.shape[1] == self.vae.config.latent_channels != 3)

    @property
    def inpainting_unet(self) -> bool:
        """A 9-channel U-Net (SD inpainting): noisy latents + mask + masked-image latents."""
        return self.unet.config.in_channels == 2 * self.vae.config.latent_channels + 1

    # ------------------------------------------------------------------------------------------------------------
    # Encoders

    @property
    def is_sdxl(self) -> bool:
        """Two text encoders and a pooled embedding (SDXL)."""
        return getattr(self, "text_encoder_2", None) is not None

    def text_encoder_backend(self, clip_skip: int | None = None) -> TextEncoder:
        if self.is_sdxl:
            return SDXLTextEncoder(self.tokenizer, self.text_encoder, self.tokenizer_2, self.text_encoder_2,
                                   clip_skip=clip_skip)
        return text_encoder_for(self.tokenizer, self.text_encoder, clip_skip=clip_skip)

    def encode_conditioning(self, prompts: Sequence[str], clip_skip: int | None = None) -> Conditioning:
        """(B,) prompts -> their Conditioning in the U-Net's dtype; A1111's weighting syntax and prompts longer
        than the encoder's window work (latentgen.generation.prompts). A model with a Chinese text encoder
        (`text_encoder_zh`, `components.chinese`) reads the prompts written in Chinese with it."""
        if getattr(self, "text_encoder_zh", None) is not None and any(map(chinese.is_chinese, prompts)):
            for prompt in prompts:
                chinese.check_one_language(prompt)
            rows = [self._encode_chinese([p]) if chinese.is_chinese(p) else self.encode_conditioning([p], clip_skip)
                    for p in prompts]
            return Conditioning.concat(rows)
        device, dtype = self.execution_device, self.unet.dtype
        # len(tokenizer): embeddings loaded later add words, and a cached prompt may have used them as text
        key = (id(self.text_encoder), len(self.tokenizer), clip_skip, str(device), str(dtype),
               lora.text_encoder_state(self))
        spell = self.maybe_convert_prompt if self.__dict__.get("embedding_files") else None  # k-vector words
        return self.prompt_encoder.encode(prompts, key, lambda: self.text_encoder_backend(clip_skip), device, dtype,
                                          spell=None if spell is None else lambda p: spell(p, self.tokenizer))

    def _encode_chinese(self, prompts: Sequence[str]) -> Conditioning:
        device, dtype = self.execution_device, self.unet.dtype
        key = ("zh", id(self.text_encoder_zh), str(device), str(dtype))
        return self.prompt_encoder.encode(
            prompts, key, lambda: chinese.ChineseTextEncoder(self.tokenizer_zh, self.text_encoder_zh), device, dtype)

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B,) prompts -> hidden states (B, T, D) and a (B, T) mask or None, with the model's clip skip."""
        cond = self.encode_conditioning(prompts, self.config.clip_skip)
        return cond.hidden_states, cond.mask

    def clear_prompt_cache(self) -> None:
        """Forget cached prompt embeddings (after changing the text encoder's weights in place)."""
        self.prompt_encoder.clear()

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> scaled latents z0 (N, C, H/f, W/f), the posterior mean."""
        return sampling.encode_images(self, images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (N, C, h, w) -> images (N, 3, H, W) in [-1, 1]."""
        return sampling.decode(self, latents)

    # ------------------------------------------------------------------------------------------------------------
    # Generation

    def check_request(self, prompt=None, **fields) -> Plan:
        """The request's plan, every value checked against this model (one-line UserErrors), nothing run."""
        return _request(prompt, fields).fit(self)

    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str] | None = None, *, on_step: Callable[[int], None] | None = None,
                 on_latents: Callable[[int, torch.Tensor], None] | None = None, **fields) -> GenerationOutput:
        """Generate images: `fields` are `latentgen.generation.request.Request`'s (diffusers' names: negative_prompt,
        num_inference_steps, guidance_scale, height, width, num_images_per_prompt, generator, output_type, image,
        mask_image, strength, ...; and seed, scheduler, guidance variants, clip_skip, hires).
        `on_step(i)` is called after each sampling step, `on_latents(i, latents)` before it with the current
        latents (an exception raised there stops the call)."""
        return self.generate(_request(prompt, fields), on_step, on_latents)

    @torch.no_grad()
    def generate(self, request: Request | Plan, on_step: Callable[[int], None] | None = None,
                 on_latents: Callable[[int, torch.Tensor], None] | None = None) -> GenerationOutput:
        """Run a Request, or a Plan already fitted to this pipeline (then nothing is checked again)."""
        plan = request if isinstance(request, Plan) else request.fit(self)
        name = plan.request.scheduler
        if (name in SCHEDULERS and SCHEDULERS[name].consistency and self.unet.config.get("time_cond_proj_dim") is None
                and self.student() is not None):  # `--scheduler lcm`: the model's distilled student samples
            return self.student().generate(plan, on_step, on_latents)
        tiled = plan.request.tiling
        # from now on every call takes the lock: none may run while the convolutions are circular or the
        # cross-attention regional
        prompts = control.image_prompts(plan.controls)
        images, image_masks = [a.adapter for a in prompts], [a.mask for a in prompts]
        lllites = [a.net for a in plan.controls if isinstance(a, control.Active) and a.lllite]
        regional_attention = plan.request.regions is not None and plan.request.regions.calc == "attention"
        if tiled or images or lllites or regional_attention:
            self.__dict__["tiling_used"] = True
        switch = bool(plan.loras or self.__dict__.get("managed_loras"))
        offloaded = self.__dict__.get("offloaded")  # the hooks move weights: one call at a time
        with self.lora_lock if switch or offloaded or self.__dict__.get("tiling_used") else contextlib.nullcontext():
            if switch:
                lora.activate(self, plan.loras)
            regions = plan.request.regions
            shape = regions.shape_of(plan.prompts) if regions is not None else (1, False)
            try:
                with tiling.circular(self.unet, self.vae, enabled=tiled), \
                        ip_adapter.applied(self.unet, images, image_masks), lllite.applied(self.unet, lllites), \
                        regional.attention(self.unet, regions, *shape, plan.height, plan.width):
                    if plan.request.hires is not None:
                        return hires.generate(self, plan, on_step, on_latents)
                    if plan.request.upscale is not None:
                        return cascade.generate(self, plan, on_step, on_latents)
                    return self.run_plan(plan, on_step, on_latents)
            finally:
                if offloaded:
                    self.maybe_free_model_hooks()  # every model back in main memory, as diffusers' pipelines end

    def run_plan(self, plan: Plan, on_step: Callable[[int], None] | None = None,
                 on_latents: Callable[[int, torch.Tensor], None] | None = None) -> GenerationOutput:
        """Sample and decode; in fp32 again where the low precision overflowed (NaN/Inf latents would decode to a
        black image), on fp32 copies of the modules."""
        generators = _generator_factory(plan)
        info: dict[str, Any] = {}
        hooks = (on_step, on_latents)

        def run(pipe, retry):
            return sampling.sample(pipe, plan, generators(), *((None, None) if retry else hooks))

        with threads.track() as used:
            latents, retried = sampling.finite_or_fp32(
                self, run,
                ("unet", "text_encoder"), warning="NaN/Inf in the latents sampled in {dtype}; sampling again in fp32",
                fatal="the model produced NaN/Inf latents even in fp32; its weights may be damaged")
        if used:
            info["threads"] = sorted(used)
        if retried:
            info["fp32_retry"] = "unet"
        if plan.request.output_type == "latent":
            images = latents
        else:
            decoded, retried = sampling.finite_or_fp32(
                self, lambda pipe, retry: sampling.decode(pipe, latents), ("vae",),
                warning="NaN/Inf in the image decoded in {dtype}; decoding again in fp32",
                fatal="the VAE decoded NaN/Inf pixels even in fp32; its weights may be damaged")
            if retried:
                info["fp32_retry"] = "vae"
            if plan.overlay is not None:  # outpainting: the original pixels back where the mask is black
                canvas, alpha = (t.to(decoded.device, decoded.dtype) for t in plan.overlay)
                decoded = decoded * alpha + canvas * (1 - alpha)
            images = self.image_processor.postprocess(decoded, output_type=plan.request.output_type)

        name = plan.request.scheduler or scheduler_name_of(self.scheduler)
        info |= {"scheduler": name, "height": plan.height, "width": plan.width, "dtype": name_of(self.unet.dtype)}
        return GenerationOutput(images=images, seeds=plan.seeds, scheduler=name, info=info,
                                metadata=[plan.record(i, name) for i in range(plan.batch_size)])


def cache_processor_signatures(model: nn.Module) -> None:
    """Each attention call of diffusers' `Attention.forward` reads its processor's signature
    (`inspect.signature(processor.__call__)`, 30 µs here; 280 calls an image of the default model); stored as the
    function's `__signature__`, where `inspect` looks first, it costs 5. The signature is the function's own."""
    for cls in {type(p) for p in getattr(model, "attn_processors", {}).values()}:
        call = cls.__call__
        if inspect.isfunction(call) and "__signature__" not in call.__dict__:
            call.__signature__ = inspect.signature(call)


def offload_hooks(pipe: DiffusionPipeline, mode: str, device: torch.device | str) -> None:
    """diffusers' offload of `mode` ("model", "sequential") on any of its pipelines."""
    if mode not in OFFLOAD_MODES:
        raise UserError(f"offload {mode!r} is not one of {', '.join(OFFLOAD_MODES)}")
    if mode == "model":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.enable_sequential_cpu_offload(device=device)


def _request(prompt, fields: dict) -> Request:
    """A Request from `__call__`'s keywords; an unknown keyword is a one-line error naming the valid ones."""
    names = [f.name for f in dataclasses.fields(Request) if f.name != "checked"]
    unknown = sorted(set(fields) - set(names))
    if unknown:
        raise UserError(f"unknown generation option {unknown[0]!r}; valid: {', '.join(names)}")
    return Request(prompt=prompt if prompt is not None else fields.pop("prompt", ""), **fields)


def _generator_factory(plan: Plan):
    """A function giving the call's generators in their initial state, each time it is called (for a retry)."""
    if plan.seeds is not None:
        return lambda: sampling.cpu_generators(plan.seeds)
    generator = plan.generator
    gens = generator if isinstance(generator, list) else [generator] if generator is not None else []
    states = [g.get_state() for g in gens]

    def fresh():
        for g, state in zip(gens, states):
            g.set_state(state)
        return generator

    return fresh


def _target_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """A torch dtype as given, or a precision name ("auto", None: the fast one for this machine)."""

    return dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype or "auto", resolve_device("auto"))
