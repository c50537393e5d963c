"""Issue #18's GPU figures, for the few minutes a GPU is lent (README, Performance, "On a GPU").

    python bench/gpu.py --out DIR              # on a CUDA machine: SD 1.x's U-Net size at 512×512, sections 1-4
    python bench/gpu.py --only SECTION... --folder /tmp/sd --out DIR   # some sections, one model build for all
    python bench/gpu.py --smoke --device cpu   # tiny sizes and 2 steps: checks the script itself, anywhere

Each section prints a Markdown table and goes into DIR/gpu.json:

1. **peak**: the best of 8192³ matrix products in bf16 and fp16, TFLOP/s (what the U-Net's share is against).
2. **inference**: seconds per image at 1 and 8 images per call, DPM-Solver++ 2M, 20 steps, guidance 7.5, of an
   SD 1.x-shaped model with random weights (`common.sd_shaped_folder`: SD's U-Net topology at its full width 320,
   a CLIP-L-sized text encoder, SD's VAE): diffusers' `StableDiffusionPipeline` in fp16 with its SDPA attention
   (what a diffusers expert runs on a GPU) against `LatentPipeline` at its defaults (bf16 where the GPU has it,
   SDPA or xformers), in fp16, and compiled (`compile_unet`: `torch.compile` of the U-Net and the VAE decoder on
   CUDA; its compile time is reported apart), in the default mode and with the U-Net in CUDA graphs
   (`reduce-overhead`). Each path warms up once, then the best of `--repeat` timed calls.
3. **unet**: one U-Net call at 8 images per call with guidance (16 rows), FLOPs counted by
   `torch.utils.flop_counter` (`flops.unet_rate`, which `bench/flops.py` runs on the CPU), eager and compiled,
   as a share of the bf16 peak of section 1. **tuned** (not in the default sections: its compiles take minutes):
   the same call compiled with the Inductor settings diffusers' GPU guide gives (`DIFFUSERS_INDUCTOR`) and with
   Inductor's autotuning of matrix products and convolutions (`max-autotune-no-cudagraphs`).
4. **training**: samples/s of the core of diffusers' `train_text_to_image.py` (fp16 autocast with a gradient
   scaler, the VAE and the text encoder run every step) against `train_unet.py` itself continuing the same U-Net
   (cached latents and text states, bf16 mixed precision where the GPU has it, fused AdamW, min-SNR, EMA).
5. **graphs**: the inference table's last row alone (the U-Net compiled to CUDA graphs), against no reference.
6. **split**: one 8-image call of diffusers' fp16 pipeline and of latentgen's defaults, timed component by
   component (text encoder, U-Net, VAE decoder, the rest) by hooks that synchronise around each forward;
   latentgen again with its weights channels-last (the CPU's layout), with the 8 images decoded in one VAE call
   instead of one each, and with its VAE decoder compiled (as `compile_unet` does on CUDA).
7. **big**: one 2048×2048 image (4 steps) of the SD-shaped model: seconds and peak GPU memory
   (`torch.cuda.max_memory_allocated`) at latentgen's defaults, with `--vae-tiling`, and with `--offload model`
   and `--offload sequential` (with tiling), against diffusers fp16 with its VAE tiling and model CPU offload.

The paths run one after another in this process (a GPU's speed does not drift as a shared CPU's does); CUDA
work is synchronised before each clock is read (`common.best_time` with a device).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flops import matmul_peak, unet_rate

from common import ROOT, best_time, print_table, sd_shaped_folder, synchronize

PROMPT = "a red circle on a blue background"


def peak(device, smoke: bool) -> dict:
    import torch

    sizes = (512,) if smoke else (8192,)
    return {name: matmul_peak(dtype, device, sizes) / 1e12
            for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16))}


def diffusers_fp16(folder: Path, device):
    """diffusers' `StableDiffusionPipeline` as a diffusers user runs it on a GPU: fp16, SDPA, DPM-Solver++ 2M."""
    import torch
    from diffusers import StableDiffusionPipeline

    from latentgen.components.schedulers import make_scheduler

    diff = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float16, local_files_only=True,
                                                   safety_checker=None, requires_safety_checker=False).to(device)
    diff.scheduler = make_scheduler("dpm++", diff.scheduler.config)
    diff.set_progress_bar_config(disable=True)
    return diff


