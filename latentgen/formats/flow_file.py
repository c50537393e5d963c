"""Single-file SD3 / SD3.5 checkpoints (Stability's layout, as ComfyUI, Forge and model sites share them), read
offline with the architecture taken from the weights.

A file holds the MMDiT (`model.diffusion_model.joint_blocks.…`) and usually the VAE (`first_stage_model.`) and
text encoders (`text_encoders.clip_l.transformer.`, `text_encoders.clip_g.transformer.`,
`text_encoders.t5xxl.transformer.`, all in transformers' names). What the weights say: the transformer's depth,
width, patch, channels, text and pooled widths, position-table size, qk-norm and the dual-attention blocks of
SD3.5 Medium; each encoder's widths and depth, T5's heads (from its relative-position table). What they cannot say
follows Stability's conventions: as many attention heads as blocks (64-wide for every released model), 64-wide
CLIP heads, the VAE's scaling and shift (1.5305, 0.0609), the flow scheduler's shift 3.0, sample size 128 (1024 px).

Tokenizers are not in the files: CLIP's are built from open_clip's BPE table; T5's comes from `components`, a
diffusers SD3 folder, which also gives any part the file lacks (a transformer-only file takes its VAE and encoders
from there). A file without T5 (`sd3_medium_incl_clips`) runs without it, as diffusers runs SD3 with
`text_encoder_3=None`. fp8 weights are upcast to the load precision.

The transformer is converted by diffusers' `convert_sd3_transformer_checkpoint_to_diffusers` and the VAE by its
`convert_ldm_vae_checkpoint`; diffusers' own `from_single_file` takes every config from the Hugging Face hub,
which is offline here.

Flux.1 files (BFL's `double_blocks.`/`single_blocks.` layout: flux1-dev, flux1-schnell and their fine-tunes) hold
the transformer; its architecture (depths, width, heads, text and pooled widths, dev's guidance embedding) comes
from the weights, and the rest from `components`, a diffusers Flux folder, as Forge and ComfyUI take the VAE and
text encoders separately.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from latentgen.components.text_encoders import clip_tokenizer
from latentgen.errors import UserError, first_line
from latentgen.formats.single_file import (
    VAE,
    _build,
    _clip_cfg,
    _clip_hf,
    _count,
    _load_clip,
    _meta,
    _sub,
    clip_config,
    vae_config,
)

MMDIT = "model.diffusion_model."
CLIP_L, CLIP_G, T5 = "text_encoders.clip_l.transformer.", "text_encoders.clip_g.transformer.", \
    "text_encoders.t5xxl.transformer."
SD3_VAE_SCALING, SD3_VAE_SHIFT, SD3_SHIFT, SD3_SAMPLE_SIZE = 1.5305, 0.0609, 3.0, 128
FP8 = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name))


def upcast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """fp8 tensors in `dtype` (the load precision; CPUs and most GPUs have no fp8 arithmetic), others as they are."""
    return {k: v.to(dtype) if v.dtype in FP8 else v for k, v in state.items()}


def kind_of_keys(keys) -> str | None:
    """"sd3" for Stability's MMDiT layout, "flux" for BFL's, else None."""
    keys = list(keys)
    if any(k.startswith(MMDIT + "joint_blocks.") or k.startswith("joint_blocks.") for k in keys):
        return "sd3"
    if any(k.startswith(MMDIT + "double_blocks.") or k.startswith("double_blocks.") for k in keys):
        return "flux"
    return None


def kind_of_file(path: Path) -> str | None:
    """"sd3" or "flux" for a .safetensors file of those layouts (its header only is read), else None."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return kind_of_keys(f.keys())
    except Exception:  # not a safetensors file: single_file.read says what is wrong with it
        return None


