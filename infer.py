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


def parse_args(argv, request_cls=None):
    from latentgen.generation import options
    from latentgen.generation.request import Request

    p = ArgumentParser(prog="infer.py", description=__doc__.splitlines()[1])
    options.add_flags(p, request_cls or Request)  # every generation option's flag, from the option table
    p.add_argument("--prompts-file", help="a text file with one prompt per line")
    p.add_argument("--batch-size", type=int, default=8, help="images per pipeline call")
    p.add_argument("--upscaler", metavar="FOLDER", help="an upscaler folder (default: the model folder's upscaler/)")
    p.add_argument("--loras-dir", default="loras", help="where <lora:NAME> finds NAME.safetensors (default: loras)")
    p.add_argument("--controlnets-dir", default="controlnets",
                   help="where --control finds a ControlNet by name (default: controlnets)")
    p.add_argument("--embeddings-dir", default="embeddings",
                   help="textual-inversion embeddings (*.safetensors) to load, each used as its file name in "
                        "prompts (default: embeddings, when it exists)")
    p.add_argument("--model", help="a diffusers pipeline folder, a single-file SD 1.x/2.x/SDXL or SD3/SD3.5 "
                                   "checkpoint (.safetensors), or the name of one in --models-dir (default: the "
                                   "model shipped with latentgen)")
    p.add_argument("--models-dir", default="models", help="where --model NAME is looked up (default: models)")
    p.add_argument("--vae", help="replace the model's VAE: a diffusers VAE folder or a single VAE file")
    p.add_argument("--components", metavar="FOLDER",
                   help="for an SD3/SD3.5 or Flux single file: a diffusers folder of that family giving what the "
                        "file lacks (T5's tokenizer; a transformer-only file's VAE and text encoders)")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"],
                   help="for single-file SD 2.x 768-v checkpoints that do not say they predict v")
    p.add_argument("--out", default="outputs", help="an image file (.png/.jpg) or a folder (default: outputs)")
    p.add_argument("--grid", action="store_true", help="also write one contact sheet of all images")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--compile", action="store_true",
                   help="compile the U-Net (on the CPU: once per model and shape, then cached; reports the time; "
                   "on CUDA: with CUDA graphs, and the VAE decoder too)")
    p.add_argument("--vae-tiling", action="store_true",
                   help="decode large images tile by tile (diffusers' VAE tiling): the memory of one tile, seams "
                        "blended")
    p.add_argument("--attention-slicing", action="store_true", help="attention a head at a time (less memory)")
    p.add_argument("--offload", choices=["model", "sequential"],
                   help="for models larger than the GPU's memory: keep them in main memory and move each model "
                        "(model) or each layer (sequential, slower still) to the GPU to run")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also load .bin/.ckpt weights (with torch.load(weights_only=True)); safetensors only by "
                        "default")
    p.add_argument("--replay", metavar="IMAGE", help="regenerate an image from its metadata and compare")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size must be ≥ 1, got {args.batch_size}")
    if args.compile and args.offload:
        p.error("--compile and --offload do not go together (the offload hooks move the weights a compiled graph "
                "would use); choose one")
    return args


def request_of(args, prompts, image=None, mask=None):
    """The run as one Request (checked later, once): its options from their flags (the option table), image k of
    the run with seed --seed + k."""
    from latentgen import validate
    from latentgen.generation import options
    from latentgen.generation.request import Request

    fields = options.from_args(args, Request) | dict(prompt=prompts, image=image, mask_image=mask)
    fields.setdefault("seed", validate.random_seed())  # replay's, without a Seed field
    return Request(**fields)


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
    request = request_of(args, prompts, image, mask).check("cli")
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
                         loras_dir=args.loras_dir, embeddings_dir=args.embeddings_dir,
                         controlnets_dir=args.controlnets_dir, components=args.components,
                         vae_tiling=args.vae_tiling, attention_slicing=args.attention_slicing, offload=args.offload)
    if args.upscaler:
        pipe.load_upscaler(args.upscaler)
    if args.compile:
        pipe.compile_unet(report=lambda message: print(message, file=sys.stderr))
    return pipe, model


def write(pipe, model, plan, paths, args, show=True) -> list:
    """Generate the plan's images in batches, each written with its metadata as soon as its batch is done."""
    import tqdm

    from latentgen.generation.outputs import run_about, write_images

    about = run_about(pipe, model, plan, vae=args.vae, prediction_type=args.prediction_type, components=args.components,
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
    args.components = args.components or meta.get("components", {}).get("path")
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
    units = settings.pop("control", None)
    if units and not request.control:  # the text names each ControlNet and its settings, not its image
        raise UserError(f"{args.replay} was made with ControlNet {', '.join(u.name for u in units)}; its control "
                        "image is not in the text: give it with --control MODEL:IMAGE (as many as it used)")
    if units and len(units) != len(request.control):
        raise UserError(f"{args.replay} used {len(units)} ControlNet unit(s); --control gave {len(request.control)}")
    if units:  # the text's settings with the images (and models, where the text's name is not found) given
        request = dataclasses.replace(request, control=[dataclasses.replace(
            u, image=given.image, model=given.model) for u, given in zip(units, request.control)])
    request = dataclasses.replace(request, **settings, num_images_per_prompt=1).check("cli")
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
