#!/usr/bin/env python
"""Train or fine-tune the VAE (diffusers AutoencoderKL).

    python train_vae.py --config configs/vae-shapes.yaml [key=value ...]
    accelerate launch --num_processes 2 train_vae.py --config configs/vae-shapes.yaml
"""

import sys

from latentgen.cli import ArgumentParser, quiet_libraries, run_cli


def main(argv=None):
    p = ArgumentParser(prog="train_vae.py", description="Train or fine-tune the VAE.")
    p.add_argument("--config", required=True, help="a YAML file in configs/")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. max_steps=100 data.resolution=32")
    args = p.parse_args(argv)

    from latentgen.config import load_config
    from latentgen.training.vae import VAETrainConfig, train_vae

    config = load_config(VAETrainConfig, args.config, args.overrides)
    quiet_libraries()
    train_vae(config)


if __name__ == "__main__":
    sys.exit(run_cli(main))