GRAPHS = [("latentgen compiled, CUDA graphs", "auto", "reduce-overhead")]
PATHS = [("latentgen (defaults)", "auto", False), ("latentgen fp16", "fp16", False),
         ("latentgen compiled, default mode", "auto", "default"), *GRAPHS]


def inference(folder: Path, device, batches: list[int], steps: int, repeat: int, paths=PATHS,
              reference: bool = True) -> list[dict]:
    """Seconds per image of each of `paths` (name, dtype, compile mode or False), after diffusers' fp16
    pipeline's (`reference`)."""
    import torch

    from latentgen.generation.models import open_pipeline

    rows = []

    def failed(name, batch, extra, e):  # one path's failure (a compile mode, say) is a finding; the others run on
        rows.append({"path": name, "images/call": batch, "s/img": None, **(extra or {}),
                     "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"})
        print(json.dumps(rows[-1]), flush=True)

    def measure(name, run, batch, extra=None):
        try:
            seconds = best_time(lambda: run(batch), repeat=repeat, device=device)
        except Exception as e:
            return failed(name, batch, extra, e)
        rows.append({"path": name, "images/call": batch, "s/img": round(seconds / batch, 4), **(extra or {})})
        print(json.dumps(rows[-1]), flush=True)  # a run cut short by its time limit still leaves these

    if reference:
        diff = diffusers_fp16(folder, device)
        for batch in batches:
            gens = [torch.Generator(device).manual_seed(s) for s in range(batch)]
            measure("diffusers fp16 (SDPA)", lambda b: diff([PROMPT] * b, num_inference_steps=steps,
                                                              guidance_scale=7.5, generator=gens), batch)
        diff = None
    for name, dtype, mode in paths:
        pipe = open_pipeline(folder, dtype, device, embeddings_dir=None)
        extra = {"dtype": str(pipe.unet.dtype).removeprefix("torch.")}
        if mode is not False:
            pipe.compile_unet(mode=mode)
            start = time.perf_counter()
            try:
                pipe([PROMPT], num_inference_steps=steps, scheduler="dpm++", seed=[0])
                synchronize(device)
            except Exception as e:
                failed(name, 1, extra, e)
                continue
            extra["first call s (compiles)"] = round(time.perf_counter() - start, 1)
        for batch in batches:
            measure(name, lambda b: pipe([PROMPT] * b, num_inference_steps=steps, guidance_scale=7.5,
                                         scheduler="dpm++", seed=list(range(b))), batch, extra)
        pipe = None  # frees its memory before the next path loads
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = {r["images/call"]: r["s/img"] for r in rows if r["path"].startswith("diffusers")}
    for r in rows:
        if r["s/img"] and base.get(r["images/call"]):
            r["speed-up"] = f"{base[r['images/call']] / r['s/img']:.2f}×"
    return rows


