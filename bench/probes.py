"""Smaller measurements the README quotes, each one command.

    python bench/probes.py samplers       # PNDM/LMS against DPM-Solver++ over guidance; diffusers against ours
    python bench/probes.py dpm-variants   # DPM-Solver++ 2M: first order, log-SNR-uniform steps, Karras sigmas
    python bench/probes.py bf16-drift     # how far bf16 images are from fp32 images, same seeds
    python bench/probes.py profile        # where a call of the default model spends its time [--images N --compile]
    python bench/probes.py train-step     # the U-Net training step: attention, channels-last, [--compile], profile
    python bench/probes.py memory         # the memory guard's estimate against measured peaks (default model)
    python bench/probes.py transformer-depth  # what a U-Net's deeper transformers (SDXL's) keep for backward
    python bench/probes.py shapes         # the strict shape measures: dataset, VAE round trip, default model
    python bench/probes.py pairs          # two-shape scores of the dataset's images and of their VAE round trip
    python bench/probes.py thread         # the default model sampling on the main thread and on another thread
    python bench/probes.py cascade        # seconds per image: the default model alone, with its upscaler, bicubic
    python bench/probes.py upscale-start  # the cascade's start, old (bilinear latents) and new (enlarged image)
    python bench/probes.py denoise        # where shapes are lost: latent noise through the decoder; img2img strengths
    python bench/probes.py wordllama      # a static multilingual token table (pip install --no-deps wordllama)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import ROOT

MODEL = str(ROOT / "latentgen" / "default_model")
PROMPT = "a red circle on a blue background"


def _pipe(dtype=None, model=MODEL, vae=None):
    """The default model (or `model`), with the VAE of folder `vae` (as train_vae.py writes it) if given. A VAE
    with other latent channels than the model's (a new latent space) is put in as it is: for round trips only."""
    from latentgen import LatentPipeline

    pipe = LatentPipeline.from_pretrained(model, torch_dtype=dtype)
    if vae:  # e.g. a decoder fine-tuned with decoder_only; swapped as infer.py --vae swaps it
        from diffusers import AutoencoderKL

        from latentgen.formats.folders import load_vae

        folder = (Path(vae) / "config.json").is_file()  # else a pipeline folder or a single file: load_vae's
        if folder and AutoencoderKL.load_config(vae)["latent_channels"] != pipe.vae.config.latent_channels:
            own = AutoencoderKL.from_pretrained(vae, use_safetensors=True)
            pipe.register_modules(vae=own.to(pipe.vae.dtype).eval())
        else:
            pipe.register_modules(vae=load_vae(vae, pipe.vae))
        pipe.keep_vae_safe()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _round_trip(pipe, images):
    """The images encoded and decoded by the pipeline's VAE."""
    import torch

    with torch.no_grad():
        latents = pipe.encode_images(pipe.image_processor.preprocess(images).float())
        return pipe.image_processor.postprocess(pipe.decode(latents))


def _heldout_samples(count, kinds=None):
    """The first `count` held-out single-shape dataset samples the probes read."""
    from latentgen.data.shapes import KINDS, ShapesSpec, make_sample

    spec = ShapesSpec(split="heldout", seed=5, max_shapes=1, kinds=tuple(kinds or KINDS))
    return [make_sample(spec, i) for i in range(count)]


def _singles(samples):
    """Kinds, images and captions of single-shape `samples`."""
    return [s.shapes[0].kind for s in samples], [s.render() for s in samples], [s.text for s in samples]


def _heldout_singles(count, kinds=None):
    """Kinds, images and captions of `_heldout_samples`."""
    return _singles(_heldout_samples(count, kinds))


def _largest(image):
    """The largest shape the analyzer finds in the image, or None."""
    from latentgen.eval.analyzer import analyze

    shapes = analyze(image).shapes
    return max(shapes, key=lambda d: d.area) if shapes else None


def _pixels(image):
    import numpy as np

    return np.asarray(image, dtype=np.float64)


