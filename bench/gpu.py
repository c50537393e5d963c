"""Issue #18's GPU figures in one run, for the few minutes a GPU is lent (README, Performance, "On a GPU").

    python bench/gpu.py --out DIR              # on a CUDA machine: SD 1.x's U-Net size at 512×512
    python bench/gpu.py --smoke --device cpu   # tiny sizes and 2 steps: checks the script itself, anywhere

Each section prints a Markdown table and goes into DIR/gpu.json:

1. **peak**: the best of 8192³ matrix products in bf16 and fp16, TFLOP/s (what the U-Net's share is against).
2. **inference**: seconds per image at 1 and 8 images per call, DPM-Solver++ 2M, 20 steps, guidance 7.5, of an
   SD 1.x-shaped model with random weights (`common.sd_shaped_folder`: SD's U-Net topology at its full width 320,
   a CLIP-L-sized text encoder, SD's VAE): diffusers' `StableDiffusionPipeline` in fp16 with its SDPA attention
   (what a diffusers expert runs on a GPU) against `LatentPipeline` at its defaults (bf16 where the GPU has it,
   SDPA or xformers), in fp16, and with its U-Net compiled (`compile_unet`: `torch.compile` on CUDA; its compile
   time is reported apart). Each path warms up once, then the best of `--repeat` timed calls.
3. **unet**: one U-Net call at 8 images per call with guidance (16 rows), FLOPs counted by
   `torch.utils.flop_counter`, eager and compiled, as a share of the bf16 peak of section 1.
4. **training**: samples/s of the core of diffusers' `train_text_to_image.py` (fp16 autocast with a gradient
   scaler, the VAE and the text encoder run every step) against latentgen's step as `train_unet.py` runs it
   (bf16 autocast, cached latents and text states, fused AdamW, min-SNR weighting, EMA), same U-Net and batch.

The paths run one after another in this process (a GPU's speed does not drift as a shared CPU's does); CUDA
work is synchronised before each clock is read.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import best_time, print_table, sd_shaped_folder

PROMPT = "a red circle on a blue background"


def synced(device):
    """A function that waits for `device`'s queued work (CUDA runs asynchronously)."""
    import torch

    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def timed(fn, device, repeat: int) -> float:
    sync = synced(device)

    def call():
        fn()
        sync()

    return best_time(call, repeat=repeat)


def peak(device, smoke: bool) -> dict:
    import torch

    n = 512 if smoke else 8192
    out = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
        out[name] = 2 * n**3 / timed(lambda: a @ b, device, repeat=10) / 1e12
    return out


def inference(folder: Path, device, batches: list[int], steps: int, repeat: int) -> list[dict]:
    import torch
    from diffusers import StableDiffusionPipeline

    from latentgen.loading import open_pipeline
    from latentgen.schedulers import make_scheduler

    rows = []

    def measure(name, run, batch, extra=None):
        seconds = timed(lambda: run(batch), device, repeat)
        rows.append({"path": name, "images/call": batch, "s/img": round(seconds / batch, 4), **(extra or {})})

    diff = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float16, local_files_only=True,
                                                   safety_checker=None, requires_safety_checker=False).to(device)
    diff.scheduler = make_scheduler("dpm++", diff.scheduler.config)
    diff.set_progress_bar_config(disable=True)
    for batch in batches:
        gens = [torch.Generator(device).manual_seed(s) for s in range(batch)]
        measure("diffusers fp16 (SDPA)", lambda b: diff([PROMPT] * b, num_inference_steps=steps,
                                                          guidance_scale=7.5, generator=gens), batch)
    for name, dtype, compile in (("latentgen (defaults)", "auto", False), ("latentgen fp16", "fp16", False),
                                 ("latentgen compiled", "auto", True)):
        pipe = open_pipeline(folder, dtype, device, embeddings_dir=None)
        extra = {"dtype": str(pipe.unet.dtype).removeprefix("torch.")}
        if compile:
            pipe.compile_unet()
            start = time.perf_counter()
            pipe([PROMPT], num_inference_steps=steps, scheduler="dpm++", seed=[0])
            synced(device)()
            extra["first call s (compiles)"] = round(time.perf_counter() - start, 1)
        for batch in batches:
            measure(name, lambda b: pipe([PROMPT] * b, num_inference_steps=steps, guidance_scale=7.5,
                                         scheduler="dpm++", seed=list(range(b))), batch, extra)
    base = {r["images/call"]: r["s/img"] for r in rows if r["path"].startswith("diffusers")}
    for r in rows:
        r["speed-up"] = f"{base[r['images/call']] / r['s/img']:.2f}×"
    return rows


