"""Tiny random components, built offline in well under a second (the way diffusers' pipeline tests do)."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from latentgen.text_encoders import clip_tokenizer

_TOKENIZER = None


def tokenizer():
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = clip_tokenizer()
    return _TOKENIZER


def unet(cross_attention_dim: int = 32, sample_size: int = 16, prediction_type: str = "epsilon", seed: int = 0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=sample_size, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, norm_num_groups=8, attention_head_dim=8,
    ).eval()


def vae(seed: int = 0, attention: bool = True):
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32,
        mid_block_add_attention=attention,
    ).eval()


def clip_text_encoder(hidden_size: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    config = CLIPTextConfig(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=hidden_size,
                            intermediate_size=37, layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=3,
                            vocab_size=49408, max_position_embeddings=77)
    return CLIPTextModel(config).eval()


def scheduler(prediction_type: str = "epsilon"):
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)


def components(prediction_type: str = "epsilon") -> dict:
    return dict(unet=unet(prediction_type=prediction_type), vae=vae(), text_encoder=clip_text_encoder(),
                tokenizer=tokenizer(), scheduler=scheduler(prediction_type))


def record_calls(module) -> list:
    """Make `module.forward` record the batch size of every call; returns the (live) list of sizes."""
    sizes = []
    forward = module.forward

    def spy(sample, *args, **kwargs):
        sizes.append(sample.shape[0])
        return forward(sample, *args, **kwargs)

    module.forward = spy
    return sizes