def samplers(_):
    """Mean color of one image per sampler and guidance (a red circle on blue is mostly blue: ~(0.1, 0, 0.9)), and
    the mean absolute difference to diffusers' StableDiffusionPipeline in fp32 with the same sampler."""
    import torch
    from diffusers import StableDiffusionPipeline

    from latentgen.components.schedulers import make_scheduler

    ours = _pipe(torch.float32)
    ref = StableDiffusionPipeline.from_pretrained(MODEL, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    for guidance in (1.0, 2.0, 3.0, 4.0, 5.0, 7.5):
        cells = []
        for name in ("dpm++", "pndm", "lms"):
            ref.scheduler = make_scheduler(name, ref.scheduler.config)
            a = ref(PROMPT, num_inference_steps=20, guidance_scale=guidance,
                    generator=torch.Generator().manual_seed(0)).images[0]
            b = ours(PROMPT, num_inference_steps=20, guidance_scale=guidance, scheduler=name,
                     generator=torch.Generator().manual_seed(0)).images[0]
            color = (_pixels(b).reshape(-1, 3).mean(0) / 255).round(2).tolist()
            diff = abs(_pixels(a) - _pixels(b)).mean() / 255
            cells.append(f"{name} {color} (vs diffusers {diff:.3f})")
        print(f"guidance {guidance}: " + "; ".join(cells), flush=True)


def dpm_variants(_):
    """Held-out single-shape adherence at guidance 7.5, 20 steps, 2 seeds, for variants of DPM-Solver++ 2M."""
    import dataclasses

    from latentgen.components import schedulers
    from latentgen.eval.__main__ import adherence

    pipe = _pipe()
    base = schedulers.SCHEDULERS["dpm++"]
    variants = {"uniform timesteps (dpm++)": {}, "first order (= DDIM)": {"solver_order": 1},
                "log-SNR-uniform (use_lu_lambdas)": {"use_lu_lambdas": True},
                "Karras sigmas (dpm++-karras)": {"use_karras_sigmas": True}}
    for label, extra in variants.items():
        schedulers.SCHEDULERS["dpm++"] = dataclasses.replace(base, defining={**base.defining, **extra})
        scores, _, _ = adherence(pipe, 20, "dpm++", 7.5, 2, 27, groups=("one-heldout",))
        r = scores["one-heldout"]
        print(f"{label:>34}: shape {r['shape']:.0%}  shape color {r['shape_color']:.0%}  all {r['all']:.0%}  "
              f"all strict {r['strict_all']:.0%}", flush=True)


def bf16_drift(_):
    """Mean absolute pixel difference (of 255) between the default (bf16 here) and fp32 images, same seeds."""
    import numpy as np
    import torch

    prompts = [PROMPT, "a yellow square on a black background", "a green triangle on a white background",
               "a purple circle on a gray background"]  # tests/test_fast_path.py's prompts
    kw = dict(num_inference_steps=20, scheduler="dpm++", seed=[1, 2, 3, 4])
    fast = _pipe().__call__(prompts, **kw).images
    exact = _pipe(torch.float32).__call__(prompts, **kw).images
    diffs = [float(abs(_pixels(a) - _pixels(b)).mean()) for a, b in zip(fast, exact)]
    print("per image: " + ", ".join(f"{d:.2f}" for d in diffs) + f"; mean {np.mean(diffs):.2f} (of 255)")


def profile(args):
    """Where a call of the default model spends its time (20 steps, guidance 7.5, `--images` per call, `--compile`:
    the AOTInductor U-Net): the U-Net's calls, the VAE decode and the rest, then the operators that take the time."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from latentgen.generation import sampling

    pipe = _pipe()
    if args.compile:
        pipe.compile_unet(report=print)
    spent = {"run_unet": 0.0, "decode": 0.0}

    def timed(name):
        fn = getattr(sampling, name)

        def wrapper(*a, **k):
            start = time.perf_counter()
            out = fn(*a, **k)
            spent[name] += time.perf_counter() - start
            return out
        setattr(sampling, name, wrapper)

    n = args.images

    def call():
        return pipe([PROMPT] * n, num_inference_steps=20, guidance_scale=7.5, scheduler="dpm++", seed=list(range(n)))

    call()  # warm-up, the prompt cache, and the compiled U-Net loaded
    for name in spent:
        timed(name)
    best = None
    for _ in range(5):  # the best of five: this machine's speed drifts
        spent.update(dict.fromkeys(spent, 0.0))
        start = time.perf_counter()
        call()
        total = time.perf_counter() - start
        if best is None or total < best[0]:
            best = (total, dict(spent))
    total, parts = best
    rest = total - sum(parts.values())
    print(f"{n} image(s){' compiled' if args.compile else ''}: {1000 * total:.0f} ms; U-Net's 20 calls "
          f"{1000 * parts['run_unet']:.0f} ms ({100 * parts['run_unet'] / total:.0f}%), VAE decode "
          f"{1000 * parts['decode']:.0f} ms ({100 * parts['decode'] / total:.0f}%), the rest (sampler, guidance, "
          f"prompt, images) {1000 * rest:.0f} ms ({100 * rest / total:.0f}%)")
    if args.compile:  # torch's profiler does not see inside the compiled library: `bench/flops.py --compile` rates it
        return
    with torch.no_grad(), torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def train_step(args):
    """Samples/s of the default model's U-Net training step (batch 64, bf16 autocast, train_unet.py's AdamW): SDPA
    against plain matmul-softmax attention, channels-last against contiguous, eager against torch.compile; the
    operators of the step train_unet.py runs; the optimizer's and EMA's update alone."""
    import torch
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from latentgen.config import load_config
    from latentgen.runtime.device import set_attention
    from latentgen.training.loop import make_optimizer
    from latentgen.training.unet import UNetTrainConfig

    config = load_config(UNetTrainConfig, ROOT / "configs" / "unet-shapes.yaml")
    x, hidden, t = torch.randn(64, 4, 16, 16), torch.randn(64, 32, 384), torch.randint(0, 1000, (64,))
    variants = [("eager, SDPA attention", False, "sdpa", False), ("eager, math attention", False, "math", False),
                ("eager, math attention, channels-last", False, "math", True)]
    variants += [("torch.compile, math attention", True, "math", False)] if args.compile else []
    for label, compiled, attention, channels_last in variants:
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**config.unet).train()
        set_attention(unet, attention, torch.device("cpu"), training=True)
        if channels_last:
            unet.to(memory_format=torch.channels_last)
        model = torch.compile(unet) if compiled else unet
        optimizer = make_optimizer(unet.parameters(), config)

        def step():
            with torch.autocast("cpu", torch.bfloat16):
                pred = model(x, t, hidden).sample
            F.mse_loss(pred.float(), x).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        start = time.perf_counter()
        step()
        first = time.perf_counter() - start
        for _ in range(3):
            step()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        rate = args.steps * 64 / (time.perf_counter() - start)
        print(f"{label:>30}: first step {first:.1f} s, {rate:.1f} samples/s", flush=True)
        if label == "eager, math attention":
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                step()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
    _update_costs(UNet2DConditionModel(**config.unet), config)


def _update_costs(unet, config):
    """Milliseconds per update of the optimizer and EMA over the U-Net's tensors: torch's per-tensor AdamW loop
    against train_unet.py's fused AdamW, and diffusers' EMA update in a loop against its foreach one."""
    import torch
    from diffusers.training_utils import EMAModel

    from latentgen.training.loop import make_ema, make_optimizer

    params = list(unet.parameters())
    for p in params:
        p.grad = torch.randn_like(p)

    def ms(update):
        for _ in range(3):
            update()
        start = time.perf_counter()
        for _ in range(20):
            update()
        return (time.perf_counter() - start) / 20 * 1000

    loop = torch.optim.AdamW(params, lr=config.learning_rate, foreach=False)
    ema_loop = EMAModel(params, decay=config.ema_decay, foreach=False)
    ema = make_ema(unet, config)
    print(f"AdamW over {len(params)} tensors: per-tensor loop {ms(loop.step):.1f} ms, train_unet.py's "
          f"{ms(make_optimizer(params, config).step):.1f} ms; EMA update: loop "
          f"{ms(lambda: ema_loop.step(params)):.1f} ms, train_unet.py's {ms(lambda: ema.step(params)):.1f} ms")


_MEMORY_RUN = """
import sys
from latentgen import LatentPipeline
from latentgen.runtime.device import peak_memory_mb
from latentgen.runtime.memory import sampling_bytes
size, n = int(sys.argv[1]), int(sys.argv[2])
pipe = LatentPipeline.from_pretrained(sys.argv[3])
pipe.set_progress_bar_config(disable=True)
base = peak_memory_mb()
pipe(["a red circle"] * n, num_inference_steps=2, height=size, width=size, seed=0)
print(sampling_bytes(pipe.unet, pipe.vae, size, size, n, True) / 2**20, peak_memory_mb() - base)
"""


def memory(_):
    """Each size in a fresh process (VmHWM is a high-water mark): the guard's estimate, which must not be below
    the measured rise of the peak during the call."""
    import subprocess
    import sys

    print("| size | images | estimate (MB) | measured peak rise (MB) | estimate / measured |")
    print("|---|---|---|---|---|")
    for size, n in ((64, 4), (256, 4), (512, 4), (1024, 1), (1024, 4)):
        out = subprocess.run([sys.executable, "-c", _MEMORY_RUN, str(size), str(n), MODEL], capture_output=True,
                             text=True, check=True).stdout.split()
        estimate, measured = float(out[-2]), float(out[-1])
        print(f"| {size}×{size} | {n} | {estimate:.0f} | {measured:.0f} | {estimate / measured:.2f} |")


def transformer_depth(_):
    """The bytes autograd saves for the backward pass (parameters left out) of a small SDXL-shaped U-Net with one
    transformer block per attention and with SDXL's depths (1, 2, 10): the difference per feature map of the
    added blocks is the memory guard's TRANSFORMER_SAVED; and the guard's deep-transformer term against it."""
    import torch
    from diffusers import UNet2DConditionModel

    from latentgen.runtime.memory import deep_transformer_bytes, saved_for_backward

    def saved(depth, size):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            block_out_channels=(64, 128, 128), layers_per_block=2, sample_size=size, cross_attention_dim=64,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4, 4),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            transformer_layers_per_block=depth, projection_class_embeddings_input_dim=64 + 6 * 8)
        added = {"text_embeds": torch.randn(1, 64), "time_ids": torch.randn(1, 6)}
        return saved_for_backward(unet, torch.randn(1, 4, size, size), torch.tensor([10]), torch.randn(1, 77, 64),
                                  added_cond_kwargs=added), unet.config

    print("| latents | saved, depth 1 (MB) | saved, depth (1, 2, 10) (MB) | feature maps per added block | "
          "guard's term (MB) |")
    print("|---|---|---|---|---|")
    for size in (32, 64):
        (one, _), (deep, config) = saved((1, 1, 1), size), saved((1, 2, 10), size)
        maps = 128 * (5 * (size // 2) ** 2 + 45 * (size // 4) ** 2)  # 5 added blocks at level 1, 45 at level 2
        term = deep_transformer_bytes(config, size, size, 1, 4)
        print(f"| {size}×{size} | {one / 2**20:.1f} | {deep / 2**20:.1f} | {(deep - one) / 4 / maps:.1f} | "
              f"{term / 2**20:.1f} |")


def shapes(args):
    """The strict reading's measures per kind on the dataset's own images, on the VAE's round trip of them, and on
    the default model's images (`--seeds` per single-shape prompt of the eval, its own sampler unless
    `--scheduler`); `--kinds star` for the kind that the showcase LoRA teaches, `--lora FILE` to apply one."""
    import collections

    import numpy as np
    import torch

    from latentgen.eval.adherence import prompt_set
    from latentgen.eval.analyzer import STRICT

    def report(what, kinds, detected):
        """`detected`: the largest shape (or None) of each image, whose kind should be `kinds`'."""
        found = collections.defaultdict(list)
        for kind, d in zip(kinds, detected):
            found[kind].append(d)
        for kind, shapes in sorted(found.items()):
            seen = [d for d in shapes if d is not None]
            rect, solid = [d.rect_fill for d in seen], [d.solidity for d in seen]
            (low, high), (least, _), corners = STRICT[kind]
            wrong = [d for d in seen if d.strict_kind != kind]
            print(f"{what:>14} {kind:>8}: strict right {len(seen) - len(wrong)}/{len(shapes)}, "
                  f"rect fill {min(rect):.2f}-{max(rect):.2f} (median {np.median(rect):.2f}), solidity ≥ "
                  f"{min(solid):.2f} (median {np.median(solid):.2f}); of the wrong, rect fill outside "
                  f"{sum(not low <= d.rect_fill <= high for d in wrong)}, solidity below "
                  f"{sum(d.solidity < least for d in wrong)}, corners {sum(d.corners not in corners for d in wrong)}")

    kinds = tuple(args.kinds)
    samples = _heldout_samples(args.count, kinds)
    real_kinds, real, _ = _singles(samples)
    report("dataset", real_kinds, [_largest(image) for image in real])
    round_trip = [_largest(image) for image in _round_trip(_pipe(torch.float32, vae=args.vae), real)]
    report("VAE round trip", real_kinds, round_trip)
    by_pair = collections.defaultdict(list)  # (color, kind, background): kept strictly?
    for s, found in zip(samples, round_trip):
        by_pair[(s.shapes[0].color, s.shapes[0].kind, s.background)].append(
            found is not None and found.strict_kind == s.shapes[0].kind)
    worst = sorted((sum(v) / len(v), key, len(v)) for key, v in by_pair.items())[:4]
    print("  the round trip's worst held-out triples: " + ", ".join(
        f"{c} {k} on {b} {sum_:.0%} of {n}" for sum_, (c, k, b), n in worst))
    pipe = _pipe(vae=args.vae)
    if pipe.vae.config.latent_channels != pipe.unet.config.in_channels:
        print("(the VAE's latent space is not the default model's U-Net's: no generated images)")
        return
    targets = [t for t in prompt_set(27, kinds=kinds) if t.group.startswith("one")] * args.seeds
    images = pipe([t.prompt for t in targets], seed=list(range(1000, 1000 + len(targets))),
                     num_inference_steps=20, guidance_scale=7.5, loras=[(args.lora, 1.0)] if args.lora else None,
                     scheduler=args.scheduler).images
    report("default model", [t.shapes[0][1] for t in targets], [_largest(image) for image in images])


