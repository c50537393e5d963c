"""AUTOMATIC1111's `parameters` text (read by A1111, ComfyUI, civitai, sd-parsers, ...): written from an image's
metadata (its `Request` fields and the model's name and hash) and read back into a request, for `infer.py --replay`
and the server's `png-info`.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

from latentgen import validate
from latentgen.components.schedulers import a1111_name, a1111_names, from_a1111
from latentgen.errors import UserError
from latentgen.generation import options
from latentgen.generation.cascade import A1111_NAME
from latentgen.generation.control import Control
from latentgen.generation.hires import Hires
from latentgen.generation.request import Request


def quote(value) -> str:
    """A value as A1111 writes it into `parameters` (`infotext_utils.quote`): JSON-quoted when it holds a comma,
    a colon or a newline, so that the 'Key: value, ...' line still splits right."""
    text = str(value)
    if "," not in text and ":" not in text and "\n" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def model_name(model: str) -> str:
    """A model's name as A1111 lists it: a checkpoint file without its suffix, or a folder's name."""
    path = Path(model)
    return path.stem if path.suffix in (".safetensors", ".ckpt") else path.name


FIRST = ("Steps", "Sampler", "CFG scale", "Seed", "Size", "Model hash", "Model")  # A1111's own order


def a1111_parameters(meta: dict, cls=Request) -> str:
    """The `parameters` text A1111 writes: prompt, 'Negative prompt: …', then 'Key: value, …'; `meta` is an
    image's metadata (its `cls` fields, and the model's name and hash). Every option with a text key in the
    option table is written (`options.text_items`); here are the keys A1111 spells over several fields."""
    fields = dict(options.text_items(meta, cls))
    fields |= {"Sampler": a1111_name(meta["scheduler"]), "Size": f"{meta['width']}x{meta['height']}",
               "Model hash": meta["model_hash"], "Model": model_name(meta["model"])}
    if meta.get("vae"):
        fields |= {"VAE hash": meta["vae"]["hash"], "VAE": Path(meta["vae"]["path"]).name}
    if meta.get("hires"):  # its denoising strength is A1111's "Denoising strength" of a hires image
        fields |= dict(options.text_items(meta["hires"], Hires))
    if meta.get("upscale"):  # the cascade, as the server offers it to A1111's clients: a hires upscaler
        u = meta["upscale"]
        fields |= {"Hires upscale": u["scale"], "Hires steps": u["steps"], "Hires upscaler": A1111_NAME}
    if meta.get("distilled_guidance"):  # Flux: Forge's keys, CFG scale being the true CFG (1: off)
        fields["Distilled CFG Scale"] = fields.pop("CFG scale")
        fields["CFG scale"] = fields.pop("True CFG scale", 1.0)
    for i, unit in enumerate(meta.get("control") or []):  # A1111's ControlNet extension's keys
        fields[f"ControlNet {i}"] = Control(**unit).text()
    if meta.get("ti_hashes"):
        fields["TI hashes"] = ", ".join(f"{name}: {h}" for name, h in meta["ti_hashes"].items())
    if meta.get("lora_hashes"):
        fields["Lora hashes"] = ", ".join(f"{name}: {h}" for name, h in meta["lora_hashes"].items())
    fields = {k: fields[k] for k in FIRST if k in fields} | {k: v for k, v in fields.items() if k not in FIRST}
    fields["Version"] = f"latentgen {meta['version']}"
    # LoRAs given apart from the prompt (--lora) become A1111's prompt tags, found by name in its loras folder
    tags = "".join(f" <lora:{Path(path).stem}:{scale:g}>" for path, scale in meta.get("loras") or [])
    lines = [meta["prompt"] + tags]
    if meta.get("negative_prompt"):
        lines.append(f"Negative prompt: {meta['negative_prompt']}")
    lines.append(", ".join(f"{k}: {quote(v)}" for k, v in fields.items()))
    return "\n".join(lines)


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


# Fields that describe the image but need no setting here.
_A1111_INFORMATIONAL = {"Model hash", "Model", "Version", "VAE", "VAE hash", "Lora hashes", "TI hashes",
                        "Emphasis", "Token merging ratio"}


def a1111_request(text: str, cls=Request) -> tuple[dict, dict[str, str], list[str]]:
    """Generation settings from an A1111 `parameters` text: (`cls` fields, the A1111 fields as read, the fields
    latentgen does not use). Every option with a text key is read (`options.from_text`); here are the keys A1111
    spells over several fields. Unknown samplers are a one-line error naming the ones we have."""
    prompt, negative, fields = parse_a1111_parameters(text)
    unused: list[str] = []
    settings: dict = {"prompt": prompt, "negative_prompt": negative}
    try:
        given, used = options.from_text(fields, cls)
        settings |= given
        if "Size" in fields:
            settings["width"], settings["height"] = validate.size_text(fields["Size"], "Size")
        if "Hires upscale" in fields and fields.get("Hires upscaler") == A1111_NAME:  # latentgen's cascade
            settings["upscale"] = dict(scale=int(fields["Hires upscale"]), steps=int(fields.get("Hires steps", 0)))
        elif "Hires upscale" in fields:
            hires, _ = options.from_text(fields, Hires)
            if hires.get("upscaler", "latent") is None:  # an upscaler model latentgen does not have: the latent one
                unused.append("Hires upscaler")
                hires["upscaler"] = "latent"
            settings["hires"] = {"denoise": 0.7, **hires}  # A1111's default strength of the second pass
    except ValueError as err:
        raise UserError(f"the AUTOMATIC1111 parameters hold a value latentgen cannot read: {err}") from None
    if "Distilled CFG Scale" in fields:  # Forge's Flux text: its guidance is the distilled one, CFG the true CFG
        try:
            settings["guidance_scale"] = float(fields["Distilled CFG Scale"])
            settings["true_cfg_scale"] = float(fields.get("CFG scale", 1.0))
        except ValueError as err:
            raise UserError(f"the AUTOMATIC1111 parameters hold a value latentgen cannot read: {err}") from None
        used |= {"Distilled CFG Scale", "CFG scale"}
    schedule = fields.get("Schedule type", "")
    if "Sampler" in fields:
        sampler = fields["Sampler"]
        name = from_a1111(sampler, schedule) or from_a1111(sampler)
        if name is None:
            raise UserError(f"the AUTOMATIC1111 sampler {sampler!r}"
                            f"{f' with schedule {schedule!r}' if schedule else ''} has no latentgen counterpart; "
                            f"known: {', '.join(a1111_names())}")
        settings["scheduler"] = name
    used |= {"Size", "Sampler", "Hires upscale", "Hires steps", "Hires upscaler", "Denoising strength"}
    if "Sampler" not in fields or from_a1111(fields["Sampler"], schedule) is not None:
        used.add("Schedule type")  # else: a schedule we do not have for this sampler, listed as unused
    units = [k for k in fields if re.fullmatch(r"ControlNet \d+", k)]
    if units:  # the text names each unit's model and settings, not its control image
        settings["control"] = [Control.from_text(fields[k]) for k in units]
    unused += [k for k in fields if k not in used | _A1111_INFORMATIONAL | set(units)]
    return settings, fields, unused
