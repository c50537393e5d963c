"""ControlNets as users have them: diffusers folders (`config.json` + weights), and the single files AUTOMATIC1111's
ControlNet extension takes (`control_v11p_sd15_canny.safetensors`: the LDM layout, `control_model.*` keys or the
same keys bare), read offline with the architecture taken from the weights.

diffusers' `ControlNetModel.from_single_file` fetches a config from the Hugging Face hub; here the config comes from
the weights' names and shapes (as `single_file.unet_config` does for a checkpoint's U-Net) and the tensors are
converted by diffusers' own `convert_controlnet_checkpoint`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from latentgen.components.diffusion import takes_sizes
from latentgen.errors import UserError
from latentgen.formats import ip_adapter, lllite, single_file

LDM_PREFIX = "control_model."
SUFFIXES = (".safetensors", ".pth", ".ckpt", ".pt", ".bin")


MODEL_FOLDER = "controlnets"  # ControlNets shipped inside a pipeline folder (the default model's layout one)


def resolve(name: str | Path, folders, confined: bool = False) -> Path:
    """The ControlNet `name` names: a path, or a file or folder in one of `folders` (with or without its suffix, as
    A1111's model list shows them, " [hash]" and all); `confined` (the server): only there, and no path may leave
    them."""
    name = str(name)
    bases = [Path(f) for f in ([folders] if isinstance(folders, (str, Path)) else folders or []) if f is not None]
    if not confined and Path(name).exists():
        return Path(name)
    stem = name.split(" [")[0]
    for base in bases:
        inside = base.resolve()
        for candidate in [base / stem] + [base / (stem + s) for s in SUFFIXES]:
            if candidate.exists() and candidate.resolve().is_relative_to(inside):
                return candidate
    where = f" in {', '.join(map(str, bases))}" if bases else ""
    if confined:
        raise UserError(f"no ControlNet named {name!r}{where} (the server takes names from its --controlnets-dir)")
    raise UserError(f"ControlNet {name!r} is neither a file, a folder nor a name{where}")


def shipped(pipe) -> Path | None:
    """The `controlnets/` folder inside the pipeline's own folder, when it has one."""
    source = pipe.config.get("_name_or_path")
    folder = Path(source) / MODEL_FOLDER if source else None
    return folder if folder is not None and folder.is_dir() else None


def names(*folders) -> list[str]:
    """The ControlNets in `folders`, as `resolve` takes them: single files by stem, folders by name."""
    found = set()
    for folder in folders:
        base = Path(folder) if folder is not None else None
        if base is None or not base.is_dir():
            continue
        found |= {p.stem if p.is_file() else p.name for p in base.iterdir()
                  if (p.is_file() and p.suffix in SUFFIXES) or (p / "config.json").is_file()}
    return sorted(found)


def load(path: Path, allow_pickle: bool = False, base=None):
    """A ControlNetModel (fp32, eval mode) from a diffusers folder or a single file (LDM layout, diffusers' keys
    without a config, or Stability's control-LoRA); what A1111's ControlNet extension runs too: a T2I-Adapter
    folder (diffusers' `T2IAdapter`), an IP-Adapter file (a `formats.ip_adapter.IPAdapter`); kohya's ControlNet-LLLite
    file (a `formats.lllite.LLLite`) as ComfyUI runs it. `base`: the U-Net it
    will run with, for what a file's weights cannot say (SDXL's time-embedding width, the attention heads) and, for
    a control-LoRA, the weights it changes."""
    from diffusers import ControlNetModel

    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                keys = list(f.keys())
        except Exception:  # damaged: single_file.read below says so in its own words
            keys = []
        if ip_adapter.is_ip_adapter(keys):
            return ip_adapter.load(path)
        if lllite.is_lllite(keys):  # kohya's ControlNet-LLLite (SDXL)
            if base is None:
                raise UserError(f"{path.name} is a ControlNet-LLLite file: it loads beside the U-Net it acts on")
            try:
                return lllite.from_state(single_file.read(path, allow_pickle)[0], base, path.name)
            except (KeyError, ValueError, RuntimeError) as err:
                raise UserError(f"cannot load the ControlNet-LLLite {path.name}: {str(err).splitlines()[0]}") from None
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} is not a ControlNet folder (no config.json)")
        try:
            config = (path / "config.json").read_text()
            if '"T2IAdapter"' in config:  # TencentARC's adapters, as diffusers has them
                from diffusers import T2IAdapter

                return T2IAdapter.from_pretrained(path, use_safetensors=not allow_pickle or None).eval()
            for flow in ("SD3ControlNetModel", "FluxControlNetModel"):  # for SD3/Flux models (generation.flow)
                if f'"{flow}"' in config:
                    import diffusers

                    return getattr(diffusers, flow).from_pretrained(path, use_safetensors=not allow_pickle or None
                                                                    ).eval()
            return ControlNetModel.from_pretrained(path, use_safetensors=not allow_pickle or None).eval()
        except (OSError, ValueError, EnvironmentError) as err:
            raise UserError(f"cannot load the ControlNet in {path} ({str(err).splitlines()[0]})") from None
    state, _ = single_file.read(path, allow_pickle)
    config = dict(base.config) if base is not None else None
    if "controlnet_cond_embedding.conv_in.weight" in state:
        return from_diffusers_keys(state, path.name, config)
    if "lora_controlnet" in state:
        return from_control_lora(state, path.name, base)
    if "adapter.conv_in.weight" in state or ("conv_in.weight" in state and "body.0.block1.weight" in state):
        return t2i_adapter(state, path.name, config)
    return from_ldm(state, path.name, config)


