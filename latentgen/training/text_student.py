"""Distil a Chinese text encoder from the default model's English one (multilingual knowledge distillation: Reimers &
Gurevych 2020; AltCLIP / AltDiffusion, Chen et al. 2022).

    python -m latentgen.training.text_student --config configs/text-student-zh.yaml [key=value ...]
    python -m latentgen.training.text_student --install runs/text-student-zh/student latentgen/default_model

The teacher is the pipeline's text encoder (MiniLM for the default model) reading a scene's caption in English; the
student (`latentgen.components.chinese`: a character-level BERT) reads the same scene's caption in Chinese and
learns to give the teacher's states, all 32 positions of them (the U-Net attends to every one), by mean squared
error. Scenes come from the shapes dataset's train split only, so its held-out triples stay unseen in both
languages. The Chinese captions are the dataset's phrasings and a few more (`PHRASINGS_*`), with noise: clauses in
another order, random common characters and particles inserted, 的 and 一个 dropped, 色 and 形 left out, so that
the student learns which characters carry the scene. The English side is always one canonical phrasing, the one
the evaluation's prompts use.

The run is a `training.loop.Run` (accelerate, checkpoints, exact resume after a kill); `--install` puts the
trained student into a model folder as its `text_encoder_zh/` and `tokenizer_zh/`, which the pipeline then uses for
every prompt written in Chinese.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from latentgen.cli import ArgumentParser, quiet_libraries, run_cli
from latentgen.components.chinese import is_chinese, make_tokenizer, student_config, vocabulary
from latentgen.config import load_config, valid_keys
from latentgen.data.shapes import (
    COLOR_NAMES,
    KINDS,
    ZH_COLORS,
    ZH_KINDS,
    ZH_ONE,
    ZH_TWO,
    is_heldout,
    pair_prompt,
    single_prompt,
    zh_prompt,
)
from latentgen.errors import UserError
from latentgen.generation.models import open_pipeline, resolve_model
from latentgen.io import atomic_dir
from latentgen.training.loop import (
    Run,
    TrainConfig,
    make_ema,
    make_lr_scheduler,
    make_optimizer,
    step_generator,
)

# The Chinese phrasings the student learns from: the dataset's, and a few more ({b} the background's color).
PHRASINGS_ONE = ZH_ONE + ("一个{c}{k}，{b}背景", "{c}{k}，{b}背景", "在{b}背景上的一个{c}{k}", "{b}底色上有一个{c}{k}")
PARTICLES = ("的", "在", "是", "上", "一个", "，")
PHRASINGS_TWO = ZH_TWO + ("{c1}{k1}在左，{c2}{k2}在右，{b}背景", "{b}背景上，左边是{c1}{k1}，右边是{c2}{k2}",
                          "{c1}{k1}在{c2}{k2}左边，背景是{b}")
# Captions are also put together from clauses: a background clause and a shape clause, one or the other first, so that
# every way of naming the background is learned with one shape and with two (without it "背景是{b}", which only
# two-shape phrasings used, was misread in one-shape prompts: background right 1 of 14 in `--phrasing unseen`).
BACKGROUND_CLAUSES = ("{b}背景", "背景是{b}", "在{b}背景上", "{b}底色")
SHAPE_CLAUSES_ONE = ("{c}{k}", "一个{c}{k}", "有一个{c}{k}")
SHAPE_CLAUSES_TWO = ("{c1}{k1}在{c2}{k2}的左边", "{c2}{k2}在{c1}{k1}的右边", "{c1}{k1}在左，{c2}{k2}在右",
                     "左边是{c1}{k1}，右边是{c2}{k2}")
COMPOSED = 0.4  # the share of captions put together from clauses


@dataclass
class TextStudentConfig(TrainConfig):
    teacher: str = "latentgen/default_model"  # the pipeline whose text encoder is the teacher
    max_length: int = 32  # the teacher's window: the student gives as many states
    layers: int = 4
    heads: int = 6
    intermediate_size: int = 1024
    two_shape_fraction: float = 0.6
    noise: float = 0.3  # chance that a caption gets 1-3 random common characters inserted
    validation_scenes: int = 256
    scenes: int = 0  # 0: every scene of the train split; n: about n of them, evenly spaced (quick runs, tests)

    def check(self) -> None:
        super().check()
        if not 0.0 <= self.noise <= 1.0 or not 0.0 <= self.two_shape_fraction <= 1.0:
            raise UserError("noise and two_shape_fraction must be in [0, 1]")
        if self.layers < 1 or self.heads < 1 or self.intermediate_size < 1 or self.max_length < 8:
            raise UserError("layers, heads and intermediate_size must be ≥ 1, max_length ≥ 8")


# ----------------------------------------------------------------------------------------------------------------
# Scenes and their captions


@dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[tuple[str, str], ...]  # (color, kind), left to right

    def english(self) -> str:
        """The canonical English caption: the evaluation's own phrasing."""
        if len(self.shapes) == 1:
            return single_prompt(*self.shapes[0], self.background)
        return pair_prompt(self.shapes[0], self.shapes[1], self.background)

    def chinese(self, template: str, short_color: bool = False, short_kind: bool = False) -> str:
        return zh_prompt(template, self.background, self.shapes, short_color, short_kind)


