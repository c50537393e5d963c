"""Device and attention-kernel choice (`auto` picks what runs fastest on the hardware at hand); precision is in
`latentgen.runtime.precision`."""

from __future__ import annotations

from pathlib import Path

import torch

from latentgen.errors import UserError, one_of


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise one_of("device", name, ["auto", "cpu", "cuda"])
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} was asked for but this machine has no CUDA GPU; use --device cpu")
    return torch.device(name)


ATTENTION = ("auto", "sdpa", "math", "xformers")


def set_attention(model, kind: str, device: torch.device, training: bool = False) -> str:
    """Choose the attention kernel of a diffusers model; returns the one used.

    auto: xformers on CUDA when installed, else PyTorch SDPA; on the CPU the plain matmul-softmax kernel for
    training (the default model's training step: 138.5 against 86.2 samples/s with SDPA's CPU flash kernel,
    `python bench/probes.py train-step`), and SDPA for inference.
    """
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if kind not in ATTENTION:
        raise one_of("attention", kind, list(ATTENTION))
    if kind == "auto":
        if device.type == "cuda":
            kind = "xformers" if _has_xformers() else "sdpa"
        else:
            kind = "math" if training else "sdpa"
    if kind == "xformers":
        if not _has_xformers():
            raise UserError("attention 'xformers' needs the xformers package: pip install 'latentgen[cuda]'")
        model.enable_xformers_memory_efficient_attention()
    else:
        model.set_attn_processor(AttnProcessor2_0() if kind == "sdpa" else AttnProcessor())
    return kind


def _has_xformers() -> bool:
    try:
        import xformers  # noqa: F401
    except ImportError:
        return False
    return True


def peak_memory_mb() -> float:
    """This process's peak resident memory in MB (VmHWM: unlike getrusage's ru_maxrss, not inherited from the
    parent across fork and exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
