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
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from latentgen.errors import first_line
from latentgen.formats.checkpoint import SHARDED, checkpoints_dir
from latentgen.runtime.precision import DTYPES

OPTIONS: dict[str, Any] = {"full_state_dict": True, "cpu_offload": True}


def shard(unet: torch.nn.Module, config=None) -> torch.nn.Module:
    """The U-Net sharded in place over the process group's ranks (FSDP2), with the `distributed` section's
    policies: `param_dtype` (the dtype shards are gathered and computed in; gradients are reduced in fp32) and
    `offload` (a GPU's shards and optimizer state in CPU memory between uses)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    policies: dict[str, Any] = {}
    if config is not None and config.param_dtype != "fp32":
        policies["mp_policy"] = MixedPrecisionPolicy(param_dtype=DTYPES[config.param_dtype],
                                                     reduce_dtype=torch.float32)
    policies["offload_policy"] = CPUOffloadPolicy() if config is not None and config.offload else OffloadPolicy()
    unet.plain_class = type(unet)  # fully_shard swaps the class for an FSDP subclass
    for unit in units(unet):
        fully_shard(unit, **policies)
    fully_shard(unet, **policies)
    return unet


def units(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """FSDP's units of a U-Net, inner ones first: each transformer block, then each down, mid and up block (with
    what is left of it). A level is not one unit: SDXL's first up block holds 1.2B of its 2.6B parameters (three
    transformers of 10 blocks), which one unit would gather whole on every GPU; a transformer block holds 10M or 35M
    (at 640 and 1280 channels; counted on the meta device with `bench/sdxl_plan.py`'s SDXL_UNET)."""
    blocks = [b for b in [*unet.down_blocks, unet.mid_block, *unet.up_blocks] if b is not None]
    inner = [m for b in blocks for m in b.modules() if type(m).__name__ == "BasicTransformerBlock"]
    return inner + blocks


def resident(model: torch.nn.Module) -> int:
    """How many of the model's parameters this rank holds (its shards' elements)."""
    return sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())


def _options(**more):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**(OPTIONS | more))


def _partly_frozen(model: torch.nn.Module) -> bool:
    """A LoRA's base: checkpoints hold only what trains (as `formats.checkpoint` keeps a LoRA run's)."""
    return any(not p.requires_grad for p in model.parameters())


class FullModel:
    """A sharded model as a checkpoint holds it: `state_dict()` gathers whole tensors (a collective: every rank calls
    it), `load_state_dict` takes whole tensors and keeps this rank's shards; `shards()` is this rank's part, as DCP
    writes it."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def shards(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(
            ignore_frozen_params=_partly_frozen(self.model)))

    def load_checkpoint(self, path: Path, name: str) -> None:
        """From checkpoint folder `path`: its DCP shards (`sharded/`) if it has them, else `{name}.safetensors`."""
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if not (path / SHARDED).is_dir():
            return self.load_state_dict(load_file(str(path / f"{name}.safetensors")))
        set_model_state_dict(self.model, _read_shards(path, name, self.shards()),
                             options=StateDictOptions(strict=not _partly_frozen(self.model)))

    def state_dict(self, everything: bool = False) -> dict[str, torch.Tensor]:
        """Whole tensors of what trains (`everything`: of every parameter and buffer)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        frozen = _partly_frozen(self.model) and not everything
        return get_model_state_dict(self.model, options=_options(ignore_frozen_params=frozen))

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        trainable = {k for k, p in self.model.named_parameters() if p.requires_grad}
        if _partly_frozen(self.model) and set(state) != trainable:
            raise ValueError(f"it holds other trainable weights than this run's ({len(state)} tensors, this run "
                             f"trains {len(trainable)}): was it made with another LoRA config?")
        set_model_state_dict(self.model, state, options=StateDictOptions(
            full_state_dict=True, strict=not _partly_frozen(self.model)))


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


