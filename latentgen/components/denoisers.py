"""The denoiser's backbone: diffusers' cross-attention U-Net (`UNet2DConditionModel`, the default), a DiT or an
MMDiT, all called as the U-Net is, so that the trainer and `LatentPipeline` drive the three alike.

    unet    UNet2DConditionModel: convolutions, with cross-attention to the text at its attention levels
    dit     PixArt-α's transformer (`PixArtTransformer2DModel`, Chen et al. 2023): a DiT over 2×2 latent patches
            whose blocks cross-attend to the text, timestep by adaLN-single
    mmdit   SD3's transformer (`SD3Transformer2DModel`, Esser et al. 2024): text and image tokens in one joint
            attention, each stream with its own weights; the pooled text (the tokens' mean: the sentence
            embedding MiniLM was trained to give) joins the timestep in the adaptive norms

A transformer is kept in a `TransformerDenoiser`, a diffusers model whose config names the backbone and the
transformer's arguments, and which adds to that config the few U-Net keys the rest of latentgen reads (channels,
sample size, text width, patch size). Its folder loads with `TransformerDenoiser.from_pretrained`, and the
pipeline folder with `LatentPipeline.from_pretrained`; diffusers' own pipelines have no place for it (SD3's and
PixArt's want their own text encoders).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.loaders import PeftAdapterMixin

from latentgen.errors import UserError, first_line, one_of

BACKBONES = ("unet", "dit", "mmdit")
TRANSFORMERS = {"dit": "PixArtTransformer2DModel", "mmdit": "SD3Transformer2DModel"}

# The experiment's transformers (configs/backbone-*-flow.yaml give them): 64 image tokens at 64 px, width 192
DEFAULT_TRANSFORMERS = {
    "dit": dict(num_layers=8, num_attention_heads=6, attention_head_dim=32, in_channels=4, out_channels=4,
                sample_size=16, patch_size=2, caption_channels=384, cross_attention_dim=192,
                use_additional_conditions=False, norm_type="ada_norm_single"),
    "mmdit": dict(num_layers=7, num_attention_heads=6, attention_head_dim=32, in_channels=4, out_channels=4,
                  sample_size=16, patch_size=2, joint_attention_dim=384, caption_projection_dim=192,
                  pooled_projection_dim=384, pos_embed_max_size=32),
}


def text_width_key(kind: str) -> str:
    """The transformer argument that is the text encoder's width."""
    return {"dit": "caption_channels", "mmdit": "joint_attention_dim"}[kind]


class TransformerDenoiser(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """A DiT or MMDiT behind the U-Net's call: `(sample, timestep, encoder_hidden_states) -> (prediction,)`.

    `config.transformer_config` holds the diffusers transformer's arguments; `in_channels`, `out_channels`,
    `sample_size`, `cross_attention_dim` (the text width it takes) and `patch_size` are derived from them, for the
    code that reads a U-Net's config (sizes, checks, memory estimates). LoRAs attach through diffusers' peft
    mixin, as to a U-Net (the attention projections' names are the transformer's: `transformer.….attn.to_q`)."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(self, kind: str = "mmdit", transformer_config: dict | None = None, in_channels: int | None = None,
                 out_channels: int | None = None, sample_size: int | None = None,
                 cross_attention_dim: int | None = None, patch_size: int | None = None):
        super().__init__()
        import diffusers

        if kind not in TRANSFORMERS:
            raise one_of("backbone", kind, list(TRANSFORMERS))
        arguments = dict(DEFAULT_TRANSFORMERS[kind] if transformer_config is None else transformer_config)
        try:
            self.transformer = getattr(diffusers, TRANSFORMERS[kind])(**arguments)
        except (TypeError, ValueError) as err:
            raise UserError(f"bad transformer config for the {kind} backbone: {first_line(err)}") from None
        t = self.transformer.config
        self.register_to_config(transformer_config=arguments, in_channels=t.in_channels, out_channels=t.out_channels,
                                sample_size=t.sample_size, patch_size=t.patch_size,
                                cross_attention_dim=t[text_width_key(kind)])

    @property
    def attn_processors(self):
        return self.transformer.attn_processors

    def set_attn_processor(self, processor) -> None:
        """The DiT's attention kernel; the MMDiT keeps its joint-attention processors (SDPA), which the plain
        processors cannot replace."""
        if self.config.kind == "dit":
            self.transformer.set_attn_processor(processor)

    def enable_gradient_checkpointing(self, *args, **kwargs) -> None:
        self.transformer.enable_gradient_checkpointing(*args, **kwargs)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                encoder_attention_mask: torch.Tensor | None = None, return_dict: bool = True,
                **unused: Any):
        """The prediction (B, C, h, w) for latents `sample` at `timestep` (a number or (B,)) given the text
        (B, T, D); `encoder_attention_mask` (B, T), 1 for the tokens that count. What a U-Net takes besides
        (class labels, added conditions) must be absent: these backbones have no use for it."""
        given = [k for k, v in unused.items() if v is not None and k != "cross_attention_kwargs"]
        if given:
            raise UserError(f"the {self.config.kind} backbone takes no {', '.join(sorted(given))}")
        b = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device)
        t = (t.expand(b) if t.ndim == 0 else t).to(sample.dtype if t.is_floating_point() else torch.long)
        h = encoder_hidden_states.to(sample.dtype)
        if self.config.kind == "dit":
            out = self.transformer(sample, encoder_hidden_states=h, timestep=t,
                                   added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                                   encoder_attention_mask=encoder_attention_mask, return_dict=False)[0]
        else:
            out = self.transformer(sample, encoder_hidden_states=h, timestep=t, return_dict=False,
                                   pooled_projections=pooled(h, encoder_attention_mask))[0]
        return _Output(out) if return_dict else (out,)


class _Output:
    def __init__(self, sample: torch.Tensor):
        self.sample = sample


def pooled(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, D): the mean of each text's token embeddings (over its real tokens where a mask says which)."""
    if mask is None:
        return hidden.mean(dim=1)
    w = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)


def build_denoiser(kind: str, unet: dict, transformer: dict | None):
    """A new denoiser: a UNet2DConditionModel from `unet` (its arguments), or a TransformerDenoiser of `kind` from
    `transformer` (None: the experiment's default size)."""
    if kind not in BACKBONES:
        raise one_of("backbone", kind, list(BACKBONES))
    if kind == "unet":
        from diffusers import UNet2DConditionModel

        try:
            return UNet2DConditionModel(**unet)
        except (TypeError, ValueError) as err:
            raise UserError(f"bad unet config: {first_line(err)}") from None
    return TransformerDenoiser(kind, transformer or None)


def backbone_of(model) -> str:
    """'unet', 'dit' or 'mmdit'."""
    return model.config.kind if isinstance(model, TransformerDenoiser) else "unet"
