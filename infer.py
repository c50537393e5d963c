#!/usr/bin/env python
"""Generate images from text prompts.

    python infer.py --prompt "a red circle on a blue background" --guidance 7.5
    python infer.py --model path/to/sd-folder --prompt "a castle" --steps 25 --scheduler dpm++ --out castle.png
    python infer.py --prompt "a blue square" --image in.png --strength 0.6            # image-to-image
    python infer.py --prompt "a red circle" --image in.png --mask mask.png            # inpainting
    python infer.py --replay outputs/00000-42-a-red-circle.png                       # regenerate, compare
    accelerate launch --cpu --num_processes 2 infer.py --prompts-file prompts.txt     # split across processes
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from latentgen.cli import ArgumentParser, quiet_libraries, run_cli
from latentgen.errors import UserError


def parse_args(argv):
    from latentgen.components.schedulers import scheduler_names
    from latentgen.generation.guidance import add_apg_flags

    p = ArgumentParser(prog="infer.py", description=__doc__.splitlines()[1])
    p.add_argument("--prompt", action="append", help="a prompt (repeat the flag for several); A1111 weighting "
                                                     "syntax (word:1.3), (word), [word]")
    p.add_argument("--prompts-file", help="a text file with one prompt per line")
    p.add_argument("--negative-prompt", action="append", help="one for all prompts, or one per prompt")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (≤ 1: off)")
    p.add_argument("--steps", type=int, default=30, help="sampling steps")
    p.add_argument("--scheduler", choices=scheduler_names(), metavar="NAME",
                   help=f"sampler: {', '.join(scheduler_names())} (default: the model's own)")
    p.add_argument("--seed", type=int, help="seed of the first image; image k gets seed+k (default: random)")
    p.add_argument("--variation-seed", type=int,
                   help="A1111's variation seed: image k's noise is turned towards seed S+k's (default: random)")
    p.add_argument("--variation-strength", type=float, default=0.0,
                   help="how far, in [0, 1] (default 0: no variation; 1: the variation seed's own image)")
    p.add_argument("--seed-resize-from", metavar="WxH",
                   help="A1111's 'resize seed from': draw each seed's noise at this size, centered in the image's, "
                        "so an image made at WxH keeps much of its composition at another size")
    p.add_argument("--tiling", action="store_true", help="make the image tile seamlessly (A1111's Tiling)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--batch-size", type=int, default=8, help="images per pipeline call")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--image", help="init image: image-to-image, or inpainting with --mask")
    p.add_argument("--mask", help="inpainting mask, same size as --image (white = repaint)")
    p.add_argument("--strength", type=float, help="how much of the init image to redo, in (0, 1] "
                                                  "(default 0.8 for image-to-image, 1 for inpainting)")
    p.add_argument("--guidance-rescale", type=float, default=0.0, help="φ in [0, 1] (for zero-terminal-SNR models)")
    add_apg_flags(p)
    p.add_argument("--dynamic-threshold", type=float,
                   help="clip x̂0 at this percentile of |x̂0|, e.g. 0.995 (never below 3σ)")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=[0.0, 1.0], metavar=("START", "END"),
                   help="guide only in this fraction of the steps (0 = the noisiest)")
    p.add_argument("--hires-scale", type=float, help="hires fix: generate, upscale by this factor, then "
                                                      "image-to-image at the larger size (A1111's 'Hires upscale')")
    p.add_argument("--hires-steps", type=int, default=0, help="second-pass steps (default 0: as --steps)")
    p.add_argument("--hires-denoise", type=float, default=0.5, help="second-pass denoising strength, in (0, 1]")
    p.add_argument("--hires-upscaler", default="latent", choices=["latent", "lanczos"],
                   help="upscale the latents (default) or the decoded pixels (Lanczos)")
    p.add_argument("--upscale", type=int, help="run the model's trained upscaler after it (a cascade: e.g. 64 -> "
                                                 "128 px with 2); the default model ships one")
    p.add_argument("--upscale-steps", type=int, default=0, help="upscaler steps (default 0: the upscaler's own)")
    p.add_argument("--upscale-noise", type=int, help="the noise-augmentation level of the first image, 0-999 "
                                                     "(higher: the upscaler redraws more; default: the upscaler's)")
    p.add_argument("--upscale-guidance", type=float, help="the upscaler's guidance scale (default: its own)")
    p.add_argument("--upscale-strength", type=float,
                   help="the part of the upscaler's schedule to run, in (0, 1], starting from the first image "
                        "upsampled and noised (1: from pure noise; default: the upscaler's)")
    p.add_argument("--upscaler", metavar="FOLDER", help="an upscaler folder (default: the model folder's upscaler/)")
    p.add_argument("--lora", action="append", metavar="PATH[:SCALE]",
                   help="apply a LoRA (repeatable; diffusers or kohya/A1111 format); prompts may also hold "
                        "<lora:NAME:SCALE>, NAME looked up in --loras-dir")
    p.add_argument("--loras-dir", default="loras", help="where <lora:NAME> finds NAME.safetensors (default: loras)")
    p.add_argument("--embeddings-dir", default="embeddings",
                   help="textual-inversion embeddings (*.safetensors) to load, each used as its file name in "
                        "prompts (default: embeddings, when it exists)")
    p.add_argument("--model", help="a diffusers pipeline folder, a single-file SD 1.x/2.x/SDXL checkpoint "
                                   "(.safetensors), or the name of one in --models-dir (default: the model shipped "
                                   "with latentgen)")
    p.add_argument("--models-dir", default="models", help="where --model NAME is looked up (default: models)")
    p.add_argument("--vae", help="replace the model's VAE: a diffusers VAE folder or a single VAE file")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"],
                   help="for single-file SD 2.x 768-v checkpoints that do not say they predict v")
    p.add_argument("--out", default="outputs", help="an image file (.png/.jpg) or a folder (default: outputs)")
    p.add_argument("--grid", action="store_true", help="also write one contact sheet of all images")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--compile", action="store_true",
                   help="compile the U-Net (on the CPU: once per model and shape, then cached; reports the time; "
                   "on CUDA: with CUDA graphs, and the VAE decoder too)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also load .bin/.ckpt weights (with torch.load(weights_only=True)); safetensors only by "
                        "default")
    p.add_argument("--replay", metavar="IMAGE", help="regenerate an image from its metadata and compare")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size must be ≥ 1, got {args.batch_size}")
    return args


# What the request's checks call each field: the flag the user typed.
FLAG_NAMES = {"num_inference_steps": "--steps", "guidance_scale": "--guidance", "seed": "--seed",
              "strength": "--strength", "num_images_per_prompt": "--num-images", "image": "--image",
              "mask_image": "--mask", "hires": "--hires-scale", "upscale": "--upscale",
              "variation_seed": "--variation-seed", "variation_strength": "--variation-strength",
              "seed_resize_from": "--seed-resize-from"}


def request_of(args, prompts, image=None, mask=None):
    """The run as one Request (checked later, once): image k of the run gets seed --seed + k."""
    from latentgen import validate
    from latentgen.formats import lora
    from latentgen.generation.cascade import Upscale
    from latentgen.generation.guidance import apg_of
    from latentgen.generation.hires import Hires
    from latentgen.generation.request import Request

    hires, upscale = None, None
    if args.upscale is not None:
        upscale = Upscale(args.upscale, args.upscale_steps, args.upscale_noise, args.upscale_guidance,
                          args.upscale_strength)
    if args.hires_scale is not None:
        hires = Hires(args.hires_scale, args.hires_steps, args.hires_denoise, args.hires_upscaler)
    seed = args.seed if args.seed is not None else validate.random_seed()  # replay's, without a Seed field
    seed_resize = args.seed_resize_from and validate.size_text(args.seed_resize_from, FLAG_NAMES["seed_resize_from"])
    return Request(prompt=prompts, negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
                   guidance_scale=args.guidance, height=args.height, width=args.width,
                   num_images_per_prompt=args.num_images, seed=seed, variation_seed=args.variation_seed,
                   variation_strength=args.variation_strength, seed_resize_from=seed_resize, tiling=args.tiling,
                   scheduler=args.scheduler, strength=args.strength, guidance_rescale=args.guidance_rescale,
                   apg=apg_of(args), dynamic_threshold=args.dynamic_threshold,
                   guidance_interval=tuple(args.guidance_interval),
                   hires=hires, upscale=upscale, loras=[lora.parse_flag(v) for v in args.lora or []] or None,
                   image=image, mask_image=mask)


def main(argv=None):
    args = parse_args(argv)
    if args.replay:
        return replay(args)
    from latentgen.generation import outputs
    from latentgen.runtime.distributed import describe, process_state, relaunch_cpu_ranks, say, shared_random_seed

    relaunch_cpu_ranks(argv)  # `accelerate launch --cpu --num_processes N`: N ranks from here on
    state = process_state()  # one process, or this rank of `accelerate launch`, before anything else asks
    if args.seed is None:  # drawn once for the whole run, not once per rank
        args.seed = shared_random_seed(state)
    if args.variation_strength and args.variation_seed is None:
        args.variation_seed = shared_random_seed(state)
    # Check everything the user typed before loading a model, then what depends on the model, once.
    prompts = outputs.read_prompts(args.prompt, args.prompts_file)
    image = outputs.load_image(args.image) if args.image else None
    mask = outputs.load_image(args.mask, "mask") if args.mask else None
    request = request_of(args, prompts, image, mask).check(FLAG_NAMES)
    jobs = outputs.jobs(request)
    paths = outputs.output_paths(args.out, jobs)
    pipe, model = load_pipeline(args, state)
    plan = request.fit(pipe, args.batch_size)

    mine = range(state.process_index, len(jobs), state.num_processes)
    written = write(pipe, model, plan.take(mine), [paths[i] for i in mine], args, show=state.is_local_main_process)
    if state.num_processes > 1:
        say(f"{describe(state)}: wrote {len(written)} of {len(jobs)} images", sys.stderr)
    if args.grid:
        state.wait_for_everyone()
        if state.is_main_process:
            write_grid(jobs, paths, args.out)
    return written


def load_pipeline(args, state=None):
    """The pipeline on its device: under a multi-process launch with --device auto, this rank's own device."""
    from latentgen.generation.models import open_pipeline, resolve_model
    from latentgen.runtime.device import resolve_device

    quiet_libraries()
    device = resolve_device(args.device)
    if args.device == "auto" and state is not None and state.num_processes > 1:
        device = state.device  # e.g. cuda:1 for rank 1
    model = resolve_model(args.model, args.models_dir)
    pipe = open_pipeline(model, dtype=args.dtype, device=device, vae=args.vae,
                         prediction_type=args.prediction_type, allow_pickle=args.allow_pickle,
                         loras_dir=args.loras_dir, embeddings_dir=args.embeddings_dir)
    if args.upscaler:
        pipe.load_upscaler(args.upscaler)
    if args.compile:
        pipe.compile_unet(report=lambda message: print(message, file=sys.stderr))
    return pipe, model


