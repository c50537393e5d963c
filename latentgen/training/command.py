"""The command line of both training scripts (`train_vae.py`, `train_unet.py`): `--config FILE` and `key=value`
overrides."""

from __future__ import annotations

from typing import Callable

from latentgen.cli import ArgumentParser, quiet_libraries


def training_main(prog: str, description: str, load: Callable[[], tuple[type, Callable]], argv=None) -> None:
    """The command line of both training scripts: `--config FILE` and `key=value` overrides.

    `load()` returns (config dataclass, train function); it is called after argument parsing so that `--help`
    and argument mistakes answer without importing torch.
    """
    p = ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", help="a YAML file in configs/ (required)")
    p.add_argument("--keys", action="store_true", help="list every config key and exit")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. max_steps=100 resume_from=latest")
    args = p.parse_args(argv)

    from latentgen.config import load_config, valid_keys
    from latentgen.runtime.distributed import relaunch_cpu_ranks

    config_cls, train = load()
    if args.keys:
        print("\n".join(valid_keys(config_cls)))
        return
    if args.config is None:
        p.error("the following arguments are required: --config")
    config = load_config(config_cls, args.config, args.overrides)
    relaunch_cpu_ranks(argv)  # `accelerate launch --cpu --num_processes N`: N ranks from here on
    quiet_libraries()
    train(config)
