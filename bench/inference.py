"""Seconds per image: LatentPipeline (its defaults, then with its compiled U-Net) against diffusers'
StableDiffusionPipeline (its defaults, and in bf16 where this CPU has native bf16: what an expert would pick).

All load the same folder and run the same prompt, sampler (DPM-Solver++ 2M), steps and guidance, at 1 and 8
images per call, each in its own process (so peak memory is its own). For the shipped default model and for a
larger Stable-Diffusion-shaped U-Net built from a config. The compiled path starts from an empty compile cache:
its first round reports the compile time, the later rounds the time to load the compiled U-Net from the cache.
Then the prompt adherence of the default model's images under each path, so speed is never bought with quality.

    python bench/inference.py                 # everything (over 45 minutes on a 2-core AVX2 CPU)
    python bench/inference.py --quick         # default model only, batch 1 and 8
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from common import ROOT, best_time, peak_rss_mb, print_table, run_child, sd_shaped_folder

PROMPT = "a red circle on a blue background"


def child(args) -> dict:
    import torch

    from latentgen.components.schedulers import make_scheduler

    torch.manual_seed(0)
    messages = []  # the compiled U-Net's reports
    if args.path == "diffusers":
        from diffusers import StableDiffusionPipeline

        dtype = {"torch_dtype": torch.bfloat16} if args.dtype == "bf16" else {}  # else diffusers' default, fp32
        pipe = StableDiffusionPipeline.from_pretrained(args.model, local_files_only=True, **dtype)
        pipe.scheduler = make_scheduler("dpm++", pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)

        def run(prompts, seeds):
            gens = [torch.Generator().manual_seed(s) for s in seeds]
            return pipe(prompts, num_inference_steps=args.steps, guidance_scale=7.5, generator=gens).images
    else:
        from latentgen import LatentPipeline

        pipe = LatentPipeline.from_pretrained(args.model)
        pipe.set_progress_bar_config(disable=True)
        if args.compile:
            pipe.compile_unet(report=messages.append)

        def run(prompts, seeds):
            return pipe(prompts, num_inference_steps=args.steps, guidance_scale=7.5, scheduler="dpm++",
                        seed=seeds).images

    if args.adherence:
        from latentgen.eval.adherence import evaluate_images, prompt_set

        targets = [t for t in prompt_set(27) if t.group in ("one-heldout", "one-seen") for _ in range(2)]
        images = []
        for i in range(0, len(targets), 8):
            images += run([t.prompt for t in targets[i:i + 8]], list(range(i, min(i + 8, len(targets)))))
        return {"adherence": evaluate_images(targets, images), "rss_mb": peak_rss_mb()}
    # the warm-up call compiles the U-Net or loads it compiled; `messages` say how long that took
    seconds = best_time(lambda: run([PROMPT] * args.batch, list(range(args.batch))), repeat=args.repeat)
    return {"s_per_image": seconds / args.batch, "rss_mb": peak_rss_mb(),
            "dtype": str(getattr(pipe, "unet").dtype).removeprefix("torch."),
            "compile": [m for m in messages if m.startswith(("compiled", "loaded"))]}


def compile_and_load(runs: list[dict]) -> str:
    """'compile s / load s': what the first process paid to compile every package it needed (a batch can need two:
    its own and the one-image package that `compiled.batch_invariant` compares it with), and the longest time a
    later process took to load them from the cache."""
    def seconds(run: dict, verb: str) -> float:
        return sum(float(m.rsplit(" in ", 1)[1].removesuffix(" s")) for m in run["compile"] if m.startswith(verb))

    compiled = max(seconds(r, "compiled") for r in runs)
    loaded = max(seconds(r, "loaded") for r in runs)
    return f"{compiled:.1f} / {loaded:.1f}" if compiled or loaded else "-"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--child", action="store_true")
    p.add_argument("--path", choices=["diffusers", "latentgen"])
    p.add_argument("--model", default=str(ROOT / "latentgen" / "default_model"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--adherence", action="store_true")
    p.add_argument("--dtype", default="auto", help="diffusers' dtype: auto (its default, fp32) or bf16")
    p.add_argument("--compile", action="store_true", help="latentgen with its compiled U-Net")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=2, help="alternate the paths this many times; best of each")
    p.add_argument("--sd-steps", type=int, default=10)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    models = [("default model (64×64)", args.model, args.steps)]
    if not args.quick:
        folder = sd_shaped_folder(Path(tempfile.gettempdir()) / "latentgen-bench-sd-shaped")
        models.append(("SD-shaped U-Net, 256×256", str(folder), args.sd_steps))
    paths = {"diffusers": ["--path", "diffusers"], "latentgen": ["--path", "latentgen"],
             "latentgen compiled": ["--path", "latentgen", "--compile"]}
    from latentgen.runtime.precision import cpu_has_fast_bf16

    if cpu_has_fast_bf16():
        paths["diffusers bf16"] = ["--path", "diffusers", "--dtype", "bf16"]
    else:
        print("this CPU has no native bf16 (AMX or AVX-512-BF16), where bf16 runs slower than fp32: diffusers' "
              "fp32 default is also what an expert would pick here")
    os.environ["LATENTGEN_CACHE"] = tempfile.mkdtemp(prefix="latentgen-bench-cache-")  # compile times from zero
    rows = []
    for label, model, steps in models:
        for batch in (1, 8):
            repeat = "1" if "SD" in label else str(args.repeat)
            runs: dict[str, list[dict]] = {path: [] for path in paths}
            for _ in range(args.rounds):  # alternated, best of each: the machine's speed drifts over minutes
                for path, flags in paths.items():
                    runs[path].append(run_child("inference", *flags, "--model", model, "--batch", str(batch),
                                                "--steps", str(steps), "--repeat", repeat))
            best = {path: min(r, key=lambda x: x["s_per_image"]) for path, r in runs.items()}
            ref = best["diffusers"]["s_per_image"]
            row = {"model": label, "images/call": batch, "steps": steps, "diffusers s/img": f"{ref:.3f}"}
            for path in paths:
                if path != "diffusers":
                    row[f"{path} s/img"] = f"{best[path]['s_per_image']:.3f} " \
                                           f"({ref / best[path]['s_per_image']:.2f}×)"
            row["compile / load s"] = compile_and_load(runs["latentgen compiled"])
            row.update({f"{path} RSS MB": f"{best[path]['rss_mb']:.0f}" for path in paths})
            row["latentgen dtype"] = best["latentgen"]["dtype"]
            rows.append(row)
            print(json.dumps(rows[-1]), flush=True)
    print()
    print_table(rows, list(rows[0]))

    print("\nPrompt adherence of the default model, held-out and seen single-shape prompts (54 images each), "
          f"{args.steps} DPM-Solver++ steps, guidance 7.5:")
    for path, flags in paths.items():
        r = run_child("inference", *flags, "--model", args.model, "--steps", str(args.steps), "--adherence")
        for group, scores in r["adherence"].items():
            rates = {k: v for k, v in scores.items() if k not in ("n", "by_kind")}
            print(f"  {path:>18} {group}: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in rates.items()))


if __name__ == "__main__":
    main()
