"""Tiny random components, built offline in well under a second (the way diffusers' pipeline tests do)."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from latentgen.components.text_encoders import clip_tokenizer

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



# Scaled-down checkpoints of Stable Diffusion's own topologies, following SD's conventions for what weights do not
# show (32 norm groups, SD 1.x's 8 attention heads, 64-wide heads elsewhere), so that a single file written without
# latentgen's metadata loads back with the same architecture, as a full-size SD file does.


def sd_vae(seed: int = 0, levels: int = 4):
    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(32, 32, 64, 64)[:levels], layers_per_block=1, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, sample_size=64).eval()


def clip(act: str, projection: bool = False, hidden: int = 64, seed: int = 0):
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                            num_attention_heads=max(hidden // 64, 1), vocab_size=49408, max_position_embeddings=77,
                            hidden_act=act, bos_token_id=49406, eos_token_id=49407, projection_dim=hidden)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def sd1_components(seed: int = 0) -> dict:
    """SD 1.x's topology with small widths: 4 levels of 2 blocks, attention on the first 3, 8 heads, CLIP."""
    torch.manual_seed(seed)
    unet_ = UNet2DConditionModel(
        block_out_channels=(32, 32, 64, 64), layers_per_block=2, sample_size=8, cross_attention_dim=64,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=8).eval()
    return dict(unet=unet_, vae=sd_vae(seed), text_encoder=clip("quick_gelu", seed=seed), tokenizer=tokenizer(),
                scheduler=scheduler())


def sdxl_components(seed: int = 0) -> dict:
    """SDXL's topology with small widths: no attention on the first level, deeper transformers below, linear
    projections, the added text/time embedding; a CLIP-L-like and an OpenCLIP-bigG-like encoder (projected)."""
    torch.manual_seed(seed)
    unet_ = UNet2DConditionModel(
        block_out_channels=(32, 64, 64), layers_per_block=2, sample_size=16, cross_attention_dim=128,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(1, 1, 1),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1, 2), projection_class_embeddings_input_dim=64 + 6 * 8).eval()
    return dict(unet=unet_, vae=sd_vae(seed, levels=3), text_encoder=clip("quick_gelu", seed=seed),
                tokenizer=tokenizer(), text_encoder_2=clip("gelu", projection=True, seed=seed + 1),
                tokenizer_2=clip_tokenizer(pad_token="!"), scheduler=scheduler())


def random_unet_lora(folder) -> dict:
    """A peft state dict of a rank-4 LoRA on a saved pipeline's U-Net attention projections, with random (non-zero)
    up weights, so that it changes the images."""
    from peft import LoraConfig, get_peft_model_state_dict

    from latentgen import LatentPipeline

    unet = LatentPipeline.from_pretrained(folder, torch_dtype=torch.float32).unet
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(0)
    for name, param in unet.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    return get_peft_model_state_dict(unet)


def random_lora(model, targets, seed: int, alpha: float = 8) -> dict:
    """A peft state dict of a rank-4 LoRA injected into `model` with peft directly, with random (non-zero) up
    weights drawn after torch.manual_seed(seed)."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    model = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=alpha, init_lora_weights="gaussian",
                                               target_modules=list(targets)), model)
    torch.manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    return get_peft_model_state_dict(model, state_dict={k: v for k, v in model.state_dict().items() if "lora_" in k},
                                     adapter_name="default")


def random_text_encoder_lora(folder) -> dict:
    """A peft state dict of a rank-4 LoRA (alpha 8) on a saved pipeline's CLIP text encoder attention projections,
    with random (non-zero) up weights. peft injects it directly: transformers' `add_adapter` wants a newer peft
    than the one pip has for it."""
    from latentgen import LatentPipeline

    encoder = LatentPipeline.from_pretrained(folder, torch_dtype=torch.float32).text_encoder
    return random_lora(encoder, ["q_proj", "k_proj", "v_proj", "out_proj"], seed=1)

def t5_tokenizer():
    """A T5 tokenizer built offline: a Unigram model over CLIP's vocabulary words (the real one is a download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import T5TokenizerFast

    vocab = tokenizer().get_vocab()  # a dict whose order changes from one call to the next: take the lowest ids
    words = sorted({w.replace("</w>", "") for w in sorted(vocab, key=vocab.get)[:2000]} - {""})
    unigram = models.Unigram([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"▁{w}", -1.0) for w in words]
                             + [(w, -2.0) for w in words], unk_id=2)
    tok = Tokenizer(unigram)
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0)


def t5(d_model: int, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=t5_tokenizer().vocab_size, d_model=d_model, d_kv=8, d_ff=2 * d_model,
                                   num_layers=2, num_heads=2, decoder_start_token_id=0)).eval()


def flow_vae(latent_channels: int, seed: int = 0):
    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(16, 16), layers_per_block=1, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                         scaling_factor=1.5035, sample_size=32).eval()


def sd3_components(seed: int = 0) -> dict:
    """SD3's parts, tiny: an MMDiT, CLIP-L- and CLIP-G-like encoders (projected, pooled 32 + 32), T5, a
    16-channel-style VAE (4 channels here), the flow-matching scheduler with SD3's shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=64,
                                        caption_projection_dim=16, pooled_projection_dim=64).eval()
    return dict(transformer=transformer, vae=flow_vae(4, seed), text_encoder=clip("gelu", True, 32, seed),
                tokenizer=tokenizer(), text_encoder_2=clip("gelu", True, 32, seed + 1), tokenizer_2=tokenizer(),
                text_encoder_3=t5(64, seed + 2), tokenizer_3=t5_tokenizer(),
                scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


def flux_components(seed: int = 0, guidance: bool = True) -> dict:
    """Flux.1's parts, tiny: double- and single-stream blocks, CLIP (pooled) and T5, its dynamic shift;
    `guidance`: dev's embedded guidance (schnell has none)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
                                         guidance_embeds=guidance).eval()
    scheduler_ = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                 max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    return dict(transformer=transformer, vae=flow_vae(4, seed), text_encoder=clip("quick_gelu", False, 32, seed),
                tokenizer=tokenizer(), text_encoder_2=t5(32, seed + 1), tokenizer_2=t5_tokenizer(),
                scheduler=scheduler_)