def split(folder: Path, device, images: int, steps: int) -> list[dict]:
    """Where one call of `images` images goes, component by component (text encoder, U-Net, VAE decoder, the
    rest), for diffusers' fp16 pipeline, latentgen's defaults and three variants of them (the channels-last layout,
    all images decoded in one VAE call, the VAE decoder compiled): each component's forward is timed between two
    device synchronisations by hooks, so the split costs the overlap of host and device it measures around."""
    import torch

    from latentgen.generation import sampling
    from latentgen.generation.models import open_pipeline

    def timed(pipe, call) -> dict:
        spent, started, hooks = {}, {}, []
        for name in ("text_encoder", "unet", "vae.decoder"):
            module = pipe.vae.decoder if name == "vae.decoder" else getattr(pipe, name)

            def before(*_, name=name):
                synchronize(device)
                started[name] = time.perf_counter()

            def after(*_, name=name):
                synchronize(device)
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - started[name]

            hooks += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
        call()  # warm-up
        spent.clear()
        synchronize(device)
        start = time.perf_counter()
        call()
        synchronize(device)
        total = time.perf_counter() - start
        for h in hooks:
            h.remove()
        parts = {k: round(v / images, 4) for k, v in spent.items()}
        return {"images/call": images, "s/img": round(total / images, 4), **parts,
                "rest": round(total / images - sum(parts.values()), 4)}

    rows = []

    def row(name, pipe, call):
        rows.append({"path": name, **timed(pipe, call)})
        print(json.dumps(rows[-1]), flush=True)  # a section cut short by its time limit still leaves these

    diff = diffusers_fp16(folder, device)
    row("diffusers fp16 (SDPA)", diff, lambda: diff([PROMPT] * images, num_inference_steps=steps, guidance_scale=7.5))
    diff = None
    pipe = open_pipeline(folder, "auto", device, embeddings_dir=None)

    def ours():
        pipe([PROMPT] * images, num_inference_steps=steps, guidance_scale=7.5, scheduler="dpm++",
             seed=list(range(images)))

    row("latentgen (defaults: " + ("channels-last" if pipe.unet.conv_in.weight.stride()[1] == 1 else "contiguous")
        + " layout)", pipe, ours)
    # the layout the CPU is given (`choose_memory_format`), and latentgen's CUDA default before 4 Dec
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    row("latentgen, channels-last U-Net and VAE", pipe, ours)
    pipe.choose_memory_format()
    one_image_each = sampling.decode
    sampling.decode = lambda p, z: p.vae.decode(sampling.unscale_latents(p.vae, z).to(p.vae.dtype),
                                                return_dict=False)[0]
    try:
        row(f"latentgen, the {images} images in one VAE call", pipe, ours)
    finally:
        sampling.decode = one_image_each
    # the code `compile_unet` gives the decoder on CUDA, in a wrapper module whose hooks the timing sees outside the
    # compiled code; the warm-up call compiles it
    pipe.vae.decoder = torch.compile(pipe.vae.decoder)
    row("latentgen, VAE decoder compiled (U-Net eager)", pipe, ours)
    return rows


# What diffusers' guide to fast inference on GPUs sets for a compiled U-Net ("Accelerate inference of text-to-image
# diffusion models"): 1×1 convolutions as matrix products, Triton's block sizes tuned by coordinate descent, no
# epilogue fusion into the matrix products
DIFFUSERS_INDUCTOR = {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True,
                      "coordinate_descent_check_all_directions": True, "epilogue_fusion": False}