def from_ldm(state: dict[str, torch.Tensor], name: str = "the file", base: dict | None = None):
    """A ControlNetModel from LDM-layout tensors (`control_model.` prefix or none); an SDXL one (`label_emb`) needs
    `base`, the U-Net config it runs with, for its time-embedding width."""
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    bare = {k.removeprefix(LDM_PREFIX): v for k, v in state.items()}
    if "input_hint_block.0.weight" not in bare or "zero_convs.0.0.weight" not in bare:
        raise UserError(f"{name} is not a ControlNet (no input_hint_block / zero_convs weights)")
    config = config_from_ldm(bare, name, base)
    # diffusers' converter numbers the hint block as SD's 16-32-96-256 one (conv_out at index 14)
    if f"input_hint_block.{2 * len(config['conditioning_embedding_out_channels']) * 2 - 2}.weight" not in bare:
        raise UserError(f"{name}: its hint encoder is not SD's four-level one, which this converter reads")
    converted = convert_controlnet_checkpoint({LDM_PREFIX + k: v for k, v in bare.items()}, config)
    converted = {k: v for k, v in converted.items() if v is not None}
    # SDXL's added embedding (pooled text and sizes), which diffusers' converter leaves out
    converted |= {f"add_embedding.linear_{n}.{p}": bare[f"label_emb.0.{i}.{p}"]
                  for n, i in ((1, 0), (2, 2)) for p in ("weight", "bias") if f"label_emb.0.{i}.{p}" in bare}
    return single_file._build(ControlNetModel, config, converted, "ControlNet")


def _pooled_width(adm: int, base: dict | None, name: str) -> int:
    """The pooled text width inside SDXL's added embedding of `adm` inputs: the base U-Net's."""
    if base is None or not takes_sizes(base):
        raise UserError(f"{name} is an SDXL ControlNet: use it with an SDXL model")
    pooled = adm - 6 * int(base["addition_time_embed_dim"])
    if adm != base.get("projection_class_embeddings_input_dim") or pooled <= 0:
        raise UserError(f"{name} takes a {adm}-wide added embedding; this model's U-Net takes "
                        f"{base.get('projection_class_embeddings_input_dim')}: they are not for each other")
    return pooled


