"""python -m latentgen.data export --out DIR --count N --split train|heldout [--resolution R --seed S]
python -m latentgen.data heldout        # list the held-out (color, kind, background) combinations"""

from __future__ import annotations

import json
import sys

from latentgen.cli import ArgumentParser, run_cli
from latentgen.data.shapes import LANGUAGES, SPLITS, ShapesSpec, heldout_triples, iter_samples
from latentgen.errors import UserError


def export(out: str, count: int, spec: ShapesSpec, overwrite: bool = False) -> int:
    """Write `count` samples as PNGs + metadata.jsonl, a folder `load_dataset("imagefolder")` reads as is.

    The folder is built under a temporary name and renamed into place, so it is complete or absent.
    """
    from pathlib import Path

    from latentgen.io import atomic_dir

    target = Path(out)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise UserError(f"--out {target} exists and is not empty; choose a new folder or pass --overwrite")
    with atomic_dir(target) as tmp:
        with open(tmp / "metadata.jsonl", "w", encoding="utf-8") as meta:
            for sample in iter_samples(spec, count):
                name = f"{sample.index:06d}.png"
                sample.render().save(tmp / name)
                row = {"file_name": name, "text": sample.text, "captions": sample.captions, **sample.truth()}
                meta.write(json.dumps(row, ensure_ascii=False) + "\n")
    return count


def main(argv=None):
    p = ArgumentParser(prog="python -m latentgen.data", description="The built-in shapes dataset.")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="write samples as an image folder with metadata.jsonl")
    e.add_argument("--out", required=True)
    e.add_argument("--count", type=int, required=True)
    e.add_argument("--split", default="train", choices=SPLITS)
    e.add_argument("--resolution", type=int, default=64)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--max-shapes", type=int, default=2, choices=[1, 2])
    e.add_argument("--two-shape-fraction", type=float, default=0.3)
    e.add_argument("--language", default="en", choices=LANGUAGES)
    e.add_argument("--overwrite", action="store_true")
    sub.add_parser("heldout", help="list the held-out (color, kind, background) combinations")
    args = p.parse_args(argv)
    if args.command == "heldout":
        for color, kind, background in heldout_triples():
            print(f"{color} {kind} on {background}")
        return
    if args.count < 1:
        raise UserError(f"--count must be ≥ 1, got {args.count}")
    spec = ShapesSpec(split=args.split, resolution=args.resolution, seed=args.seed, max_shapes=args.max_shapes,
                      two_shape_fraction=args.two_shape_fraction, language=args.language).check()
    export(args.out, args.count, spec, overwrite=args.overwrite)
    print(f"wrote {args.count} {args.split} images to {args.out}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