def big_images(folder: Path, device, size: int, steps: int) -> list[dict]:
    """Seconds and peak memory of one `size`² image with VAE tiling and offloading (README: big images on small
    GPUs); diffusers fp16 with tiling and model offload first, as its memory guide gives it."""
    import torch

    from latentgen.generation.models import open_pipeline

    cuda = device.type == "cuda"
    rows = []

    def measure(name, build, call):
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            model = build()
            start = time.perf_counter()
            call(model)
            synchronize(device)
            seconds = time.perf_counter() - start
        except Exception as e:  # out of memory without tiling is a finding; the other rows run on
            rows.append({"path": name, "s": None, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"})
        else:
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
            rows.append({"path": name, "s": round(seconds, 2), "peak GB": peak and round(peak, 2)})
        print(json.dumps(rows[-1]), flush=True)

    def diffusers_offloaded():
        diff = diffusers_fp16(folder, "cpu")
        diff.vae.enable_tiling()
        if cuda:
            diff.enable_model_cpu_offload(device=device)
        return diff

    def ours(offload=None, tiling=True):
        return lambda: open_pipeline(folder, "auto", device, embeddings_dir=None, vae_tiling=tiling, offload=offload)

    measure("diffusers fp16, VAE tiling, model offload", diffusers_offloaded,
            lambda d: d([PROMPT], num_inference_steps=steps, height=size, width=size, guidance_scale=7.5))
    for name, build in (("latentgen (defaults)", ours(tiling=False)), ("latentgen --vae-tiling", ours()),
                        ("latentgen --vae-tiling --offload model", ours("model")),
                        ("latentgen --vae-tiling --offload sequential", ours("sequential"))):
        measure(name, build, lambda pipe: pipe([PROMPT], num_inference_steps=steps, height=size, width=size,
                                               guidance_scale=7.5, scheduler="dpm++", seed=[0]))
    return rows


def unet_share(folder: Path, device, images: int, bf16_peak: float, tuned: bool = False) -> list[dict]:
    """`flops.unet_rate` in bf16 on `device`, eager and compiled (`torch.compile`'s default mode), or (`tuned`) compiled
    with `DIFFUSERS_INDUCTOR` and with Inductor's autotuning (`max-autotune-no-cudagraphs`), as a share of the
    bf16 matrix peak."""
    def row(name, r, seconds):
        out = {"U-Net": name, "rows": 2 * images, "GFLOP/call": round(r["flops"] / 1e9, 1),
               "ms/call": round(seconds * 1e3, 2), "TFLOP/s": round(r["flops"] / seconds / 1e12, 1),
               "share of bf16 peak": f"{r['flops'] / seconds / 1e12 / bf16_peak:.0%}"}
        print(json.dumps(out), flush=True)  # a section cut short by its time limit still leaves these
        return out

    if not tuned:  # torch.compile's default mode, as in the README's figures (CUDA graphs change little at 16 rows)
        r = unet_rate(str(folder), images, compile=True, device=device, dtype="bf16",
                      compile_kwargs={"mode": "default"})
        return [row("eager", r, r["seconds"]), row("compiled", r, r["compiled_seconds"])]
    rows = []
    for name, kwargs in (("compiled, diffusers' Inductor settings", {"options": DIFFUSERS_INDUCTOR}),
                         ("compiled, max-autotune-no-cudagraphs", {"mode": "max-autotune-no-cudagraphs"})):
        start = time.perf_counter()
        r = unet_rate(str(folder), images, compile=True, device=device, dtype="bf16", compile_kwargs=kwargs)
        rows.append(row(name, r, r["compiled_seconds"]) | {"section s (compiles)": round(time.perf_counter() - start)})
    return rows


def train_unet_py(folder: Path, batch: int, steps: int, launch: list[str] | None = None, ema: bool = True) -> float:
    """Samples/s of `train_unet.py` itself continuing the folder's U-Net (its VAE and text encoder, the shapes
    dataset at the folder's resolution, latents and text states cached first, mixed precision for the hardware),
    as its log reports them after the first step; `bench/training.py` runs it the same way on the CPU. `launch`:
    `accelerate launch` flags to start it with (one process)."""
    import yaml

    out = Path(tempfile.mkdtemp(prefix="bench-gpu-train-"))
    config = {"output_dir": str(out / "run"), "pretrained_pipeline": str(folder), "text_encoder": {"kind": "pipeline"},
              "max_steps": steps + 1, "train_batch_size": batch, "mixed_precision": "auto", "ema": ema,
              "checkpoint_every": 100000, "validate_every": 0, "validation_steps": 1,
              "validation_prompts": [PROMPT], "cache_dir": str(out / "cache"), "noise": {"snr_gamma": 5.0},
              "data": {"source": "shapes", "resolution": 8 * unet_size(folder), "num_samples": 4 * batch,
                       "max_shapes": 2}}
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    start = [sys.executable] if launch is None else [sys.executable, "-m", "accelerate.commands.launch", *launch,
                                                     "--num_processes", "1", "--dynamo_backend", "no"]
    r = subprocess.run([*start, str(ROOT / "train_unet.py"), "--config", str(out / "config.yaml")],
                       capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    return float(re.search(r"([\d.]+) samples/s \(after the first step\)", r.stdout).group(1))


def unet_size(folder: Path) -> int:
    return json.loads((folder / "unet" / "config.json").read_text())["sample_size"]


def training(folder: Path, device, batch: int, steps: int) -> list[dict]:
    """The core of diffusers' `train_text_to_image.py` with `--mixed_precision fp16` (fp32 weights, fp16
    autocast, a gradient scaler, the frozen VAE and text encoder in fp16 run on every step) against
    `train_unet.py` itself, on the folder's U-Net at the same batch."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    size = 8 * unet_size(folder)
    pixels = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    ids = tokenizer([PROMPT] * batch, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids.to(device)
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
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

    seconds = best_time(lambda: [plain() for _ in range(steps)], repeat=1, warmup=1, device=device)
    reference = steps * batch / seconds
    ours = train_unet_py(folder, batch, steps)
    return [{"step": "diffusers train_text_to_image.py (fp16 autocast, VAE + text encoder every step)",
             "batch": batch, "samples/s": round(reference, 1), "speed-up": "1.00×"},
            {"step": "train_unet.py (cached latents and text states, mixed precision auto, EMA)", "batch": batch,
             "samples/s": round(ours, 1), "speed-up": f"{ours / reference:.2f}×"}]


def zero(folder: Path, batch: int, steps: int) -> list[dict]:
    """DeepSpeed on one GPU, a smoke run of `accelerate launch --use_deepspeed` (issue #47): train_unet.py's
    samples/s plainly and under ZeRO-2 and ZeRO-3 (one process partitions nothing: what it shows is that the
    engine runs, and what it costs), EMA off (DeepSpeed runs take none)."""
    rows, reference = [], None
    for name, launch in (("train_unet.py, one process", None),
                         ("DeepSpeed ZeRO-2 (accelerate launch --use_deepspeed)",
                          ["--use_deepspeed", "--zero_stage", "2"]),
                         ("DeepSpeed ZeRO-3", ["--use_deepspeed", "--zero_stage", "3"])):
        rate = train_unet_py(folder, batch, steps, launch, ema=False)
        reference = reference or rate
        rows.append({"run": name, "batch": batch, "samples/s": round(rate, 1), "vs plain": f"{rate / reference:.2f}×"})
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, help="folder for gpu.json")
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="tiny model, 2 steps: checks the script, measures nothing")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--only", nargs="+",
                   choices=["peak", "inference", "unet", "training", "graphs", "split", "tuned", "big", "zero"],
                   help="graphs: the U-Net compiled with CUDA graphs (mode reduce-overhead), no reference; "
                   "split: where one 8-image call's time goes, component by component; tuned: the U-Net "
                   "compiled with diffusers' Inductor settings and with Inductor's autotuning; big: a 2048² image with "
                   "VAE tiling and offloading, seconds and peak memory; zero: train_unet.py under DeepSpeed ZeRO-2/3 "
                   "on one GPU against plain")
    p.add_argument("--folder", type=Path, help="where the SD-shaped model is built, or found built by an earlier "
                   "run (one build serves several --only runs)")
    args = p.parse_args()
    import torch

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        # A static graph per input shape, not one dynamic graph after the second shape: faster kernels, and each
        # section's process finds the shapes that an earlier one compiled in Inductor's on-disk cache.
        torch._dynamo.config.automatic_dynamic_shapes = False
    width, resolution, steps = (32, 64, 2) if args.smoke else (320, 512, 20)
    repeat = 1 if args.smoke else args.repeat
    folder = sd_shaped_folder(args.folder or Path(tempfile.mkdtemp(prefix="bench-gpu-")) / "sd", width, resolution)
    sections = args.only or ["peak", "inference", "unet", "training"]
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "width": width, "resolution": resolution}
    print(f"# {report['device']}, torch {report['torch']}, SD-shaped U-Net width {width} at {resolution} px")
    if "peak" in sections:
        report["peak"] = peak(device, args.smoke)
        print(f"\nmatrix-product peak: bf16 {report['peak']['bf16']:.0f}, fp16 {report['peak']['fp16']:.0f} TFLOP/s")
    tables = {
        "inference": lambda: inference(folder, device, [1, 8], steps, repeat),
        "graphs": lambda: inference(folder, device, [1, 8], steps, repeat, GRAPHS, reference=False),
        "split": lambda: split(folder, device, 8, steps),
        "unet": lambda: unet_share(folder, device, 8,
                                   report.get("peak", {}).get("bf16") or peak(device, args.smoke)["bf16"]),
        "tuned": lambda: unet_share(folder, device, 8,
                                    report.get("peak", {}).get("bf16") or peak(device, args.smoke)["bf16"], True),
        "big": lambda: big_images(folder, device, 128 if args.smoke else 2048, 2 if args.smoke else 4),
        "training": lambda: training(folder, device, 2 if args.smoke else 16, 2 if args.smoke else 20),
        "zero": lambda: zero(folder, 2 if args.smoke else 16, 2 if args.smoke else 20),
    }
    for name, run in tables.items():
        if name in sections:
            report[name] = run()
            print()
            print_table(report[name])
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