def write(pipe, model, plan, paths, args, show=True) -> list:
    """Generate the plan's images in batches, each written with its metadata as soon as its batch is done."""
    import tqdm

    from latentgen.generation.outputs import run_about, write_images

    about = run_about(pipe, model, plan, vae=args.vae, prediction_type=args.prediction_type,
                      inputs={k: getattr(args, k) for k in ("image", "mask") if getattr(args, k)})
    if plan.loras:
        from latentgen.formats import lora

        lora.fuse(pipe, plan.loras)  # one LoRA set for the whole run: fused is faster per image
    # disable=None: a progress bar on a terminal only, never mixed into redirected output
    bar = tqdm.tqdm(total=plan.batch_size * plan.request.sampling_steps, unit="step", desc="generating",
                    file=sys.stderr, disable=None if show else True, leave=False)
    written = write_images(pipe, plan, paths, args.batch_size, about, on_progress=bar.update,
                           on_image=lambda path: print_path(path, tqdm.tqdm))
    bar.close()
    return written


def print_path(path, bars) -> None:
    """One written image's path on stdout, clear of the progress bar. One write per line (`say`): tqdm.write and
    print write the newline separately, and ranks of `accelerate launch` under PYTHONUNBUFFERED (as in many
    containers) then interleave their lines in a shared pipe."""
    from latentgen.runtime.distributed import say

    with bars.external_write_mode():
        say(str(path))


