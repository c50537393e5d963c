"""Processes: the one accelerate state of a run, created first and in one place, and CPU data parallelism
under `accelerate launch --cpu --num_processes N` made real.

accelerate decides at the first `PartialState` of a process whether it is one rank of a group. Created without
`cpu=True` on a machine with no GPU, that state is a lone process even under torchrun, and every later
`Accelerator(cpu=True)` inherits it. So the scripts create the state through `process_state()` before anything
else asks for it, with the CPU flag decided here.

A second trap is in accelerate's launcher itself: with `--cpu`, a MULTI_CPU config, or no `--multi_gpu`, and no
MPI host file, it runs the script once, whatever `--num_processes` says, setting only MASTER_ADDR/MASTER_PORT.
`relaunch_cpu_ranks` recognises that situation, reads the launch command from the parent process with
accelerate's own parser, and starts the asked-for ranks with torch's elastic launcher (torchrun), which the GPU
launcher uses too.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from latentgen.errors import UserError
from latentgen.validate import random_seed

_WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def fsdp_requested() -> bool:
    """Whether `accelerate launch` asked for FSDP (`--use_fsdp`, or `distributed_type: FSDP` in its config)."""
    return _flag("ACCELERATE_USE_FSDP")


def deepspeed_requested() -> bool:
    """Whether `accelerate launch` asked for DeepSpeed (`--use_deepspeed`, or `distributed_type: DEEPSPEED`)."""
    return _flag("ACCELERATE_USE_DEEPSPEED")


def check_launch_request(gradient_accumulation_steps: int, shards: bool = False, zero: bool = False) -> None:
    """What `accelerate launch` asked for that the trainers do not do is a one-line error, not silently plain data
    parallel: accelerate switches to FSDP or DeepSpeed only for GPUs, so on the CPU their flags would pass
    unnoticed, and its --gradient_accumulation_steps would disagree with the config's. A trainer that `shards`
    (FSDP2 of its own, `training.sharded`) takes an FSDP launch: accelerate is then told to run the processes
    plainly and the trainer shards. A trainer that takes `zero` (train_unet.py: `training.zero`) takes a DeepSpeed
    launch, which accelerate runs."""
    if shards and fsdp_requested():
        os.environ.pop("ACCELERATE_USE_FSDP")
    refused = [("ACCELERATE_USE_FSDP", "FSDP (--use_fsdp or distributed_type: FSDP)"),
               ("ACCELERATE_USE_MEGATRON_LM", "Megatron-LM")]
    if not zero:
        refused.insert(1, ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"))
    for flag, what in refused:
        if _flag(flag):
            raise UserError(f"{what} was asked for, but this trainer runs data parallel (train_unet.py also "
                            "DeepSpeed ZeRO, and FSDP2 of its own: distributed.strategy: fsdp shards parameters, "
                            "gradients and AdamW state as ZeRO-3 does); launch without it (accelerate launch "
                            "--multi_gpu, or --cpu)")
    if zero and deepspeed_requested() and not torch.cuda.is_available() and world_size() > 1:
        # tried: under `accelerate launch --use_deepspeed --num_processes 2` on a machine without a GPU, DeepSpeed
        # joins both ranks over gloo but accelerate's state counts one process, so each rank would train alone
        raise UserError(f"DeepSpeed through accelerate runs {world_size()} processes on GPUs only (on the CPU "
                        "accelerate counts its ranks as one); on the CPU shard with distributed.strategy: fsdp, or "
                        "launch one process")
    steps = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    if steps is not None and steps != str(gradient_accumulation_steps):
        raise UserError(f"accelerate launch --gradient_accumulation_steps {steps} disagrees with the config's "
                        f"{gradient_accumulation_steps}; set it in the config (gradient_accumulation_steps={steps})")


def world_size() -> int:
    """The number of processes the launcher started (1 without a launcher)."""
    return max(int(os.environ.get(v, "1")) for v in _WORLD_SIZE_VARS)


def use_cpu() -> bool:
    """True when the run is on the CPU: no CUDA here, or `accelerate launch --cpu` asked for it."""
    return not torch.cuda.is_available() or _flag("ACCELERATE_USE_CPU")


def accelerate_cpu() -> bool:
    """The `cpu` flag for accelerate: `use_cpu()`, except under a DeepSpeed launch, which accelerate starts only
    without it (a one-process run on a machine without a GPU then runs DeepSpeed on the CPU)."""
    return use_cpu() and not deepspeed_requested()


def process_state():
    """accelerate's PartialState for this process, created with the right device flag (see the module doc)."""
    from accelerate import PartialState

    return PartialState(cpu=accelerate_cpu())


