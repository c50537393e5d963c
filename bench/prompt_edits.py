"""Can prompt editing swap a shape's colour or kind at a given step (#49)? The default model's held-out single-shape
prompts with one word edited, `a [red:blue:k] circle on a white background` (colour) or `a red [circle:square:k] on
...` (kind), for several switch steps k of 20, each image read by the strict judge: the share drawn in the word
edited to ("to"), in the word edited from ("from"), and how many keep the background.

    python bench/prompt_edits.py [--seeds 2] [--when 0 2 4 6 10 20]

Edit at k: the first word for steps 0..k, the second after (A1111's counting); k = 20 is the first word throughout.
"""

from __future__ import annotations

import argparse
import random

from common import ROOT  # noqa: F401  (the repository on the path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--when", type=int, nargs="+", default=[0, 2, 4, 6, 10, 20])
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    from latentgen.cli import quiet_libraries
    from latentgen.data.shapes import COLOR_NAMES, KINDS
    from latentgen.eval.adherence import prompt_set
    from latentgen.eval.analyzer import analyze
    from latentgen.generation.models import DEFAULT_MODEL, open_pipeline

    quiet_libraries()
    pipe = open_pipeline(DEFAULT_MODEL)
    rng = random.Random(0)
    targets = [t for t in prompt_set(27) if t.group == "one-heldout"]
    edits = []  # (what, from, to, background, the prompt with {edit} for the edited word)
    for t in targets:
        b, ((c, k),) = t.background, t.shapes
        other_color = rng.choice([x for x in COLOR_NAMES if x not in (b, c)])
        other_kind = rng.choice([x for x in KINDS if x != k])
        edits.append(("colour", c, other_color, b, f"a {{edit}} {k} on a {b} background"))
        edits.append(("kind", k, other_kind, b, f"a {c} {{edit}} on a {b} background"))
    print(f"default model, held-out single shapes: {len(targets)} prompts × {args.seeds} seeds per row, "
          f"{args.steps} steps, its own sampler and guidance; strict reading")
    print("| edited | switch after step | drawn as 'to' | drawn as 'from' | background kept |")
    print("|---|---|---|---|---|")
    for what in ("colour", "kind"):
        for when in args.when:
            to = start = bg = n = 0
            for i, (kind, a, b, background, template) in enumerate(e for e in edits if e[0] == what):
                prompt = template.format(edit=f"[{a}:{b}:{when}]")
                for s in range(args.seeds):
                    image = pipe(prompt, seed=3000 + 10 * i + s, num_inference_steps=args.steps).images[0]
                    found = analyze(image).strict()
                    main = max(found.shapes, key=lambda d: d.area) if found.shapes else None
                    got = None if main is None else (main.color if what == "colour" else main.kind)
                    to += got == b
                    start += got == a
                    bg += found.background == background
                    n += 1
            print(f"| {what} | {when} | {100 * to / n:.0f}% | {100 * start / n:.0f}% | {100 * bg / n:.0f}% |",
                  flush=True)


if __name__ == "__main__":
    main()
