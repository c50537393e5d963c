"""Sharded training with FSDP2 (`distributed.strategy: fsdp`, issue #47): the U-Net's parameters, gradients and
optimizer state split over the ranks by torch's `fully_shard` (each down, mid and up block a unit, then the whole
model), which runs on the CPU with gloo as on GPUs with NCCL. accelerate switches to FSDP only on GPUs, so the
trainer calls `fully_shard` itself.

Checkpoints hold whole tensors, gathered with `torch.distributed.checkpoint.state_dict` (full state dicts) and
written by rank 0 in the trainer's usual format, so a run resumes exactly after a kill and with another number of
ranks (2 → 1 → 2), and the final pipeline is a normal diffusers folder. With `distributed.checkpoint: sharded` the
U-Net and its optimizer state are written by every rank, each its own shards, with torch.distributed.checkpoint
(DCP) into the checkpoint's `sharded/` (no rank ever holds the whole model), and DCP reshards them on loading, at
any number of ranks; the rest (LR schedule, scaler, step) is written by rank 0 as before.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import torch

from latentgen.errors import first_line
from latentgen.formats.checkpoint import SHARDED, checkpoints_dir

OPTIONS: dict[str, Any] = {"full_state_dict": True, "cpu_offload": True}


def shard(unet: torch.nn.Module) -> torch.nn.Module:
    """The U-Net sharded in place over the process group's ranks (FSDP2)."""
    from torch.distributed.fsdp import fully_shard

    unet.plain_class = type(unet)  # fully_shard swaps the class for an FSDP subclass
    for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
        if block is not None:
            fully_shard(block)
    fully_shard(unet)
    return unet


def resident(model: torch.nn.Module) -> int:
    """How many of the model's parameters this rank holds (its shards' elements)."""
    return sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**OPTIONS)


class FullModel:
    """A sharded model as a checkpoint holds it: `state_dict()` gathers whole tensors (a collective: every rank calls
    it), `load_state_dict` takes whole tensors and keeps this rank's shards; `shards()` is this rank's part, as DCP
    writes it."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def shards(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.model)

    def load_checkpoint(self, path: Path, name: str) -> None:
        """From checkpoint folder `path`: its DCP shards (`sharded/`) if it has them, else `{name}.safetensors`."""
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        if not (path / SHARDED).is_dir():
            return self.load_state_dict(load_file(str(path / f"{name}.safetensors")))
        set_model_state_dict(self.model, _read_shards(path, name, self.shards()))

    def state_dict(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.model, options=_options())

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True, strict=True))


class FullOptimizer:
    """A sharded model's optimizer as a checkpoint holds it: its state by parameter name, whole tensors."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def shards(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_checkpoint(self, path: Path, name: str, saved: dict) -> None:
        """From checkpoint folder `path`: its DCP shards if it has them, else `saved[name]` (training_state.pt)."""
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        if not (path / SHARDED).is_dir():
            return self.load_state_dict(saved[name])
        set_optimizer_state_dict(self.model, self.optimizer, _read_shards(path, name, self.shards()))

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optimizer, options=_options())

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.model, self.optimizer, state, options=StateDictOptions(full_state_dict=True))


class Snapshot:
    """State gathered on every rank (`gathered`), for rank 0 to write."""

    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return self.state


def gathered(obj: Any) -> Any:
    """What a checkpoint writes of `obj`: a sharded model's or optimizer's whole state (a collective), else `obj`."""
    if isinstance(obj, FullModel):
        return obj.state_dict()
    if isinstance(obj, FullOptimizer):
        return Snapshot(obj.state_dict())
    return obj


def unsharded(model: torch.nn.Module, main: bool) -> torch.nn.Module | None:
    """A plain copy of a sharded diffusers model with its whole weights, on the main rank (None elsewhere); every
    rank must call it (the gather is a collective)."""
    state = FullModel(model).state_dict()
    if not main:
        return None
    plain = getattr(model, "plain_class", type(model)).from_config(copy.deepcopy(dict(model.config)))
    plain.load_state_dict(state)
    return plain.eval()


def is_sharded(obj: Any) -> bool:
    return isinstance(obj, (FullModel, FullOptimizer))


def write_shards(output_dir: Path, step: int, objects: dict[str, Any], accelerator) -> Path | None:
    """Every rank writes its shards of the sharded `objects` (DCP, into one folder beside the checkpoints; a
    collective); returns that folder, which `formats.checkpoint.save_checkpoint` moves into the checkpoint."""
    import torch.distributed.checkpoint as dcp

    states = {name: obj.shards() for name, obj in objects.items() if is_sharded(obj)}
    if not states:
        return None
    folder = checkpoints_dir(output_dir) / f".shards-{step:07d}.tmp"
    if accelerator.is_main_process:  # what a killed save left
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    accelerator.wait_for_everyone()
    dcp.save(states, checkpoint_id=folder)
    accelerator.wait_for_everyone()
    return folder


def _read_shards(path: Path, name: str, state: dict[str, Any]) -> dict[str, Any]:
    """`state` (this rank's shards, as `shards()` gives them) filled from the checkpoint's DCP folder: DCP reads
    each rank's part whatever the number of ranks that wrote it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    wrapped = {name: state}
    try:
        dcp.load(wrapped, checkpoint_id=path / SHARDED)
    except CheckpointException as err:  # a BaseException: the trainer's one-line errors catch RuntimeErrors
        raise RuntimeError(f"its {name} shards do not fit this run: {first_line(err)}") from None
    return wrapped[name]