def pairs(args):
    """The ceiling of the two-shape scores: held-out two-shape dataset images, scored as the eval scores generated
    ones (their caption's shapes left to right), as drawn and through the default model's VAE (encode, decode)."""
    import torch

    from latentgen.data.shapes import ShapesSpec, make_sample
    from latentgen.eval.adherence import Target, evaluate_images
    from latentgen.eval.analyzer import analyze

    spec = ShapesSpec(split="heldout", seed=5, max_shapes=2, two_shape_fraction=1.0)
    samples = [make_sample(spec, i) for i in range(args.count)]
    left_to_right = [sorted(s.shapes, key=lambda d: d.center[0]) for s in samples]
    targets = [Target(s.text, s.background, tuple((d.color, d.kind) for d in shapes), True)
               for s, shapes in zip(samples, left_to_right)]
    images = [s.render() for s in samples]
    round_trip = _round_trip(_pipe(torch.float32, vae=args.vae), images)
    for what, drawn in (("dataset", images), ("VAE round trip", round_trip)):
        r = evaluate_images(targets, drawn)["two-heldout"]
        print(f"{what:>14} ({r['n']} images): " + ", ".join(
            f"{k} {r[k]:.0%} (strict {r['strict_' + k]:.0%})" for k in ("kinds", "binding", "relation")))
    # which shapes the round trip loses: each drawn shape's strict reading, by kind and by size (the two-shape
    # scenes' circumradii, 11-17% of the side, split at 14%)
    read: dict[tuple[str, str], list[bool]] = {}
    for shapes, image in zip(left_to_right, round_trip):
        found = analyze(image).strict().shapes
        for k, shape in enumerate(shapes):
            size = "small" if shape.radius < 0.14 * spec.resolution else "large"
            read.setdefault((shape.kind, size), []).append(len(found) == 2 and found[k].kind == shape.kind)
    print("round trip, each shape read strictly as its kind: " + ", ".join(
        f"{size} {kind}s {sum(ok)}/{len(ok)}" for (kind, size), ok in sorted(read.items())))