def train_scenes(kinds: tuple[str, ...] = KINDS) -> list[Scene]:
    """Every scene of the train split: one shape, or two whose triples are both seen in training."""
    one = [Scene(b, ((c, k),)) for b in COLOR_NAMES for c in COLOR_NAMES for k in kinds
           if c != b and not is_heldout(c, k, b)]
    shapes = [(c, k) for c in COLOR_NAMES for k in kinds]
    two = [Scene(b, (s1, s2)) for b in COLOR_NAMES for s1 in shapes for s2 in shapes
           if b not in (s1[0], s2[0]) and not is_heldout(*s1, b) and not is_heldout(*s2, b)]
    return one + two


def noisy_caption(scene: Scene, g: torch.Generator, config: TextStudentConfig, noise_chars: list[str]) -> str:
    """One of the scene's Chinese phrasings, with the noise that teaches the student what carries the scene."""
    def draw(n: int) -> int:
        return int(torch.randint(0, n, (1,), generator=g))

    def chance(p: float) -> bool:
        return float(torch.rand(1, generator=g)) < p

    if chance(COMPOSED):
        shapes = SHAPE_CLAUSES_ONE if len(scene.shapes) == 1 else SHAPE_CLAUSES_TWO
        clauses = [BACKGROUND_CLAUSES[draw(len(BACKGROUND_CLAUSES))], shapes[draw(len(shapes))]]
        template = "，".join(clauses[::-1] if chance(0.5) else clauses)
    else:
        templates = PHRASINGS_ONE if len(scene.shapes) == 1 else PHRASINGS_TWO
        template = templates[draw(len(templates))]
    text = scene.chinese(template, short_color=chance(0.15), short_kind=chance(0.15))
    if chance(0.3):  # the clauses in another order: what a clause says does not depend on where it stands
        clauses = text.split("，")
        order = torch.randperm(len(clauses), generator=g).tolist()
        text = "，".join(clauses[i] for i in order)
    if chance(0.2):
        text = text.replace("的", "").replace("一个", "")
    if chance(0.2):  # a particle more, somewhere
        at = draw(len(text) + 1)
        text = text[:at] + PARTICLES[draw(len(PARTICLES))] + text[at:]
    if noise_chars and chance(config.noise):
        for _ in range(1 + draw(3)):
            at = draw(len(text) + 1)
            text = text[:at] + noise_chars[draw(len(noise_chars))] + text[at:]
    return text


def draw_scenes(scenes_one: list[Scene], scenes_two: list[Scene], n: int, fraction: float,
                g: torch.Generator) -> list[Scene]:
    out = []
    for _ in range(n):
        pool = scenes_two if float(torch.rand(1, generator=g)) < fraction else scenes_one
        out.append(pool[int(torch.randint(0, len(pool), (1,), generator=g))])
    return out


# ----------------------------------------------------------------------------------------------------------------
# The job


def teacher_states(pipe, texts: list[str], batch: int = 256) -> dict[str, torch.Tensor]:
    """The teacher's states (T, D) for each English caption, as the pipeline encodes a prompt (fp32)."""
    out = {}
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            chunk = texts[i:i + batch]
            hidden, _ = pipe.encode_prompts(chunk)
            out |= {t: h.float().cpu() for t, h in zip(chunk, hidden)}
    return out


