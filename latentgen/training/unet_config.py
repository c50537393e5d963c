"""`train_unet.py`'s config: the run, its U-Net, text encoder, LoRA and upscaler sections, checked before any
work."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from latentgen.components.denoisers import BACKBONES
from latentgen.components.diffusion import (
    PREDICTION_TYPES,
    TIMESTEP_SAMPLING,
    NoiseConfig,
)
from latentgen.components.schedulers import FLOW_SAMPLERS, scheduler_names
from latentgen.errors import UserError, one_of
from latentgen.formats.upscaler import UpscalerConfig
from latentgen.training.loop import (
    TrainConfig,
)

log = logging.getLogger(__name__)

LORA_ALGOS = ("lora", "loha", "lokr")

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
class LcmConfig:
    """`train_unet.py`'s `lcm:` section."""

    enabled: bool = False
    ddim_steps: int = 50  # N: the teacher's DDIM schedule, whose neighbours the student learns to join
    w_min: float = 3.0  # the guidance scale drawn for each example (CFG's s, where s = 1 is unguided)
    w_max: float = 9.0
    embed_guidance: bool = True  # full student: its guidance an input (time_cond_proj_dim); a LoRA learns w_max
    time_cond_proj_dim: int = 256
    huber_c: float = 0.001
    target_decay: float = 0.95  # the target network's EMA of the student
    timestep_scaling: float = 10.0  # LCMScheduler's: its boundary scalings at sampling time are the same

    def check(self) -> None:
        if not 2 <= self.ddim_steps <= 1000 or not 1.0 <= self.w_min <= self.w_max:
            raise UserError("lcm.ddim_steps must be in [2, 1000] and 1 ≤ lcm.w_min ≤ lcm.w_max")
        if not 0 <= self.target_decay < 1 or not self.huber_c > 0:
            raise UserError("lcm.target_decay must be in [0, 1) and lcm.huber_c > 0")


@dataclass
class ControlNetTrainConfig:
    """`train_unet.py`'s `controlnet:` section: train a ControlNet for the pretrained pipeline (training.controlnet)."""

    enabled: bool = False
    # the hint encoder's widths, one stride-2 step between each (SD's 16, 32, 96, 256 for its 8× VAE); empty: SD's
    # first widths, as many as the VAE's factor needs
    hint_channels: list[int] = field(default_factory=list)
    # the control image of each example: the shapes dataset's "layout" (each shape's silhouette, white on black);
    # for an hf dataset, the name of its conditioning image column
    condition: str = "layout"
    pretrained_controlnet: str | None = None  # continue this ControlNet (else a copy of the U-Net's encoder)


@dataclass
class UNetTrainConfig(TrainConfig):
    output_dir: str = "runs/unet"
    pretrained_pipeline: str | None = None  # fine-tune the U-Net of this pipeline folder (and use its parts)
    vae_path: str | None = None  # an AutoencoderKL folder (train_vae.py's output)
    vae_model: dict = field(default_factory=dict)  # or a new, untrained VAE (smoke tests only)
    unet: dict = field(default_factory=lambda: dict(DEFAULT_UNET))  # UNet2DConditionModel arguments
    # the denoiser: unet (the U-Net above), dit (PixArt-α's transformer) or mmdit (SD3's joint-attention
    # transformer); a transformer's diffusers arguments in `transformer` (empty: components.denoisers' defaults)
    backbone: str = "unet"
    transformer: dict = field(default_factory=dict)
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
    lcm: LcmConfig = field(default_factory=LcmConfig)  # enabled: distil a few-step student (training.lcm)
    controlnet: ControlNetTrainConfig = field(default_factory=ControlNetTrainConfig)  # enabled: train a ControlNet

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
        if self.backbone not in BACKBONES:
            raise one_of("backbone", self.backbone, list(BACKBONES))
        if self.backbone != "unet" and (self.pretrained_pipeline or self.upscaler.scale or self.lcm.enabled
                                        or self.controlnet.enabled or self.lora.rank):
            raise UserError(f"backbone {self.backbone} makes a new transformer; a pretrained_pipeline's backbone is "
                            "its own (leave backbone unset to fine-tune it or train its LoRA); upscalers, lcm and "
                            "controlnet runs are U-Net runs")
        if self.noise.prediction_type == "flow" and self.noise.snr_gamma:
            raise UserError("noise.snr_gamma weights ε/v losses by SNR; flow matching has its own (none): "
                            "set noise.snr_gamma: 0")
        if self.noise.flow_shift is not None and not self.noise.flow_shift > 0:
            raise UserError(f"noise.flow_shift must be > 0, got {self.noise.flow_shift}")
        if self.noise.prediction_type == "flow" and self.sampler not in FLOW_SAMPLERS:
            raise one_of("sampler (for a flow model)", self.sampler, list(FLOW_SAMPLERS))
        if self.noise.snr_gamma < 0 or self.noise.offset_noise < 0:
            raise UserError("noise.snr_gamma and noise.offset_noise must be ≥ 0")
        if self.noise.timestep_sampling not in TIMESTEP_SAMPLING:
            raise one_of("noise.timestep_sampling", self.noise.timestep_sampling, list(TIMESTEP_SAMPLING))
        if not self.noise.logit_std > 0:
            raise UserError(f"noise.logit_std must be > 0, got {self.noise.logit_std}")
        if self.sampler not in scheduler_names() and self.noise.prediction_type != "flow":
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
        self.lcm.check()
        if self.lcm.enabled:
            if not self.pretrained_pipeline:
                raise UserError("lcm distils a pretrained pipeline: set pretrained_pipeline (the teacher)")
            if self.lora.rank and self.lcm.embed_guidance:
                raise UserError("a LoRA student learns one guidance (lcm.w_max): set lcm.embed_guidance: false")
            if self.upscaler.scale or self.trains_text or not self.cache:
                raise UserError("lcm distils a text-to-image U-Net on cached latents with its text encoder frozen: "
                                "set cache: true")
        if self.controlnet.enabled:
            if not self.pretrained_pipeline:
                raise UserError("controlnet trains a ControlNet for a pretrained pipeline: set pretrained_pipeline")
            if self.lcm.enabled or self.upscaler.scale or self.trains_text or self.lora.rank or not self.cache:
                raise UserError("controlnet trains the ControlNet alone, on cached latents: set cache: true, no "
                                "lcm, upscaler, lora or text encoder training")
            if self.data.source == "shapes" and self.controlnet.condition != "layout":
                raise UserError("the shapes dataset's control image is its layout: set controlnet.condition: layout")
        if self.cache and (self.data.random_crop or self.data.hflip):
            raise UserError("cache=true stores one view of each image; set data.random_crop=false and "
                            "data.hflip=0, or cache=false to augment every step")
        if self.cache and self.data.buckets:
            raise UserError("cache=true stores every image's latents at one size; data.buckets needs cache: false")
