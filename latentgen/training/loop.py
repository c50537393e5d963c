"""What both trainers share: the run config, the `Run` around their loops (accelerate, resume, logging,
checkpoints, validation), deterministic batches and randomness, optimizer, LR schedule and EMA.

A trainer's loop reads top to bottom in the trainer itself (`training/unet.py`, `training/vae.py`):

    run = Run(config, "train_unet")          # joins the process group, finds the resume point, seeds torch
    ...                                      # models and data, checked
    accelerator = run.launch()
    ...                                      # optimizer, schedule, EMA, accelerator.prepare
    start = run.resume(models, states, validate)
    for step in range(start, config.max_steps):
        for micro in range(accum):           # forward, backward, optimizer step, run.averages.add(loss=...)
            ...
        lr_scheduler.step(); ema.step(...)
        run.end_step(step + 1)               # progress, logging, checkpoint and validation when due
    if run.finish(samples_per_step):         # final checkpoint; True in the process that saves the model
        ...
    run.close()

Exact resume rests on one idea: every random draw of a step (data order, augmentation, noise, timesteps,
dropout, caption dropout) comes from a generator seeded by (seed, step, micro-batch, rank). Nothing random
carries over from one step to the next, so a checkpoint needs only the weights, optimizer, LR schedule, EMA and
scaler, and a resumed run replays exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from latentgen.config import to_yaml
from latentgen.data.sources import DataConfig, StreamingImageTextDataset
from latentgen.errors import UserError, one_of
from latentgen.formats.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from latentgen.io import write_text
from latentgen.runtime.device import ATTENTION, peak_memory_mb
from latentgen.runtime.distributed import (
    accelerate_cpu,
    check_launch_request,
    describe,
    process_state,
    say,
    use_cpu,
)
from latentgen.runtime.precision import mixed_precision
from latentgen.runtime.precision import mixed_precision as resolve
from latentgen.training import sharded, zero

MIXED_PRECISION = ("auto", "fp32", "bf16", "fp16")  # not "no": YAML reads that as false
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


STRATEGIES = ("ddp", "fsdp")


@dataclass
class DistributedConfig:
    # ddp: every rank holds the whole model (accelerate's data parallel); fsdp: parameters, gradients and optimizer
    # state sharded over the ranks (FSDP2, `training.sharded`)
    strategy: str = "ddp"
    # fsdp's checkpoints: whole (tensors gathered, written by rank 0 as every other run's) or sharded (each rank
    # writes its shards with torch.distributed.checkpoint; loads at any number of ranks)
    checkpoint: str = "whole"
    # fsdp: the dtype shards are gathered and computed in (FSDP2's MixedPrecisionPolicy; gradients reduced in fp32,
    # the shards and AdamW stay fp32): fp32, bf16 or fp16
    param_dtype: str = "fp32"
    offload: bool = False  # fsdp on GPUs: shards, gradients and AdamW state in CPU memory between uses


@dataclass
class TrainConfig:
    """Settings every training run has; `train_vae.py` and `train_unet.py` add their own."""

    output_dir: str = "runs/run"
    seed: int = 0
    max_steps: int = 1000
    train_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant_with_warmup"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    use_8bit_adam: bool = False
    max_grad_norm: float = 1.0
    mixed_precision: str = "auto"  # auto: bf16 where the hardware has fast bf16, else fp32
    gradient_checkpointing: bool = False
    attention: str = "auto"  # auto, sdpa, math or xformers (see latentgen.runtime.device.set_attention)
    ema: bool = False
    ema_decay: float = 0.999
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    resume_from: str | None = None  # "latest" or a checkpoint folder
    log_every: int = 10
    validate_every: int = 0  # 0: validate only at the end
    # the experiment trackers (accelerate's): tensorboard, wandb (offline unless WANDB_MODE says otherwise), mlflow,
    # aim, comet_ml, clearml, dvclive, swanlab, trackio; several comma-separated; "none": no tracker
    log_with: str = "tensorboard"
    num_workers: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def check(self) -> None:
        positive = ("max_steps", "train_batch_size", "gradient_accumulation_steps", "checkpoint_every",
                    "keep_checkpoints", "log_every")
        for name in positive:
            value = getattr(self, name)
            if value < 1:
                raise UserError(f"{name} must be ≥ 1, got {value}")
        for name in ("lr_warmup_steps", "validate_every", "num_workers"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be ≥ 0, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise UserError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise one_of("mixed_precision", self.mixed_precision, list(MIXED_PRECISION))

        if self.attention not in ATTENTION:
            raise one_of("attention", self.attention, list(ATTENTION))
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise one_of("lr_scheduler", self.lr_scheduler, list(LR_SCHEDULERS))
        trackers(self.log_with)  # checked here, before any model loads
        if self.distributed.strategy not in STRATEGIES:
            raise one_of("distributed.strategy", self.distributed.strategy, list(STRATEGIES))
        if self.distributed.checkpoint not in ("whole", "sharded"):
            raise one_of("distributed.checkpoint", self.distributed.checkpoint, ["whole", "sharded"])
        if self.distributed.param_dtype not in ("fp32", "bf16", "fp16"):
            raise one_of("distributed.param_dtype", self.distributed.param_dtype, ["fp32", "bf16", "fp16"])
        sharding = {"checkpoint": self.distributed.checkpoint != "whole", "offload": self.distributed.offload,
                    "param_dtype": self.distributed.param_dtype != "fp32"}
        if any(sharding.values()) and self.distributed.strategy != "fsdp":
            key = next(k for k, asked in sharding.items() if asked)
            raise UserError(f"distributed.{key} is a setting of sharded training: set distributed.strategy: fsdp")


# ----------------------------------------------------------------------------------------------------------------
# accelerate


def compute_bytes(config: TrainConfig) -> int:
    """Bytes per activation element under the run's mixed precision (for the memory guard, before accelerate)."""

    return 2 if mixed_precision(config.mixed_precision, use_cpu())[0] in ("bf16", "fp16") else 4