def train_text_student(config: TextStudentConfig) -> Path:
    run = Run(config, "text_student")
    teacher = open_pipeline(resolve_model(config.teacher), dtype="fp32", device="cpu", embeddings_dir=None)
    scenes = train_scenes()
    if config.scenes:
        scenes = scenes[::max(1, len(scenes) // config.scenes)]
    one = [s for s in scenes if len(s.shapes) == 1]
    two = [s for s in scenes if len(s.shapes) == 2]
    targets = teacher_states(teacher, sorted({s.english() for s in scenes}))
    width = next(iter(targets.values())).shape[-1]
    # the characters the captions are made of: every color and kind name and the phrasings' own words
    words = list(ZH_COLORS.values()) + list(ZH_KINDS.values()) + list(PHRASINGS_ONE + PHRASINGS_TWO
                                                                      + BACKGROUND_CLAUSES + SHAPE_CLAUSES_ONE
                                                                      + SHAPE_CLAUSES_TWO)
    vocab = vocabulary(words)
    tokenizer = make_tokenizer(vocab, config.max_length)
    learned = set("".join(words))
    noise_chars = [c for c in vocab if is_chinese(c) and c not in learned]  # common characters no caption uses

    from transformers import BertModel

    accelerator = run.launch()
    device = accelerator.device
    student = BertModel(student_config(len(vocab), width, config.layers, config.heads, config.intermediate_size,
                                       config.max_length), add_pooling_layer=False).to(device)
    optimizer = make_optimizer(student.parameters(), config)
    lr_scheduler = make_lr_scheduler(optimizer, config)
    ema = make_ema(student, config) if config.ema else None
    student, optimizer = accelerator.prepare(student, optimizer)
    raw = accelerator.unwrap_model(student)
    if ema is not None:
        ema.to(device)
    validation = draw_scenes(one, two, config.validation_scenes, 0.5, torch.Generator().manual_seed(12345))

    def encode(texts: list[str]):
        tokens = tokenizer(texts, padding="max_length", max_length=config.max_length, truncation=True,
                           return_tensors="pt")
        return student(tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device))[0]

    def validate(step: int) -> None:
        with torch.no_grad():
            texts = [s.chinese(ZH_ONE[0] if len(s.shapes) == 1 else ZH_TWO[0]) for s in validation]
            got = encode(texts).float().cpu()
            want = torch.stack([targets[s.english()] for s in validation])
            cos = torch.nn.functional.cosine_similarity(got, want, dim=-1).mean().item()
            mse = torch.nn.functional.mse_loss(got, want).item()
        accelerator.log({"validation/cosine": cos, "validation/mse": mse}, step=step)
        accelerator.print(f"step {step}: validation cosine {cos:.4f}, mse {mse:.5f}")

    start = run.resume({"student": raw}, {"optimizer": optimizer.optimizer, "lr_scheduler": lr_scheduler,
                                          "ema": ema, "scaler": accelerator.scaler}, validate)
    for step in range(start, config.max_steps):
        g = step_generator(config.seed, step, 0, accelerator.process_index, torch.device("cpu"))
        batch = draw_scenes(one, two, config.train_batch_size, config.two_shape_fraction, g)
        texts = [noisy_caption(s, g, config, noise_chars) for s in batch]
        want = torch.stack([targets[s.english()] for s in batch]).to(device)
        with accelerator.autocast():
            loss = torch.nn.functional.mse_loss(encode(texts).float(), want)
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(student.parameters(), config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr_scheduler.step()
        if ema is not None:
            ema.step(raw.parameters())
        run.averages.add(loss=loss.item())
        run.end_step(step + 1)

    target = Path(config.output_dir) / "student"
    if run.finish(config.train_batch_size * accelerator.num_processes):
        if ema is not None:
            ema.copy_to(raw.parameters())
        validate(config.max_steps)
        with atomic_dir(target) as tmp:
            raw.to(torch.float16).save_pretrained(tmp / "text_encoder_zh", safe_serialization=True)
            tokenizer.save_pretrained(tmp / "tokenizer_zh")
        accelerator.print(f"wrote {target}")
    run.close()
    return target


def install(student: Path, model: Path) -> None:
    """Put a trained student into a model folder (`text_encoder_zh/`, `tokenizer_zh/` and their entries in
    `model_index.json`), leaving every other file as it is."""
    for part in ("text_encoder_zh", "tokenizer_zh"):
        if not (student / part).is_dir():
            raise UserError(f"{student} is not a trained student (no {part}/)")
    index_path = model / "model_index.json"
    if not index_path.is_file():
        raise UserError(f"{model} is not a pipeline folder (no model_index.json)")
    for part in ("text_encoder_zh", "tokenizer_zh"):
        with atomic_dir(model / part) as tmp:
            shutil.copytree(student / part, tmp, dirs_exist_ok=True)
    index = json.loads(index_path.read_text())
    index |= {"text_encoder_zh": ["transformers", "BertModel"], "tokenizer_zh": ["transformers", "BertTokenizer"]}
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def main(argv=None) -> None:
    p = ArgumentParser(prog="python -m latentgen.training.text_student", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="a YAML file (configs/text-student-zh.yaml)")
    p.add_argument("--install", nargs=2, metavar=("STUDENT", "MODEL"), help="put a trained student into a model "
                                                                          "folder")
    p.add_argument("--keys", action="store_true", help="list every config key and exit")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    args = p.parse_args(argv)
    if args.keys:
        print("\n".join(valid_keys(TextStudentConfig)))
        return
    if args.install:
        install(Path(args.install[0]), Path(args.install[1]))
        return
    if args.config is None:
        p.error("the following arguments are required: --config (or --install)")
    config = load_config(TextStudentConfig, args.config, args.overrides)
    quiet_libraries()
    train_text_student(config)


if __name__ == "__main__":
    sys.exit(run_cli(main))
