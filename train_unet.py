#!/usr/bin/env python
"""Train the text-conditioned U-Net on VAE latents (one process, or many with accelerate).

    python train_unet.py --config configs/smoke.yaml [key=value ...]
    accelerate launch --cpu --num_processes 2 train_unet.py --config configs/unet-shapes.yaml   # CPU ranks (gloo)
    accelerate launch --multi_gpu --num_processes 8 train_unet.py --config configs/unet-shapes.yaml
"""

import sys

from latentgen.cli import run_cli
from latentgen.training.command import training_main


def load():
    from latentgen.training.unet import UNetTrainConfig, train_unet

    return UNetTrainConfig, train_unet


def main(argv=None):
    training_main("train_unet.py", "Train the text-conditioned U-Net.", load, argv)


if __name__ == "__main__":
    sys.exit(run_cli(main))
