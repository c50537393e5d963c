"""LoRAs, read and written in one place.

LoRAs as users name them: `--lora PATH[:SCALE]`, and AUTOMATIC1111's `<lora:NAME:SCALE>` in a prompt (NAME looked
up in the pipeline's `loras_dir`, `loras/` by default). Loading is diffusers' (`load_lora_weights`, through peft,
diffusers/peft and kohya/A1111 formats); what is here: the prompt tags, finding the files, one-line errors for a
LoRA that does not fit, A1111's `Lora hashes`, switching the active set between requests, and LyCORIS's LoHa and
LoKr files (kohya's names), which diffusers' loader does not read: they go into peft's LoHa/LoKr layers here.
Writing (`write`): what `train_unet.py` trains, in diffusers', kohya's and LyCORIS's formats, beside their readers.

In a shared pipeline LoRAs stay unfused: `set_adapters` switches between requests without touching the base
weights, so the base model comes back bit for bit. A process that makes all its images with one set (infer.py)
fuses them (`fuse`): faster per image, as `python bench/lora.py` measures.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Sequence

import torch

from latentgen.errors import UserError, first_line
from latentgen.formats.single_file import unet_ldm_names
from latentgen.io import save_safetensors

# A1111 reads the LyCORIS extension's <lyco:NAME:SCALE> as <lora:NAME:SCALE>
TAG = re.compile(r"<(?:lora|lyco):([^:>]+)(?::([^>]*))?>")
SUFFIXES = (".safetensors",)
_lock = threading.Lock()


def tags(prompt: str) -> list[tuple[str, float]]:
    """The `<lora:NAME:SCALE>` (or `<lyco:NAME:SCALE>`) tags of a prompt (SCALE 1 when left out)."""
    found = []
    for name, scale in TAG.findall(prompt):
        try:
            found.append((name.strip(), float(scale) if scale.strip() else 1.0))
        except ValueError:
            raise UserError(f"<lora:{name}:{scale}> has a scale that is not a number") from None
    return found


def strip_tags(prompt: str) -> str:
    """The prompt without its LoRA tags (what the text encoder sees, as in A1111)."""
    return TAG.sub("", prompt) if "<lora:" in prompt or "<lyco:" in prompt else prompt


def parse_flag(value: str) -> tuple[str, float]:
    """`PATH[:SCALE]` of `--lora` (a colon not followed by a number belongs to the path)."""
    path, sep, scale = value.rpartition(":")
    try:
        return (path, float(scale)) if sep and path else (value, 1.0)
    except ValueError:
        return value, 1.0


def resolve(name: str, folder: Path, confined: bool = False) -> Path:
    """A LoRA file from a path, or a name in `folder` (NAME.safetensors). `confined` (the server: names come from
    clients): only a .safetensors file inside `folder`, however the name is spelt (no absolute paths, no `..`, no
    symlink that leads out), and one answer for every name that is not one, so that a client learns nothing of the
    files outside."""
    if confined:
        return _in_folder(name, Path(folder))
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (folder / name, *(folder / f"{name}{s}" for s in SUFFIXES)):
        if candidate.is_file():
            return candidate
    known = [p.stem for p in available(folder)]
    raise UserError(f"LoRA {name!r} is neither a file nor a name in {folder}/"
                    + (f" (it has: {', '.join(known)})" if known else " (no .safetensors files there)"))


def _in_folder(name: str, folder: Path) -> Path:
    root = folder.resolve()
    for candidate in (folder / name, *(folder / f"{name}{s}" for s in SUFFIXES)):
        try:
            real = candidate.resolve()
        except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte in the name
            continue
        if real.is_relative_to(root) and real.suffix in SUFFIXES and real.is_file():
            return real
    known = [p.stem for p in available(folder) if p.resolve().is_relative_to(root)]
    raise UserError(f"LoRA {name!r} is not one of this server's LoRAs"
                    + (f" (it has: {', '.join(known)})" if known else " (it has none)"))


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


# what diffusers' LoRA loaders load into: SD/SDXL's, and SD3's and Flux's (generation.flow)
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def text_encoder_state(pipe) -> tuple:
    """What the text encoders' LoRA layers do now (active adapters, scales, merged ones), for the prompt cache's
    key: an embedding made with one LoRA set is not reused with another, however the set was changed (here or
    through diffusers' `set_adapters`, `fuse_lora`, ...)."""
    state = []
    for encoder in (getattr(pipe, name, None) for name in TEXT_ENCODERS):
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
    kind = _lycoris_kind(path, keys)
    before = _adapters(pipe)
    try:
        if kind is None:
            if hasattr(pipe, "unet"):  # SD3's and Flux's loaders return other things from lora_state_dict
                _check_shapes(pipe, path)
            pipe.load_lora_weights(str(path), adapter_name=adapter)
        else:
            _load_lycoris(pipe, path, kind, adapter)
    except (RuntimeError, ValueError, KeyError) as err:
        raise UserError(f"LoRA {path} does not fit this model ({first_line(err)}); it was made for another "
                        "base architecture") from None
    if not any(a == adapter for _, a in _adapters(pipe) - before):
        raise UserError(f"LoRA {path} matches no layer of this model's U-Net or text encoder; it was made for "
                        "another base architecture")


# LyCORIS (KohakuBlueleaf's LyCORIS, which kohya's sd-scripts trains and A1111 applies): each layer's update is a
# product of small factors, not LoRA's B·A. Keys are kohya's: `lora_unet_<module path with _>.<factor>`.
LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")  # ΔW = (w1a·w1b) ⊙ (w2a·w2b)
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")  # ΔW = w1 ⊗ w2
PLAIN = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")
OTHER_LYCORIS = {"diff": "full (weight difference)", "on_input": "(IA)³", "oft_blocks": "OFT", "oft_diag": "OFT",
                 "w_norm": "norm", "a1.weight": "GLoRA", "oft_R": "BOFT"}
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}