class FullEMA:
    """The EMA of a sharded model (diffusers' EMAModel over its sharded parameters: each rank averages its own
    shards) as a checkpoint holds it: `state_dict()` gathers whole shadow tensors (a collective), `load_state_dict`
    keeps this rank's part of them; `shards()` is this rank's part, as DCP writes it."""

    def __init__(self, ema):
        self.ema = ema
        ema.foreach = False  # DTensor has no sharding rule for _foreach_copy_ (copy_to), only per-tensor copies

    def state_dict(self) -> dict:
        return self.ema.state_dict() | {"shadow_params": [_whole(s) for s in self.ema.shadow_params]}

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        mine = [distribute_tensor(full.to(s.device), s.device_mesh, s.placements, src_data_rank=None)
                if isinstance(s, DTensor) else full for full, s in zip(state["shadow_params"], self.ema.shadow_params)]
        self.ema.load_state_dict(state | {"shadow_params": mine})

    def shards(self) -> dict[str, Any]:
        return self.ema.state_dict() | {"shadow_params": {str(i): s for i, s in enumerate(self.ema.shadow_params)}}

    def load_checkpoint(self, path: Path, name: str, saved: dict) -> None:
        if not (path / SHARDED).is_dir():
            return self.load_state_dict(saved[name])
        state = _read_shards(path, name, self.shards())
        shadows = state["shadow_params"]
        self.ema.load_state_dict(state | {"shadow_params": [shadows[str(i)] for i in range(len(shadows))]})


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


@contextmanager
def swapped_in(ema, model: torch.nn.Module) -> Iterator[None]:
    """`model` with the EMA's weights (each rank its shards) inside the block, its own after; `ema` None: as it is."""
    if ema is None:
        yield
        return
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    try:
        yield
    finally:
        ema.restore(model.parameters())


def gathered(obj: Any) -> Any:
    """What a checkpoint writes of `obj`: a sharded model's, optimizer's or EMA's whole state (a collective), else
    `obj`."""
    if isinstance(obj, FullModel):
        return obj.state_dict()
    if isinstance(obj, (FullOptimizer, FullEMA)):
        return Snapshot(obj.state_dict())
    return obj


def unsharded(model: torch.nn.Module, main: bool, full: FullModel | None = None) -> torch.nn.Module | None:
    """A plain copy of a sharded diffusers model with its whole weights, on the main rank (None elsewhere); every
    rank must call it (the gather is a collective). `full`: how to gather them (FSDP2's by default)."""
    state = (full or FullModel(model)).state_dict(everything=True)
    if not main:
        return None
    plain = getattr(model, "plain_class", type(model)).from_config(copy.deepcopy(dict(model.config)))
    for name, config in getattr(model, "peft_config", {}).items():  # a LoRA's layers, to take its weights
        plain.add_adapter(copy.deepcopy(config), adapter_name=name)
    plain.load_state_dict(state)
    return plain.eval()


@torch.no_grad()
def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """torch's `clip_grad_norm_` over a sharded model's DTensors and plain tensors together (a text encoder trained
    beside it), which torch's cannot mix: the global norm of every gradient, each DTensor's norm taken over all its
    shards (a collective), then every gradient scaled by max_norm / (norm + 1e-6) where that is below 1."""
    norms = [_whole(torch.linalg.vector_norm(p.grad)) for p in params if p.grad is not None]
    total = torch.linalg.vector_norm(torch.stack(norms).float())
    scale = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))
    for p in params:
        if p.grad is not None:
            p.grad.mul_(scale)
    return total


def is_sharded(obj: Any) -> bool:
    return isinstance(obj, (FullModel, FullOptimizer, FullEMA))


def write_shards(output_dir: Path, step: int, objects: dict[str, Any], accelerator) -> Path | None:
    """Every rank writes its shards of the sharded `objects` (DCP, into one folder beside the checkpoints; a
    collective); returns that folder, which `formats.checkpoint.save_checkpoint` moves into the checkpoint."""
    import torch.distributed.checkpoint as dcp

    states = {name: obj.shards() for name, obj in objects.items() if is_sharded(obj)}
    if not states:
        return None
    return written_by_every_rank(output_dir, step, accelerator, lambda folder: dcp.save(states, checkpoint_id=folder))


def written_by_every_rank(output_dir: Path, step: int, accelerator, write) -> Path:
    """A fresh folder beside the checkpoints that `write(folder)` fills on every rank (a collective: DCP's or
    DeepSpeed's shards); returned once all have written, for `formats.checkpoint.save_checkpoint` to move in."""
    folder = checkpoints_dir(output_dir) / f".shards-{step:07d}.tmp"
    if accelerator.is_main_process:  # what a killed save left
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    accelerator.wait_for_everyone()
    write(folder)
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
