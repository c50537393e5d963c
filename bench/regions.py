"""Putting the right color on the right shape on the right side (#49): the default model's two-shape prompts, strict
binding and relation, asked plainly, with AND, and with regional prompts split left/right, same targets and seeds.

    python bench/regions.py [--seeds 4] [--groups two-heldout two-seen] [--base 0.5] [--model FOLDER]

Methods (the target: c1 k1 left of c2 k2 on b):
- plain: "a c1 k1 to the left of a c2 k2 on a b background" (the evaluation's own prompt);
- and: the plain prompt :0.5 AND "a c1 k1 on a b background" :0.25 AND "a c2 k2 on a b background" :0.25;
- regions: columns 1,1, the left region's prompt "a c1 k1 on a b background", the right one's "a c2 k2 on ...",
  with the plain prompt as the base prompt (--base of it over the whole image);
- regions-nobase: the same without the base prompt;
- attention, attention-nobase: the same two in the regional prompter's attention mode (one U-Net pass whose
  cross-attention reads each region's prompt inside it) instead of its latent mode.
"""

from __future__ import annotations

import argparse
import time

from common import ROOT  # noqa: F401  (the repository on the path)


def prompts_for(target, method: str) -> tuple[str, dict]:
    from latentgen.data.shapes import single_prompt

    (c1, k1), (c2, k2) = target.shapes
    b = target.background
    left, right = single_prompt(c1, k1, b), single_prompt(c2, k2, b)
    if method == "plain":
        return target.prompt, {}
    if method == "and":  # the parts' weights sum to 1, so the guidance is the request's, as for one prompt
        return f"{target.prompt} :0.5 AND {left} :0.25 AND {right} :0.25", {}
    if method in ("regions", "attention"):
        return f"{target.prompt} ADDBASE {left} BREAK {right}", {}
    return f"{left} BREAK {right}", {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--groups", nargs="+", default=["two-heldout"])
    p.add_argument("--base", type=float, default=0.5)
    p.add_argument("--methods", nargs="+",
                   default=["plain", "and", "regions", "regions-nobase", "attention", "attention-nobase"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--model", help="a pipeline folder (default: the shipped model)")
    args = p.parse_args()
    from latentgen.cli import quiet_libraries
    from latentgen.eval.adherence import evaluate_images, prompt_set
    from latentgen.generation.models import DEFAULT_MODEL, open_pipeline

    quiet_libraries()
    pipe = open_pipeline(args.model or DEFAULT_MODEL)
    targets = [t for t in prompt_set(27) if t.group in args.groups for _ in range(args.seeds)]
    seeds = [1000 + i for i in range(len(targets))]
    print(f"{args.model or 'default model'}, {len(targets)} images a method ({', '.join(args.groups)}, "
          f"{args.seeds} seeds), {args.steps} steps, base ratio {args.base}")
    print("| method | strict binding | strict relation | strict all | lenient binding | s/image |")
    print("|---|---|---|---|---|---|")
    for method in args.methods:
        regions = {"ratios": "1,1", "base": 0.0 if method.endswith("nobase") else args.base,
                   "calc": "attention" if method.startswith("attention") else "latent"} \
            if method.startswith(("regions", "attention")) else None
        start = time.perf_counter()
        images = []
        for target, seed in zip(targets, seeds):
            prompt, _ = prompts_for(target, method)
            images += pipe(prompt, seed=seed, num_inference_steps=args.steps, regions=regions).images
        seconds = (time.perf_counter() - start) / len(images)
        scores = evaluate_images(targets, images)
        for group in args.groups:
            r = scores[group]
            print(f"| {method} ({group}) | {100 * r['strict_binding']:.0f}% | {100 * r['strict_relation']:.0f}% | "
                  f"{100 * r['strict_all']:.0f}% | {100 * r['binding']:.0f}% | {seconds:.2f} |")


if __name__ == "__main__":
    main()