def thread(_):
    """Seconds per image of the default model (20 steps), sampled on the main thread, then on another thread."""
    import threading

    pipe = _pipe()

    def run(where, out):
        pipe(PROMPT, num_inference_steps=20, seed=0)  # warm-up
        start = time.perf_counter()
        for k in range(10):
            pipe(PROMPT, num_inference_steps=20, seed=k)
        out[where] = (time.perf_counter() - start) / 10

    out = {}
    run("main thread", out)
    worker = threading.Thread(target=run, args=("another thread", out))
    worker.start()
    worker.join()
    for where, seconds in out.items():
        print(f"{where}: {seconds:.3f} s per image")
    print(f"ratio: {out['another thread'] / out['main thread']:.2f}")


def guidance_norms(_):
    """The RMS of the guidance update εc − ε∅ at each of the default model's 20 steps (guidance 7.5), over two
    prompts, against the cap APG puts on it (a norm of 1 over the 16×16×4 latent: RMS 1/32)."""
    import latentgen.generation.sampling as sampling

    pipe = _pipe()
    seen = []
    run_unet = sampling.run_unet

    def spy(pipe, x_in, t, cond, rows_per_image, class_labels=None):
        out = run_unet(pipe, x_in, t, cond, rows_per_image, class_labels)
        if rows_per_image == 2:  # a guided call: [uncond; cond]
            uncond, conditional = out.chunk(2)
            seen.append((int(t), (conditional - uncond).flatten(1).pow(2).mean(1).sqrt().mean().item()))
        return out

    sampling.run_unet = spy
    try:
        pipe(["a red square on a green background", "a blue triangle left of a yellow circle on a black background"],
             num_inference_steps=20, seed=0, apg=False)
    finally:
        sampling.run_unet = run_unet
    cap = 1.0 / (4 * 16 * 16) ** 0.5
    for t, rms in seen:
        print(f"timestep {t:4d}: update RMS {rms:.3f}" + (f" (capped to {cap / rms:.0%})" if rms > cap else ""))


