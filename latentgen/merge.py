"""Merge two checkpoints of one architecture by a weighted sum of their weights: A·(1 − α) + B·α, AUTOMATIC1111's
checkpoint merger ("weighted sum") and kohya's `merge_models.py`. For two fine-tunes of one base, or two stages of
one training run (a model soup: Wortsman et al. 2022).

    python -m latentgen.merge A B OUT [--alpha 0.5] [--fp16]

A and B are diffusers folders or single-file checkpoints; OUT is a folder, or a .safetensors file. The merge
holds A's scheduler and tokenizer; an upscaler or a training config beside A's weights is not carried over.

diffusers has no merge (only a community pipeline, `checkpoint_merger.py`, that is not in the package) and
neither kohya's nor A1111's merger is a library, hence these few lines.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from .cli import ArgumentParser, quiet_libraries, run_cli
from .convert import check_source, check_target, write
from .errors import UserError
from .loading import WEIGHT_COMPONENTS


def merge_weights(a, b, alpha: float):
    """Set every floating-point weight of pipeline `a` to a·(1 − α) + b·α, computed in fp32, in place; returns
    `a`. Integer buffers (counters, position ids) must agree. Raises UserError, changing nothing, where the two
    are not one architecture."""
    check_alpha(alpha)
    names = [*WEIGHT_COMPONENTS, "text_encoder_2"]
    for name in names:
        if (getattr(a, name, None) is None) != (getattr(b, name, None) is None):
            raise UserError(f"cannot merge: only one of the two models has a {name}")
    states = [(name, getattr(a, name).state_dict(), getattr(b, name).state_dict())
              for name in names if getattr(a, name, None) is not None]
    for name, state_a, state_b in states:  # all checked before any weight changes
        _check_same_architecture(name, state_a, state_b)
    done = set()  # tied weights (one tensor under two names) are merged once
    with torch.no_grad():
        for _, state_a, state_b in states:
            for key, wa in state_a.items():
                if wa.is_floating_point() and wa.data_ptr() not in done:
                    done.add(wa.data_ptr())
                    wa.copy_(torch.lerp(wa.float(), state_b[key].float(), alpha))  # a + α(b − a)
    return a


def check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"alpha must be between 0 and 1 (the second model's weight), got {alpha:g}")


def _check_same_architecture(name: str, state_a: dict, state_b: dict) -> None:
    only = sorted(set(state_a) ^ set(state_b))
    if only:
        raise UserError(f"cannot merge: the two {name}s are different architectures ({only[0]} is in only one; "
                        f"{len(only)} such weights)")
    for key, wa in state_a.items():
        if wa.shape != state_b[key].shape:
            raise UserError(f"cannot merge: {name} {key} is {tuple(wa.shape)} in the first model and "
                            f"{tuple(state_b[key].shape)} in the second")
        if not wa.is_floating_point() and not torch.equal(wa, state_b[key]):
            raise UserError(f"cannot merge: {name} {key} differs and is not a weight")


def main(argv: list[str] | None = None) -> Path:
    p = ArgumentParser(prog="python -m latentgen.merge", description=__doc__.split("\n\n")[0])
    p.add_argument("a", help="the first model: a diffusers folder or a single-file checkpoint")
    p.add_argument("b", help="the second model, of the same architecture")
    p.add_argument("out", help="a .safetensors file (single-file checkpoint) or a folder (diffusers layout)")
    p.add_argument("--alpha", type=float, default=0.5, help="the second model's weight (0: A, 1: B; default 0.5)")
    p.add_argument("--fp16", action="store_true", help="store the weights in fp16 (half the size)")
    args = p.parse_args(argv)
    from .pipeline import LatentPipeline

    quiet_libraries()
    a, b, out = Path(args.a), Path(args.b), Path(args.out)
    for source in (a, b):
        check_source(source)
    check_target(out)
    check_alpha(args.alpha)  # before loading two models
    merged = merge_weights(LatentPipeline.from_pretrained(a, torch_dtype=torch.float32),
                           LatentPipeline.from_pretrained(b, torch_dtype=torch.float32), args.alpha)
    write(merged, out, torch.float16 if args.fp16 else None)
    print(out)
    return out


if __name__ == "__main__":
    sys.exit(run_cli(main))