def write_grid(jobs, paths, out: str):
    from latentgen.generation.outputs import contact_sheet, grid_path, load_image
    from latentgen.io import save_image

    images = [load_image(paths[j.index]) for j in jobs]
    target = save_image(contact_sheet(images, [j.prompt for j in jobs]), grid_path(out))
    print(target)


def replay(args):
    """Regenerate an image from its metadata with the same model, seed and settings; compare pixels.

    Images infer.py wrote as PNG carry everything (our JSON chunk: the image's Request fields) and must come back
    bit for bit. Images that carry only AUTOMATIC1111's `parameters` (made by A1111 itself, or JPEG/WebP from
    infer.py) are regenerated from those settings with --model (default: the shipped model) and written, not
    compared."""

    import numpy as np

    from latentgen.formats.images import read_metadata
    from latentgen.generation.outputs import load_image
    from latentgen.generation.request import Request
    from latentgen.io import model_hash, same_hash

    found = read_metadata(args.replay)
    if "parameters" in found:
        return replay_a1111(args, found["parameters"])
    meta = found["latentgen"]
    model = Path(args.model or meta["model"])
    if not model.exists():
        raise UserError(f"the model folder {model} recorded in {args.replay} does not exist; pass --model FOLDER")
    if not same_hash(model_hash(model), meta["model_hash"]):
        print(f"warning: {model} holds other weights than the ones that made the image "
              f"({model_hash(model)} vs {meta['model_hash']})", file=sys.stderr)
    args.model = str(model)
    args.vae = args.vae or meta.get("vae", {}).get("path")
    args.prediction_type = args.prediction_type or meta.get("prediction_type")
    args.upscaler = args.upscaler or meta.get("upscaler", {}).get("path")
    if args.dtype == "auto":
        args.dtype = meta["dtype"]
    image, mask = (meta.get(k, {}).get("path") for k in ("image", "mask"))
    pin_threads(meta.get("threads"))
    pipe, _ = load_pipeline(args)
    plan = Request.from_metadata(meta, image=load_image(image) if image else None,
                                 mask_image=load_image(mask, "mask") if mask else None).fit(pipe)
    if plan.loras:
        from latentgen.formats import lora

        lora.fuse(pipe, plan.loras)  # as write() did: fused and unfused LoRAs differ in the last float bits
    out = pipe.generate(plan)
    new = np.asarray(out.images[0].convert("RGB"), dtype=np.int16)
    old = np.asarray(load_image(args.replay).convert("RGB"), dtype=np.int16)
    if args.out != "outputs":
        from latentgen.io import save_image

        print(save_image(out.images[0], args.out))
    if new.shape == old.shape and np.array_equal(new, old):
        print(f"replay of {args.replay}: identical, bit for bit")
        return
    diff = np.abs(new - old) if new.shape == old.shape else None
    detail = f"max |Δ| = {diff.max()} over {int((diff > 0).any(-1).sum())} pixels" if diff is not None \
        else f"size {new.shape[1]}×{new.shape[0]} vs {old.shape[1]}×{old.shape[0]}"
    print(f"replay of {args.replay}: differs ({detail})")
    sys.exit(1)