def apg_cost(_):
    """Milliseconds per image (8 per call, 20 steps, guidance 7.5) of the default model with plain guidance and with
    its own APG, alternated three times, the best of each kept: what the projection and the cap cost."""
    pipe = _pipe()
    prompts = [PROMPT] * 8
    best = {"plain": float("inf"), "APG": float("inf")}
    pipe(prompts, num_inference_steps=20, seed=0)  # warm-up
    for _ in range(3):
        for name, apg in (("plain", False), ("APG", None)):  # None: the model's own, APG
            start = time.perf_counter()
            pipe(prompts, num_inference_steps=20, seed=0, apg=apg)
            best[name] = min(best[name], (time.perf_counter() - start) / len(prompts))
    for name, seconds in best.items():
        print(f"{name}: {seconds * 1000:.1f} ms per image")
    print(f"ratio APG / plain: {best['APG'] / best['plain']:.3f}")


def cascade(_):
    """Seconds per image (20 steps, guidance 7.5, batches of 8) of the default model at 64 px, and of the cascade to
    128 px (its upscaler with its defaults), measured round by round in one run."""
    from latentgen.generation.cascade import Upscale

    pipe = _pipe()
    prompts = [PROMPT] * 8
    times = {"64 px": [], "cascade to 128 px": []}
    for variant, upscale in (("64 px", None), ("cascade to 128 px", Upscale(2))):
        pipe(prompts, num_inference_steps=20, seed=list(range(8)), upscale=upscale)  # warm-up
    for round_ in range(3):
        for variant, upscale in (("64 px", None), ("cascade to 128 px", Upscale(2))):
            start = time.perf_counter()
            pipe(prompts, num_inference_steps=20, seed=[8 * round_ + k for k in range(8)], upscale=upscale)
            times[variant].append((time.perf_counter() - start) / 8)
    for variant, seconds in times.items():
        print(f"{variant}: {min(seconds):.3f} s per image (best of 3 rounds of 8)")
    print(f"ratio: {min(times['cascade to 128 px']) / min(times['64 px']):.2f}")


