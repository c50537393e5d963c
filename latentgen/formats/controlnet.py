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

from latentgen.errors import UserError
from latentgen.formats import ip_adapter, single_file

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


def load(path: Path, allow_pickle: bool = False):
    """A ControlNetModel (fp32, eval mode) from a diffusers folder or a single LDM-layout file; what A1111's
    ControlNet extension runs too: a T2I-Adapter folder (diffusers' `T2IAdapter`), an IP-Adapter file (a
    `formats.ip_adapter.IPAdapter`)."""
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
    return from_ldm(state, path.name)


def from_ldm(state: dict[str, torch.Tensor], name: str = "the file"):
    """A ControlNetModel from LDM-layout tensors (`control_model.` prefix or none)."""
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    bare = {k.removeprefix(LDM_PREFIX): v for k, v in state.items()}
    if "input_hint_block.0.weight" not in bare or "zero_convs.0.0.weight" not in bare:
        if any(k.startswith("controlnet_cond_embedding.") for k in bare):
            raise UserError(f"{name} is a ControlNet in diffusers' layout: give its folder, with its config.json")
        if any("lora" in k for k in bare):
            raise UserError(f"{name} looks like a control-LoRA, which latentgen does not load yet")
        raise UserError(f"{name} is not a ControlNet (no input_hint_block / zero_convs weights)")
    config = config_from_ldm(bare, name)
    # diffusers' converter numbers the hint block as SD's 16-32-96-256 one (conv_out at index 14)
    if f"input_hint_block.{2 * len(config['conditioning_embedding_out_channels']) * 2 - 2}.weight" not in bare:
        raise UserError(f"{name}: its hint encoder is not SD's four-level one, which this converter reads")
    converted = convert_controlnet_checkpoint({LDM_PREFIX + k: v for k, v in bare.items()}, config)
    converted = {k: v for k, v in converted.items() if v is not None}
    return single_file._build(ControlNetModel, config, converted, "ControlNet")


def config_from_ldm(c: dict[str, torch.Tensor], name: str = "the file") -> dict:
    """A ControlNetModel config from LDM ControlNet tensors (prefix stripped)."""
    pooled = None
    if "label_emb.0.0.weight" in c:
        raise UserError(f"{name} is an SDXL ControlNet in the LDM layout, which latentgen reads only as a "
                        "diffusers folder")
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