def mmdit_config(t: dict[str, torch.Tensor]) -> dict[str, Any]:
    """An SD3Transformer2DModel config from Stability-layout MMDiT weights (`model.diffusion_model.` stripped)."""
    for key in ("x_embedder.proj.weight", "context_embedder.weight", "y_embedder.mlp.0.weight", "pos_embed",
                "final_layer.linear.weight"):
        if key not in t:
            raise UserError(f"the checkpoint's MMDiT is incomplete (no {key})")
    width, in_channels, patch, _ = t["x_embedder.proj.weight"].shape
    layers = _count(t, r"joint_blocks\.(\d+)\.")
    heads = layers  # Stability's MMDiT: as many heads as blocks (64-wide in SD3 and SD3.5)
    if "joint_blocks.0.x_block.attn.ln_q.weight" in t:  # qk-norm (SD3.5): the head width is the norm's
        heads = int(width) // int(t["joint_blocks.0.x_block.attn.ln_q.weight"].shape[0])
    if int(width) % heads:
        raise UserError(f"the checkpoint's MMDiT is {width} wide with {layers} blocks: no head width fits")
    positions = int(t["pos_embed"].shape[1])
    return {
        "sample_size": min(SD3_SAMPLE_SIZE, math.isqrt(positions) * int(patch)), "patch_size": int(patch),
        "in_channels": int(in_channels), "num_layers": layers, "attention_head_dim": int(width) // heads,
        "num_attention_heads": heads, "joint_attention_dim": int(t["context_embedder.weight"].shape[1]),
        "caption_projection_dim": int(t["context_embedder.weight"].shape[0]),
        "pooled_projection_dim": int(t["y_embedder.mlp.0.weight"].shape[1]),
        "out_channels": int(t["final_layer.linear.weight"].shape[0]) // int(patch) ** 2,
        "pos_embed_max_size": math.isqrt(positions),
        "dual_attention_layers": sorted({int(k.split(".")[1]) for k in t if ".x_block.attn2." in k}),
        "qk_norm": "rms_norm" if "joint_blocks.0.x_block.attn.ln_q.weight" in t else None,
    }