def upscale_start(_):
    """Where the cascade's upscaler could start, read by the analyzer with no upscaler step: the first stage's
    latents ×2 bilinear, decoded (the start until 5fcfaa9), against its image ×2 bicubic, encoded and decoded (the
    start now); on the two-shape held-out prompts, 2 seeds each, as `python -m latentgen.eval upscale` draws them."""
    import torch
    import torch.nn.functional as F

    from latentgen.eval.adherence import evaluate_images, prompt_set
    from latentgen.eval.cascade import first_stage
    from latentgen.generation.cascade import initial

    pipe = _pipe()
    targets = [t for t in prompt_set(27) for _ in range(2)]
    keep = [i for i, t in enumerate(targets) if t.group == "two-heldout"]
    targets = [targets[i] for i in keep]
    latents, small = first_stage(pipe, targets, [1000 + i for i in keep], 20, 7.5)
    with torch.no_grad():
        starts = {"first stage, 64 px": None,
                  "latents x2 bilinear, decoded": F.interpolate(latents.float(), scale_factor=2, mode="bilinear"),
                  "image x2 bicubic, encoded, decoded": initial(pipe, latents, 2)}
        for name, z in starts.items():
            images = small if z is None else pipe.image_processor.postprocess(pipe.decode(z), output_type="pil")
            r = evaluate_images(targets, images)["two-heldout"]
            print(f"{name:36s} kinds {r['kinds']:.0%}  binding {r['binding']:.0%}  strict binding "
                  f"{r['strict_binding']:.0%}  (n {r['n']})")


