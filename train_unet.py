#!/usr/bin/env python
"""Train the text-conditioned U-Net on VAE latents (one process, or many with accelerate).

    python train_unet.py --config configs/smoke.yaml [key=value ...]
    accelerate launch --num_processes 2 train_unet.py --config configs/unet-shapes.yaml
"""

import sys

from latentgen.cli import ArgumentParser, quiet_libraries, run_cli


def main(argv=None):
    p = ArgumentParser(prog="train_unet.py", description="Train the text-conditioned U-Net.")
    p.add_argument("--config", required=True, help="a YAML file in configs/")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. max_steps=100 resume_from=latest")
    args = p.parse_args(argv)

    from latentgen.config import load_config
    from latentgen.training.unet import UNetTrainConfig, train_unet

    config = load_config(UNetTrainConfig, args.config, args.overrides)
    quiet_libraries()
    train_unet(config)


if __name__ == "__main__":
    sys.exit(run_cli(main))
