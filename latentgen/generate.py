"""What `infer.py` does, as functions: read prompts, plan the images, run the pipeline in batches, write files."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

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
    if seed < 0:
        raise UserError(f"--seed must be ≥ 0, got {seed}")
    jobs, k = [], 0
    for prompt, negative in zip(prompts, negatives):
        for _ in range(num_images):
            jobs.append(Job(k, prompt, negative, seed + k))
            k += 1
    return jobs


def slug(text: str, length: int = 40) -> str:
    s = re.sub(r"[^\w]+", "-", text.lower(), flags=re.UNICODE).strip("-")
    return s[:length].rstrip("-") or "image"


def output_paths(out: str, jobs: Sequence[Job]) -> list[Path]:
    """Where each image goes: `--out x.png` for one image (x-0.png, x-1.png, ... for several), else a folder."""
    target = Path(out)
    if target.suffix.lower() in IMAGE_SUFFIXES:
        if len(jobs) == 1:
            return [target]
        return [target.with_name(f"{target.stem}-{j.index}{target.suffix}") for j in jobs]
    if target.exists() and not target.is_dir():
        raise UserError(f"--out {target} is an existing file without an image suffix; "
                        f"give a folder or a file ending in {', '.join(IMAGE_SUFFIXES)}")
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