def t5_config(t: dict[str, torch.Tensor]):
    """A T5Config for transformers-named T5 encoder weights."""
    from transformers import T5Config

    bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    if "shared.weight" not in t or bias not in t:
        raise UserError("the checkpoint's T5 is incomplete (no shared.weight or relative attention table)")
    vocab, d_model = t["shared.weight"].shape
    buckets, heads = t[bias].shape
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in t
    d_ff = t["encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"].shape[0]
    return T5Config(vocab_size=int(vocab), d_model=int(d_model), num_heads=int(heads),
                    d_kv=int(t["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]) // int(heads),
                    d_ff=int(d_ff), num_layers=_count(t, r"encoder\.block\.(\d+)\."),
                    relative_attention_num_buckets=int(buckets),
                    feed_forward_proj="gated-gelu" if gated else "relu", decoder_start_token_id=0)


def sd3_parts(state: dict[str, torch.Tensor], components: Path | None = None, dtype: torch.dtype = torch.float32):
    """The StableDiffusion3Pipeline modules of a single-file checkpoint, in `dtype`; what the file lacks (and T5's
    tokenizer) from the diffusers SD3 folder `components`."""
    import diffusers
    from diffusers.loaders.single_file_utils import (
        convert_ldm_vae_checkpoint,
        convert_sd3_transformer_checkpoint_to_diffusers,
    )

    state = upcast(state, dtype)
    folder = _components(components)
    parts: dict[str, Any] = {}
    t = _sub(state, MMDIT) or {k: v for k, v in state.items() if k.startswith(("joint_blocks.", "x_embedder.",
                                                                                  "context_embedder.", "y_embedder.",
                                                                                  "t_embedder.", "pos_embed",
                                                                                  "final_layer."))}
    config = mmdit_config(t)
    try:
        converted = convert_sd3_transformer_checkpoint_to_diffusers(dict(t))
    except KeyError as err:
        raise UserError(f"the checkpoint's MMDiT lacks {first_line(err)}") from None
    parts["transformer"] = _build(diffusers.SD3Transformer2DModel, config, converted, "MMDiT")

    v = _sub(state, VAE)
    if v:
        vae = vae_config(v, SD3_VAE_SCALING) | {"shift_factor": SD3_VAE_SHIFT,
                                                "use_quant_conv": "quant_conv.weight" in v,
                                                "use_post_quant_conv": "post_quant_conv.weight" in v}
        parts["vae"] = _build(diffusers.AutoencoderKL, vae, convert_ldm_vae_checkpoint(state, vae), "VAE")
    for name, prefix, act, pad in (("text_encoder", CLIP_L, "quick_gelu", "<|endoftext|>"),
                                   ("text_encoder_2", CLIP_G, "gelu", "!")):
        weights = _clip_hf(state, prefix)
        if not weights:
            continue
        if "text_projection.weight" not in weights:  # no projection stored: SD3's pooled output is then unprojected
            embedding = weights["embeddings.token_embedding.weight"]
            weights["text_projection.weight"] = torch.eye(embedding.shape[1], dtype=embedding.dtype)
        projection = int(weights["text_projection.weight"].shape[0])
        parts[name] = _load_clip(_clip_cfg(clip_config(weights, act, projection=projection)), weights, True)
        parts[name.replace("text_encoder", "tokenizer")] = clip_tokenizer(
            parts[name].config.max_position_embeddings, pad_token=pad)
    weights = _sub(state, T5)
    if weights:
        from transformers import T5EncoderModel

        if folder is None or not (folder / "tokenizer_3").is_dir():
            raise UserError("the checkpoint holds T5, whose tokenizer single files do not carry: give --components "
                            "FOLDER, a diffusers SD3 folder with tokenizer_3/")
        model = _meta(T5EncoderModel, t5_config(weights))
        weights.setdefault("encoder.embed_tokens.weight", weights["shared.weight"])
        missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
        if missing or unexpected:
            raise UserError(f"the checkpoint's T5 does not fit the architecture read from it: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}")
        parts["text_encoder_3"] = model.eval()
    parts = {k: m.to(dtype) if isinstance(m, torch.nn.Module) else m for k, m in parts.items()}
    return _complete(parts, folder, dtype)


def _components(components: Path | None) -> Path | None:
    if components is None:
        return None
    folder = Path(components)
    if not (folder / "model_index.json").is_file():
        raise UserError(f"--components {folder} is not a diffusers pipeline folder (no model_index.json)")
    return folder


def _complete(parts: dict[str, Any], folder: Path | None, dtype: torch.dtype) -> dict[str, Any]:
    """The file's parts, with the scheduler and what the file lacks taken from `folder` (SD3's shift-3 flow
    scheduler when there is no folder). Without T5 (in the file or the folder) the pipeline runs without it."""
    import diffusers
    import transformers

    needed = {"vae": diffusers.AutoencoderKL, "text_encoder": transformers.CLIPTextModelWithProjection,
              "text_encoder_2": transformers.CLIPTextModelWithProjection,
              "tokenizer": transformers.CLIPTokenizer, "tokenizer_2": transformers.CLIPTokenizer,
              "text_encoder_3": transformers.T5EncoderModel, "tokenizer_3": transformers.AutoTokenizer,
              "scheduler": diffusers.FlowMatchEulerDiscreteScheduler}
    for name, cls in needed.items():
        if name in parts:
            continue
        if folder is not None and (folder / name).is_dir():
            kwargs = {} if "tokenizer" in name or name == "scheduler" else {"dtype": dtype, "use_safetensors": True}
            try:
                parts[name] = cls.from_pretrained(folder / name, local_files_only=True, **kwargs)
            except Exception as err:
                raise UserError(f"cannot load {name} from --components {folder}: {first_line(err)}") from None
        elif name == "scheduler":
            parts[name] = diffusers.FlowMatchEulerDiscreteScheduler(shift=SD3_SHIFT)
        elif name in ("text_encoder_3", "tokenizer_3"):
            parts[name] = None
        else:
            where = f" and --components {folder} has no {name}/" if folder else \
                "; give --components FOLDER, a diffusers SD3 folder with it"
            raise UserError(f"the checkpoint has no {name}{where}")
    if (parts["text_encoder_3"] is None) != (parts["tokenizer_3"] is None):
        parts["text_encoder_3"] = parts["tokenizer_3"] = None  # a tokenizer without its model, or the reverse
    if parts["text_encoder_3"] is not None:
        tokens, rows = parts["tokenizer_3"].vocab_size, parts["text_encoder_3"].config.vocab_size
        if tokens > rows:
            raise UserError(f"the T5 tokenizer of --components has {tokens} tokens but the checkpoint's T5 embeds "
                            f"{rows}: they are not one model's")
    return parts


# ----------------------------------------------------------------------------------------------------------------
# Flux.1 (BFL's layout: double_blocks / single_blocks, as flux1-dev.safetensors and its fine-tunes are shared)

# BFL name -> diffusers name, inside a double block, a single block, or at the top (weight and bias alike)
_FLUX_DOUBLE = {"img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
                "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
                "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
                "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
                "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
                "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
                "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
                "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight"}
_FLUX_SINGLE = {"modulation.lin": "norm.linear", "linear2": "proj_out",
                "norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}
_FLUX_TOP = {"time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
             "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
             "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
             "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
             "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
             "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
             "txt_in": "context_embedder", "img_in": "x_embedder", "final_layer.linear": "proj_out"}
FLUX_MLP_RATIO = 4  # diffusers' FluxTransformer2DModel fixes it (every released Flux.1 has it)


def flux_config(t: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A FluxTransformer2DModel config from BFL-layout weights (`model.diffusion_model.` stripped). The rotary
    axes are not in the weights: Flux's (16, 56, 56) for its 128-wide heads, the same proportions (even sizes)
    for others."""
    for key in ("img_in.weight", "txt_in.weight", "vector_in.in_layer.weight",
                "double_blocks.0.img_attn.norm.query_norm.scale"):
        if key not in t:
            raise UserError(f"the checkpoint's Flux transformer is incomplete (no {key})")
    width, in_channels = t["img_in.weight"].shape
    head = int(t["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0])
    side = 2 * (7 * head // 32)
    return {"patch_size": 1, "in_channels": int(in_channels), "num_layers": _count(t, r"double_blocks\.(\d+)\."),
            "num_single_layers": _count(t, r"single_blocks\.(\d+)\."), "attention_head_dim": head,
            "num_attention_heads": int(width) // head, "joint_attention_dim": int(t["txt_in.weight"].shape[1]),
            "pooled_projection_dim": int(t["vector_in.in_layer.weight"].shape[1]),
            "guidance_embeds": "guidance_in.in_layer.weight" in t, "axes_dims_rope": [head - 2 * side, side, side]}


def flux_to_diffusers(t: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """BFL-layout Flux weights -> diffusers' names. diffusers' `convert_flux_transformer_checkpoint_to_diffusers`
    splits the single blocks' fused projection at Flux's full width (3072) whatever the file's width, so the same
    map is written here with the width read from the weights."""
    width = config["attention_head_dim"] * config["num_attention_heads"]
    out: dict[str, torch.Tensor] = {}

    def rename(src: str, dst: str, table: dict[str, str]) -> None:
        for key, value in t.items():
            if not key.startswith(src):
                continue
            rest = key[len(src):]
            for old, new in table.items():
                if rest == old or rest.startswith(old + "."):
                    out[dst + new + rest[len(old):]] = value

    rename("", "", {k: v for k, v in _FLUX_TOP.items()})
    for p in ("weight", "bias"):  # AdaLayerNormContinuous: BFL (shift, scale), diffusers (scale, shift)
        shift, scale = t[f"final_layer.adaLN_modulation.1.{p}"].chunk(2)
        out[f"norm_out.linear.{p}"] = torch.cat([scale, shift])
    for i in range(config["num_layers"]):
        src, dst = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        rename(src, dst, _FLUX_DOUBLE)
        for p in ("weight", "bias"):
            for stream, names in (("img", ("to_q", "to_k", "to_v")), ("txt", ("add_q_proj", "add_k_proj",
                                                                            "add_v_proj"))):
                for name, part in zip(names, t[f"{src}{stream}_attn.qkv.{p}"].chunk(3)):
                    out[f"{dst}attn.{name}.{p}"] = part
    for i in range(config["num_single_layers"]):
        src, dst = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        rename(src, dst, _FLUX_SINGLE)
        for p in ("weight", "bias"):
            q, k, v, mlp = t[f"{src}linear1.{p}"].split([width, width, width, FLUX_MLP_RATIO * width])
            out |= {f"{dst}attn.to_q.{p}": q, f"{dst}attn.to_k.{p}": k, f"{dst}attn.to_v.{p}": v,
                    f"{dst}proj_mlp.{p}": mlp}
    return out


def flux_pipeline(state: dict[str, torch.Tensor], components: Path | None, dtype: torch.dtype = torch.float32):
    """The FluxPipeline of a transformer file (BFL's layout, fp8 upcast) and everything else from the diffusers
    Flux folder `components` (its VAE, CLIP-L, T5, tokenizers and scheduler)."""
    import diffusers

    folder = _components(components)
    if folder is None:
        raise UserError("a Flux file holds the transformer only: give --components FOLDER, a diffusers Flux folder "
                        "(its VAE, CLIP-L, T5, tokenizers and scheduler)")
    t = upcast(_sub(state, MMDIT) or state, dtype)
    config = flux_config(t)
    transformer = _build(diffusers.FluxTransformer2DModel, config, flux_to_diffusers(t, config), "Flux transformer")
    transformer.to(dtype)
    for name in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        if not (folder / name).is_dir():
            raise UserError(f"--components {folder} has no {name}/ (a diffusers Flux folder has it)")
    try:
        inner = diffusers.FluxPipeline.from_pretrained(folder, transformer=transformer, dtype=dtype,
                                                       local_files_only=True, use_safetensors=True)
    except Exception as err:
        raise UserError(f"cannot load the Flux parts of --components {folder}: {first_line(err)}") from None
    return inner
