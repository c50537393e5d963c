"""LoRAs as users name them: `--lora PATH[:SCALE]`, and AUTOMATIC1111's `<lora:NAME:SCALE>` in a prompt (NAME looked
up in the pipeline's `loras_dir`, `loras/` by default). Loading is diffusers' (`load_lora_weights`, through peft,
diffusers/peft and kohya/A1111 formats); what is here: the prompt tags, finding the files, one-line errors for a
LoRA that does not fit, A1111's `Lora hashes`, and switching the active set between requests.

In a shared pipeline LoRAs stay unfused: `set_adapters` switches between requests without touching the base
weights, so the base model comes back bit for bit. A process that makes all its images with one set (infer.py)
fuses them (`fuse`): faster per image, as `python bench/lora.py` measures.
"""

from __future__ import annotations

import hashlib
import re
import threading
from pathlib import Path
from typing import Sequence

from .errors import UserError, first_line

TAG = re.compile(r"<lora:([^:>]+)(?::([^>]*))?>")
SUFFIXES = (".safetensors",)
_lock = threading.Lock()


def tags(prompt: str) -> list[tuple[str, float]]:
    """The `<lora:NAME:SCALE>` tags of a prompt (SCALE 1 when left out)."""
    found = []
    for name, scale in TAG.findall(prompt):
        try:
            found.append((name.strip(), float(scale) if scale.strip() else 1.0))
        except ValueError:
            raise UserError(f"<lora:{name}:{scale}> has a scale that is not a number") from None
    return found


def strip_tags(prompt: str) -> str:
    """The prompt without its LoRA tags (what the text encoder sees, as in A1111)."""
    return TAG.sub("", prompt) if "<lora:" in prompt else prompt


def parse_flag(value: str) -> tuple[str, float]:
    """`PATH[:SCALE]` of `--lora` (a colon not followed by a number belongs to the path)."""
    path, sep, scale = value.rpartition(":")
    try:
        return (path, float(scale)) if sep and path else (value, 1.0)
    except ValueError:
        return value, 1.0


def resolve(name: str, folder: Path) -> Path:
    """A LoRA file from a path, or a name in `folder` (NAME.safetensors)."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (folder / name, *(folder / f"{name}{s}" for s in SUFFIXES)):
        if candidate.is_file():
            return candidate
    known = [p.stem for p in available(folder)]
    raise UserError(f"LoRA {name!r} is neither a file nor a name in {folder}/"
                    + (f" (it has: {', '.join(known)})" if known else " (no .safetensors files there)"))


def available(folder: Path) -> list[Path]:
    """The LoRA files in `folder` (none if it does not exist), by name."""
    folder = Path(folder)
    return sorted(p for s in SUFFIXES for p in folder.glob(f"*{s}")) if folder.is_dir() else []


def short_hash(path: Path) -> str:
    """A1111's LoRA hash in `Lora hashes`: the first 12 hex digits of the file's sha256."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:12]


def activate(pipe, loras: Sequence[tuple[Path, float]]) -> None:
    """Make exactly `loras` (file, scale) active on the pipeline, loading files not loaded yet; none: the base
    model (LoRA layers disabled). Adapters are named by the file's hash, so a file loads once whatever it is
    called. Only adapters loaded here are switched; a pipeline whose LoRAs the caller manages with diffusers'
    own `load_lora_weights`/`set_adapters` and that never names a LoRA in a request is left as it is."""
    with _lock:
        wanted = [(f"lora_{short_hash(path)}", path, scale) for path, scale in loras]
        active = tuple((a, s) for a, _, s in wanted)
        if pipe.__dict__.get("active_loras") == active:
            return  # already so (and perhaps fused, see `fuse`)
        if pipe.__dict__.get("fused_loras_of"):
            raise UserError("this pipeline's LoRAs are fused into its weights; it cannot switch to other LoRAs")
        managed = pipe.__dict__.setdefault("managed_loras", set())
        for adapter, path, _ in wanted:
            if adapter not in managed:
                _load(pipe, path, adapter)
                managed.add(adapter)
        if wanted:
            pipe.enable_lora()
            pipe.set_adapters([a for a, _, _ in wanted], adapter_weights=[s for _, _, s in wanted])
        elif managed:
            pipe.disable_lora()
        pipe.__dict__["active_loras"] = active