def _lycoris_kind(path: Path, keys: Sequence[str]) -> str | None:
    """"loha" or "lokr" for a LyCORIS file of one algorithm; None for LoRA (LoCon included); a one-line error for
    the LyCORIS kinds not read here, and for files that mix kinds."""
    suffixes = {key.partition(".")[2] for key in keys}
    found = {name for name, kind in (("LoHa", LOHA), ("LoKr", LOKR), ("LoRA", PLAIN)) if suffixes & set(kind)}
    other = sorted({label for suffix, label in OTHER_LYCORIS.items() if suffix in suffixes})
    if other:
        raise UserError(f"LoRA {path} holds LyCORIS {' and '.join(other)} layers, which latentgen does not load "
                        "(it loads LoRA, LoCon, LoHa and LoKr)")
    if len(found) > 1:
        raise UserError(f"LoRA {path} mixes {' and '.join(sorted(found))} layers; latentgen loads one kind per file")
    kind = {"LoHa": "loha", "LoKr": "lokr"}.get(next(iter(found), ""))
    unread = sorted(suffixes - set(LOHA) - set(LOKR) - {"alpha"}) if kind else []
    if unread:  # e.g. DoRA's dora_scale: loading the rest would silently drop part of the update
        raise UserError(f"LoRA {path} is a LyCORIS {next(iter(found))} file with {unread[0]} tensors, which latentgen "
                        "does not read")
    return kind


def _lycoris_state(pipe, path: Path) -> dict[str, dict]:
    """The file's factors per pipeline component, keyed by the component's module paths (peft's names)."""
    from safetensors.torch import load_file

    state: dict[str, dict[str, torch.Tensor]] = {}
    names: dict[str, dict[str, str]] = {}
    for key, tensor in load_file(str(path)).items():
        module, _, factor = key.partition(".")
        prefix = next((p for p in KOHYA_PREFIXES if module.startswith(p)), None)
        component = KOHYA_PREFIXES.get(prefix)
        if component is None or getattr(pipe, component, None) is None:
            raise ValueError(f"{module} is not a layer of this model's U-Net or text encoders")
        if component not in names:
            names[component] = kohya_layer_names(getattr(pipe, component), component)
        kohya = module[len(prefix):]
        # sd-scripts names the text encoder's layers under transformers 4's `text_model.`, which transformers 5 drops
        name = names[component].get(kohya) or names[component].get(kohya.removeprefix("text_model_"))
        if name is None:
            raise ValueError(f"{module} is not a layer of this model's {component}")
        state.setdefault(component, {})[f"{name}.{factor}"] = tensor
    return state


