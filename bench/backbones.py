"""The backbone experiment's compute (issue #45): each arm's denoiser (configs/backbone-*.yaml), its parameters,
the FLOPs of one training step (forward + backward at the config's batch, counted by torch.utils.flop_counter),
and the measured time of one step, each as a ratio to the U-Net ε arm measured in the same run. Equal steps of
equal batches are then equal training compute within the FLOP ratio printed.

    python bench/backbones.py [--threads 1] [--repeat 5]
"""

from __future__ import annotations

import argparse

from common import ROOT, best_time

ARMS = ("unet-eps", "unet-flow", "dit-flow", "mmdit-flow")


def arm_step(name: str):
    """(parameters, FLOPs of one training step, a function running one) for an arm, on random latents and text
    of the config's batch and sizes."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from latentgen.components.denoisers import build_denoiser
    from latentgen.config import load_config
    from latentgen.training.unet_config import UNetTrainConfig

    config = load_config(UNetTrainConfig, ROOT / "configs" / f"backbone-{name}.yaml", [])
    torch.manual_seed(0)
    model = build_denoiser(config.backbone, config.unet, config.transformer).train()
    b, side = config.train_batch_size, config.data.resolution // 4
    x = torch.randn(b, 4, side, side)
    text = torch.randn(b, config.text_encoder.max_length or 32, 384)
    t = torch.rand(b) * 999

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, encoder_hidden_states=text, return_dict=False)[0]
        out.float().pow(2).mean().backward()
        model.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        step()
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops(), step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the experiment trained on 1)")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    for name in ARMS:
        params, flops, step = arm_step(name)
        rows.append((name, params, flops, best_time(step, repeat=args.repeat)))
    _, _, flops0, time0 = rows[0]
    print(f"| arm | parameters | GFLOP a training step | vs U-Net ε | s a step ({args.threads} thread, bf16) | "
          f"vs U-Net ε |")
    print("|---|---|---|---|---|---|")
    for name, params, flops, seconds in rows:
        print(f"| {name} | {params / 1e6:.2f}M | {flops / 1e9:.1f} | {flops / flops0:.2f}× | {seconds:.3f} | "
              f"{seconds / time0:.2f}× |")


if __name__ == "__main__":
    main()