TRACKERS = ("tensorboard", "wandb", "mlflow", "aim", "comet_ml", "clearml", "dvclive", "swanlab", "trackio")


def trackers(log_with: str) -> list[str]:
    """The trackers `log_with` names ("none": none), each installed, or a one-line error saying what to install."""
    import accelerate.utils.imports as available

    names = [n.strip() for n in str(log_with).split(",") if n.strip()]
    if names == ["none"]:
        return []
    for name in names:
        if name not in TRACKERS:
            raise one_of("log_with", name, [*TRACKERS, "none"])
        if not getattr(available, f"is_{name}_available")():
            raise UserError(f"log_with: {name} is not installed; pip install {name.replace('_', '-')} (or log with "
                            "tensorboard, the default)")
    if "wandb" in names:
        os.environ.setdefault("WANDB_MODE", "offline")  # no internet here: runs sync later with `wandb sync`
    return names


def make_accelerator(config: TrainConfig, project: str):
    """The run's Accelerator, created before anything else asks accelerate about processes, so that every rank
    of `accelerate launch` (or torchrun) joins one group; each rank says which it is."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    if config.distributed.strategy == "fsdp" and project != "train_unet":
        raise UserError(f"{project} trains data parallel only; distributed.strategy fsdp shards train_unet.py's "
                        "U-Net, LoRA and upscaler runs: set distributed.strategy: ddp")
    check_launch_request(config.gradient_accumulation_steps, config.distributed.strategy == "fsdp",
                         zero=project == "train_unet")
    cpu = accelerate_cpu()
    mixed_precision, source = resolve(config.mixed_precision, use_cpu())
    state = process_state()
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=trackers(config.log_with) or None,
        project_config=ProjectConfiguration(project_dir=config.output_dir,
                                            logging_dir=str(Path(config.output_dir) / "logs")),
        cpu=cpu,
    )
    kind = str(accelerator.distributed_type).split(".")[-1]
    if kind in ("FSDP", "MEGATRON_LM") or (kind == "DEEPSPEED" and project != "train_unet"):
        raise UserError(f"{project} runs data parallel (DDP) only, not {kind}: its checkpoints hold whole weights; "
                        "launch with --multi_gpu (or --cpu) instead")
    say(f"{project}: {describe(state)}")
    accelerator.print(f"{project}: mixed precision {mixed_precision} ({source})")
    if accelerator.is_main_process and accelerator.log_with:
        accelerator.init_trackers(project, config=flat_scalars(config))
    return accelerator


def save_run_config(accelerator, config: TrainConfig) -> None:
    """The full config of the run, beside its checkpoints (enough to rebuild and rerun it)."""
    if accelerator.is_main_process:

        write_text(Path(config.output_dir) / "train_config.yaml", to_yaml(config))


def flat_scalars(config: Any, prefix: str = "") -> dict[str, Any]:
    """A config as {dotted.key: scalar} (TensorBoard's hparams take only scalars)."""
    from dataclasses import fields, is_dataclass

    out: dict[str, Any] = {}
    for f in fields(config):
        value = getattr(config, f.name)
        key = prefix + f.name
        if is_dataclass(value):
            out.update(flat_scalars(value, key + "."))
        elif isinstance(value, (int, float, str, bool)):
            out[key] = value
        elif value is not None:
            out[key] = str(value)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Deterministic randomness and batches


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(1)[0])


