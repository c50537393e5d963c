"""Peak memory and time of decoding one large image with the SD VAE, whole against tiled (`--vae-tiling`,
diffusers' tiling: 512-pixel tiles, overlaps blended), each in its own process, beside the memory guard's estimate
(with its slack: an upper bound).

    python bench/vae_tiling.py [--side 1024] [--dtype bf16]

The VAE is SD's topology with random weights (`bench/common.py`); the memory is the process's peak resident set
above what it held before decoding.
"""

from __future__ import annotations

import argparse
import json
import time

from common import print_table, run_child


def child(side: int, dtype: str, tiled: bool) -> dict:
    import torch
    from diffusers import AutoencoderKL

    from latentgen.runtime.device import peak_memory_mb
    from latentgen.runtime.memory import SLACK, _quadratic_attention, vae_decode_bytes

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        sample_size=512).to({"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]).eval()
    if tiled:
        vae.enable_tiling()
    latents = torch.randn(1, 4, side // 8, side // 8, dtype=vae.dtype)
    before = peak_memory_mb()
    start = time.perf_counter()
    with torch.no_grad():
        vae.decode(latents)
    seconds = time.perf_counter() - start
    decoded = min(side, vae.tile_sample_min_size) if tiled else side
    estimate = vae_decode_bytes(vae.config, decoded, decoded, 1, vae.dtype.itemsize, _quadratic_attention(vae))
    return {"peak_mb": peak_memory_mb() - before, "seconds": seconds, "estimate_mb": SLACK * estimate / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--side", type=int, default=1024)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tiled", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.side, args.dtype, args.tiled)))
        return
    rows = []
    for tiled in (False, True):
        r = run_child("vae_tiling", "--side", str(args.side), "--dtype", args.dtype, *(["--tiled"] if tiled else []))
        rows.append({"decode": "tiled" if tiled else "whole", "peak MB": f"{r['peak_mb']:.0f}",
                     "guard's estimate MB": f"{r['estimate_mb']:.0f}", "s": f"{r['seconds']:.1f}"})
    whole, tiled = (float(r["peak MB"]) for r in rows)
    print(f"SD VAE, {args.side}×{args.side}, {args.dtype}")
    print_table(rows)
    print(f"tiled / whole peak memory: {tiled / whole:.2f}×")


if __name__ == "__main__":
    main()