def unet_share(folder: Path, device, images: int, bf16_peak: float, repeat: int) -> list[dict]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from latentgen.loading import open_pipeline

    pipe = open_pipeline(folder, "bf16", device, embeddings_dir=None)
    unet = pipe.unet
    size = unet.config.sample_size
    x = torch.randn(2 * images, unet.config.in_channels, size, size, dtype=unet.dtype, device=device)
    hidden, _ = pipe.encode_prompts([PROMPT] * 2 * images)
    t = torch.full((2 * images,), 500, device=device)

    def call():
        with torch.no_grad():
            return unet(x, t, encoder_hidden_states=hidden)

    with FlopCounterMode(display=False) as counter:
        call()
    flops = counter.get_total_flops()
    rows = []
    for name in ("eager", "compiled"):
        if name == "compiled":
            pipe.compile_unet()
            call()
        seconds = timed(call, device, repeat)
        rows.append({"U-Net": name, "rows": 2 * images, "GFLOP/call": round(flops / 1e9, 1),
                     "ms/call": round(seconds * 1e3, 2), "TFLOP/s": round(flops / seconds / 1e12, 1),
                     "share of bf16 peak": f"{flops / seconds / 1e12 / bf16_peak:.0%}"})
    return rows


def training(folder: Path, device, batch: int, steps: int) -> list[dict]:
    """The two training steps on the same U-Net (fresh copies of the folder's) and batch."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import EMAModel, compute_snr
    from transformers import CLIPTextModel

    from latentgen import LatentPipeline

    sync = synced(device)
    pipe = LatentPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    tokenizer = pipe.tokenizer
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    pixels = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    ids = tokenizer([PROMPT] * batch, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids.to(device)
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    rows = []

    def run(name, step):
        step()
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        rows.append({"step": name, "batch": batch, "samples/s": round(steps * batch / (time.perf_counter() - start),
                                                                       1)})

    # diffusers' train_text_to_image.py with --mixed_precision fp16: fp32 weights, fp16 autocast, a gradient
    # scaler, the frozen VAE and text encoder in fp16, run on every step
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").to(device).train()
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", dtype=torch.float16).to(device)
    text = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=torch.float16).to(device)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")

    def plain():
        with torch.no_grad():
            latents = vae.encode(pixels.half()).latent_dist.sample() * vae.config.scaling_factor
            hidden = text(ids)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            pred = unet(scheduler.add_noise(latents, noise, t).float(), t, hidden.float()).sample
        loss = F.mse_loss(pred.float(), noise.float())
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    run("diffusers train_text_to_image.py (fp16 autocast, VAE + text encoder every step)", plain)

    # latentgen: latents and text states cached once (train_unet.py's cache), bf16 autocast, fused AdamW, min-SNR 5,
    # EMA; the attention kernel as train_unet.py picks it
    from latentgen.device import set_attention

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").to(device).train()
    set_attention(unet, "auto", device, training=True)
    if device.type == "cuda":
        unet.to(memory_format=torch.channels_last)
    with torch.no_grad():
        pipe.to(device)
        latents = pipe.vae.encode(pixels).latent_dist.sample() * pipe.vae.config.scaling_factor
        hidden = pipe.text_encoder(ids)[0]
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5, fused=True)
    ema = EMAModel(unet.parameters(), decay=0.999, foreach=True)
    dtype = torch.bfloat16

    def ours():
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=device)
        with torch.autocast(device.type, dtype=dtype):
            pred = unet(scheduler.add_noise(latents, noise, t), t, hidden).sample
        snr = compute_snr(scheduler, t)
        weight = torch.clamp(snr, max=5.0) / snr
        loss = (F.mse_loss(pred.float(), noise, reduction="none").mean(dim=(1, 2, 3)) * weight).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(unet.parameters())

    run("latentgen (bf16 autocast, cached latents and text, fused AdamW, min-SNR, EMA)", ours)
    base = rows[0]["samples/s"]
    for r in rows:
        r["speed-up"] = f"{r['samples/s'] / base:.2f}×"
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, help="folder for gpu.json")
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="tiny model, 2 steps: checks the script, measures nothing")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--only", nargs="+", choices=["peak", "inference", "unet", "training"])
    args = p.parse_args()
    import torch

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    width, resolution, steps = (32, 64, 2) if args.smoke else (320, 512, 20)
    repeat = 1 if args.smoke else args.repeat
    folder = sd_shaped_folder(Path(tempfile.mkdtemp(prefix="bench-gpu-")) / "sd", width, resolution)
    sections = args.only or ["peak", "inference", "unet", "training"]
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "width": width, "resolution": resolution}
    print(f"# {report['device']}, torch {report['torch']}, SD-shaped U-Net width {width} at {resolution} px")
    if "peak" in sections:
        report["peak"] = peak(device, args.smoke)
        print(f"\nmatrix-product peak: bf16 {report['peak']['bf16']:.0f}, fp16 {report['peak']['fp16']:.0f} TFLOP/s")
    if "inference" in sections:
        report["inference"] = inference(folder, device, [1, 8], steps, repeat)
        print()
        print_table(report["inference"], list(report["inference"][-1]))
    if "unet" in sections:
        bf16 = report.get("peak", {}).get("bf16") or peak(device, args.smoke)["bf16"]
        report["unet"] = unet_share(folder, device, 8, bf16, max(repeat, 1) * (1 if args.smoke else 5))
        print()
        print_table(report["unet"], list(report["unet"][0]))
    if "training" in sections:
        report["training"] = training(folder, device, 2 if args.smoke else 16, 2 if args.smoke else 20)
        print()
        print_table(report["training"], list(report["training"][0]))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
