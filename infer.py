#!/usr/bin/env python
"""Generate images from text prompts.

    python infer.py --prompt "a red circle on a blue background" --guidance 7.5
    python infer.py --model path/to/sd-folder --prompt "a castle" --steps 25 --scheduler dpm++ --out castle.png
"""

from __future__ import annotations

import sys

from latentgen.cli import ArgumentParser, quiet_libraries, run_cli
from latentgen.errors import UserError


def parse_args(argv):
    from latentgen.schedulers import scheduler_names

    p = ArgumentParser(prog="infer.py", description=__doc__.splitlines()[1])
    p.add_argument("--prompt", action="append", help="a prompt (repeat the flag for several)")
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
    p.add_argument("--model", help="a diffusers pipeline folder (default: the model shipped with latentgen)")
    p.add_argument("--out", default="outputs", help="an image file (.png/.jpg) or a folder (default: outputs)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also load .bin weights (with torch.load(weights_only=True)); safetensors only by default")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size must be ≥ 1, got {args.batch_size}")
    return args


def main(argv=None):
    args = parse_args(argv)
    from latentgen.generate import batches, output_paths, plan_jobs, read_prompts, resolve_model

    # Check everything the user typed before loading a model.
    prompts = read_prompts(args.prompt, args.prompts_file)
    jobs = plan_jobs(prompts, args.negative_prompt, args.num_images, args.seed)
    paths = output_paths(args.out, jobs)
    if args.steps < 1:
        raise UserError(f"--steps must be ≥ 1, got {args.steps}")
    if args.guidance < 0:
        raise UserError(f"--guidance must be ≥ 0, got {args.guidance}")

    import tqdm

    from latentgen.device import resolve_device, resolve_dtype
    from latentgen.io import save_image
    from latentgen.pipeline import LatentPipeline, check_pipeline_folder, check_size, folder_geometry

    quiet_libraries()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model = resolve_model(args.model)
    check_pipeline_folder(model, allow_pickle=args.allow_pickle)
    check_size(args.height, args.width, *folder_geometry(model))
    pipe = LatentPipeline.from_pretrained(model, torch_dtype=dtype, allow_pickle=args.allow_pickle).to(device)
    pipe.set_progress_bar_config(disable=True)

    bar = tqdm.tqdm(total=len(jobs) * args.steps, unit="step", desc="generating", file=sys.stderr)
    for batch in batches(jobs, args.batch_size):
        out = pipe([j.prompt for j in batch], negative_prompt=[j.negative_prompt for j in batch],
                   num_inference_steps=args.steps, guidance_scale=args.guidance, height=args.height,
                   width=args.width, seed=[j.seed for j in batch], scheduler=args.scheduler,
                   on_step=lambda _: bar.update(len(batch)))
        for job, image in zip(batch, out.images):
            path = save_image(image, paths[job.index])
            tqdm.tqdm.write(str(path))
    bar.close()


if __name__ == "__main__":
    sys.exit(run_cli(main))
