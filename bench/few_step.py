"""Seconds to a strictly correct image: seconds per image ÷ strict accuracy on held-out prompts, for the default
model's 20-step sampling (its own sampler and guidance), its 4-step LCM student in latentgen, and the same student
in diffusers' own `LatentConsistencyModelPipeline` (LCMScheduler, 4 steps, its guidance embedded, as diffusers'
docs run an LCM). Speed alone would reward a student that draws the wrong thing quickly; this divides by how
often it draws the right one.

    python bench/few_step.py --student runs/lcm-shapes/pipeline [--seeds 2] [--steps 4 2]

Accuracy: the strict reading of `python -m latentgen.eval adherence` on the held-out groups (one shape: shape,
color and background; two shapes: binding and left/right relation), one image per call. Time: one image per call,
best of 3, each path in the same process one after the other. diffusers gets the prompt embeddings from
latentgen's text encoder (its pipelines cannot run MiniLM), which spares it the text encoding.
"""

from __future__ import annotations

import argparse

from common import ROOT, best_time, print_table

PROMPT = "a red circle on a blue background"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default=str(ROOT / "latentgen" / "default_model"))
    p.add_argument("--student", required=True, help="the LCM student's pipeline folder")
    p.add_argument("--seeds", type=int, default=2, help="images per held-out prompt")
    p.add_argument("--steps", type=int, nargs="+", default=[4, 2], help="the student's step counts")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--compile", action="store_true", help="also the student with latentgen's compiled U-Net "
                   "(`compile_unet`, as `infer.py --compile`); its compile is not timed")
    args = p.parse_args()
    import torch
    from diffusers import LatentConsistencyModelPipeline

    from latentgen import LatentPipeline
    from latentgen.eval.adherence import evaluate_images, prompt_set

    targets = [t for t in prompt_set(27) if t.group in ("one-heldout", "two-heldout") for _ in range(args.seeds)]
    seeds = [3000 + i for i in range(len(targets))]
    teacher = LatentPipeline.from_pretrained(args.teacher)
    student = LatentPipeline.from_pretrained(args.student)
    for pipe in (teacher, student):
        pipe.set_progress_bar_config(disable=True)
    theirs = LatentConsistencyModelPipeline(vae=student.vae, text_encoder=None, tokenizer=None, unet=student.unet,
                                            scheduler=student.scheduler, safety_checker=None, feature_extractor=None,
                                            requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)

    def ours(pipe, steps, scheduler=None):
        def run(prompts, seed_list):
            return pipe(prompts, seed=seed_list, num_inference_steps=steps, guidance_scale=args.guidance,
                        scheduler=scheduler).images
        return run

    def diffusers(steps):
        def run(prompts, seed_list):
            embeds = student.encode_prompts(prompts)[0]
            gens = [torch.Generator().manual_seed(s) for s in seed_list]
            return theirs(prompt_embeds=embeds, num_inference_steps=steps, guidance_scale=args.guidance,
                          generator=gens, width=student.default_size, height=student.default_size).images
        return run

    paths = [("teacher, 20 steps (its own sampler)", ours(teacher, 20))]
    compiled = None
    if args.compile:
        compiled = LatentPipeline.from_pretrained(args.student)
        compiled.set_progress_bar_config(disable=True)
        compiled.compile_unet()
    for steps in args.steps:
        paths += [(f"student, {steps} steps, latentgen", ours(student, steps, "lcm")),
                  (f"student, {steps} steps, diffusers' LatentConsistencyModelPipeline", diffusers(steps))]
        if compiled is not None:
            paths.append((f"student, {steps} steps, latentgen compiled", ours(compiled, steps, "lcm")))
    rows = []
    for name, run in paths:
        seconds = best_time(lambda: run([PROMPT], [0]))
        images = []
        for i in range(0, len(targets), 8):
            images += run([t.prompt for t in targets[i:i + 8]], seeds[i:i + 8])
        scores = evaluate_images(targets, images)
        one, two = scores["one-heldout"]["strict_all"], scores["two-heldout"]["strict_binding"]
        both = (one + scores["two-heldout"]["strict_relation"]) / 2
        rows.append({"path": name, "s per image": f"{seconds:.3f}", "one shape strict": f"{one:.0%}",
                     "two shapes strict binding": f"{two:.0%}",
                     "two shapes strict relation": f"{scores['two-heldout']['strict_relation']:.0%}",
                     "s per strictly correct image": f"{seconds / both:.3f}" if both else "∞",
                     "_s": seconds / both if both else float("inf")})
        print(rows[-1], flush=True)
    base = rows[0]["_s"]
    for r in rows:
        r["vs the teacher"] = f"{base / r.pop('_s'):.2f}×"
    print(f"\n{len(targets)} held-out prompts × images, {torch.get_num_threads()} threads; strictly correct: the "
          "mean of one-shape strict and two-shape strict relation")
    print_table(rows)


if __name__ == "__main__":
    main()
