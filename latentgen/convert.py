"""Convert between a diffusers pipeline folder and a single-file checkpoint (A1111's and ComfyUI's format).

    python -m latentgen.convert FOLDER model.safetensors [--fp16]     # for A1111 / ComfyUI
    python -m latentgen.convert model.safetensors FOLDER [--fp16]     # for diffusers / latentgen
    python -m latentgen.convert model.ckpt FOLDER --allow-pickle      # an old pickled checkpoint, weights only
"""

from __future__ import annotations

import sys
from pathlib import Path

from latentgen.cli import ArgumentParser, quiet_libraries, run_cli


def main(argv: list[str] | None = None) -> Path:
    p = ArgumentParser(prog="python -m latentgen.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="a diffusers pipeline folder or a single .safetensors/.ckpt checkpoint")
    p.add_argument("target", help="a .safetensors file (single-file checkpoint) or a folder (diffusers layout)")
    p.add_argument("--fp16", action="store_true", help="store the weights in fp16 (half the size)")
    p.add_argument("--allow-pickle", action="store_true", help="read .ckpt/.bin weights (torch.load, weights only)")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"],
                   help="for SD 2.x 768-v checkpoints that do not say they predict v")
    args = p.parse_args(argv)
    import torch

    from latentgen.generation.models import check_source, check_target, write
    from latentgen.generation.pipeline import LatentPipeline

    quiet_libraries()
    source, target = Path(args.source), Path(args.target)
    check_source(source)
    check_target(target)
    pipe = LatentPipeline.from_pretrained(source, torch_dtype=torch.float32, allow_pickle=args.allow_pickle,
                                          prediction_type=args.prediction_type)
    write(pipe, target, torch.float16 if args.fp16 else None)
    print(target)
    return target


if __name__ == "__main__":
    sys.exit(run_cli(main))
