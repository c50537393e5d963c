"""Training checkpoints: written atomically, loaded without unpickling anything that could run code.

A checkpoint is a folder `checkpoints/checkpoint-0000100/` holding each model's weights as safetensors (only the
trainable ones of a partly frozen model, such as a LoRA's: the rest comes from the pretrained model again), the
optimizer, LR-schedule, EMA and scaler states (`training_state.pt`, plain tensors and numbers, read back with
`torch.load(weights_only=True)`) and `state.json` (the step). It is built under a temporary name and renamed into
place, so a run killed at any moment leaves only complete checkpoints under the names `latest` looks at.

accelerate's save_state/load_state would do most of this. Its load reads optimizer, scheduler and RNG states
with torch.load(weights_only=True), but objects registered with `register_for_checkpointing` (the EMA would be
one) with weights_only=False, and it does not write atomically. Our RNG is derived from the step, so there is
no RNG state to keep.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from latentgen.errors import UserError, first_line
from latentgen.io import atomic_dir

NAME = re.compile(r"^checkpoint-(\d+)$")
SHARDED = "sharded"  # an FSDP run's shards, in torch.distributed.checkpoint's format
ZERO = "zero"  # in SHARDED: the partitions a DeepSpeed run writes (`training.zero`; DeepSpeed's checkpoint tag)


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of interrupted saves are never listed)."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if NAME.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(NAME.match(p.name).group(1)))


def resolve_resume(output_dir: str | Path, resume_from: str | None) -> Path | None:
    """The checkpoint `resume_from` names: None, "latest" (None if there is none yet) or a folder."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume_from)
    if not (path / "state.json").is_file():
        raise UserError(f"resume_from {path} is not a checkpoint folder (no state.json); "
                        f"use 'latest' or a folder under {checkpoints_dir(output_dir)}")
    return path


def save_checkpoint(output_dir: str | Path, step: int, models: dict[str, torch.nn.Module],
                    states: dict[str, Any], keep: int, shards: Path | None = None) -> Path:
    """Save models (unwrapped, or their state dicts) and objects with state_dict(); keep the newest `keep`
    checkpoints. `shards`: a folder of sharded states (torch.distributed.checkpoint's, written by every rank of an
    FSDP run) that becomes the checkpoint's `sharded/`."""
    target = checkpoints_dir(output_dir) / f"checkpoint-{step:07d}"
    with atomic_dir(target) as tmp:
        if shards is not None:
            os.replace(shards, tmp / SHARDED)
        for name, model in models.items():
            if isinstance(model, Mapping):  # whole tensors gathered from a sharded model (`training.sharded`)
                save_file({k: v.detach().contiguous() for k, v in model.items()}, str(tmp / f"{name}.safetensors"))
                continue
            trainable = _trainable(model)
            if trainable is None:
                save_model(model, str(tmp / f"{name}.safetensors"))
            else:
                save_file({k: v.detach().contiguous() for k, v in trainable.items()}, str(tmp / f"{name}.safetensors"))
        torch.save({name: obj.state_dict() for name, obj in states.items() if obj is not None},
                   tmp / "training_state.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step}, indent=2))
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The trainable parameters of a partly frozen model by name; None when all of it trains, or none of it (a
    model that changes without gradients, such as a distillation's target network: saved whole)."""
    params = dict(model.named_parameters())
    trainable = {k: p for k, p in params.items() if p.requires_grad}
    return None if len(trainable) in (0, len(params)) else trainable


def load_checkpoint(path: Path, models: dict[str, torch.nn.Module], states: dict[str, Any]) -> dict[str, Any]:
    """Restore what save_checkpoint wrote; returns state.json."""
    try:
        for name, model in models.items():
            if not isinstance(model, torch.nn.Module):  # a sharded model (`training.sharded.FullModel`)
                model.load_checkpoint(path, name)  # whole tensors, or the shards of `sharded/`
                continue
            trainable = _trainable(model)
            if trainable is None:
                load_model(model, str(path / f"{name}.safetensors"), strict=True)
                continue
            saved = load_file(str(path / f"{name}.safetensors"))
            if saved.keys() != trainable.keys():
                raise ValueError(f"its {name} holds other trainable weights than this run's ({len(saved)} tensors, "
                                 f"this run trains {len(trainable)}): was it made with another LoRA config?")
            with torch.no_grad():
                for key, tensor in saved.items():
                    trainable[key].copy_(tensor)
        saved = torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)
        for name, obj in states.items():
            if hasattr(obj, "load_checkpoint"):  # a sharded model's optimizer (`training.sharded.FullOptimizer`)
                obj.load_checkpoint(path, name, saved)
            elif obj is not None:
                if name not in saved:
                    deepspeed = (path / SHARDED / ZERO).is_dir()
                    raise ValueError(f"it holds no {name} state" + (" (DeepSpeed's partitions are in sharded/: "
                                                                     "resume under DeepSpeed)" if deepspeed else ""))
                obj.load_state_dict(saved[name])
        return json.loads((path / "state.json").read_text())
    except (OSError, RuntimeError, KeyError, ValueError) as err:  # DCP's CheckpointException is a RuntimeError
        raise UserError(f"cannot resume from {path}: {first_line(err)}") from None
