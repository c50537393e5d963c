"""Diffusers pipeline folders (ours, Stable Diffusion's and SDXL's), checked before diffusers reads them so that each
mistake a user makes gets a one-line error, and replacement VAEs. Weights are safetensors unless pickles are
allowed explicitly. Single-file checkpoints are `latentgen.formats.single_file`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from latentgen.errors import UserError, first_line
from latentgen.formats import single_file

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
MODEL_SUFFIXES = (".safetensors", ".ckpt")


def load_vae(path: str | Path, like, allow_pickle: bool = False):
    """An AutoencoderKL from a diffusers folder (vae/ or a pipeline folder) or a single VAE file (A1111's
    `vae-ft-mse-840000.safetensors` layout, or a whole checkpoint's first_stage_model), in `like`'s dtype and
    latent scaling: a replacement VAE decodes the same latent space."""
    from diffusers import AutoencoderKL

    path = Path(path)
    if path.is_dir():
        folder = path / "vae" if (path / "model_index.json").exists() else path
        if not (folder / "config.json").exists():
            raise UserError(f"VAE {path} is neither a diffusers VAE folder (config.json) nor a pipeline folder")
        try:
            vae = AutoencoderKL.from_pretrained(folder, local_files_only=True, use_safetensors=not allow_pickle)
        except Exception as err:
            raise UserError(f"cannot load the VAE in {folder}: {first_line(err)}") from None
    else:
        vae = single_file.vae_from_file(path, allow_pickle)
    if vae.config.latent_channels != like.config.latent_channels:
        raise UserError(f"VAE {path} has {vae.config.latent_channels} latent channels; the model's has "
                        f"{like.config.latent_channels}")
    vae.register_to_config(scaling_factor=like.config.scaling_factor, shift_factor=like.config.get("shift_factor"))
    return vae.to(like.dtype).eval()


def check_pipeline_folder(folder: Path, allow_pickle: bool = False, components: Sequence[str] = COMPONENTS) -> None:
    """One-line errors for the folder mistakes users make, before diffusers reads anything; `components`: the
    ones the pipeline needs (a U-Net pipeline's by default)."""
    if not folder.exists():
        raise UserError(f"model folder {folder} does not exist")
    if not folder.is_dir():
        raise UserError(f"model {folder} is a file; give a diffusers pipeline folder (with model_index.json)")
    index_path = folder / "model_index.json"
    if not index_path.exists():
        raise UserError(f"{folder} is not a diffusers pipeline folder: it has no model_index.json")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{index_path} is not valid JSON ({first_line(err)}); re-save or re-download it") from None
    if not isinstance(index, dict):
        raise UserError(f"{index_path} is not a diffusers model index (a JSON object of components)")
    for name in components:
        entry = index.get(name)
        if name == "unet" and not entry and index.get("transformer"):
            raise UserError(f"{folder} holds a transformer ({index.get('_class_name')}), not a U-Net: load it with "
                            "latentgen.FlowPipeline (infer.py and the server do)")
        if not entry or entry[0] is None or not (folder / name).is_dir():
            raise UserError(f"{folder} is missing the component '{name}' (a folder {name}/ listed in "
                            f"model_index.json); a pipeline needs {', '.join(components)}")
        for config in sorted((folder / name).glob("*.json")):
            try:
                json.loads(config.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                raise UserError(f"{config} is not valid JSON ({first_line(err)}); re-save or re-download it") \
                    from None
    for encoder, tokenizer, what in (("text_encoder_2", "tokenizer_2", "SDXL"),
                                     ("text_encoder_zh", "tokenizer_zh", "Chinese")):
        entry = index.get(encoder)
        if entry and entry[0] is not None:
            if not (folder / encoder).is_dir() or not (folder / tokenizer).is_dir():
                raise UserError(f"{folder} lists {encoder} ({what}) but lacks the folders {encoder}/ and "
                                f"{tokenizer}/")
    for name in weight_components(index):
        files = [f for f in (folder / name).iterdir() if f.is_file()]
        if any(f.suffix == ".safetensors" for f in files):
            check_weights(folder, name, index[name])
            continue
        pickles = [f.name for f in files if f.suffix in PICKLE_SUFFIXES]
        if not pickles:
            raise UserError(f"{folder / name} holds no weights (expected a .safetensors file)")
        if not allow_pickle:
            raise UserError(f"{folder / name}/{pickles[0]} is a pickle file, which can run code when loaded; "
                            "convert it to safetensors, or allow it explicitly with --allow-pickle "
                            "(allow_pickle=True), which loads it with torch.load(weights_only=True)")


def weight_components(index: dict) -> list[str]:
    """The components of a model index that hold weights, where listed: unet (or an SD3/Flux transformer), vae,
    text_encoder, text_encoder_2 (SDXL, SD3, Flux), text_encoder_3 (SD3's T5) and text_encoder_zh (a Chinese
    student)."""
    return [name for name in (*WEIGHT_COMPONENTS, "transformer", "text_encoder_2", "text_encoder_3", "text_encoder_zh")
            if index.get(name) and index[name][0] is not None]


def _strip(key: str) -> str:
    return key.removeprefix("text_model.")  # transformers 4 nests CLIP's text model; 5 does not


def check_weights(folder: Path, name: str, entry: list) -> None:
    """Each safetensors file of a component is complete, and its tensors have the shapes its config implies.

    Reads only the files' headers and builds the model on the meta device (no memory, no weights), so a
    truncated download or weights saved for another config are named precisely instead of failing deep inside
    diffusers or transformers.
    """
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted((folder / name).glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt") as sf:
                shapes.update({_strip(k): tuple(sf.get_slice(k).get_shape()) for k in sf.keys()})
        except Exception as err:  # safetensors raises its own error type for every kind of damage
            raise UserError(f"{f} is corrupt or truncated ({first_line(err)}); re-save or re-download it") \
                from None
    expected = _expected_shapes(folder / name, entry)
    if expected is None:
        return
    for key, shape in expected.items():
        if key in shapes and shapes[key] != shape:
            raise UserError(f"{folder / name}: weight {key} has shape {list(shapes[key])} but {name}/config.json "
                            f"needs {list(shape)}; the weights and the config do not belong together")


def _expected_shapes(path: Path, entry: list) -> dict[str, tuple[int, ...]] | None:
    """{parameter: shape} of the component's class built from its config on the meta device; None if unknown."""
    import importlib

    from accelerate import init_empty_weights

    library, class_name = entry
    try:
        cls = getattr(importlib.import_module(library), class_name)
        with init_empty_weights():
            if library == "diffusers":
                model = cls.from_config(cls.load_config(path))
            else:
                model = cls._from_config(cls.config_class.from_pretrained(path))
    except Exception:  # an unusual class or config: leave the check to the loader
        return None
    return {_strip(k): tuple(v.shape) for k, v in model.state_dict().items()}
