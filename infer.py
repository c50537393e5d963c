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

import sys

from latentgen.cli import ArgumentParser, quiet_libraries, run_cli
from latentgen.errors import UserError


def parse_args(argv):
    from latentgen.schedulers import scheduler_names

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
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--batch-size", type=int, default=8, help="images per pipeline call")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--image", help="init image: image-to-image, or inpainting with --mask")
    p.add_argument("--mask", help="inpainting mask, same size as --image (white = repaint)")
    p.add_argument("--strength", type=float, help="how much of the init image to redo, in (0, 1] "
                                                  "(default 0.8 for image-to-image, 1 for inpainting)")
    p.add_argument("--guidance-rescale", type=float, default=0.0, help="φ in [0, 1] (for zero-terminal-SNR models)")
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
    p.add_argument("--model", help="a diffusers pipeline folder (default: the model shipped with latentgen)")
    p.add_argument("--out", default="outputs", help="an image file (.png/.jpg) or a folder (default: outputs)")
    p.add_argument("--grid", action="store_true", help="also write one contact sheet of all images")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--compile", action="store_true", help="torch.compile the U-Net (reports the compile time)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also load .bin weights (with torch.load(weights_only=True)); safetensors only by default")
    p.add_argument("--replay", metavar="IMAGE", help="regenerate an image from its metadata and compare")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size must be ≥ 1, got {args.batch_size}")
    from latentgen import validate

    validate.steps(args.steps, what="--steps")  # the model's own limit is checked once it is loaded
    validate.guidance(args.guidance, what="--guidance")
    if args.strength is not None:
        validate.in_range(args.strength, "--strength", 0.0, 1.0, low_open=True)
    if args.mask and not args.image:
        raise UserError("--mask needs --image (the image to inpaint)")
    args.hires = None
    if args.hires_scale is not None:
        from latentgen.hires import Hires

        if args.image:
            raise UserError("--hires-scale is for text-to-image; with --image, resize the image instead")
        args.hires = Hires(args.hires_scale, args.hires_steps, args.hires_denoise, args.hires_upscaler).check()
    return args


def main(argv=None):
    args = parse_args(argv)
    from latentgen import generate as g

    if args.replay:
        return replay(args)
    from latentgen.distributed import describe, process_state, relaunch_cpu_ranks, say

    relaunch_cpu_ranks(argv)  # `accelerate launch --cpu --num_processes N`: N ranks from here on
    state = process_state()  # one process, or this rank of `accelerate launch`, before anything else asks
    # Check everything the user typed before loading a model.
    prompts = g.read_prompts(args.prompt, args.prompts_file)
    jobs = g.plan_jobs(prompts, args.negative_prompt, args.num_images, args.seed)
    g.check_prompt_syntax(prompts + list(args.negative_prompt or []))
    paths = g.output_paths(args.out, jobs)
    image = g.load_image(args.image) if args.image else None
    mask = g.load_image(args.mask, "mask") if args.mask else None
    pipe, model = load_pipeline(args, state)
    options = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, height=args.height,
                   width=args.width, scheduler=args.scheduler, image=image, mask_image=mask, strength=args.strength,
                   guidance_rescale=args.guidance_rescale, dynamic_threshold=args.dynamic_threshold,
                   guidance_interval=tuple(args.guidance_interval))
    req = pipe.check_request(prompts[0], seed=0, **options)  # every setting checked before any work
    if args.hires:  # and the second pass's size (and its memory)
        h, w = args.hires.size(req.height, req.width, pipe.size_multiple)
        pipe.check_request(prompts[0], seed=0, **(options | dict(height=h, width=w, strength=args.hires.denoise,
                                                                num_inference_steps=args.hires.steps or args.steps)))

    mine = jobs[state.process_index::state.num_processes]
    written = run_jobs(pipe, model, mine, paths, options, args, show=state.is_local_main_process)
    if state.num_processes > 1:
        say(f"{describe(state)}: wrote {len(written)} of {len(jobs)} images", sys.stderr)
    if args.grid:
        state.wait_for_everyone()
        if state.is_main_process:
            write_grid(jobs, paths, args.out)
    return written