def step_generator(seed: int, step: int, micro: int, rank: int, device: torch.device) -> torch.Generator:
    """The generator for one micro-batch; also reseeds torch's global RNG (dropout inside the models)."""
    s = step_seed(seed, step, micro, rank)
    torch.manual_seed(s)
    return torch.Generator(device=device).manual_seed(s)


class StepBatches(torch.utils.data.Sampler):
    """The index batches of micro-steps `start`, `start+1`, ... for one rank: exact, resumable data order.

    Micro-step m of rank r takes positions [(m·W + r)·B, (m·W + r + 1)·B) of the epoch's permutation, seeded by
    (seed, epoch). An epoch holds the largest multiple of W·B samples that fits, so a batch never spans epochs.
    """

    def __init__(self, size: int, batch_size: int, world: int, rank: int, seed: int, start: int = 0):
        self.size, self.batch_size, self.world, self.rank = size, batch_size, world, rank
        self.seed, self.start = seed, start
        self.per_epoch = size // (batch_size * world) * batch_size * world
        if self.per_epoch == 0:
            raise UserError(f"the dataset has {size} usable samples, fewer than one step needs "
                            f"(train_batch_size {batch_size} × {world} process(es)); lower train_batch_size")

    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        micro, cached_epoch, perm = self.start, -1, None
        while True:
            position = (micro * self.world + self.rank) * self.batch_size
            epoch, offset = divmod(position, self.per_epoch)
            if epoch != cached_epoch:
                perm, cached_epoch = self.permutation(epoch), epoch
            yield [(int(i), epoch) for i in perm[offset:offset + self.batch_size]]
            micro += 1

    def __len__(self) -> int:  # infinite; DataLoader only needs this for its own bookkeeping
        return 2**62