def fuse(pipe, loras: Sequence[tuple[Path, float]]) -> None:
    """Activate `loras` and fold them into the U-Net's and text encoder's weights, for a process that makes all its
    images with one set of LoRAs (infer.py): `python bench/lora.py` measured unfused LoRAs 1.26× slower per image
    than fused on the default model (bf16, rank 16, 20 steps). A fused pipeline refuses to switch to other LoRAs."""
    activate(pipe, loras)
    if loras:
        pipe.fuse_lora()
        pipe.__dict__["fused_loras_of"] = pipe.__dict__["active_loras"]


COMPONENTS = ("unet", "text_encoder", "text_encoder_2")  # what diffusers' SD/SDXL LoRA loaders load into


def text_encoder_state(pipe) -> tuple:
    """What the text encoders' LoRA layers do now (active adapters, scales, merged ones), for the prompt cache's
    key: an embedding made with one LoRA set is not reused with another, however the set was changed (here or
    through diffusers' `set_adapters`, `fuse_lora`, ...)."""
    state = []
    for encoder in (getattr(pipe, name, None) for name in COMPONENTS[1:]):
        if encoder is None or not getattr(encoder, "peft_config", None):
            continue
        from peft.tuners.tuners_utils import BaseTunerLayer

        state += [(tuple(layer.active_adapters), tuple(sorted(layer.scaling.items())), tuple(layer.merged_adapters),
                   layer.disable_adapters) for layer in encoder.modules() if isinstance(layer, BaseTunerLayer)]
    return tuple(state)


def _check_shapes(pipe, path: Path) -> None:
    """Every LoRA matrix fits the layer it names (diffusers/peft load mismatched shapes without a word)."""
    state, _ = pipe.lora_state_dict(str(path))  # diffusers' names, kohya's converted
    down, up = ("lora_A.weight", "lora.down.weight", "lora_down.weight"), ("lora_B.weight", "lora.up.weight",
                                                                            "lora_up.weight")
    modules = {}
    for key, tensor in state.items():
        component, _, rest = key.partition(".")
        if component not in COMPONENTS or getattr(pipe, component, None) is None or not key.endswith(down + up):
            continue
        if component not in modules:
            modules[component] = dict(getattr(pipe, component).named_modules())
        rest = re.sub(r"\.to_(q|k|v|out)_lora\.", r".\1_proj.lora.", rest)  # kohya's text encoder names, converted
        name = re.split(r"\.lora[._]", rest)[0]
        layer = modules[component].get(name)
        weight = getattr(getattr(layer, "base_layer", layer), "weight", None)
        if weight is None or tensor.ndim < 2:
            continue  # no such layer: diffusers reports LoRAs that match nothing (checked after loading)
        axis = 1 if key.endswith(down) else 0
        if tensor.shape[axis] != weight.shape[axis]:
            raise ValueError(f"{name} is {tuple(weight.shape)} here but the LoRA has {tuple(tensor.shape)} for it")


def _adapters(pipe) -> set[tuple[str, str]]:
    """(component, adapter) for every LoRA adapter loaded into the pipeline's models."""
    if not any(getattr(getattr(pipe, c, None), "peft_config", None) for c in COMPONENTS):
        return set()
    return {(c, a) for c, names in pipe.get_list_adapters().items() for a in names}


def _load(pipe, path: Path, adapter: str) -> None:
    """Load one LoRA file; a file that is not a LoRA of this model's architecture is a one-line error."""
    from safetensors import safe_open

    if path.suffix not in SUFFIXES:
        raise UserError(f"LoRA {path} is not a .safetensors file (pickled LoRAs are not loaded)")
    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
    except Exception as err:  # safetensors raises its own error type for every kind of damage
        raise UserError(f"LoRA {path} is corrupt or truncated ({first_line(err)})") from None
    if not any("lora" in k.lower() for k in keys):
        raise UserError(f"{path} holds no LoRA weights (no lora_* keys among its {len(keys)} tensors)")
    before = _adapters(pipe)
    try:
        _check_shapes(pipe, path)
        pipe.load_lora_weights(str(path), adapter_name=adapter)
    except (RuntimeError, ValueError, KeyError) as err:
        raise UserError(f"LoRA {path} does not fit this model ({first_line(err)}); it was made for another "
                        "base architecture") from None
    if not any(a == adapter for _, a in _adapters(pipe) - before):
        raise UserError(f"LoRA {path} matches no layer of this model's U-Net or text encoder; it was made for "
                        "another base architecture")