def load_pipeline(args, state=None):
    """The pipeline on its device: under a multi-process launch with --device auto, this rank's own device."""
    import time

    from latentgen.device import resolve_device, resolve_dtype
    from latentgen.generate import resolve_model
    from latentgen.pipeline import LatentPipeline, check_pipeline_folder, check_size, folder_geometry

    quiet_libraries()
    device = resolve_device(args.device)
    if args.device == "auto" and state is not None and state.num_processes > 1:
        device = state.device
    dtype = resolve_dtype(args.dtype, device)
    model = resolve_model(args.model)
    check_pipeline_folder(model, allow_pickle=args.allow_pickle)
    if not args.image:
        check_size(args.height, args.width, *folder_geometry(model))
    pipe = LatentPipeline.from_pretrained(model, torch_dtype=dtype, allow_pickle=args.allow_pickle).to(device)
    pipe.set_progress_bar_config(disable=True)
    if args.compile:
        start = time.perf_counter()
        seconds = pipe.compile_unet()
        print(f"compiled the U-Net in {seconds:.1f} s (total warm-up {time.perf_counter() - start:.1f} s)",
              file=sys.stderr)
    return pipe, model


def run_jobs(pipe, model, jobs, paths, options, args, show=True) -> list:
    import tqdm

    from latentgen import __version__
    from latentgen.generate import batches, file_sha256, image_metadata
    from latentgen.io import model_hash as hash_of
    from latentgen.io import save_image

    model_hash = hash_of(model)
    inputs = {k: {"path": str(getattr(args, k)), "sha256": file_sha256(getattr(args, k))}
              for k in ("image", "mask") if getattr(args, k)}
    # disable=None: a progress bar on a terminal only, never mixed into redirected output
    steps = args.steps + ((args.hires.steps or args.steps) if args.hires else 0)
    bar = tqdm.tqdm(total=len(jobs) * steps, unit="step", desc="generating", file=sys.stderr,
                    disable=None if show else True, leave=False)
    written = []
    for batch in batches(jobs, args.batch_size):
        call = dict(negative_prompt=[j.negative_prompt for j in batch], seed=[j.seed for j in batch],
                    on_step=lambda _: bar.update(len(batch)), **options)
        if args.hires:
            from latentgen import hires

            out = hires.generate(pipe, args.hires, [j.prompt for j in batch], **call)
        else:
            out = pipe([j.prompt for j in batch], **call)
        for job, image in zip(batch, out.images):
            meta = {"prompt": job.prompt, "negative_prompt": job.negative_prompt, "seed": job.seed,
                    "model": str(model.resolve()), "model_hash": model_hash, "version": __version__,
                    "device": str(pipe.unet.device.type), **out.info, **inputs}
            path = save_image(image, paths[job.index], **image_metadata(meta, paths[job.index].suffix))
            tqdm.tqdm.write(str(path))
            written.append(path)
    bar.close()
    return written


def write_grid(jobs, paths, out: str):
    from pathlib import Path

    from latentgen.generate import IMAGE_SUFFIXES, contact_sheet, load_image
    from latentgen.io import save_image

    target = Path(out)
    grid_path = target.with_name(f"{target.stem}-grid.png") if target.suffix.lower() in IMAGE_SUFFIXES \
        else target / "grid.png"
    images = [load_image(paths[j.index]) for j in jobs]
    save_image(contact_sheet(images, [j.prompt for j in jobs]), grid_path)
    print(grid_path)


