"""Merge checkpoints of one architecture, as AUTOMATIC1111's checkpoint merger and kohya's `merge_models.py` do:

- weighted sum, A·(1 − α) + B·α: two fine-tunes of one base, or two stages of one training run (a model soup:
  Wortsman et al. 2022);
- add difference, A + (B − C)·α: what fine-tuning changed in B (C being its base) carried onto A. With A an
  inpainting model whose U-Net takes 9 input channels and B, C ordinary ones, the difference goes into the first 4
  (A1111's recipe for an inpainting model of a fine-tune: A the base's inpainting model, B the fine-tune, C the base).

    python -m latentgen.merge A B OUT [--alpha 0.5] [--subtract C] [--fp16]

A, B and C are diffusers folders or single-file checkpoints; OUT is a folder, or a .safetensors file. The merge
holds A's scheduler and tokenizer; an upscaler or a training config beside A's weights is not carried over.

diffusers has no merge (only a community pipeline, `checkpoint_merger.py`, that is not in the package) and
neither kohya's nor A1111's merger is a library, hence these few lines.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from latentgen.cli import ArgumentParser, quiet_libraries, run_cli
from latentgen.errors import UserError
from latentgen.formats.folders import WEIGHT_COMPONENTS
from latentgen.generation.models import check_source, check_target, write


def merge_weights(a, b, alpha: float, c=None):
    """Set every floating-point weight of pipeline `a` to a + α(b − a) (weighted sum) or, given `c`, to
    a + α(b − c) (add difference), computed in fp32, in place; returns `a`. Integer buffers (counters, position
    ids) must agree. Raises UserError, changing nothing, where the models are not one architecture (an inpainting
    U-Net's wider `conv_in` as A aside)."""
    check_alpha(alpha)
    models = [a, b] if c is None else [a, b, c]
    names = [*WEIGHT_COMPONENTS, "text_encoder_2"]
    for name in names:
        if len({getattr(m, name, None) is None for m in models}) > 1:
            raise UserError(f"cannot merge: only some of the models have a {name}")
    states = [(name, *(getattr(m, name).state_dict() for m in models))
              for name in names if getattr(a, name, None) is not None]
    for name, *state in states:  # all checked before any weight changes
        _check_same_architecture(name, state[0], state[1], "the first model", "the second")
        if c is not None:
            _check_same_architecture(name, state[1], state[2], "the second model", "the third", wider_first=False)
    done = set()  # tied weights (one tensor under two names) are merged once
    with torch.no_grad():
        for _, state_a, state_b, *state_c in states:
            for key, wa in state_a.items():
                if wa.is_floating_point() and wa.data_ptr() not in done:
                    done.add(wa.data_ptr())
                    part = wa[:, :state_b[key].shape[1]] if wa.shape != state_b[key].shape else wa  # inpainting
                    wb = state_b[key].float()
                    if state_c:
                        part.copy_(part.float() + alpha * (wb - state_c[0][key].float()))
                    else:
                        part.copy_(torch.lerp(part.float(), wb, alpha))  # a + α(b − a)
    return a


def check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"alpha must be between 0 and 1 (the second model's weight), got {alpha:g}")


def _check_same_architecture(name: str, state_a: dict, state_b: dict, first: str, second: str,
                             wider_first: bool = True) -> None:
    """The two states have the same weights of the same shapes; where `wider_first`, the first may be an inpainting
    U-Net whose conv_in takes more input channels than the second's."""
    only = sorted(set(state_a) ^ set(state_b))
    if only:
        raise UserError(f"cannot merge: the {name}s of {first} and {second} are different architectures "
                        f"({only[0]} is in only one; {len(only)} such weights)")
    for key, wa in state_a.items():
        wb = state_b[key]
        if wa.shape != wb.shape:
            inpainting = (name, key) == ("unet", "conv_in.weight") and wa.shape[0] == wb.shape[0] and \
                wa.shape[2:] == wb.shape[2:]
            if inpainting and wa.shape[1] > wb.shape[1] and wider_first:
                continue
            hint = "; an inpainting model goes first, as A" if inpainting and wider_first else ""
            raise UserError(f"cannot merge: {name} {key} is {tuple(wa.shape)} in {first} and {tuple(wb.shape)} in "
                            f"{second}{hint}")
        if not wa.is_floating_point() and not torch.equal(wa, wb):
            raise UserError(f"cannot merge: {name} {key} differs between {first} and {second} and is not a weight")


def main(argv: list[str] | None = None) -> Path:
    p = ArgumentParser(prog="python -m latentgen.merge", description=__doc__.split("\n\n")[0])
    p.add_argument("a", help="the first model: a diffusers folder or a single-file checkpoint")
    p.add_argument("b", help="the second model, of the same architecture")
    p.add_argument("out", help="a .safetensors file (single-file checkpoint) or a folder (diffusers layout)")
    p.add_argument("--alpha", type=float, default=0.5,
                   help="the second model's weight (0: A, 1: B, or all of B − C; default 0.5)")
    p.add_argument("--subtract", metavar="C", help="add difference: A + (B − C)·alpha, C being B's base model")
    p.add_argument("--fp16", action="store_true", help="store the weights in fp16 (half the size)")
    args = p.parse_args(argv)
    from latentgen.generation.pipeline import LatentPipeline

    quiet_libraries()
    sources = [Path(s) for s in (args.a, args.b, args.subtract) if s is not None]
    out = Path(args.out)
    for source in sources:
        check_source(source)
    check_target(out)
    check_alpha(args.alpha)  # before loading the models
    a, b, *c = (LatentPipeline.from_pretrained(s, torch_dtype=torch.float32) for s in sources)
    merged = merge_weights(a, b, args.alpha, *c)
    write(merged, out, torch.float16 if args.fp16 else None)
    print(out)
    return out


if __name__ == "__main__":
    sys.exit(run_cli(main))
