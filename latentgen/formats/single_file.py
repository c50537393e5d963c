"""Single-file Stable Diffusion checkpoints (the CompVis/LDM layout of AUTOMATIC1111, ComfyUI and model sites),
read and written offline.

Reading: the architecture comes from the weights' names and shapes (widths, depth, attention per level, transformer
depth, cross-attention width, linear or convolutional projections, in_channels of inpainting models, SDXL's added
embedding), so a scaled-down checkpoint of SD's topology loads as a full-size one does. What the weights cannot
say follows SD's conventions (attention heads, VAE scaling factor, sample size, noise schedule) unless the file
carries latentgen's own configs in its safetensors metadata (`__metadata__["latentgen"]`, written by `write`),
which make folder -> file -> folder exact. The U-Net and VAE are converted by diffusers' `single_file_utils`;
text encoders are built here: diffusers takes their configs from the Hugging Face hub (offline it cannot load an
SD 1.x file's CLIP), and it splits OpenCLIP's fused q/k/v by the projection width instead of the model width.

Writing: the inverse key maps (diffusers ships them only as a script for SD 1.x/2.x with exactly 4 levels of 2
blocks, `scripts/convert_diffusers_to_original_stable_diffusion.py`), built from the config so any depth works.

Layouts: SD 1.x (`cond_stage_model.transformer.`: OpenAI CLIP in transformers' names), SD 2.x
(`cond_stage_model.model.`: OpenCLIP), SDXL (`conditioner.embedders.0.transformer.` CLIP-L and
`conditioner.embedders.1.model.` OpenCLIP bigG with its projection).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import torch

from latentgen.components.schedulers import make_scheduler
from latentgen.components.text_encoders import clip_tokenizer
from latentgen.errors import UserError, first_line
from latentgen.io import save_safetensors

UNET, VAE = "model.diffusion_model.", "first_stage_model."
SD1_TEXT, SD2_TEXT = "cond_stage_model.transformer.", "cond_stage_model.model."
XL_TEXT, XL_TEXT_2 = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SD_SCALING, SDXL_SCALING = 0.18215, 0.13025
HEAD_WIDTH = 64  # SD 2.x, SDXL and every CLIP text tower use 64-wide attention heads
SD1_HEADS = 8  # SD 1.x's U-Net has 8 heads at every level


# ----------------------------------------------------------------------------------------------------------------
# Reading files


def read(path: Path, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A checkpoint file's tensors and safetensors metadata. Pickles (.ckpt) only with `allow_pickle`, and then
    through `torch.load(weights_only=True)`, which builds tensors and never runs the file's code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise UserError(f"{path} is a pickle file, which can run code when loaded; use a .safetensors file, "
                            "or allow it explicitly with --allow-pickle (loaded with torch.load(weights_only=True))")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise UserError(f"cannot read {path} as a weights-only checkpoint ({first_line(err)})") from None
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        if not isinstance(state, dict):
            raise UserError(f"{path} holds no state dict")
        return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, {}
    if path.suffix not in SAFE_SUFFIXES:
        raise UserError(f"{path} is not a single-file checkpoint (.safetensors, or .ckpt with --allow-pickle) "
                        "nor a diffusers pipeline folder")
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as err:  # safetensors raises its own error type for every kind of damage
        raise UserError(f"{path} is corrupt or truncated ({first_line(err)}); re-save or re-download it") from None


def layout(state: dict[str, Any], name: str = "the file") -> str:
    """"sd1", "sd2" or "sdxl"; anything else is a one-line error naming what the file looks like."""
    def has(prefix):
        return any(k.startswith(prefix) for k in state)

    if has(UNET) and has(VAE):
        if has(XL_TEXT) and has(XL_TEXT_2):
            return "sdxl"
        if has(SD2_TEXT):
            return "sd2"
        if has(SD1_TEXT):
            return "sd1"
    found = [what for what, yes in (
        ("a U-Net (model.diffusion_model.*)", has(UNET)), ("a VAE (first_stage_model.*)", has(VAE)),
        ("a text encoder (cond_stage_model.* / conditioner.embedders.*)", has("cond_stage_model.") or
         has("conditioner.embedders.")),
    ) if yes]
    hint = ""
    if any(re.search(r"lora_(unet|te)|\.lora_[AB]\.|lora_(up|down)", k) for k in state):
        hint = "; it is a LoRA: apply it with --lora FILE"
    elif has("encoder.down.") or has("decoder.up.") or has("encoder.down_blocks."):
        hint = "; it is a VAE: use it with --vae FILE"
    elif "string_to_param" in state or "emb_params" in state or "clip_l" in state:
        hint = "; it is a textual-inversion embedding: put it in --embeddings-dir"
    elif has(UNET + "joint_blocks") or has("double_blocks.") or has("transformer_blocks.0.attn.to_q"):
        hint = "; it is an SD3/Flux transformer model: load it with FlowPipeline.from_single_file (--model does)"
    elif has("image_proj.") and has("ip_adapter."):
        hint = "; it is an IP-Adapter: use it with --control FILE:IMAGE (its image_encoder/ folder beside it)"
    elif any(re.search(r"(^|\.)(input_hint_block|zero_convs|controlnet_cond_embedding)\.", k) for k in state):
        hint = "; it is a ControlNet: use it with --control FILE:IMAGE"
    recognised = ", ".join(found) if found else "none of a Stable Diffusion checkpoint's parts"
    raise UserError(f"{name} is not a Stable Diffusion 1.x/2.x/SDXL checkpoint: found {recognised}{hint}")


def _sub(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _count(keys, pattern: str) -> int:
    """How many distinct integers fill the `(\\d+)` of `pattern` among `keys`."""
    rx = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := rx.match(k))})


# ----------------------------------------------------------------------------------------------------------------
# Configs from shapes


def unet_config(u: dict[str, torch.Tensor], pooled_dim: int | None = None, what: str = "U-Net") -> dict[str, Any]:
    """A UNet2DConditionModel config from LDM U-Net weights (`model.diffusion_model.` stripped); for a ControlNet's
    (`control_model.` stripped, `what` "ControlNet"), the encoder half's, without out_channels."""
    head = what == "U-Net"
    if "input_blocks.0.0.weight" not in u or (head and "out.2.weight" not in u):
        raise UserError(f"the checkpoint's {what} is incomplete (no input_blocks.0.0{' or out.2' if head else ''} "
                        "weights)")
    blocks = sorted({int(k.split(".")[1]) for k in u if k.startswith("input_blocks.")})
    downs = [i for i in blocks if f"input_blocks.{i}.0.op.weight" in u]
    per_level = downs[0] - 1 if downs else len(blocks) - 1
    widths, attention, depth = [], [], []
    for level in range(len(downs) + 1):
        first = 1 + level * (per_level + 1)
        widths.append(int(u[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0]))
        n = _count(u, rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\.")
        attention.append(n > 0)
        depth.append(max(n, 1))
    to_k = next(v for k, v in u.items() if k.endswith("attn2.to_k.weight"))
    proj_in = next(v for k, v in u.items() if k.endswith(".proj_in.weight"))
    linear = proj_in.ndim == 2
    config: dict[str, Any] = {
        "in_channels": int(u["input_blocks.0.0.weight"].shape[1]),
        "block_out_channels": widths,
        "layers_per_block": per_level,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "cross_attention_dim": int(to_k.shape[1]),
        "use_linear_projection": linear,
        "attention_head_dim": [max(w // HEAD_WIDTH, 1) for w in widths] if linear else SD1_HEADS,
        "transformer_layers_per_block": depth if any(d > 1 for d in depth) else 1,
    }
    if head:
        config["out_channels"] = int(u["out.2.weight"].shape[0])
    if "label_emb.0.0.weight" in u:  # SDXL: pooled text embedding + 6 size/crop numbers, each 256-wide
        adm = int(u["label_emb.0.0.weight"].shape[1])
        if pooled_dim is None or (adm - pooled_dim) % 6:
            raise UserError(f"the U-Net takes a {adm}-wide class embedding that latentgen cannot feed")
        config |= {"addition_embed_type": "text_time", "addition_time_embed_dim": (adm - pooled_dim) // 6,
                   "projection_class_embeddings_input_dim": adm}
    return config


def vae_config(v: dict[str, torch.Tensor], scaling_factor: float) -> dict[str, Any]:
    """An AutoencoderKL config from LDM VAE weights (`first_stage_model.` stripped)."""
    if "encoder.conv_in.weight" not in v or "decoder.conv_out.weight" not in v:
        raise UserError("the checkpoint's VAE is incomplete (no encoder.conv_in or decoder.conv_out weights)")
    levels = _count(v, r"encoder\.down\.(\d+)\.")
    widths = [int(v[f"encoder.down.{i}.block.0.conv2.weight"].shape[0]) for i in range(levels)]
    return {
        "in_channels": int(v["encoder.conv_in.weight"].shape[1]),
        "out_channels": int(v["decoder.conv_out.weight"].shape[0]),
        "block_out_channels": widths,
        "layers_per_block": _count(v, r"encoder\.down\.0\.block\.(\d+)\."),
        "latent_channels": int(v["decoder.conv_in.weight"].shape[1]),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "scaling_factor": scaling_factor,
    }


def clip_config(t: dict[str, torch.Tensor], act: str, layers: int | None = None, projection: int | None = None):
    """A CLIPTextConfig from transformers-named CLIP weights (`text_model.` stripped)."""
    from transformers import CLIPTextConfig

    vocab, width = t["embeddings.token_embedding.weight"].shape
    return CLIPTextConfig(
        vocab_size=int(vocab), hidden_size=int(width),
        intermediate_size=int(t["encoder.layers.0.mlp.fc1.weight"].shape[0]),
        num_hidden_layers=layers or _count(t, r"encoder\.layers\.(\d+)\."),
        num_attention_heads=max(int(width) // HEAD_WIDTH, 1),
        max_position_embeddings=int(t["embeddings.position_embedding.weight"].shape[0]),
        projection_dim=projection or int(width), hidden_act=act,
        bos_token_id=min(49406, int(vocab) - 2), eos_token_id=min(49407, int(vocab) - 1), pad_token_id=1)


# ----------------------------------------------------------------------------------------------------------------
# Text encoders: transformers' CLIP <-> SD 1.x (same names) and OpenCLIP (fused q/k/v)

_OPENCLIP_NAMES = [  # (OpenCLIP, transformers), inside a layer or at the top
    ("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("attn.out_proj.", "self_attn.out_proj."),
    ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2."),
]


def openclip_to_hf(o: dict[str, torch.Tensor], layers: int | None = None) -> dict[str, torch.Tensor]:
    """OpenCLIP text-tower weights -> transformers CLIP names (without `text_model.`), the first `layers` layers."""
    out = {"embeddings.token_embedding.weight": o["token_embedding.weight"],
           "embeddings.position_embedding.weight": o["positional_embedding"],
           "final_layer_norm.weight": o["ln_final.weight"], "final_layer_norm.bias": o["ln_final.bias"]}
    if "text_projection" in o:
        out["text_projection.weight"] = o["text_projection"].T.contiguous()
    n = _count(o, r"transformer\.resblocks\.(\d+)\.")
    for i in range(layers or n):
        src, dst = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for key, value in o.items():
            if not key.startswith(src):
                continue
            rest = key[len(src):]
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[1]  # weight or bias
                for name, part in zip("qkv", value.chunk(3)):
                    out[f"{dst}self_attn.{name}_proj.{kind}"] = part.contiguous()
                continue
            for old, new in _OPENCLIP_NAMES:
                if rest.startswith(old):
                    out[dst + new + rest[len(old):]] = value
    return out


def hf_to_openclip(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `openclip_to_hf`."""
    out = {"token_embedding.weight": t["embeddings.token_embedding.weight"],
           "positional_embedding": t["embeddings.position_embedding.weight"],
           "ln_final.weight": t["final_layer_norm.weight"], "ln_final.bias": t["final_layer_norm.bias"]}
    if "text_projection.weight" in t:
        out["text_projection"] = t["text_projection.weight"].T.contiguous()
    for i in range(_count(t, r"encoder\.layers\.(\d+)\.")):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([t[f"{src}self_attn.{n}_proj.{kind}"] for n in "qkv"])
        for key, value in t.items():
            if key.startswith(src):
                rest = key[len(src):]
                for old, new in _OPENCLIP_NAMES:
                    if rest.startswith(new):
                        out[dst + old + rest[len(new):]] = value
    return out


def _hf_state(model) -> dict[str, torch.Tensor]:
    """A transformers CLIP model's weights without the `text_model.` nesting (transformers 4/5 differ)."""
    return {k.removeprefix("text_model."): v for k, v in model.state_dict().items()
            if not k.endswith("position_ids")}


def _load_clip(config, weights: dict[str, torch.Tensor], with_projection: bool):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    model = _meta(CLIPTextModelWithProjection if with_projection else CLIPTextModel, config)
    nested = hasattr(model, "text_model")  # transformers 4 nests both classes' weights; 5 only the projected one's
    state = {("text_model." + k if nested and not k.startswith("text_projection") else k): v
             for k, v in weights.items() if not k.endswith("position_ids")}
    return _fill(model, state, "text encoder")


def _clip_hf(state, prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix("text_model."): v for k, v in _sub(state, prefix).items()}


# ----------------------------------------------------------------------------------------------------------------
# File -> components


def components(state: dict[str, torch.Tensor], metadata: dict[str, str], kind: str,
               prediction: str = "epsilon") -> dict[str, Any]:
    """The diffusers/transformers modules of a single-file checkpoint: unet, vae, text_encoder, tokenizer,
    scheduler and, for SDXL, text_encoder_2 and tokenizer_2 (weights as stored: cast them after).
    `prediction` is the noise schedule's prediction type where latentgen's own metadata does not give it."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        SCHEDULER_DEFAULT_CONFIG,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    ours = json.loads(metadata["latentgen"]) if "latentgen" in metadata else {}
    out: dict[str, Any] = {}
    if kind == "sd1":
        weights = _clip_hf(state, SD1_TEXT)
        config = ours.get("text_encoder") or clip_config(weights, "quick_gelu")
        out["text_encoder"] = _load_clip(_clip_cfg(config), weights, False)
    elif kind == "sd2":
        o = _sub(state, SD2_TEXT)
        n = _count(o, r"transformer\.resblocks\.(\d+)\.")
        # SD 2 conditions on OpenCLIP's penultimate layer: original files hold the whole tower (with its
        # projection), files written from diffusers only the layers used. diffusers' own SD 2 configs do the same.
        weights = openclip_to_hf(o, n - 1 if "text_projection" in o and not ours else n)
        weights.pop("text_projection.weight", None)
        config = ours.get("text_encoder") or clip_config(weights, "gelu")
        out["text_encoder"] = _load_clip(_clip_cfg(config), weights, False)
    else:
        weights = _clip_hf(state, XL_TEXT)
        out["text_encoder"] = _load_clip(_clip_cfg(ours.get("text_encoder") or clip_config(weights, "quick_gelu")),
                                         weights, False)
        weights = openclip_to_hf(_sub(state, XL_TEXT_2))
        projection = int(weights["text_projection.weight"].shape[0])
        config = ours.get("text_encoder_2") or clip_config(weights, "gelu", projection=projection)
        out["text_encoder_2"] = _load_clip(_clip_cfg(config), weights, True)
        out["tokenizer_2"] = clip_tokenizer(out["text_encoder_2"].config.max_position_embeddings, pad_token="!")
    pad = "!" if kind == "sd2" else "<|endoftext|>"
    out["tokenizer"] = clip_tokenizer(out["text_encoder"].config.max_position_embeddings, pad_token=pad)

    pooled = out["text_encoder_2"].config.projection_dim if kind == "sdxl" else None
    config = ours.get("unet") or unet_config(_sub(state, UNET), pooled)
    if not ours.get("unet"):
        v2 = kind == "sd2" and prediction == "v_prediction"
        config["sample_size"] = {"sdxl": 128}.get(kind, 96 if v2 else 64)
        config["upcast_attention"] = v2  # as diffusers' SD 2.x-v configs: fp16 attention overflows otherwise
    out["unet"] = _build(UNet2DConditionModel, config, convert_ldm_unet_checkpoint(state, config), "U-Net")
    scaling = SDXL_SCALING if kind == "sdxl" else SD_SCALING
    config = ours.get("vae") or vae_config(_sub(state, VAE), scaling)
    out["vae"] = _build(AutoencoderKL, config, convert_ldm_vae_checkpoint(state, config), "VAE")

    if ours.get("scheduler"):
        config = ours["scheduler"]
        cls = getattr(__import__("diffusers"), config.get("_class_name", "DPMSolverMultistepScheduler"))
        out["scheduler"] = cls.from_config(config)
    else:
        # SD's training noise (diffusers' default for single files: every SD 1.x/2.x/SDXL model's), sampled with
        # DPM-Solver++ 2M as A1111 does by default
        out["scheduler"] = make_scheduler("dpm++", SCHEDULER_DEFAULT_CONFIG | {"prediction_type": prediction})
    return out


def _clip_cfg(config):
    from transformers import CLIPTextConfig

    return CLIPTextConfig.from_dict(config) if isinstance(config, dict) else config


def _meta(cls, config):
    """A model without initialised weights (SDXL's U-Net would spend seconds and gigabytes on random numbers);
    buffers such as CLIP's position ids are real."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return cls.from_config(config) if hasattr(cls, "load_config") else cls(config)


def _build(cls, config, state: dict[str, torch.Tensor], what: str):
    """A model of `cls` built from `config` and given the file's tensors."""
    return _fill(_meta(cls, config), state, what)


def _fill(model, state: dict[str, torch.Tensor], what: str):
    """`model` (on the meta device) given the file's tensors; a misfit is a one-line error."""
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise UserError(f"the checkpoint's {what} does not fit the architecture read from it: missing "
                        f"{missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()


def prediction_type(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """v-prediction where the file says so: Stability's ModelSpec metadata, the `v_pred` marker key of
    v-prediction SDXL fine-tunes (ComfyUI reads it too), or A1111's convention for SD 2.x 768-v files, a YAML
    config beside the file (`NAME.yaml`) with `parameterization: "v"`. Otherwise ε, SD's default."""
    spec = metadata.get("modelspec.prediction_type", "").lower()
    if spec in ("v", "v_prediction", "v-prediction") or "v_pred" in state:
        return "v_prediction"
    sidecar = Path(path).with_suffix(".yaml")
    if sidecar.is_file():
        import yaml

        try:
            config = yaml.safe_load(sidecar.read_text(encoding="utf-8")) or {}
            params = config.get("model", {}).get("params", {})
        except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError) as err:
            raise UserError(f"{sidecar} is not a readable LDM config ({first_line(err)})") from None
        if params.get("parameterization") == "v":
            return "v_prediction"
    return "epsilon"


def vae_from_file(path: Path, allow_pickle: bool = False):
    """An AutoencoderKL from a single VAE file (LDM names, bare or under first_stage_model./vae.) or a whole
    checkpoint's VAE; diffusers-named VAE files load as they are."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    state, metadata = read(path, allow_pickle)
    ours = json.loads(metadata["latentgen"]).get("vae") if "latentgen" in metadata else None
    bare = next((p for p in (VAE, "vae.", "") if f"{p}encoder.conv_in.weight" in state), None)
    if bare is None:
        raise UserError(f"{path} is not a VAE: it has no encoder.conv_in weights")
    v = _sub(state, bare)
    if "encoder.down_blocks.0.resnets.0.conv1.weight" in v:  # already diffusers' names
        levels = _count(v, r"encoder\.down_blocks\.(\d+)\.")
        config = ours or {"block_out_channels": [int(v[f"encoder.down_blocks.{i}.resnets.0.conv2.weight"].shape[0])
                                                 for i in range(levels)],
                          "latent_channels": int(v["decoder.conv_in.weight"].shape[1]),
                          "layers_per_block": _count(v, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."),
                          "down_block_types": ["DownEncoderBlock2D"] * levels,
                          "up_block_types": ["UpDecoderBlock2D"] * levels}
        return _build(AutoencoderKL, config, v, "VAE")
    config = ours or vae_config(v, SD_SCALING)
    return _build(AutoencoderKL, config, convert_ldm_vae_checkpoint(v, config), "VAE")


# ----------------------------------------------------------------------------------------------------------------
# Components -> file


def _unet_names(config) -> list[tuple[str, str]]:
    """(LDM prefix, diffusers prefix) of every U-Net block, from the config: any number of levels and blocks."""
    n, per = len(config.block_out_channels), config.layers_per_block
    down_attn = [t.startswith("CrossAttn") for t in config.down_block_types]
    up_attn = [t.startswith("CrossAttn") for t in config.up_block_types]
    names = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
             ("label_emb.0.0.", "add_embedding.linear_1."), ("label_emb.0.2.", "add_embedding.linear_2."),
             ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out."),
             ("middle_block.0.", "mid_block.resnets.0."), ("middle_block.1.", "mid_block.attentions.0."),
             ("middle_block.2.", "mid_block.resnets.1.")]
    for i in range(n):
        for j in range(per):
            index = 1 + i * (per + 1) + j
            names.append((f"input_blocks.{index}.0.", f"down_blocks.{i}.resnets.{j}."))
            if down_attn[i]:
                names.append((f"input_blocks.{index}.1.", f"down_blocks.{i}.attentions.{j}."))
        if i < n - 1:
            names.append((f"input_blocks.{(i + 1) * (per + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
        for j in range(per + 1):
            index = i * (per + 1) + j
            names.append((f"output_blocks.{index}.0.", f"up_blocks.{i}.resnets.{j}."))
            if up_attn[i]:
                names.append((f"output_blocks.{index}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < n - 1:
            names.append((f"output_blocks.{i * (per + 1) + per}.{2 if up_attn[i] else 1}.",
                          f"up_blocks.{i}.upsamplers.0."))
    return names


_RESNET = [("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("out_layers.0.", "norm2."),
           ("out_layers.3.", "conv2."), ("emb_layers.1.", "time_emb_proj."), ("skip_connection.", "conv_shortcut.")]


def unet_ldm_names(config) -> Callable[[str], str | None]:
    """A function from a U-Net weight's (or module's) diffusers name to its LDM name (`input_blocks.1.0.in_layers.2`
    for `down_blocks.0.resnets.0.conv1`), for a U-Net of this config; None where the LDM layout has no place."""
    names = sorted(_unet_names(config), key=lambda p: -len(p[1]))

    def ldm(key: str) -> str | None:
        prefix = next((p for p in names if f"{key}.".startswith(p[1])), None)
        if prefix is None:
            return None
        rest = key[len(prefix[1]):]
        if ".resnets." in prefix[1]:
            rest = next((old + rest[len(new):] for old, new in _RESNET if f"{rest}.".startswith(new)), rest)
        return (prefix[0] + rest).rstrip(".")  # a module at a block's start: no trailing dot

    return ldm


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    ldm = unet_ldm_names(unet.config)
    out = {}
    for key, value in unet.state_dict().items():
        name = ldm(key)
        if name is None:
            raise UserError(f"U-Net weight {key} has no place in the single-file layout")
        out[UNET + name] = value
    return out


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    n = len(vae.config.block_out_channels)
    names = [("mid.block_1.", "mid_block.resnets.0."), ("mid.block_2.", "mid_block.resnets.1."),
             ("mid.attn_1.", "mid_block.attentions.0."), ("norm_out.", "conv_norm_out.")]
    for i in range(n):
        names += [(f"down.{i}.block.", f"down_blocks.{i}.resnets."),
                  (f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."),
                  (f"up.{n - 1 - i}.block.", f"up_blocks.{i}.resnets."),
                  (f"up.{n - 1 - i}.upsample.", f"up_blocks.{i}.upsamplers.0.")]
    attention = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."),
                 ("proj_out.", "to_out.0.")]
    out = {}
    for key, value in vae.state_dict().items():
        new = key.replace("conv_shortcut.", "nin_shortcut.")
        for old, diffusers_name in names:
            new = new.replace(diffusers_name, old)
        if ".mid.attn_1." in new:
            head, rest = new.split(".mid.attn_1.")
            rest = next((o + rest[len(d):] for o, d in attention if rest.startswith(d)), rest)
            new = f"{head}.mid.attn_1.{rest}"
            if value.ndim == 2:
                value = value[:, :, None, None]  # LDM's attention uses 1×1 convolutions
        out[VAE + new] = value
    return out


def to_state(pipe) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A pipeline's weights in the single-file layout, with latentgen's configs as metadata."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    encoder = pipe.text_encoder
    if not isinstance(encoder, (CLIPTextModel, CLIPTextModelWithProjection)):
        raise UserError(f"a single-file checkpoint needs a CLIP text encoder (the format A1111/ComfyUI read); "
                        f"this model's is {type(encoder).__name__}: share its folder instead")
    state = unet_to_ldm(pipe.unet) | vae_to_ldm(pipe.vae)
    scheduler = {"_class_name": type(pipe.scheduler).__name__} | dict(pipe.scheduler.config)
    meta = {"unet": dict(pipe.unet.config), "vae": dict(pipe.vae.config), "scheduler": scheduler,
            "text_encoder": encoder.config.to_dict()}
    second = getattr(pipe, "text_encoder_2", None)
    if second is not None:
        state |= {XL_TEXT + "text_model." + k: v for k, v in _hf_state(encoder).items()}
        state |= {XL_TEXT_2 + k: v for k, v in hf_to_openclip(_hf_state(second)).items()}
        meta["text_encoder_2"] = second.config.to_dict()
    elif encoder.config.hidden_act == "gelu":  # OpenCLIP's activation: SD 2.x layout
        state |= {SD2_TEXT + k: v for k, v in hf_to_openclip(_hf_state(encoder)).items()}
    else:  # OpenAI CLIP (quick_gelu): SD 1.x layout
        state |= {SD1_TEXT + "text_model." + k: v for k, v in _hf_state(encoder).items()}
    spec = {"modelspec.prediction_type": "v" if pipe.scheduler.config.get("prediction_type") == "v_prediction"
            else "epsilon"}
    return state, spec | {"latentgen": json.dumps(meta, default=_jsonable, sort_keys=True)}


def _jsonable(value):
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return str(value)


def write(pipe, path: Path, dtype: torch.dtype | None = None) -> Path:
    """Save `pipe` as one .safetensors file (atomically), optionally in `dtype` (e.g. torch.float16)."""

    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"{path}: a single-file checkpoint is written as .safetensors")
    if "block_out_channels" not in pipe.unet.config:  # a DiT/MMDiT denoiser (components.denoisers)
        raise UserError(f"{path}: single files hold SD 1.x/2.x/SDXL U-Nets; this pipeline's denoiser is a "
                        f"{pipe.unet.config.get('kind', 'transformer')}: keep its diffusers folder")
    state, metadata = to_state(pipe)
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous().cpu()
             for k, v in state.items()}
    return save_safetensors(state, path, metadata)