def replay(args):
    """Regenerate an image from its metadata with the same model, seed and settings; compare pixels.

    Images infer.py wrote as PNG carry everything (our JSON chunk) and must come back bit for bit. Images that
    carry only AUTOMATIC1111's `parameters` (made by A1111 itself, or JPEG/WebP from infer.py) are regenerated
    from those settings with --model (default: the shipped model) and written, not compared."""
    from pathlib import Path

    import numpy as np

    from latentgen.generate import load_image, read_metadata
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
    if args.dtype == "auto":
        args.dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[meta["dtype"]]
    args.image = meta.get("image", {}).get("path")
    args.mask = meta.get("mask", {}).get("path")
    pipe, _ = load_pipeline(args)
    call = dict(negative_prompt=meta["negative_prompt"], seed=meta["seed"], num_inference_steps=meta["steps"],
                guidance_scale=meta["guidance"], height=meta["height"], width=meta["width"],
                scheduler=meta["scheduler"], eta=meta.get("eta", 0.0),
                guidance_rescale=meta.get("guidance_rescale", 0.0), dynamic_threshold=meta.get("dynamic_threshold"),
                guidance_interval=tuple(meta.get("guidance_interval", (0.0, 1.0))))
    if "hires_scale" in meta:
        from latentgen import hires

        settings = hires.Hires(meta["hires_scale"], meta["hires_steps"], meta["hires_denoise"], meta["hires_upscaler"])
        out = hires.generate(pipe, settings, meta["prompt"], **call)
    else:
        out = pipe(meta["prompt"], image=load_image(args.image) if args.image else None,
                   mask_image=load_image(args.mask, "mask") if args.mask else None, strength=meta.get("strength"),
                   **call)
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


def replay_a1111(args, parameters: str):
    """Generate again from an A1111 `parameters` text: its prompt, seed, steps, CFG scale, size, sampler and clip
    skip; fields latentgen does not use are listed, not fatal."""
    from pathlib import Path

    from latentgen.generate import a1111_request, output_paths, plan_jobs
    from latentgen.io import model_hash, same_hash

    settings, fields, unused = a1111_request(parameters)
    if not settings["prompt"].strip():
        raise UserError(f"{args.replay}: its AUTOMATIC1111 parameters hold no prompt")
    if unused:
        print(f"warning: {args.replay}: ignored AUTOMATIC1111 fields: {', '.join(unused)}", file=sys.stderr)
    pipe, model = load_pipeline(args)
    recorded = fields.get("Model hash")
    if recorded and not same_hash(model_hash(model), recorded):
        print(f"warning: the image was made with model hash {recorded} ({fields.get('Model', '?')}); "
              f"{model} has {model_hash(model)}", file=sys.stderr)
    clip_skip = settings.pop("clip_skip", None)
    if "hires" in settings:
        from latentgen.hires import Hires

        args.hires = Hires(**settings.pop("hires")).check()
    if clip_skip != pipe.config.clip_skip:
        from latentgen.text_encoders import text_encoder_for

        text_encoder_for(pipe.tokenizer, pipe.text_encoder, clip_skip=clip_skip)  # a one-line error if not CLIP
        pipe.register_to_config(clip_skip=clip_skip)
    jobs = plan_jobs([settings["prompt"]], [settings["negative_prompt"]], 1, settings.get("seed"))
    args.steps = settings.get("steps", args.steps)
    options = dict(num_inference_steps=args.steps, guidance_scale=settings.get("guidance", args.guidance),
                   height=settings.get("height"), width=settings.get("width"), scheduler=settings.get("scheduler"),
                   guidance_rescale=settings.get("guidance_rescale", 0.0))
    pipe.check_request(jobs[0].prompt, seed=0, **options)
    args.image = args.mask = None
    out = args.out if args.out != "outputs" else str(Path("outputs"))
    run_jobs(pipe, model, jobs, output_paths(out, jobs), options, args)
    print(f"replayed the AUTOMATIC1111 parameters of {args.replay} (not compared: another program made it)")


if __name__ == "__main__":
    sys.exit(run_cli(main))
