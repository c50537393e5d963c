"""The U-Net's achieved FLOP/s during sampling against this machine's matrix-product peak in the U-Net's
precision, measured in the same run.

FLOPs of one U-Net call are counted with torch.utils.flop_counter (matmuls, convolutions, attention); the call
is timed as LatentPipeline makes it (its default precision and kernels), at 8 images per call with guidance,
i.e. a batch of 16; with --compile also as the compiled U-Net (`LatentPipeline.compile_unet`) runs it. The
peak is the best of large matrix products (bf16 and fp32; bf16 only where the CPU has bf16 units).

    python bench/flops.py [--model latentgen/default_model] [--images 8] [--sd] [--compile]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import ROOT, best_time, sd_shaped_folder


def matmul_peak(dtype, device=None, sizes: tuple[int, ...] = (2048, 4096)) -> float:
    """FLOP/s: the best of n×n matrix products for n in `sizes`, on `device` (default: the CPU)."""
    import torch

    best = 0.0
    for n in sizes:
        a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
        seconds = best_time(lambda: a @ b, repeat=5, device=a.device)
        best = max(best, 2 * n**3 / seconds)
    return best


def conv_rate(dtype) -> float:
    """FLOP/s of a 3×3 convolution of Stable Diffusion's size (320 channels, 32×32, batch 8), channels-last."""
    import torch
    import torch.nn.functional as F

    x = torch.randn(8, 320, 32, 32, dtype=dtype).to(memory_format=torch.channels_last)
    w = torch.randn(320, 320, 3, 3, dtype=dtype).to(memory_format=torch.channels_last)
    with torch.no_grad():
        seconds = best_time(lambda: F.conv2d(x, w, padding=1), repeat=5)
    return 2 * 8 * 320 * 320 * 9 * 32 * 32 / seconds


def unet_rate(model: str, images: int, profile: bool = False, compile: bool = False, device: str = "cpu",
              dtype: str = "auto", compile_kwargs: dict | None = None) -> dict:
    """FLOPs of one U-Net call at `images` per call with guidance and its best time, as the pipeline loads the
    model on `device` in `dtype` (and compiled: `compiled_seconds`; with `compile_kwargs`, `torch.compile` with
    those arguments instead of `compile_unet`)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from latentgen.generation.models import open_pipeline

    pipe = open_pipeline(model, dtype, device, embeddings_dir=None)
    unet = pipe.unet
    size = pipe.default_size // pipe.vae_scale_factor
    x = torch.randn(2 * images, unet.config.in_channels, size, size, dtype=unet.dtype, device=unet.device)
    hidden, _ = pipe.encode_prompts(["a red circle on a blue background"] * 2 * images)
    t = torch.full((2 * images,), 500, device=unet.device)

    def call():
        with torch.no_grad():
            return unet(x, t, encoder_hidden_states=hidden)

    counter = FlopCounterMode(display=False)
    with counter:
        call()
    flops = counter.get_total_flops()
    seconds = best_time(call, repeat=5, warmup=2, device=unet.device)
    out = {"flops": flops, "seconds": seconds, "dtype": unet.dtype}
    if compile:
        if compile_kwargs:
            unet.compile(**compile_kwargs)
        else:
            pipe.compile_unet()
        out["compiled_seconds"] = best_time(call, repeat=5, warmup=2, device=unet.device)  # the first compiles
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            call()
        out["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    return out


def main():
    import torch

    p = argparse.ArgumentParser()
    p.add_argument("--model", default=str(ROOT / "latentgen" / "default_model"))
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--sd", action="store_true", help="also the Stable-Diffusion-shaped U-Net")
    p.add_argument("--profile", action="store_true", help="print where the time goes")
    p.add_argument("--compile", action="store_true", help="also time the compiled U-Net")
    args = p.parse_args()
    from latentgen.runtime.precision import cpu_has_fast_bf16

    peaks = {torch.float32: matmul_peak(torch.float32)}
    if cpu_has_fast_bf16():
        peaks[torch.bfloat16] = matmul_peak(torch.bfloat16)
        conv16, conv32 = conv_rate(torch.bfloat16), conv_rate(torch.float32)
        print(f"3×3 convolution, 320 channels: bf16 {conv16 / 1e9:.0f} GFLOP/s, fp32 {conv32 / 1e9:.0f} GFLOP/s "
              f"({conv16 / conv32:.1f}×)")
    print("matrix-product peak: " + ", ".join(f"{str(d).removeprefix('torch.')} {v / 1e9:.0f} GFLOP/s"
                                              for d, v in peaks.items()))
    models = [("default model", args.model)]
    if args.sd:
        models.append(("SD-shaped U-Net 256×256", str(sd_shaped_folder(Path(tempfile.gettempdir())
                                                                          / "latentgen-bench-sd-shaped"))))
    for label, model in models:
        r = unet_rate(model, args.images, args.profile, args.compile)
        peak, dtype = peaks.get(r["dtype"]), str(r["dtype"]).removeprefix("torch.")
        timings = [("", r["seconds"])] + ([("compiled: ", r["compiled_seconds"])] if args.compile else [])
        for how, seconds in timings:
            share = f" = {100 * r['flops'] / seconds / peak:.0f}% of the {dtype} peak" if peak else ""
            print(f"{label}: {r['flops'] / 1e9:.1f} GFLOP per U-Net call ({2 * args.images} rows, {dtype}), "
                  f"{how}{seconds * 1000:.1f} ms -> {r['flops'] / seconds / 1e9:.0f} GFLOP/s{share}")
        if args.profile:
            print(r["profile"])


if __name__ == "__main__":
    main()