def config_from_ldm(c: dict[str, torch.Tensor], name: str = "the file", base: dict | None = None) -> dict:
    """A ControlNetModel config from LDM ControlNet tensors (prefix stripped)."""
    pooled = _pooled_width(int(c["label_emb.0.0.weight"].shape[1]), base, name) if "label_emb.0.0.weight" in c \
        else None
    config = single_file.unet_config(c, pooled, what="ControlNet")
    config.pop("up_block_types", None)
    hint = sorted(int(k.split(".")[1]) for k in c if k.startswith("input_hint_block.") and k.endswith(".weight"))
    # convolutions at 0, 2, ..., with SiLUs between: conv_in, then (same width, wider at stride 2) per level
    widths = [int(c["input_hint_block.0.weight"].shape[0])]
    widths += [int(c[f"input_hint_block.{i}.weight"].shape[0]) for i in hint[1:-1]][1::2]
    config |= {"conditioning_channels": int(c["input_hint_block.0.weight"].shape[1]),
               "conditioning_embedding_out_channels": widths,
               "sample_size": 64}
    return config


def from_diffusers_keys(state: dict[str, torch.Tensor], name: str = "the file", base: dict | None = None):
    """A ControlNetModel from one file of diffusers' own keys without its config.json, as A1111's ControlNet
    extension takes them (lllyasviel's `diffusers_xl_canny_full/mid/small.safetensors`, a `save_pretrained` weights
    file renamed): the architecture from the weights' names and shapes; the attention heads and SDXL's time-embedding
    width, which weights cannot say, from `base` (the U-Net it runs with), else SD's conventions."""
    from diffusers import ControlNetModel

    levels = sorted({int(k.split(".")[1]) for k in state if k.startswith("down_blocks.")})
    widths = [int(state[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0]) for i in levels]
    depth = [single_file._count(state, rf"down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\.")
             for i in levels]
    to_k = next((v for k, v in state.items() if k.endswith("attn2.to_k.weight")), None)
    proj_in = next((v for k, v in state.items() if k.endswith(".proj_in.weight")), None)
    if to_k is None or proj_in is None:
        raise UserError(f"{name} is a ControlNet without cross-attention, which latentgen does not read")
    linear = proj_in.ndim == 2
    hint = sorted(int(k.split(".")[2]) for k in state
                  if k.startswith("controlnet_cond_embedding.blocks.") and k.endswith(".weight"))
    config = {
        "in_channels": int(state["conv_in.weight"].shape[1]),
        "conditioning_channels": int(state["controlnet_cond_embedding.conv_in.weight"].shape[1]),
        "conditioning_embedding_out_channels": [int(state["controlnet_cond_embedding.conv_in.weight"].shape[0])] + [
            int(state[f"controlnet_cond_embedding.blocks.{j}.weight"].shape[0]) for j in hint[1::2]],
        "block_out_channels": widths,
        "layers_per_block": single_file._count(state, r"down_blocks\.0\.resnets\.(\d+)\."),
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depth],
        "cross_attention_dim": int(to_k.shape[1]),
        "use_linear_projection": linear,
        "attention_head_dim": base["attention_head_dim"] if base else (
            [max(w // single_file.HEAD_WIDTH, 1) for w in widths] if linear else single_file.SD1_HEADS),
        "transformer_layers_per_block": [max(d, 1) for d in depth],
        "mid_block_type": "UNetMidBlock2DCrossAttn" if any(k.startswith("mid_block.attentions.") for k in state)
        else "UNetMidBlock2D",
    }
    if "add_embedding.linear_1.weight" in state:
        adm = int(state["add_embedding.linear_1.weight"].shape[1])
        config |= {"addition_embed_type": "text_time", "projection_class_embeddings_input_dim": adm,
                   "addition_time_embed_dim": (adm - _pooled_width(adm, base, name)) // 6}
    return single_file._build(ControlNetModel, config, state, "ControlNet")


def from_control_lora(state: dict[str, torch.Tensor], name: str, base):
    """A ControlNetModel from Stability's control-LoRA (`control-lora-canny-rank128.safetensors`, marked by a
    `lora_controlnet` key), as ComfyUI builds it: the ControlNet is the base U-Net's encoder (LDM names), each layer
    the file names with `.up`/`.down` gets up·down added to its weight (scale 1), and every other tensor in the file
    (hint encoder, zero convolutions, norms, biases) replaces the base's."""
    if base is None:
        raise UserError(f"{name} is a control-LoRA: it changes a model's own U-Net, so use it with that model")
    ldm = single_file.unet_ldm_names(base.config)
    weights = {ldm(k): v.detach().float() for k, v in base.state_dict().items() if ldm(k) is not None}
    control = {k: v for k, v in weights.items() if not k.startswith(("output_blocks.", "out."))}
    for key, tensor in state.items():
        if key == "lora_controlnet" or key.endswith(".down"):
            continue
        if key.endswith(".up"):
            layer = key.removesuffix(".up")
            down, target = state.get(f"{layer}.down"), control.get(f"{layer}.weight")
            if down is None or target is None:
                raise UserError(f"{name}: its LoRA of {layer} has no {'down half' if down is None else 'layer'} "
                                "in this model's U-Net: it is made for another model")
            delta = tensor.float().flatten(1) @ down.float().flatten(1)
            if delta.numel() != target.numel():
                raise UserError(f"{name}: its LoRA of {layer} does not fit this model's U-Net (another model's)")
            control[f"{layer}.weight"] = target + delta.reshape(target.shape)
        else:
            control[key] = tensor.float()
    return from_ldm(control, name, dict(base.config))


def t2i_adapter(state: dict[str, torch.Tensor], name: str, base: dict | None):
    """A diffusers T2IAdapter (full) from one file: diffusers' keys (`adapter.body.0.resnets.0.block1.…`), or
    TencentARC's own (`t2iadapter_canny_sd15v2.pth`: `body.<level·2 + block>.block1.…`, two blocks a level, as
    diffusers' conversion script reads them). Its kind, and with it how far it shrinks the image, follows the model
    it runs with (SDXL's adapters shrink 16×, SD's 8×); the input channels follow from that."""
    from diffusers import T2IAdapter

    if "adapter.conv_in.weight" not in state:  # TencentARC's layout -> diffusers'
        renamed = {}
        for key, tensor in state.items():
            if key.startswith("body."):
                _, index, rest = key.split(".", 2)
                level, block = divmod(int(index), 2)
                rest = rest if rest.startswith("in_conv.") else f"resnets.{block}.{rest}"
                key = f"body.{level}.{rest}"
            renamed[f"adapter.{key}"] = tensor
        state = renamed
    levels = sorted({int(k.split(".")[2]) for k in state if k.startswith("adapter.body.")})
    blocks = single_file._count(state, r"adapter\.body\.0\.resnets\.(\d+)\.")
    if not levels or not blocks or any(".down_opt." in k or ".skep." in k for k in state):
        raise UserError(f"{name} is a T2I-Adapter of a kind latentgen does not read (only full adapters)")
    xl = base is not None and takes_sizes(base)
    factor = 16 if xl else 8
    channels = [int(state[f"adapter.body.{i}.resnets.0.block1.weight"].shape[0]) for i in levels]
    inputs, remainder = divmod(int(state["adapter.conv_in.weight"].shape[1]), factor * factor)
    if remainder or inputs not in (1, 3):  # a grey or an RGB control image, shrunk by the kind's factor
        raise UserError(f"{name} is a T2I-Adapter made for {'SD 1.x/2.x' if xl else 'SDXL'}, not for this "
                        f"{'SDXL' if xl else 'SD 1.x/2.x'} model")
    config = {"in_channels": inputs, "channels": channels, "num_res_blocks": blocks, "downscale_factor": factor,
              "adapter_type": "full_adapter_xl" if xl else "full_adapter"}
    return single_file._build(T2IAdapter, config, state, "T2I-Adapter")
