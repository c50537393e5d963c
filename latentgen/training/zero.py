"""DeepSpeed ZeRO for train_unet.py through accelerate (issue #47): `accelerate launch --use_deepspeed --zero_stage
N train_unet.py ...`, or an accelerate config with `distributed_type: DEEPSPEED` and its `deepspeed_config`.

accelerate builds DeepSpeed's engine around the U-Net (or its LoRA) and AdamW; `accelerator.backward` runs the
engine's backward and step, which reduce (stage 2: reduce-scatter) the gradients, clip them and step AdamW on
this rank's partition. What the run's config says is what DeepSpeed is told: the micro-batch is
`train_batch_size`, accumulation `gradient_accumulation_steps`, clipping `max_grad_norm`; a DeepSpeed config that
says otherwise is a one-line error.

Checkpoints: the optimizer's partitions (and, at stage 3, the weights' partitions) are DeepSpeed's: every rank
writes its part with the engine's `save_checkpoint` into the checkpoint's `sharded/`, and a resumed run loads them
with `load_checkpoint` (DeepSpeed's files are torch pickles, read with `weights_only=False` by DeepSpeed itself:
resume only from checkpoints your own runs wrote). Beside them the checkpoint keeps the whole fp32 weights in
safetensors, as every other run's, and the final pipeline is a normal diffusers folder of the fp32 master weights
(`safe_get_full_fp32_param`), not of the 16-bit copies the engine computes with.

Not taken with DeepSpeed (one-line errors): EMA (at stage 3 or in 16 bits the module's weights are partitions or
rounded copies, not what EMA should average; FSDP2 keeps an EMA sharded), a trained text encoder (it stays outside
the engine), and `distributed.strategy: fsdp`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from latentgen.errors import UserError, first_line
from latentgen.formats.checkpoint import SHARDED, ZERO
from latentgen.training.sharded import FullModel, written_by_every_rank


def check(config) -> None:
    """A DeepSpeed launch that this run cannot honour: a one-line error before any model loads."""
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise UserError("DeepSpeed was asked for (accelerate launch --use_deepspeed) but is not installed: pip "
                        "install deepspeed (or 'latentgen[deepspeed]')") from None
    asked = {"distributed.strategy: fsdp": config.distributed.strategy == "fsdp", "ema": config.ema,
             "text_encoder.train": config.text_encoder.train, "lora.text_encoder": config.lora.text_encoder}
    for what, yes in asked.items():
        if yes:
            raise UserError(f"{what} does not run under DeepSpeed here (its EMA and text encoders stay outside the "
                            "engine); train with distributed.strategy: fsdp (accelerate launch --multi_gpu), which "
                            f"shards as ZeRO-3 does, or without {what.split(':')[0]}")


def stage_asked() -> int:
    """The ZeRO stage the launch asks for, before accelerate reads it (for the memory guard): its DeepSpeed config
    file's, else `--zero_stage` (accelerate's default 2)."""
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if path != "none":
        try:
            return int(json.loads(Path(path).read_text()).get("zero_optimization", {}).get("stage", 0))
        except (OSError, ValueError, AttributeError) as err:
            raise UserError(f"cannot read the DeepSpeed config {path}: {first_line(err)}") from None
    return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 2))


def configure(accelerator, config) -> int:
    """Tell DeepSpeed the run's micro-batch, accumulation and clipping (before `prepare`); returns the ZeRO
    stage."""
    plugin = accelerator.state.deepspeed_plugin
    ds = plugin.deepspeed_config
    for key, ours, setting in (("train_micro_batch_size_per_gpu", config.train_batch_size, "train_batch_size"),
                               ("gradient_accumulation_steps", config.gradient_accumulation_steps,
                                "gradient_accumulation_steps"),
                               ("gradient_clipping", config.max_grad_norm, "max_grad_norm")):
        theirs = ds.get(key, "auto")
        if theirs not in ("auto", None) and float(theirs) != float(ours):
            raise UserError(f"the DeepSpeed config's {key} {theirs} disagrees with the run's {setting} {ours}; set "
                            f"it in the training config ({setting}={theirs}) or to auto")
        ds[key] = ours
    ds.pop("train_batch_size", None)  # DeepSpeed derives it: micro-batch × accumulation × ranks
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def autocast(accelerator):
    """The context the U-Net computes in: accelerate's autocast, except under DeepSpeed in 16 bits, where
    accelerate leaves autocast off (the engine holds the module in bf16/fp16) and the fp32 latents and text states
    would meet 16-bit weights: there torch's autocast in the engine's dtype, which casts them per operation."""
    if str(accelerator.distributed_type).endswith("DEEPSPEED"):
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        for key, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            if ds.get(key, {}).get("enabled") is True:
                return torch.autocast(accelerator.device.type, dtype=dtype)
    return accelerator.autocast()


class ZeroModel(FullModel):
    """A model inside DeepSpeed's engine as a checkpoint holds it: `state_dict()` is its whole fp32 weights (a
    collective: every rank calls it); loading a checkpoint is the engine's (weights and optimizer together)."""

    def __init__(self, model: torch.nn.Module, engine):
        super().__init__(model)
        self.engine = engine

    def state_dict(self, everything: bool = False) -> dict[str, torch.Tensor]:
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        model = self.model
        with deepspeed.zero.GatheredParameters(list(model.parameters())):  # stage 3: whole inside; else nothing
            state = {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}
        trainable = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                master = safe_get_full_fp32_param(p)  # the optimizer's fp32 weight (None without a ZeRO optimizer)
                trainable[name] = state[name] if master is None else master.detach().float().cpu().clone()
        if len(trainable) < len(state) and not everything:  # a LoRA's base: what trains only
            return trainable
        return state | trainable

    def load_checkpoint(self, path: Path, name: str) -> None:
        if not (path / SHARDED / ZERO).is_dir():
            raise ValueError("it has no DeepSpeed states (sharded/): it was not written by a DeepSpeed run")
        loaded, _ = self.engine.load_checkpoint(str(path / SHARDED), tag=ZERO, load_optimizer_states=True,
                                                load_lr_scheduler_states=False, load_module_strict=False)
        if loaded is None:
            raise ValueError("DeepSpeed could not read its states in sharded/")

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError("a DeepSpeed run loads its weights with its optimizer (load_checkpoint)")


def write_shards(output_dir: Path, step: int, engine, accelerator) -> Path:
    """Every rank writes its partitions with the engine's `save_checkpoint` into one folder beside the checkpoints
    (a collective); returns it, for `formats.checkpoint.save_checkpoint` to move into the checkpoint."""
    return written_by_every_rank(output_dir, step, accelerator,
                                 lambda folder: engine.save_checkpoint(str(folder), tag=ZERO, save_latest=False))


def engine_of(models: dict[str, Any]):
    """The DeepSpeed engine of a run's checkpointed models, or None."""
    return next((m.engine for m in models.values() if isinstance(m, ZeroModel)), None)