class BucketBatches(StepBatches):
    """StepBatches for aspect-ratio buckets (`data.buckets`): each epoch, every bucket's images are shuffled and
    cut into whole batches (kohya's: a bucket's last partial batch waits for the next epoch), the batches of all
    buckets shuffled together, seeded by (seed, epoch); micro-step m of rank r takes batch m·W + r. An epoch holds
    the largest multiple of W batches there are, so the ranks' steps stay in step, and a resumed run draws what an
    uninterrupted one would."""

    def __init__(self, bucket_of: list[int], batch_size: int, world: int, rank: int, seed: int, start: int = 0):
        self.bucket_of = np.asarray(bucket_of)
        self.size, self.batch_size, self.world, self.rank = len(bucket_of), batch_size, world, rank
        self.seed, self.start = seed, start
        counts = np.bincount(self.bucket_of)
        self.per_epoch = int((counts // batch_size).sum()) // world * world  # batches, not samples
        if self.per_epoch == 0:
            raise UserError(f"no aspect-ratio bucket holds train_batch_size ({batch_size}) × {world} process(es) "
                            f"images (the fullest holds {counts.max()}); lower train_batch_size or widen "
                            "data.bucket_step")

    def batches(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        out = []
        for bucket in np.unique(self.bucket_of):
            members = rng.permutation(np.flatnonzero(self.bucket_of == bucket))
            out += [members[i:i + self.batch_size] for i in range(0, len(members) - self.batch_size + 1,
                                                                   self.batch_size)]
        return [out[i] for i in rng.permutation(len(out))][:self.per_epoch]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        micro, cached_epoch, batches = self.start, -1, None
        while True:
            epoch, offset = divmod(micro * self.world + self.rank, self.per_epoch)
            if epoch != cached_epoch:
                batches, cached_epoch = self.batches(epoch), epoch
            yield [(int(i), epoch) for i in batches[offset]]
            micro += 1


def step_batches(dataset, config: TrainConfig, world: int, rank: int, start_micro: int = 0) -> StepBatches:
    """The index batches of this rank: by aspect-ratio bucket when the dataset has buckets, else StepBatches."""
    bucket_of = getattr(dataset, "bucket_of", None)
    if bucket_of is not None:
        return BucketBatches(bucket_of, config.train_batch_size, world, rank, config.seed, start_micro)
    return StepBatches(len(dataset), config.train_batch_size, world, rank, config.seed, start_micro)


class EpochItems(torch.utils.data.Dataset):
    """Adapts a dataset with `item(index, epoch, seed)` to the (index, epoch) pairs StepBatches yields."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, epoch = key
        return self.dataset.item(index, epoch, self.seed)


def batch_iterator(dataset, config: TrainConfig, world: int, rank: int, start_micro: int) -> Iterator[dict]:
    """Micro-batches from micro-step `start_micro` on, for this rank."""
    if isinstance(dataset, StreamingImageTextDataset):
        yield from _stream_batches(dataset, config, world, rank, start_micro)
        return
    sampler = step_batches(dataset, config, world, rank, start_micro)
    loader = torch.utils.data.DataLoader(EpochItems(dataset, config.seed), batch_sampler=sampler,
                                         num_workers=config.num_workers, persistent_workers=config.num_workers > 0)
    yield from loader


def _stream_batches(dataset: StreamingImageTextDataset, config: TrainConfig, world: int, rank: int,
                    start_micro: int) -> Iterator[dict]:
    """Streamed data: each rank reads its part of the stream (`iterate`'s split) in batches of B; resume skips the
    micro-batches this rank consumed."""
    from torch.utils.data import default_collate

    skip, epoch, group = start_micro * config.train_batch_size, 0, []
    while True:
        seen = 0
        for item in dataset.iterate(epoch, config.seed, rank, world):
            seen += 1
            if skip > 0:
                skip -= 1
                continue
            group.append(item)
            if len(group) == config.train_batch_size:
                yield default_collate(group)
                group = []
        if seen == 0:
            raise UserError("the streamed dataset yielded no readable rows" + (f" for rank {rank}" if world > 1
                                                                                 else ""))
        epoch += 1


# ----------------------------------------------------------------------------------------------------------------
# Optimization


def make_optimizer(params: Iterable[torch.nn.Parameter], config: TrainConfig,
                   *more: Iterable[torch.nn.Parameter]):
    """AdamW over `params` (and each of `more` as a parameter group of its own, with the same settings)."""
    groups = [list(params), *(list(g) for g in more)]
    params = [p for g in groups for p in g]
    if len(groups) > 1:
        params = [{"params": g} for g in groups if g]
    kwargs = dict(lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                  weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("use_8bit_adam needs bitsandbytes: pip install 'latentgen[cuda]'") from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    # torch's fused AdamW takes the step of its default per-tensor loop in one kernel over all the tensors (CPU
    # and CUDA): 4.4 against 18.8 ms a step for the default model's 324 U-Net tensors on a 2-core CPU
    # (`python bench/probes.py train-step`)
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for g in groups for p in g)
    return torch.optim.AdamW(params, **kwargs, fused=fused or None)


def make_lr_scheduler(optimizer, config: TrainConfig):
    from diffusers.optimization import get_scheduler

    return get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                         num_training_steps=config.max_steps)


def make_ema(model: torch.nn.Module, config: TrainConfig):
    from diffusers.training_utils import EMAModel

    # foreach: one multi-tensor update over all the tensors instead of a loop (3.6 against 4.8 ms, same probe)
    return EMAModel(model.parameters(), decay=config.ema_decay, model_cls=type(model), model_config=model.config,
                    foreach=True)


class Run:
    """One training run around the trainer's own loop: process group, resume, accelerate, and the bookkeeping
    after each optimizer step (progress bar, logging, checkpoints and validation at their intervals)."""

    def __init__(self, config: TrainConfig, name: str):

        self.state = process_state()  # first: this rank joins the launch's process group (runtime.distributed)
        self.config, self.name = config, name
        self.out = Path(config.output_dir)
        self.resume_from = resolve_resume(config.output_dir, config.resume_from)
        torch.manual_seed(config.seed)  # the initial weights
        self.accelerator = None
        self.averages = Averages()
        self.timer = StepTimer()
        self.validate_everywhere = False  # a sharded model's validation gathers it: every rank calls it

    def launch(self):
        """The run's Accelerator (after the models and data are checked), and the run's config beside it."""
        self.accelerator = make_accelerator(self.config, self.name)
        save_run_config(self.accelerator, self.config)
        return self.accelerator

    def resume(self, models: dict, states: dict, validate: Callable[[int], None]) -> int:
        """Remember what a checkpoint holds and how to validate; load the checkpoint to resume from, if any.
        Returns the first step to run."""
        from tqdm.auto import tqdm

        self.models, self.states, self.validate = models, states, validate
        start = 0
        if self.resume_from is not None:
            start = load_checkpoint(self.resume_from, models, states)["step"]
            self.accelerator.print(f"resumed from {self.resume_from} at step {start}")
        self.bar = tqdm(total=self.config.max_steps, initial=start, desc=self.name,
                        disable=not self.accelerator.is_local_main_process)
        self.timer.tick()
        return start

    def end_step(self, done: int) -> None:
        """After optimizer step number `done`: progress, then logging (the means of what the step added to
        `averages`), checkpoint and validation when due."""
        config, accelerator = self.config, self.accelerator
        self.timer.tick()
        self.bar.update(1)
        if done % config.log_every == 0 or done == config.max_steps:
            logs = self.mean_over_ranks(self.averages.pop()) | {"lr": self.states["lr_scheduler"].get_last_lr()[0]}
            accelerator.log(logs, step=done)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "psnr")})
        if done % config.checkpoint_every == 0 and done < config.max_steps:
            self.checkpoint(done)
        if config.validate_every and done % config.validate_every == 0 and (
                accelerator.is_main_process or self.validate_everywhere):
            self.validate(done)

    def mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        """Logged averages over every rank (one collective per log line, none per step)."""
        if self.accelerator.num_processes == 1 or not values:
            return values
        keys = sorted(values)
        means = self.accelerator.reduce(torch.tensor([values[k] for k in keys], device=self.accelerator.device),
                                        reduction="mean")
        return dict(zip(keys, means.tolist()))

    def checkpoint(self, step: int) -> None:
        # a sharded model's whole state is gathered on every rank (a collective), then rank 0 writes; or, with
        # distributed.checkpoint: sharded, every rank writes its shards (DCP) and rank 0 the rest
        shards = None
        models, states = self.models, self.states
        engine = zero.engine_of(models)
        if engine is not None:  # DeepSpeed's partitions, each rank its own; the whole weights below
            shards = zero.write_shards(self.out, step, engine, self.accelerator)
        elif self.config.distributed.checkpoint == "sharded":
            shards = sharded.write_shards(self.out, step, models | states, self.accelerator)
            models = {k: m for k, m in models.items() if not sharded.is_sharded(m)}
            states = {k: s for k, s in states.items() if not sharded.is_sharded(s)}
        models = {k: sharded.gathered(m) for k, m in models.items()}
        states = {k: sharded.gathered(s) for k, s in states.items()}
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            save_checkpoint(self.out, step, models, states, self.config.keep_checkpoints, shards)

    def finish(self, samples_per_step: int) -> bool:
        """The summary line and the final checkpoint; True in the process that writes the final model."""
        self.bar.close()
        self.accelerator.print(self.timer.summary(samples_per_step))
        if self.accelerator.num_processes > 1:  # each rank's own (sharding lowers it)
            say(f"{self.name}: peak memory {peak_memory_mb():.0f} MB on {describe(self.state)}")
        self.checkpoint(self.config.max_steps)
        return self.accelerator.is_main_process

    def close(self) -> None:
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()


class StepTimer:
    """Wall time of the training steps, for the run's summary line; the rate leaves out the first (warm-up) step.
    Ticks: the loop's start, then the end of each step."""

    def __init__(self):
        import time

        self.clock = time.perf_counter
        self.ticks: list[float] = []

    def tick(self) -> None:
        self.ticks.append(self.clock())

    def summary(self, samples_per_step: int) -> str:

        peak = peak_memory_mb()
        if len(self.ticks) < 3:
            return f"peak memory {peak:.0f} MB"
        rate = samples_per_step * (len(self.ticks) - 2) / (self.ticks[-1] - self.ticks[1])
        return (f"trained {len(self.ticks) - 1} steps in {self.clock() - self.ticks[0]:.1f} s: {rate:.1f} samples/s "
                f"(after the first step), peak memory {peak:.0f} MB")


class Averages:
    """Running means of logged values between two log lines."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, **values: float) -> None:
        for k, v in values.items():
            if v is None or (isinstance(v, float) and math.isnan(v)):
                continue
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
            self.counts[k] = self.counts.get(k, 0) + 1

    def pop(self) -> dict[str, float]:
        out = {k: self.sums[k] / self.counts[k] for k in self.sums}
        self.sums.clear()
        self.counts.clear()
        return out


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """`model` in eval mode inside the block; after it, every submodule's own mode comes back (a frozen part that
    was in eval mode stays there: `model.train()` would switch it too)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, mode in modes:
            module.training = mode


def log_image(accelerator, tag: str, image, step: int) -> None:
    """Log a PIL image to each tracker that takes images (main process)."""
    if not accelerator.is_main_process:
        return
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(tag, np.asarray(image), step, dataformats="HWC")
        elif hasattr(tracker, "log_images"):  # wandb, aim, comet_ml, clearml, ...: their own image types
            tracker.log_images({tag: [image]}, step=step)

