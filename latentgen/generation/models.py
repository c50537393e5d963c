"""Models as users name them: a pipeline folder, a single-file checkpoint, or a name in a models folder (as
A1111's model list names them); the shipped default model; and a model opened ready to generate, as infer.py and
the server open it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from latentgen.errors import UserError
from latentgen.formats import embeddings, flow_file, folders
from latentgen.formats.folders import MODEL_SUFFIXES
from latentgen.generation import flow
from latentgen.generation.pipeline import LatentPipeline
from latentgen.runtime.device import resolve_device
from latentgen.runtime.precision import resolve_dtype

log = logging.getLogger("latentgen")

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "default_model"


def resolve_model(model: str | Path | None, models_dir: str | Path | None = None) -> Path:
    """The model a user named: a path (pipeline folder or single checkpoint file), else NAME in `models_dir`
    (NAME/, NAME.safetensors or NAME.ckpt, as A1111's model list names them); none: the shipped default model."""
    if model is not None:
        path = Path(model)
        if path.exists() or models_dir is None or path.parent != Path("."):
            return path
        for candidate in (Path(models_dir) / model, *(Path(models_dir) / f"{model}{s}" for s in MODEL_SUFFIXES)):
            if candidate.exists():
                return candidate
        known = ", ".join(list_models(models_dir)) or "none"
        raise UserError(f"model {model} does not exist: it is neither a path nor a model in {models_dir} "
                        f"(there: {known})")
    if not (DEFAULT_MODEL / "model_index.json").exists():
        raise UserError(f"no --model given and the default model is missing from {DEFAULT_MODEL}; "
                        "pass --model FOLDER (a diffusers pipeline folder)")
    return DEFAULT_MODEL


def open_pipeline(model: str | Path, dtype: str = "auto", device="auto", vae: str | Path | None = None,
                  prediction_type: str | None = None, allow_pickle: bool = False, loras_dir: str | Path = "loras",
                  embeddings_dir: str | Path | None = "embeddings", confined: bool = False, vae_tiling: bool = False,
                  attention_slicing: bool = False, controlnets_dir: str | Path = "controlnets",
                  components: str | Path | None = None, offload: str | None = None):
    """A model ready to generate, as infer.py and the server use it: loaded in `dtype` ("auto": the fast precision
    for the device), its VAE replaced by `vae` if given, on `device`, progress bars off, `<lora:NAME>` looked up in
    `loras_dir` (`confined`, as the server has it: only there, whatever the name), the embeddings in
    `embeddings_dir` (None: none) loaded. `components`: for an SD3 single file, a diffusers SD3 folder that gives
    what the file lacks (T5's tokenizer, a transformer-only file's VAE and encoders). `offload` ("model",
    "sequential"): the models stay in main memory and go to the GPU to run (`LatentPipeline.offload`)."""
    import torch

    device = device if isinstance(device, torch.device) else resolve_device(device)
    if offload and device.type == "cpu":
        log.warning(f"--offload {offload}: the models run on the CPU here, from main memory, where offloading "
                    "would put them; nothing to offload")
        offload = None

    def place(pipe):
        if offload:
            pipe.offload(offload, device)
        else:
            pipe.to(device)
        return pipe
    single = flow_file.kind_of_file(Path(model))
    if flow.kind_of(Path(model)) or single:  # SD3 or Flux: text-to-image through diffusers' pipelines
        if vae or prediction_type or vae_tiling or attention_slicing:
            raise UserError("--vae, --prediction-type, --vae-tiling and --attention-slicing are not supported with "
                            "SD3/Flux models yet")
        if single:
            pipe = place(flow.FlowPipeline.from_single_file(model, torch_dtype=resolve_dtype(dtype, device),
                                                            components=components))
        else:
            pipe = place(flow.FlowPipeline.from_pretrained(model, torch_dtype=resolve_dtype(dtype, device),
                                                           allow_pickle=allow_pickle))
        pipe.set_progress_bar_config(disable=True)
        pipe.loras_dir, pipe.loras_confined = Path(loras_dir), confined
        pipe.controlnets_dir = Path(controlnets_dir)
        return pipe
    if components:
        raise UserError("--components completes an SD3 or Flux single-file checkpoint; this model is not one")
    pipe = LatentPipeline.from_pretrained(model, torch_dtype=resolve_dtype(dtype, device), allow_pickle=allow_pickle,
                                          prediction_type=prediction_type)  # a folder or a single file
    if vae:
        pipe.register_modules(vae=folders.load_vae(vae, pipe.vae, allow_pickle))
        pipe.keep_vae_safe()
    place(pipe)
    pipe.set_progress_bar_config(disable=True)
    pipe.loras_dir, pipe.loras_confined = Path(loras_dir), confined
    pipe.controlnets_dir, pipe.allow_pickle = Path(controlnets_dir), allow_pickle
    if vae_tiling:  # large images decoded tile by tile, blended across their overlaps (diffusers' tiling)
        pipe.vae.enable_tiling()
    if attention_slicing:  # attention a head at a time (diffusers'), for the math kernel's memory
        pipe.enable_attention_slicing()
    if embeddings_dir is not None:
        embeddings.load_folder(pipe, embeddings_dir)
    return pipe


def list_models(models_dir: str | Path) -> list[str]:
    """The models in a models directory, by name: pipeline folders and single checkpoint files."""
    folder = Path(models_dir)
    if not folder.is_dir():
        return []
    return sorted(p.stem if p.is_file() else p.name for p in folder.iterdir()
                  if (p.is_dir() and (p / "model_index.json").exists()) or (p.is_file() and p.suffix in MODEL_SUFFIXES))


def check_source(source: Path) -> None:
    if not source.exists():
        raise UserError(f"{source} does not exist")


def check_target(target: Path) -> None:
    """A .safetensors target is a single file, anything else a folder; an existing one of the other kind stays."""
    if target.exists() and target.is_dir() == (target.suffix == ".safetensors"):
        raise UserError(f"{target} exists and is not what would be written there (a .safetensors file or a "
                        "folder); choose another target")


def write(pipe, target: Path, dtype=None) -> None:
    """`target` as a single-file checkpoint (.safetensors) or a diffusers folder, weights in `dtype` if given."""
    if target.suffix == ".safetensors":
        pipe.save_single_file(target, dtype)
    else:
        pipe.save_pretrained(target, weights_dtype=dtype)
