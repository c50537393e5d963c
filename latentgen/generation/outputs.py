"""What `infer.py` does with images, as functions: read prompts, name each image's file, run a fitted request in
batches and write every image with its metadata as it comes, read init images, draw contact sheets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from latentgen._version import __version__
from latentgen.errors import UserError
from latentgen.formats import embeddings, lora
from latentgen.formats.images import file_sha256, image_metadata
from latentgen.generation.infotext import a1111_parameters
from latentgen.io import model_hash, save_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class Job:
    """One image of a run: its index, its prompt and its seed."""

    index: int
    prompt: str
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


def jobs(request) -> list[Job]:
    """Every image of a checked, seeded Request, prompt-major."""
    prompts, _, seeds = request.per_image()
    return [Job(k, prompt, seed) for k, (prompt, seed) in enumerate(zip(prompts, seeds))]


def slug(text: str, length: int = 40) -> str:
    s = re.sub(r"[^\w]+", "-", text.lower(), flags=re.UNICODE).strip("-")
    return s[:length].rstrip("-") or "image"


def output_paths(out: str, jobs: Sequence[Job]) -> list[Path]:
    """Where each image goes: `--out x.png` for one image (x-0.png, x-1.png, ... for several), else a folder; a
    place that cannot be written is an error now, before any work."""
    target = Path(out)
    if target.suffix.lower() in IMAGE_SUFFIXES:
        if target.is_dir():
            raise UserError(f"--out {target} is a folder with an image suffix; give a file name or another folder")
        check_writable(target.parent)
        if len(jobs) == 1:
            return [target]
        return [target.with_name(f"{target.stem}-{j.index}{target.suffix}") for j in jobs]
    if (target.exists() and not target.is_dir()) or (target.suffix and not target.exists()):
        raise UserError(f"--out {target} is not an image file name (a file ending in {', '.join(IMAGE_SUFFIXES)}) "
                        "nor a folder (an existing one, or a name without a suffix)")
    check_writable(target)
    return [target / f"{j.index:05d}-{j.seed}-{slug(j.prompt)}.png" for j in jobs]


def check_writable(folder: Path) -> None:
    """A one-line error unless files can be made in `folder`, or in the deepest part of it that exists (the rest is
    made when the first image is written): tried with a file, since permissions say nothing of a read-only mount."""
    import tempfile

    existing = Path(folder).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot write to {folder}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise UserError(f"cannot write to {folder}: {err.strerror or err}") from None


METADATA_WARN_BYTES = 64 * 1024  # A1111's own infotexts are a few hundred bytes; a prompt file pasted in is not


def _warn_if_large(metadata: dict, path: Path) -> None:
    import logging

    size = sum(len(chunk[1]) for chunk in getattr(metadata.get("pnginfo"), "chunks", [])) or len(
        metadata.get("exif", b""))
    if size > METADATA_WARN_BYTES:
        logging.getLogger("latentgen").warning(f"{path.name} carries {size // 1024} KB of metadata (its prompts "
                                               "and settings, written twice: A1111's text and latentgen's JSON)")


def grid_path(out: str) -> Path:
    target = Path(out)
    return target.with_name(f"{target.stem}-grid.png") if target.suffix.lower() in IMAGE_SUFFIXES \
        else target / "grid.png"


def run_about(pipe, model: str | Path, plan, vae: str | Path | None = None, prediction_type: str | None = None,
              inputs: dict[str, str | Path] | None = None, hash: str | None = None,
              components: str | Path | None = None) -> dict:
    """What every image of a run records besides its own settings: the model's path and hash, latentgen's version,
    the device, init image/mask files (`inputs`: path and sha256), a replacement VAE, the prediction type given,
    and A1111's TI and LoRA hashes. `hash`: the model's, if known already (hashing reads every weight file)."""

    about = {"model": str(Path(model).resolve()), "model_hash": hash or model_hash(model), "version": __version__,
             "device": str(pipe.device.type)}
    about |= {k: {"path": str(v), "sha256": file_sha256(v)} for k, v in (inputs or {}).items()}
    if vae:
        about["vae"] = {"path": str(Path(vae).resolve()), "hash": model_hash(vae)}
    if prediction_type:
        about["prediction_type"] = prediction_type
    if getattr(pipe, "kind", None) == "flux":  # --guidance is Flux's distilled guidance: Forge's text key for it
        about["distilled_guidance"] = True
    if components:  # an SD3 single file's --components folder
        about["components"] = {"path": str(Path(components).resolve()), "hash": model_hash(components)}
    if plan.request.upscale is not None:
        folder = pipe.upscaler().upscaler_folder
        about["upscaler"] = {"path": str(folder.resolve()), "hash": model_hash(folder)}
    about["ti_hashes"] = embeddings.used(pipe, plan.prompts + plan.negative_prompts)
    if plan.loras:

        about["lora_hashes"] = {path.stem: lora.short_hash(path) for path, _ in plan.loras}
    return about


def write_images(pipe, plan, paths: Sequence[Path], batch_size: int, about: dict,
                 on_progress: Callable[[int], None] | None = None, on_image: Callable[[Path], None] | None = None):
    """Run a fitted request (`request.Plan`) in batches of `batch_size` images and write each image to its path
    (one per plan row) as soon as its batch is done, with its metadata: its Request fields and `about` (model,
    hash, version, inputs). `on_progress(n)` after each sampling step of a batch of n images. Returns the paths
    written."""

    written = []
    rows = iter(paths)
    for batch in plan.split(batch_size):
        step = None if on_progress is None else lambda _, n=batch.batch_size: on_progress(n)
        out = pipe.generate(batch, on_step=step)
        for image, meta in zip(out.images, out.metadata):
            path = next(rows)
            meta = meta | about | out.recorded_info()
            metadata = image_metadata(meta, path.suffix, a1111_parameters(meta))
            _warn_if_large(metadata, path)
            written.append(save_image(image, path, **metadata))
            if on_image is not None:
                on_image(written[-1])
    return written


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