def denoise(args):
    """Where the strict reading's shapes are lost, on 60 held-out single-shape dataset images: (1) Gaussian noise
    added to their scaled latents before decoding (how precise the latents must be for the decoder), (2) the
    pipeline's image-to-image at several strengths, 20 steps (strength s keeps the image and redraws
    its last s of the noise levels: a low strength tests the U-Net's denoising at low noise only), (3) from noise;
    and (4) the x0 that one U-Net call estimates from the latents noised to timestep t. (2)-(4) at each
    `--guidance` (default 7.5)."""
    import collections

    import torch

    from latentgen.generation.guidance import alpha_sigma, classifier_free_guidance, x0_from_prediction

    kinds, real, texts = _heldout_singles(60)
    pipe = _pipe(torch.float32, args.model, args.vae)

    def report(what, images):
        right, count = collections.Counter(), collections.Counter()
        for kind, image in zip(kinds, images):
            largest = _largest(image)
            count[kind] += 1
            right[kind] += largest is not None and largest.strict_kind == kind
        print(f"{what:>26}: strict right {sum(right.values())}/{len(images)} ("
              + ", ".join(f"{k} {right[k]}/{count[k]}" for k in sorted(count)) + ")", flush=True)

    pixels = pipe.image_processor.preprocess(real).float()
    with torch.no_grad():
        latents = pipe.encode_images(pixels)
        g = torch.Generator().manual_seed(0)
        for std in (0.0, 0.1, 0.2, 0.3):
            noisy = latents + std * torch.randn(latents.shape, generator=g)
            report(f"latent noise {std}", pipe.image_processor.postprocess(pipe.decode(noisy)))
    seeds = list(range(len(texts)))
    # where each strength starts on the model's 20-step schedule (as image-to-image cuts it)
    sampler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sampler.set_timesteps(20)
    for strength in (0.1, 0.3, 0.6):
        t = int(sampler.timesteps[20 - int(20 * strength)])
        alpha = float(sampler.alphas_cumprod[t])
        print(f"strength {strength} starts at timestep {t}, SNR {alpha / (1 - alpha):.3g}")
    # one U-Net call: the dataset latents noised to timestep t, the model's x0 estimate decoded (no sampler)
    cond, mask = pipe.encode_prompts(texts)
    uncond, uncond_mask = pipe.encode_prompts([""] * len(texts))
    scheduler = pipe.scheduler
    with torch.no_grad():
        for t in (2, 20, 69, 200, 561):
            step = torch.full((len(texts),), t)
            noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(t))
            alpha, sigma = alpha_sigma(scheduler.alphas_cumprod, t)
            noisy = alpha * latents + sigma * noise  # the forward process at t (the sampler's add_noise wants its
            # own timesteps set)
            cond_pred = pipe.unet(noisy, step, encoder_hidden_states=cond, encoder_attention_mask=mask).sample
            uncond_pred = pipe.unet(noisy, step, encoder_hidden_states=uncond,
                                    encoder_attention_mask=uncond_mask).sample
            for guidance in args.guidance:
                pred = classifier_free_guidance(uncond_pred, cond_pred, guidance)
                x0 = x0_from_prediction(pred, noisy, alpha, sigma, scheduler.config.prediction_type)
                report(f"x0 at t={t}, guidance {guidance:g}", pipe.image_processor.postprocess(pipe.decode(x0)))
    for guidance in args.guidance:
        for strength in (0.1, 0.3, 0.6):
            report(f"image-to-image {strength}, g {guidance:g}",
                   pipe(texts, image=pixels, strength=strength, seed=seeds, num_inference_steps=20,
                        guidance_scale=guidance).images)
        report(f"from noise, g {guidance:g}", pipe(texts, seed=seeds, num_inference_steps=20,
                                                   guidance_scale=guidance).images)


