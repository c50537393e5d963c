"""Evaluate a model trained on the shapes data.

    python -m latentgen.eval adherence --model latentgen/default_model --guidance 7.5 1.0
    python -m latentgen.eval reconstruction --model latentgen/default_model
    python -m latentgen.eval distance --model latentgen/default_model
    python -m latentgen.eval steps --model latentgen/default_model --steps 5 10 20 40 --out eval/
    python -m latentgen.eval all --model latentgen/default_model --out eval/
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from latentgen import validate
from latentgen.cli import ArgumentParser, quiet_libraries, run_cli
from latentgen.components.schedulers import scheduler_name_of, scheduler_names
from latentgen.data.shapes import ALL_KINDS, KINDS, ShapesSpec, make_sample
from latentgen.errors import UserError
from latentgen.eval import placement
from latentgen.eval.adherence import ZH_PHRASINGS, evaluate_images, in_chinese, prompt_set
from latentgen.eval.cascade import evaluate
from latentgen.eval.metrics import clip_score, kid, photographs, reconstruction
from latentgen.formats import lora
from latentgen.formats.upscaler import check_level
from latentgen.generation import options
from latentgen.generation.guidance import model_apg
from latentgen.generation.models import open_pipeline, resolve_model
from latentgen.generation.outputs import contact_sheet
from latentgen.generation.request import Request
from latentgen.io import atomic_file, save_image, write_text

GROUP_ORDER = ("one-heldout", "one-seen", "two-heldout", "two-seen")


def load(model: str | None, dtype: str, device: str = "auto", loras: list[str] = (), compile: bool = False,
         vae: str | None = None):
    """The pipeline, with `loras` (`PATH[:SCALE]`, as infer.py's --lora) fused; `generate` asks for them.
    `compile`: the U-Net compiled (`LatentPipeline.compile_unet`), which an evaluation's hundreds of images repay.
    `vae`: a VAE folder or file in place of the model's, as infer.py's --vae."""

    pipe = open_pipeline(resolve_model(model), dtype=dtype, device=device, vae=vae, embeddings_dir=None)
    files = [(lora.resolve(path, pipe.loras_dir), scale) for path, scale in map(lora.parse_flag, loras)]
    lora.fuse(pipe, files)
    if compile:
        pipe.compile_unet(report=lambda message: print(message, file=sys.stderr))
    pipe.__dict__["eval_loras"] = [(str(path), scale) for path, scale in files] or None
    return pipe


def generate(pipe, prompts: list[str], seeds: list[int], steps: int, scheduler: str | None, guidance: float,
             batch_size: int = 32, options: dict | None = None) -> list:
    """Images for `prompts`; `options`: more of the pipeline's request settings (`guidance_interval`,
    `guidance_rescale`, `dynamic_threshold`), the model's own where absent."""
    images = []
    for i in range(0, len(prompts), batch_size):
        images += pipe(prompts[i:i + batch_size], seed=seeds[i:i + batch_size], num_inference_steps=steps,
                       scheduler=scheduler, guidance_scale=guidance, loras=pipe.__dict__.get("eval_loras"),
                       **(options or {})).images
    return images


def adherence(pipe, steps: int, scheduler: str | None, guidance: float, seeds: int, per_group: int,
              groups: tuple[str, ...] = GROUP_ORDER, kinds: tuple[str, ...] = KINDS,
              options: dict | None = None, language: str = "en", phrasing: str = "dataset") -> tuple[dict, list, list]:
    """`language` "zh": the same targets asked in Chinese, in the dataset's `phrasing` or "unseen" ones."""
    targets = [t for t in prompt_set(per_group, kinds=kinds) if t.group in groups for _ in range(seeds)]
    if language == "zh":
        targets = in_chinese(targets, phrasing)
    seed_list = [1000 + i for i in range(len(targets))]
    images = generate(pipe, [t.prompt for t in targets], seed_list, steps, scheduler, guidance,
                      options=options)
    return evaluate_images(targets, images), targets, images


def real_images(count: int, split: str = "heldout", max_shapes: int = 1, resolution: int = 64, seed: int = 7):

    spec = ShapesSpec(split=split, resolution=resolution, seed=seed, max_shapes=max_shapes)
    return [make_sample(spec, i).render() for i in range(count)]