def pin_threads(recorded: list[int] | None) -> None:
    """Replay with the CPU threads the image was made with: a reduction split over another number of threads can
    change the last bits (`latentgen.runtime.threads`)."""
    from latentgen.runtime import threads

    if recorded and len(recorded) == 1:
        threads.pin(recorded[0])
    elif recorded:
        print(f"warning: the image was made while other processes took cores (its sampling ran on {recorded} "
              "threads in turn); the replay may differ in the last bits", file=sys.stderr)


def replay_a1111(args, parameters: str):
    """Generate again from an A1111 `parameters` text: its prompt, seed, steps, CFG scale, size, sampler, clip
    skip and hires fields; fields latentgen does not use are listed, not fatal."""
    from latentgen.generation import outputs
    from latentgen.generation.infotext import a1111_request
    from latentgen.io import model_hash, same_hash

    settings, fields, unused = a1111_request(parameters)
    if not settings["prompt"].strip():
        raise UserError(f"{args.replay}: its AUTOMATIC1111 parameters hold no prompt")
    if unused:
        print(f"warning: {args.replay}: ignored AUTOMATIC1111 fields: {', '.join(unused)}", file=sys.stderr)
    args.image = args.mask = None
    settings.setdefault("clip_skip", 0)  # A1111 writes `Clip skip` only when it is not 1 (no skip)
    request = request_of(args, [settings.pop("prompt")])
    request = dataclasses.replace(request, **settings, num_images_per_prompt=1).check(FLAG_NAMES)
    pipe, model = load_pipeline(args)
    recorded = fields.get("Model hash")
    if recorded and not same_hash(model_hash(model), recorded):
        print(f"warning: the image was made with model hash {recorded} ({fields.get('Model', '?')}); "
              f"{model} has {model_hash(model)}", file=sys.stderr)
    jobs = outputs.jobs(request)
    write(pipe, model, request.fit(pipe), outputs.output_paths(args.out, jobs), args)
    print(f"replayed the AUTOMATIC1111 parameters of {args.replay} (not compared: another program made it)")


if __name__ == "__main__":
    sys.exit(run_cli(main))
