"""Sharded (FSDP2) against data-parallel (DDP) training: samples per second and each rank's peak memory and
resident parameters, for `train_unet.py` on one rank and on several CPU ranks with each strategy (this machine's
cores shared between the ranks, OMP_NUM_THREADS=1 each: more ranks than cores measure memory, not speed).

    python bench/sharded.py [--steps 20] [--ranks 1 2 4] [--config configs/unet-shapes.yaml]

The U-Net is the default model's (4.1M parameters: its weights are small next to the activations, so this
measures the mechanism's cost; the parameter and optimizer share of memory falls as 1/ranks, the rest does not).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

from common import ROOT, print_table

OVERRIDES = [f"vae_path={ROOT / 'latentgen' / 'default_model' / 'vae'}", "data.num_samples=2048", "ema=false",
             "checkpoint_every=100000", "validate_every=0", "mixed_precision=fp32"]


def run(ranks: int, strategy: str, steps: int, config: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        launch = [sys.executable, str(ROOT / "train_unet.py")] if ranks == 1 else [
            sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", str(ranks),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "train_unet.py")]
        cmd = [*launch, "--config", config, f"output_dir={out}", f"max_steps={steps}",
               f"distributed.strategy={strategy}", *OVERRIDES]
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if r.returncode:
            raise SystemExit(r.stderr[-3000:])
        text = r.stdout + r.stderr
        rate = float(re.search(r"([\d.]+) samples/s", text).group(1))
        peaks = [float(m) for m in re.findall(r"peak memory (\d+) MB on process", text)] or \
            [float(re.search(r"peak memory (\d+) MB", text).group(1))]
        held = [int(m.replace(",", "")) for m in re.findall(r"holds ([\d,]+) of", text)]
        return {"ranks": ranks, "strategy": strategy, "samples/s": f"{rate:.1f}",
                "peak MB per rank": " / ".join(f"{p:.0f}" for p in peaks),
                "parameters per rank": " / ".join(f"{h:,}" for h in held) or "all"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--config", default=str(ROOT / "configs" / "unet-shapes.yaml"))
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="numbers of ranks (fsdp from 2)")
    args = p.parse_args()
    rows = [run(n, strategy, args.steps, args.config) for n in args.ranks
            for strategy in (("ddp",) if n == 1 else ("ddp", "fsdp"))]
    print_table(rows)


if __name__ == "__main__":
    main()