def adherence_table(results: dict[float, dict]) -> str:
    attrs = ["background", "shape", "shape_color", "two_shapes", "colors", "kinds", "binding", "relation", "all",
             "strict_shape", "strict_kinds", "strict_binding", "strict_relation", "strict_all"]
    lines = ["| guidance | prompts | n | " + " | ".join(attrs) + " |", "|" + "---|" * (len(attrs) + 3)]
    for guidance, groups in results.items():
        for group in GROUP_ORDER:
            if group in groups:
                r = groups[group]
                cells = [f"{100 * r[a]:.0f}%" if a in r else "" for a in attrs]
                lines.append(f"| {guidance} | {group} | {r['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def kind_table(results: dict[float, dict]) -> str:
    """Strict shape right per kind, one-shape prompts: which kinds the model fails."""
    kinds = sorted({k for groups in results.values() for r in groups.values() for k in r.get("by_kind", {})})
    lines = ["| guidance | prompts | " + " | ".join(f"{k} (strict)" for k in kinds) + " |",
             "|" + "---|" * (len(kinds) + 2)]
    for guidance, groups in results.items():
        for group in GROUP_ORDER:
            by_kind = groups.get(group, {}).get("by_kind")
            if by_kind:
                cells = [f"{100 * by_kind[k]['strict_shape']:.0f}% of {by_kind[k]['n']}" if k in by_kind else ""
                         for k in kinds]
                lines.append(f"| {guidance} | {group} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sample_grid(targets, images, path: Path, columns: int = 8) -> None:

    save_image(contact_sheet(images, [t.prompt.replace(" background", "") for t in targets], columns), path)


def steps_sweep(pipe, schedulers: list[str], steps_list: list[int], seeds: int, guidance: float,
                real_count: int = 200, options: dict | None = None) -> list[dict]:
    """Adherence (held-out single shapes) and KID against real held-out images, per sampler and step count;
    `options` as `generate`'s."""

    real = real_images(real_count)
    rows = []
    for name in schedulers:
        for steps in steps_list:
            start = time.perf_counter()
            scores, _, images = adherence(pipe, steps, name, guidance, seeds, 27, groups=("one-heldout",),
                                          options=options)
            k, k_std = kid(real, images)
            held_out = scores["one-heldout"]
            rows.append({"scheduler": name, "steps": steps, "all": held_out["all"],
                         "strict_all": held_out["strict_all"], "kid": k, "kid_std": k_std,
                         "seconds": time.perf_counter() - start, "n": held_out["n"]})
            print(f"{name:>13} {steps:>3} steps: adherence {100 * held_out['all']:.0f}% "
                  f"(strict {100 * held_out['strict_all']:.0f}%)  KID×1000 {k:.1f}", file=sys.stderr)
    return rows


def steps_table(rows: list[dict]) -> str:
    steps_list = sorted({r["steps"] for r in rows})
    lines = ["| sampler | " + " | ".join(f"{s} steps" for s in steps_list) + " |", "|---|" + "---|" * len(steps_list)]
    for name in dict.fromkeys(r["scheduler"] for r in rows):
        cells = []
        for s in steps_list:
            r = next(r for r in rows if r["scheduler"] == name and r["steps"] == s)
            cells.append(f"{100 * r['all']:.0f}% / {100 * r['strict_all']:.0f}% / {r['kid']:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return ("\n".join(lines) + "\n\ncells: held-out single-shape prompts with all three attributes right, by the "
            "enclosing-circle analyzer / by the strict measures; KID×1000")


def steps_plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("the plot needs matplotlib: pip install 'latentgen[eval]'") from None

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(r["scheduler"] for r in rows):
        mine = sorted((r for r in rows if r["scheduler"] == name), key=lambda r: r["steps"])
        a.plot([r["steps"] for r in mine], [100 * r["strict_all"] for r in mine], marker="o", label=name)
        b.plot([r["steps"] for r in mine], [r["kid"] for r in mine], marker="o", label=name)
    for ax, label in ((a, "held-out adherence, all attributes, strict (%)"), (b, "KID × 1000 (lower is better)")):
        ax.set_xscale("log")
        ax.set_xticks(sorted({r["steps"] for r in rows}))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())  # 5, 10, 20 rather than 5×10⁰
        ax.minorticks_off()
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    a.legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_json(path: Path, data) -> None:

    write_text(path, json.dumps(data, indent=2) + "\n")


GUIDANCE_OPTIONS = {"guidance_interval", "guidance_rescale", "dynamic_threshold", "apg"}  # the option table's


def guidance_options(args) -> dict:
    """The request settings that the guidance flags (`GUIDANCE_OPTIONS`' flags) set, checked before the model
    loads."""
    fields = options.from_args(args, Request, only=GUIDANCE_OPTIONS)
    Request(prompt="checked", **fields).check("cli")
    return fields


def main(argv=None):
    p = ArgumentParser(prog="python -m latentgen.eval", description="Evaluate a model trained on the shapes data.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(q, generation=True):
        q.add_argument("--model", help="pipeline folder (default: the shipped model)")
        q.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
        q.add_argument("--out", help="folder for the report, tables, grids and plots")
        if generation:
            q.add_argument("--steps", type=int, nargs="+", default=[20])
            q.add_argument("--scheduler", choices=scheduler_names(), help="default: the model's own sampler")
            q.add_argument("--guidance", type=float, nargs="+", default=[7.5])
            options.add_flags(q, Request, only=GUIDANCE_OPTIONS)
            q.add_argument("--seeds", type=int, default=4, help="images per prompt")
            q.add_argument("--kinds", nargs="+", default=list(KINDS), choices=ALL_KINDS,
                           help="shape kinds of the prompts (star: what the showcase LoRA teaches)")
            q.add_argument("--compile", action="store_true", help="compile the U-Net, as infer.py --compile")
            q.add_argument("--language", choices=["en", "zh"], default="en",
                           help="ask in Chinese (the model's Chinese text encoder reads it)")
            q.add_argument("--phrasing", choices=list(ZH_PHRASINGS), default="dataset",
                           help="with --language zh: the dataset's phrasing, or ones no training caption used")
        q.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                       help="apply a LoRA (fused), as infer.py --lora; repeatable")
        q.add_argument("--vae", help="replace the model's VAE, as infer.py --vae (a VAE folder or file)")

    common(sub.add_parser("adherence", help="per-attribute accuracy, seen vs held-out"))
    common(sub.add_parser("reconstruction", help="VAE PSNR/SSIM on held-out shapes and photographs"), False)
    d = sub.add_parser("distance", help="KID to real held-out images (and CLIP score with a local checkpoint)")
    common(d)
    d.add_argument("--clip-checkpoint", help="a local open_clip checkpoint file for the CLIP score")
    d.add_argument("--clip-model", default="ViT-B-32")
    s = sub.add_parser("steps", help="adherence and KID against steps, for every sampler")
    common(s)
    s.add_argument("--schedulers", nargs="+", default=scheduler_names(), choices=scheduler_names())
    common(sub.add_parser("all", help="adherence at 7.5 and 1.0, reconstruction, distance: all.md"))
    u = sub.add_parser("upscale", help="the cascade: adherence and edge width of the upscaler's images against "
                                       "the first stage's and a bicubic upscale, per noise-augmentation level")
    common(u)
    u.add_argument("--noise-levels", type=int, nargs="+", default=[0, 100, 250])
    u.add_argument("--upscale-steps", type=int, help="upscaler steps (default: its own)")
    u.add_argument("--upscale-strength", type=float, help="the part of its schedule it runs (default: its own)")
    u.add_argument("--upscaler", metavar="FOLDER", help="default: the model folder's upscaler/")
    c = sub.add_parser("control", help="a layout ControlNet: strict adherence and placement (IoU with the drawn "
                                        "silhouettes), with and without the layout, on held-out samples")
    common(c)
    c.add_argument("--controlnet", required=True, help="the layout ControlNet (a folder or file)")
    c.add_argument("--control-weight", type=float, default=1.0)
    c.add_argument("--samples", type=int, default=64, help="held-out samples, half with two shapes")
    args = p.parse_args(argv)
    if getattr(args, "seeds", 1) < 1 or any(n < 1 for n in getattr(args, "steps", [1])):
        raise UserError("--seeds and --steps must be ≥ 1")
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the report")
    chosen = guidance_options(args)
    quiet_libraries()
    pipe = load(args.model, args.dtype, loras=args.lora, compile=getattr(args, "compile", False), vae=args.vae)
    report = []
    made: dict[float, tuple] = {}  # guidance -> (targets, images), reused by the distance section

    if args.command in ("adherence", "all"):
        guidances = args.guidance if args.command == "adherence" else [7.5, 1.0]
        results = {}
        for g in guidances:
            results[g], targets, images = adherence(pipe, args.steps[0], args.scheduler, g, args.seeds, 27,
                                                    kinds=tuple(args.kinds), options=chosen,
                                                    language=args.language, phrasing=args.phrasing)
            made[g] = (targets, images)
            if out:
                sample_grid(targets[::args.seeds][:48], images[::args.seeds][:48], out / f"samples-g{g}.png")
        table = adherence_table(results)
        sampler = args.scheduler or f"the model's own sampler, {scheduler_name_of(pipe.scheduler)}"
        apg = chosen.get("apg", model_apg(pipe))
        extra = "".join([f", in Chinese ({args.phrasing} phrasings)" if args.language == "zh" else "",
                         f", kinds {' '.join(args.kinds)}" if tuple(args.kinds) != KINDS else "",
                         f", LoRA {' '.join(args.lora)}" if args.lora else "",
                         f", VAE {args.vae}" if args.vae else "",
                         " guided over {:g}-{:g} of the steps".format(*chosen["guidance_interval"])
                         if "guidance_interval" in chosen else "",
                         f", guidance rescale {chosen['guidance_rescale']:g}" if "guidance_rescale" in chosen else "",
                         f", dynamic threshold {chosen['dynamic_threshold']:g}" if "dynamic_threshold" in chosen
                         else "",
                         ", APG (threshold {norm_threshold:g}, eta {eta:g}, momentum {momentum:g})".format(
                             **dataclasses.asdict(apg)) if apg else ""])
        report += [f"## Prompt adherence ({sampler}, {args.steps[0]} steps, {args.seeds} seeds per prompt{extra})",
                   table, kind_table(results)]
        if out:
            write_json(out / "adherence.json", {str(k): v for k, v in results.items()})

    if args.command in ("reconstruction", "all"):

        shapes = reconstruction(pipe.vae, real_images(256, max_shapes=2))
        photos = reconstruction(pipe.vae, photographs())
        report += ["## VAE reconstruction", "\n".join([
            "| images | n | PSNR (dB) | SSIM |", "|---|---|---|---|",
            f"| held-out shapes 64×64 | {shapes['n']} | {shapes['psnr']:.2f} | {shapes['ssim']:.4f} |",
            f"| scikit-image photographs 128×128 | {photos['n']} | {photos['psnr']:.2f} | {photos['ssim']:.4f} |"])]
        if out:
            write_json(out / "reconstruction.json", {"heldout_shapes": shapes, "photographs": photos})

    if args.command in ("distance", "all"):

        if args.guidance[0] in made:
            targets, images = made[args.guidance[0]]
            keep = [i for i, t in enumerate(targets) if t.group == "one-heldout"]
            targets, images = [targets[i] for i in keep], [images[i] for i in keep]
        else:
            _, targets, images = adherence(pipe, args.steps[0], args.scheduler, args.guidance[0], args.seeds, 27,
                                           groups=("one-heldout",), options=chosen)
        real = real_images(len(images) * 2)
        k, k_std = kid(real, images)
        reference, _ = kid(real[: len(real) // 2], real[len(real) // 2:])
        report += ["## Distribution distance",
                   f"KID×1000 (random-conv features) of {len(images)} generated held-out images against real "
                   f"held-out images: **{k:.2f} ± {k_std:.2f}** (real against real: {reference:.2f})"]
        checkpoint = getattr(args, "clip_checkpoint", None)
        if checkpoint:
            if not Path(checkpoint).is_file():
                raise UserError(f"--clip-checkpoint {checkpoint} does not exist")
            score = clip_score(images, [t.prompt for t in targets], checkpoint, args.clip_model)
            report.append(f"CLIP score ({args.clip_model}): **{score:.2f}**")
        else:
            report.append("CLIP score: skipped (no local open_clip checkpoint; pass --clip-checkpoint FILE)")

    if args.command == "control":
        results = placement.evaluate(pipe, args.controlnet, args.samples, args.seeds, args.steps[0],
                                     args.guidance[0], args.control_weight)
        report += [f"## Layout ControlNet {args.controlnet} (weight {args.control_weight:g}, {args.samples} held-out "
                   f"samples × {args.seeds} seeds, {args.steps[0]} steps, guidance {args.guidance[0]:g})",
                   placement.table(results)]
        if out:
            sample_grid([t.target for t in placement.layout_targets(args.samples)][:48],
                        results["with_images"][::args.seeds][:48], out / "samples-with-layout.png")
            write_json(out / "control.json", {k: v for k, v in results.items() if not k.endswith("_images")})

    if args.command == "upscale":

        for level in args.noise_levels:
            check_level(level, "--noise-levels")
        if args.upscale_steps is not None and args.upscale_steps < 1:
            raise UserError("--upscale-steps must be ≥ 1")
        if args.upscaler:
            pipe.load_upscaler(args.upscaler)
        if args.upscale_strength is not None:
            validate.in_range(args.upscale_strength, "--upscale-strength", 0.0, 1.0, low_open=True)
        report.append(evaluate(pipe, args.seeds, args.noise_levels, args.steps[0], args.upscale_steps,
                               args.guidance[0], out, strength=args.upscale_strength))

    if args.command == "steps":
        rows = steps_sweep(pipe, args.schedulers, sorted(args.steps), args.seeds, args.guidance[0],
                           options=chosen)
        report += ["## Quality against sampling steps", steps_table(rows)]
        if out:
            write_json(out / "steps.json", rows)
            steps_plot(rows, out / "steps.png")

    text = "\n\n".join(report) + "\n"
    print(text)
    if out:

        write_text(out / f"{args.command}.md", text)


if __name__ == "__main__":
    sys.exit(run_cli(main))