def describe(state) -> str:
    """'process 1 of 2 (MULTI_CPU, gloo)': what each rank prints at the start of a run."""
    kind = str(state.distributed_type).split(".")[-1]
    backend = f", {state.backend}" if state.backend else ""
    return f"process {state.process_index} of {state.num_processes} ({kind}{backend})"


def shared_random_seed(state) -> int:
    """A random seed, the same on every rank (rank 0's): a run's image k gets seed + k whichever rank draws it,
    and its file names agree across the ranks (the grid reads them all)."""

    seed = [random_seed()]
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(seed, from_process=0)
    return seed[0]


def say(line: str, stream=None) -> None:
    """One line from one rank, in one write: print() writes the text and the newline separately, so two ranks
    sharing a pipe can interleave their lines."""
    stream = stream or sys.stdout
    stream.write(line + "\n")
    stream.flush()


# ----------------------------------------------------------------------------------------------------------------
# accelerate launch --cpu --num_processes N


def _launched_alone_by_accelerate() -> bool:
    """accelerate's simple launcher sets MASTER_ADDR only when more than one process or machine was asked for;
    a launcher that really starts ranks also sets one of the world-size variables. (The parent process is then
    checked to be `accelerate launch`.)"""
    return "MASTER_ADDR" in os.environ and not any(v in os.environ for v in _WORLD_SIZE_VARS)


def _parent_launch_args() -> list[str] | None:
    """The arguments of the `accelerate launch` command that started this process (Linux: /proc), or None."""
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return None
    argv = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    for i, arg in enumerate(argv):
        if arg == "accelerate.commands.launch" or (arg == "launch" and i > 0 and "accelerate" in argv[i - 1]):
            return argv[i + 1:]
    return None


def _requested_topology(launch_args: list[str]) -> tuple[int, int, int, str, int]:
    """(processes, machines, machine rank, main address, port) from launch flags, then the accelerate config."""
    from accelerate.commands.launch import launch_command_parser

    args, _ = launch_command_parser().parse_known_args(launch_args)
    defaults = None
    if args.config_file is not None:
        from accelerate.commands.config.config_args import load_config_from_file

        defaults = load_config_from_file(args.config_file)

    def pick(name: str, fallback):
        value = getattr(args, name, None)
        if value is None and defaults is not None:
            value = getattr(defaults, name, None)
        return fallback if value is None else value

    return (int(pick("num_processes", 1)), int(pick("num_machines", 1)), int(pick("machine_rank", 0)),
            str(pick("main_process_ip", os.environ["MASTER_ADDR"])),
            int(pick("main_process_port", os.environ.get("MASTER_PORT", 29500))))


def relaunch_cpu_ranks(argv: list[str] | None = None) -> None:
    """Under `accelerate launch [--cpu] --num_processes N` (N > 1) started once, replace this lone process by N
    ranks.

    The current process becomes torch's elastic launcher (exec keeps its pid, so accelerate's launcher waits on
    it and gets its exit code); each rank then runs the same script with RANK/WORLD_SIZE set and forms one gloo
    group through `process_state()`. Does nothing in every other situation.
    """
    if not _launched_alone_by_accelerate():
        return
    launch_args = _parent_launch_args()
    if launch_args is None:
        return
    processes, machines, machine_rank, address, port = _requested_topology(launch_args)
    if processes <= 1 and machines <= 1:
        return
    if processes % machines:
        raise UserError(f"--num_processes {processes} is not a multiple of --num_machines {machines}")
    script = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    command = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={machines}",
               f"--node_rank={machine_rank}", f"--nproc_per_node={processes // machines}",
               f"--master_addr={address}", f"--master_port={port}", *script]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, command)