def kohya_layer_names(model, component: str) -> dict[str, str]:
    """kohya's name of each linear and convolutional layer (its path with _ for .) -> the layer's path; for a U-Net
    also its name in Stability's layout (`input_blocks_4_1_…`), which sd-scripts uses for SDXL."""
    # a layer that holds adapters already is peft's wrapper around its `base_layer` (one per kind of adapter, nested):
    # the outermost wrapper's path is the name
    layers = [re.sub(r"(\.base_layer)+$", "", n) for n, m in model.named_modules()
              if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    names = {n.replace(".", "_"): n for n in layers}
    if component == "unet" and "block_out_channels" in model.config:  # a U-Net, not a transformer backbone

        ldm = unet_ldm_names(model.config)
        names |= {stability.replace(".", "_"): n for n in layers if (stability := ldm(n)) is not None}
    return names


def _loha_config(state: dict):
    """peft's LoHaConfig for these factors: each module's rank, and its alpha (alpha / rank scales the update)."""
    from collections import Counter

    from peft import LoHaConfig

    modules = sorted({key.rpartition(".hada_")[0] for key in state if ".hada_" in key})
    ranks = {m: state[f"{m}.hada_w1_b"].shape[0] for m in modules}
    # popped: the alphas go into the config, and peft's state dict has no place for them
    alphas = {m: float(state.pop(f"{m}.alpha")) if f"{m}.alpha" in state else float(ranks[m]) for m in modules}
    r = Counter(ranks.values()).most_common(1)[0][0]
    anchored = {m: f"^{re.escape(m)}" for m in modules}  # a module path, not any path that ends like it
    return LoHaConfig(r=r, alpha=r, target_modules=modules, init_weights=False,
                      rank_pattern={anchored[m]: ranks[m] for m in modules},
                      alpha_pattern={anchored[m]: alphas[m] for m in modules},
                      use_effective_conv2d=any(key.endswith(".hada_t1") for key in state))


def _lokr_config(state: dict, model):
    """peft's LoKrConfig for these factors of `model`'s layers. diffusers has the two pieces (for its transformer
    models' LoKr files): LyCORIS's alpha / rank baked into the first factor, and the config that makes peft build
    factors of the checkpoint's shapes; they are private helpers, used here rather than written again."""
    import math

    from diffusers.loaders.lora_conversion_utils import _bake_lokr_alpha_
    from diffusers.utils.peft_utils import _create_lokr_config

    _bake_lokr_alpha_(state)
    # the helper reads each factor's shape as (out, in) (w2_a as (out, rank)); a convolution's second factor in full
    # is (out, in, k, k), decomposed its w2_b is (rank, in·k·k), and in LyCORIS's CP form (a core lokr_t2) w2_a is
    # (rank, out)
    tucker = {key.removesuffix(".lokr_t2") for key in state if key.endswith(".lokr_t2")}

    def shape(key: str, value):
        module, _, factor = key.rpartition(".")
        if factor == "lokr_w2_a" and module in tucker:
            return value.T
        if value.ndim == 4:
            return value[..., 0, 0]
        if factor == "lokr_w2_b" and module not in tucker:
            layer = model.get_submodule(module)
            layer = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer  # holds adapters already
            kernel = math.prod(getattr(layer, "kernel_size", (1,)))
            return value[:, ::kernel]
        return value

    shapes = {key: shape(key, value) for key, value in state.items()}
    config = _create_lokr_config(shapes, None)
    config.use_effective_conv2d = bool(tucker)
    return config


def _load_lycoris(pipe, path: Path, kind: str, adapter: str) -> None:
    """Load a LoHa or LoKr file as the adapter `adapter` of the components it names, with peft's layers, so that
    diffusers' `set_adapters`, `fuse_lora` and `disable_lora` treat it as they treat a LoRA."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    states = _lycoris_state(pipe, path)
    try:
        for component, state in states.items():
            model = getattr(pipe, component)
            config = _loha_config(state) if kind == "loha" else _lokr_config(state, model)
            inject_adapter_in_model(config, model, adapter_name=adapter)
            result = set_peft_model_state_dict(model, state, adapter_name=adapter)
            unexpected = [key for key in result.unexpected_keys if adapter in key]
            missing = [key for key in result.missing_keys if adapter in key]
            if unexpected or missing:
                raise ValueError(f"{(unexpected or missing)[0]} does not fit this model's {component}")
    except Exception:
        # layers injected before the failure hold random factors and are active: take them out again
        if any(a == adapter for _, a in _adapters(pipe)):
            pipe.delete_adapters(adapter)
        raise


# ----------------------------------------------------------------------------------------------------------------
# Writing: what `train_unet.py` trains, in the formats read above


def write(target: Path, layers: dict[str, dict[str, torch.Tensor]], configs: dict[str, dict], algo: str, rank: int,
          alpha: float, kohya: bool, text_model, steps: int, unet_config=None) -> None:
    """Trained adapters (`layers`: peft's state dict of each of "unet", "text_encoder" and SDXL's "text_encoder_2")
    as a file `load` reads: a LoRA in diffusers' format (with each part's peft config, as diffusers' training
    scripts write it) and, with `kohya`, in kohya's beside it (`lora_kohya.safetensors`: `lora_unet_…`/`lora_te_…`
    with alphas), which A1111, ComfyUI and sd-scripts read; a LoHa or LoKr in LyCORIS's format. `unet_config`:
    an SDXL U-Net's, whose kohya names are Stability's layout (`lora_unet_input_blocks_4_1_…`) as sd-scripts
    writes them for SDXL, with `lora_te1_`/`lora_te2_` for its text encoders."""
    names = KohyaNames(text_model, unet_config)
    if algo != "lora":
        return write_lycoris(target, layers, algo, rank, alpha, names, steps)
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    sdxl = {"text_encoder_2_lora_layers": layers.get("text_encoder_2"),
            "text_encoder_2_lora_adapter_metadata": configs.get("text_encoder_2")} if unet_config else {}
    loader = StableDiffusionXLLoraLoaderMixin if unet_config else StableDiffusionLoraLoaderMixin
    # diffusers writes into a folder without a temporary name: write into a fresh one, then rename into place
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".lora-") as tmp:
        loader.save_lora_weights(
            tmp, weight_name=target.name, unet_lora_layers=layers["unet"], unet_lora_adapter_metadata=configs["unet"],
            text_encoder_lora_layers=layers.get("text_encoder"),
            text_encoder_lora_adapter_metadata=configs.get("text_encoder"), **sdxl)
        os.chmod(Path(tmp) / target.name, 0o644)
        os.replace(Path(tmp) / target.name, target)
    if kohya:
        write_kohya(target.with_name("lora_kohya.safetensors"), layers, algo, rank, alpha, names, steps)


class KohyaNames:
    """The layer names sd-scripts writes: `lora_unet_<module path, _ for .>` (for SDXL the path in Stability's
    layout) and `lora_te_…` (SDXL: `lora_te1_…`, `lora_te2_…`) with CLIP's `text_model_` in them, which A1111 and
    sd-scripts expect (transformers 5's `CLIPTextModel` no longer has it in its module paths; `kohya_layer_names` reads
    both)."""

    def __init__(self, text_model, unet_config=None):
        self.text_model, self.ldm = text_model, unet_ldm_names(unet_config) if unet_config else None
        self.sdxl = unet_config is not None

    def __call__(self, component: str, module: str) -> str:
        if component == "unet":
            return "lora_unet_" + (self.ldm(module) if self.ldm else module).replace(".", "_")
        number = ("1" if component == "text_encoder" else "2") if self.sdxl else ""
        inside = "text_model_" if type(self.text_model).__name__ == "CLIPTextModel" and \
            not module.startswith("text_model.") else ""
        return f"lora_te{number}_{inside}{module.replace('.', '_')}"


def write_kohya(target: Path, layers: dict, algo: str, rank: int, alpha: float, names: KohyaNames,
                steps: int) -> None:
    state = {}
    for component, own in layers.items():
        for key, tensor in own.items():
            module, _, kind = key.partition(".lora_")
            name = names(component, module)
            state[f"{name}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = tensor
            state[f"{name}.alpha"] = torch.tensor(alpha)
    save_safetensors(state, target, kohya_metadata(algo, rank, alpha, names.text_model, steps))


def kohya_metadata(algo: str, rank: int, alpha: float, text_model, steps: int) -> dict[str, str]:
    """sd-scripts' training metadata, which A1111 and kohya's tools show."""
    extra = {} if algo == "lora" else {"ss_network_args": json.dumps({"algo": algo})}
    return {"ss_network_dim": str(rank), "ss_network_alpha": f"{alpha:g}",
            "ss_network_module": "networks.lora" if algo == "lora" else "lycoris.kohya", **extra,
            "ss_base_model_version": "latentgen", "ss_steps": str(steps),
            "ss_network_train_unet_only": str(text_model is None)}


def write_lycoris(target: Path, layers: dict, algo: str, rank: int, alpha: float, names: KohyaNames,
                  steps: int) -> None:
    """A LoHa or LoKr in LyCORIS's format, as sd-scripts writes it with `lycoris.kohya`: kohya's layer names
    (`lora_unet_…`, `lora_te_…`), peft's factors under LyCORIS's names (the same: `hada_w1_a`, `lokr_w1`, ...) and
    each layer's `.alpha`. LyCORIS scales a LoHa by alpha / rank as peft does; a LoKr only where a factor is
    decomposed, where peft always does, so a LoKr's scale goes into its first factor and its alpha is the rank."""
    state = {}
    for component, own_layers in layers.items():
        modules: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in own_layers.items():
            module, _, factor = key.rpartition(".")
            modules.setdefault(module, {})[factor] = tensor
        for module, own in modules.items():
            name = names(component, module)
            if algo == "lokr":
                first = "lokr_w1" if "lokr_w1" in own else "lokr_w1_a"
                own[first] = own[first] * (alpha / rank)
                decomposed = own.get("lokr_w2_b", own.get("lokr_w1_b"))
                if decomposed is not None:
                    own["alpha"] = torch.tensor(float(decomposed.shape[0]))
            else:
                own["alpha"] = torch.tensor(alpha)
            state |= {f"{name}.{factor}": tensor for factor, tensor in own.items()}
    save_safetensors(state, target, kohya_metadata(algo, rank, alpha, names.text_model, steps))