def wordllama(_):
    """Whether wordllama (the one multilingual embedding table found on PyPI, #16) could condition a bilingual
    default model: how Llama 2's tokenizer splits the dataset's Chinese words, how near each Chinese word's vector
    is to its English one (cosine of the mean token vectors), and whether two captions that swap the shape's and
    the background's colors differ as sets of token vectors (static vectors carry no order)."""
    import importlib.util
    from pathlib import Path

    import torch
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    spec = importlib.util.find_spec("wordllama")  # its files only: its __init__ imports what it serves with
    if spec is None:
        raise SystemExit("wordllama is not installed: pip install --no-deps wordllama")
    root = Path(spec.submodule_search_locations[0])
    table = next(iter(load_file(root / "weights" / "l2_supercat_256.safetensors").values())).float()
    tokenizer = Tokenizer.from_str((root / "tokenizers" / "l2_supercat_tokenizer_config.json").read_text())
    print(f"token table {tuple(table.shape)}")
    table = torch.nn.functional.normalize(table, dim=1)

    def tokens(text):
        return tokenizer.encode(text, add_special_tokens=False)

    def vector(text):
        return torch.nn.functional.normalize(table[tokens(text).ids].mean(0), dim=0)

    from latentgen.data.shapes import ZH_COLORS, ZH_KINDS, ZH_ONE

    words = {ZH_COLORS[c]: c for c in ("red", "blue", "green", "yellow")}
    words |= {ZH_KINDS[k]: k for k in ("circle", "square", "triangle")} | {"左边": "left", "右边": "right"}
    for zh, en in words.items():
        print(f"{zh} -> {tokens(zh).tokens}: cosine with '{en}' {float(vector(zh) @ vector(en)):.2f}")
    zh = lambda color, background: ZH_ONE[0].format(b=ZH_COLORS[background], c=ZH_COLORS[color],  # noqa: E731
                                                    k=ZH_KINDS["circle"])
    swapped = [("a red circle on a blue background", "a blue circle on a red background"),
               (zh("red", "blue"), zh("blue", "red"))]
    for a, b in swapped:
        same = sorted(tokens(a).ids) == sorted(tokens(b).ids)
        print(f"'{a}' / '{b}': {'the same' if same else 'different'} sets of token vectors")


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="probe", required=True)
    for name in ("samplers", "dpm-variants", "bf16-drift", "memory", "thread", "cascade", "wordllama",
                 "apg-cost", "guidance-norms", "upscale-start", "transformer-depth"):
        sub.add_parser(name)
    profile_parser = sub.add_parser("profile")
    profile_parser.add_argument("--images", type=int, default=8, help="images per call")
    profile_parser.add_argument("--compile", action="store_true", help="the AOTInductor-compiled U-Net")
    shapes_parser = sub.add_parser("shapes")
    shapes_parser.add_argument("--kinds", nargs="+", default=["circle", "square", "triangle"])
    shapes_parser.add_argument("--lora")
    shapes_parser.add_argument("--count", type=int, default=150, help="dataset images (held-out, one shape)")
    shapes_parser.add_argument("--vae", help="an AutoencoderKL folder to use instead of the model's")
    shapes_parser.add_argument("--seeds", type=int, default=1, help="the model's images per prompt")
    shapes_parser.add_argument("--scheduler", help="the sampler for the model's images (default: its own)")
    pairs_parser = sub.add_parser("pairs")
    pairs_parser.add_argument("--count", type=int, default=300)
    pairs_parser.add_argument("--vae", help="an AutoencoderKL folder to use instead of the model's")
    train_step_parser = sub.add_parser("train-step")
    train_step_parser.add_argument("--steps", type=int, default=15)
    train_step_parser.add_argument("--compile", action="store_true", help="also torch.compile (compiles for 80 s)")
    denoise_parser = sub.add_parser("denoise")
    denoise_parser.add_argument("--model", default=MODEL)
    denoise_parser.add_argument("--vae", help="an AutoencoderKL folder to use instead of the model's")
    denoise_parser.add_argument("--guidance", type=float, nargs="+", default=[7.5])
    args = p.parse_args()
    {"samplers": samplers, "dpm-variants": dpm_variants, "bf16-drift": bf16_drift, "profile": profile,
     "train-step": train_step, "memory": memory, "shapes": shapes, "pairs": pairs, "thread": thread,
     "cascade": cascade, "upscale-start": upscale_start, "denoise": denoise, "wordllama": wordllama,
     "apg-cost": apg_cost, "guidance-norms": guidance_norms, "transformer-depth": transformer_depth}[args.probe](args)


if __name__ == "__main__":
    main()
