"""What `infer.py` does, as functions: read prompts, plan the images, run the pipeline in batches, write files."""

from __future__ import annotations

import contextlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from . import validate
from .errors import UserError

DEFAULT_MODEL = Path(__file__).resolve().parent / "default_model"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class Job:
    """One image to make: its index in the run, its prompt and its seed."""

    index: int
    prompt: str
    negative_prompt: str
    seed: int


def read_prompts(prompts: Sequence[str] | None, prompts_file: str | None) -> list[str]:
    """Prompts from --prompt flags and/or a file (one per line; blank lines and # comments skipped)."""
    found = list(prompts or [])
    if prompts_file:
        path = Path(prompts_file)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(f"prompts file {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"cannot read prompts file {path}: {err}") from None
        found += [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not found:
        raise UserError("no prompt given; use --prompt TEXT (repeatable) or --prompts-file FILE")
    if any(not p.strip() for p in found):
        raise UserError("a prompt is empty; give some text")
    return found


def check_prompt_syntax(prompts: Sequence[str]) -> None:
    """Weighting-syntax errors (unbalanced brackets) for every prompt, before any image is made."""
    from .prompts import has_syntax, parse

    for prompt in prompts:
        if has_syntax(prompt):
            parse(prompt)


def plan_jobs(prompts: Sequence[str], negative_prompts: Sequence[str] | None, num_images: int,
              seed: int | None) -> list[Job]:
    """Every image of the run: prompt-major order, seeds seed, seed+1, ... (random base seed when None)."""
    negatives = list(negative_prompts or [""])
    if len(negatives) == 1:
        negatives = negatives * len(prompts)
    if len(negatives) != len(prompts):
        raise UserError(f"got {len(prompts)} prompts and {len(negatives)} negative prompts; "
                        "give one negative prompt for all or one per prompt")
    if num_images < 1:
        raise UserError(f"--num-images must be ≥ 1, got {num_images}")
    if seed is None:
        seed = random.SystemRandom().randrange(2**31)
    seeds = iter(validate.seeds(seed, len(prompts) * num_images, what="--seed"))
    pairs = [(prompt, negative) for prompt, negative in zip(prompts, negatives) for _ in range(num_images)]
    return [Job(k, prompt, negative, next(seeds)) for k, (prompt, negative) in enumerate(pairs)]


def slug(text: str, length: int = 40) -> str:
    s = re.sub(r"[^\w]+", "-", text.lower(), flags=re.UNICODE).strip("-")
    return s[:length].rstrip("-") or "image"


def output_paths(out: str, jobs: Sequence[Job]) -> list[Path]:
    """Where each image goes: `--out x.png` for one image (x-0.png, x-1.png, ... for several), else a folder."""
    target = Path(out)
    if target.suffix.lower() in IMAGE_SUFFIXES:
        if target.is_dir():
            raise UserError(f"--out {target} is a folder with an image suffix; give a file name or another folder")
        if len(jobs) == 1:
            return [target]
        return [target.with_name(f"{target.stem}-{j.index}{target.suffix}") for j in jobs]
    if (target.exists() and not target.is_dir()) or (target.suffix and not target.exists()):
        raise UserError(f"--out {target} is not an image file name (a file ending in {', '.join(IMAGE_SUFFIXES)}) "
                        "nor a folder (an existing one, or a name without a suffix)")
    return [target / f"{j.index:05d}-{j.seed}-{slug(j.prompt)}.png" for j in jobs]


def batches(jobs: Sequence[Job], size: int) -> Iterator[list[Job]]:
    for i in range(0, len(jobs), size):
        yield list(jobs[i:i + size])


def resolve_model(model: str | None) -> Path:
    if model is not None:
        return Path(model)
    if not (DEFAULT_MODEL / "model_index.json").exists():
        raise UserError(f"no --model given and the default model is missing from {DEFAULT_MODEL}; "
                        "pass --model FOLDER (a diffusers pipeline folder)")
    return DEFAULT_MODEL


# ----------------------------------------------------------------------------------------------------------------
# Image metadata: AUTOMATIC1111's `parameters` text chunk (read by A1111, ComfyUI, civitai, ...) and our own
# JSON chunk with everything `infer.py --replay` needs.

A1111_SAMPLERS = {"ddpm": "DDPM", "ddim": "DDIM", "dpm++": "DPM++ 2M", "dpm++-karras": "DPM++ 2M Karras",
                  "euler": "Euler", "euler-a": "Euler a", "heun": "Heun", "unipc": "UniPC", "pndm": "PLMS",
                  "lms": "LMS"}
METADATA_KEY = "latentgen"
EXIF_USER_COMMENT = 0x9286  # in the Exif sub-IFD (0x8769), where A1111 puts `parameters` of JPEG/WebP images
EXIF_IFD = 0x8769


def quote(value) -> str:
    """A value as A1111 writes it into `parameters` (`infotext_utils.quote`): JSON-quoted when it holds a comma,
    a colon or a newline, so that the 'Key: value, ...' line still splits right."""
    text = str(value)
    if "," not in text and ":" not in text and "\n" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def a1111_parameters(meta: dict) -> str:
    """The `parameters` text A1111 writes: prompt, 'Negative prompt: …', then 'Key: value, …'."""
    fields = {"Steps": meta["steps"], "Sampler": A1111_SAMPLERS.get(meta["scheduler"], meta["scheduler"]),
              "CFG scale": meta["guidance"], "Seed": meta["seed"], "Size": f"{meta['width']}x{meta['height']}",
              "Model hash": meta["model_hash"], "Model": Path(meta["model"]).name}
    if meta.get("clip_skip"):
        fields["Clip skip"] = meta["clip_skip"] + 1  # A1111 counts the last layer as 1; diffusers as 0
    if "strength" in meta:
        fields["Denoising strength"] = meta["strength"]
    if meta.get("guidance_rescale"):
        fields["CFG Rescale phi"] = meta["guidance_rescale"]
    if "hires_scale" in meta:
        from .hires import UPSCALERS

        fields |= {"Denoising strength": meta["hires_denoise"], "Hires upscale": f"{meta['hires_scale']:g}",
                   "Hires steps": meta["hires_steps"], "Hires upscaler": UPSCALERS[meta["hires_upscaler"]]}
    fields["Version"] = f"latentgen {meta['version']}"
    lines = [meta["prompt"]]
    if meta.get("negative_prompt"):
        lines.append(f"Negative prompt: {meta['negative_prompt']}")
    lines.append(", ".join(f"{k}: {quote(v)}" for k, v in fields.items()))
    return "\n".join(lines)


def image_metadata(meta: dict, suffix: str) -> dict:
    """Keyword arguments for PIL's `save` that carry the metadata in the file's format: PNG text chunks
    (A1111's `parameters` and our JSON), or for JPEG/WebP the `parameters` text in EXIF UserComment as A1111
    writes it (piexif's UserComment.dump, 'unicode': an 8-byte charset code, then UTF-16 big-endian)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    if suffix.lower() not in (".jpg", ".jpeg", ".webp"):
        info = PngInfo()
        info.add_text("parameters", a1111_parameters(meta))
        info.add_text(METADATA_KEY, json.dumps(meta, ensure_ascii=False, sort_keys=True))
        return {"pnginfo": info}
    exif = Image.Exif()
    exif.get_ifd(EXIF_IFD)[EXIF_USER_COMMENT] = b"UNICODE\0" + a1111_parameters(meta).encode("utf-16-be")
    return {"exif": exif.tobytes()}


def _exif_parameters(im) -> str | None:
    comment = im.getexif().get_ifd(EXIF_IFD).get(EXIF_USER_COMMENT)
    if isinstance(comment, str):
        return comment
    if not comment:
        return None
    code, body = comment[:8], comment[8:]
    if code.startswith(b"UNICODE"):
        return body.decode("utf-16-be" if not body.startswith(b"\xff\xfe") else "utf-16", errors="replace")
    return body.decode("utf-8", errors="replace").rstrip("\0")


def read_metadata(path: str | Path) -> dict:
    """What an image says about how it was made: {"latentgen": our JSON} for images infer.py wrote as PNG, else
    {"parameters": A1111's text} (PNG text chunk or EXIF UserComment, as AUTOMATIC1111 and infer.py write it)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            ours = im.info.get(METADATA_KEY) or getattr(im, "text", {}).get(METADATA_KEY)
            parameters = im.info.get("parameters") or _exif_parameters(im)
    except FileNotFoundError:
        raise UserError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(f"cannot read image {path}: {err}") from None
    if ours:
        try:
            return {METADATA_KEY: json.loads(ours)}
        except json.JSONDecodeError:
            raise UserError(f"{path} has damaged latentgen metadata") from None
    if parameters:
        return {"parameters": parameters}
    raise UserError(f"{path} has no generation parameters (neither latentgen's nor AUTOMATIC1111's)")


# AUTOMATIC1111's infotext grammar (modules/infotext_utils.py): 'Key: value' pairs, a value JSON-quoted when it
# holds a comma; sizes as WxH.
_A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_a1111_parameters(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, {key: value}) of an A1111 `parameters` text, as A1111's
    `parse_generation_parameters` splits it."""
    *lines, last = text.strip().split("\n")
    if len(_A1111_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    fields = {}
    for key, value in _A1111_PARAM.findall(last):
        if len(value) > 1 and value[0] == value[-1] == '"':
            with contextlib.suppress(json.JSONDecodeError):
                value = json.loads(value)
        fields[key.strip()] = value.strip() if isinstance(value, str) else str(value)
    return "\n".join(prompt), "\n".join(negative), fields


# A1111's sampler names (and, since 1.9, its separate 'Schedule type') -> ours.
_FROM_A1111 = {name: ours for ours, name in A1111_SAMPLERS.items()}
_A1111_KARRAS = {"DPM++ 2M": "dpm++-karras"}
# Fields that describe the image but need no setting here.
_A1111_INFORMATIONAL = {"Model hash", "Model", "Version", "VAE", "VAE hash", "Lora hashes", "TI hashes",
                        "Emphasis", "Token merging ratio"}


def a1111_request(text: str) -> tuple[dict, dict[str, str], list[str]]:
    """Generation settings from an A1111 `parameters` text: (settings under our names, the fields as read, the
    fields latentgen does not use). Unknown samplers are a one-line error naming the ones we have."""
    prompt, negative, fields = parse_a1111_parameters(text)
    unused: list[str] = []
    settings: dict = {"prompt": prompt, "negative_prompt": negative}
    try:
        if "Steps" in fields:
            settings["steps"] = int(fields["Steps"])
        if "CFG scale" in fields:
            settings["guidance"] = float(fields["CFG scale"])
        if "Seed" in fields:
            settings["seed"] = int(fields["Seed"])
        if "Size" in fields:
            width, height = fields["Size"].lower().split("x")
            settings["width"], settings["height"] = int(width), int(height)
        if "CFG Rescale phi" in fields:
            settings["guidance_rescale"] = float(fields["CFG Rescale phi"])
        if "Clip skip" in fields:
            settings["clip_skip"] = int(fields["Clip skip"]) - 1 or None
    except ValueError as err:
        raise UserError(f"the AUTOMATIC1111 parameters hold a value latentgen cannot read: {err}") from None
    if "Sampler" in fields:
        sampler, schedule = fields["Sampler"], fields.get("Schedule type", "")
        name = (_A1111_KARRAS.get(sampler) if schedule == "Karras" else None) or _FROM_A1111.get(sampler)
        if name is None:
            known = sorted(set(_FROM_A1111) | {f"{s} (Schedule type: Karras)" for s in _A1111_KARRAS})
            raise UserError(f"the AUTOMATIC1111 sampler {sampler!r}"
                            f"{f' with schedule {schedule!r}' if schedule else ''} has no latentgen counterpart; "
                            f"known: {', '.join(known)}")
        settings["scheduler"] = name
    if "Hires upscale" in fields:
        from .hires import UPSCALERS

        upscaler = {name: ours for ours, name in UPSCALERS.items()}.get(fields.get("Hires upscaler", "Latent"))
        if upscaler is None:
            unused.append("Hires upscaler")  # an upscaler model latentgen does not have: the latent one instead
        try:
            settings["hires"] = dict(scale=float(fields["Hires upscale"]), steps=int(fields.get("Hires steps", 0)),
                                     denoise=float(fields.get("Denoising strength", 0.7)),
                                     upscaler=upscaler or "latent")
        except ValueError as err:
            raise UserError(f"the AUTOMATIC1111 hires fields hold a value latentgen cannot read: {err}") from None
    used = {"Steps", "CFG scale", "Seed", "Size", "CFG Rescale phi", "Clip skip", "Sampler", "Hires upscale",
            "Hires steps", "Hires upscaler", "Denoising strength"}
    if fields.get("Schedule type", "Automatic") == "Automatic" or (
            fields["Schedule type"] == "Karras" and fields.get("Sampler") in _A1111_KARRAS):
        used.add("Schedule type")  # else: a schedule we do not have for this sampler, listed as unused
    unused += [k for k in fields if k not in used | _A1111_INFORMATIONAL]
    return settings, fields, unused


def file_sha256(path: str | Path, length: int = 16) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:length]


def load_image(path: str | Path, what: str = "image"):
    """A PIL image from a file, or a one-line error."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise UserError(f"{what} file {path} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise UserError(f"cannot read {what} file {path}: {str(err).splitlines()[0]}") from None


def _wrap(text: str, fits: Callable[[str], bool], lines: int) -> list[str]:
    """`text` broken at spaces into at most `lines` lines that each `fits` (a pixel width: textwrap counts
    characters, which a proportional font does not fill evenly); a word too long for a line is cut,
    and text that does not fit in `lines` ends with '...'."""
    out: list[str] = []
    words = text.split()
    while words and len(out) < lines:
        line = words.pop(0)
        while not fits(line) and len(line) > 1:  # one word wider than the cell
            line = line[:-1]
        while words and fits(f"{line} {words[0]}"):
            line = f"{line} {words.pop(0)}"
        out.append(line)
    if words and out:
        last = out[-1]
        while last and not fits(last + "..."):
            last = last[:-1]
        out[-1] = last + "..."
    return out


def contact_sheet(images: Sequence, captions: Sequence[str], columns: int = 8, min_cell: int = 128):
    """A grid of images with a two-line caption under each (nearest-neighbour upscaled to `min_cell`)."""
    from PIL import Image, ImageDraw

    w, h = images[0].size
    scale = max(1, min_cell // max(w, h))
    cw, ch = w * scale, h * scale + 30
    columns = min(columns, len(images))
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (cw * columns, ch * rows), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, caption) in enumerate(zip(images, captions)):
        x, y = (i % columns) * cw, (i // columns) * ch
        sheet.paste(image.resize((cw, h * scale), Image.Resampling.NEAREST), (x, y))
        for k, line in enumerate(_wrap(caption, lambda text: draw.textlength(text) <= cw - 4, lines=2)):
            draw.text((x + 2, y + h * scale + 2 + 13 * k), line, fill="black")
    return sheet
