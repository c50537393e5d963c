#!/usr/bin/env python
"""Train or fine-tune the VAE (diffusers AutoencoderKL).

    python train_vae.py --config configs/vae-shapes.yaml [key=value ...]
    accelerate launch --num_processes 2 train_vae.py --config configs/vae-shapes.yaml
"""

import sys

from latentgen.cli import run_cli
from latentgen.training.command import training_main


def load():
    from latentgen.training.vae import VAETrainConfig, train_vae

    return VAETrainConfig, train_vae


def main(argv=None):
    training_main("train_vae.py", "Train or fine-tune the VAE.", load, argv)


if __name__ == "__main__":
    sys.exit(run_cli(main))
