"""AUTOMATIC1111's web API, as its clients (`webuiapi`, bots, scripts) speak it: the JSON bodies of
`/sdapi/v1/txt2img` and `/sdapi/v1/img2img` with A1111's field names, defaults and meanings, turned into a
`Request`; and the answer A1111 gives: base64 PNG images carrying its `parameters` text, and `info`, a JSON string
with the infotexts.

Fields that A1111 accepts but latentgen does not implement (face restoration, seed resizing, scripts, ...) are
accepted; when one is set to something other than A1111's default, the answer's info says it was ignored.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model

from latentgen._version import __version__
from latentgen.components import control_images
from latentgen.components.schedulers import a1111_name, a1111_names, from_a1111
from latentgen.errors import UserError
from latentgen.formats.images import image_metadata
from latentgen.generation import options
from latentgen.generation.cascade import A1111_NAME as UPSCALER
from latentgen.generation.cascade import Upscale
from latentgen.generation.control import Control
from latentgen.generation.hires import Hires
from latentgen.generation.infotext import a1111_parameters, model_name
from latentgen.generation.prompts import BREAK_SPLIT
from latentgen.generation.regions import CALCS, Regions
from latentgen.generation.request import Request, a1111_clip_skip

# Fields latentgen does not implement, with A1111's defaults: set to anything else, they are noted as ignored.
IGNORED = {"styles": [],
           "restore_faces": None, "s_min_uncond": 0.0, "s_churn": 0.0, "s_tmax": None, "s_tmin": 0.0,
           "s_noise": 1.0, "script_name": None, "script_args": [], "refiner_checkpoint": None,
           "refiner_switch_at": None, "hr_checkpoint_name": None, "hr_sampler_name": None, "hr_scheduler": None,
           "hr_prompt": "", "hr_negative_prompt": "", "firstphase_width": 0, "firstphase_height": 0,
           "disable_extra_networks": False, "comments": None, "mask_blur": 4,
           "mask_blur_x": 4, "mask_blur_y": 4, "inpainting_fill": 0, "inpaint_full_res": True,
           "inpaint_full_res_padding": 0, "initial_noise_multiplier": 1.0, "latent_mask": None,
           "resize_mode": 0, "force_task_id": None, "infotext": None}
# Accepted and without effect on the images (where to save, what to send back): never noted.
SILENT = {"alwayson_scripts", "sampler_index", "send_images", "save_images", "do_not_save_samples", "do_not_save_grid",
          "override_settings_restore_afterwards", "include_init_images", "n_iter", "batch_size",
          "image_cfg_scale"}  # image_cfg_scale: for instruct-pix2pix models only


class A1111Fields(BaseModel):
    """The fields of A1111's `StableDiffusionProcessingTxt2Img` that spell a setting over several fields or under
    an A1111 option (`to_request` reads them); every other setting's field comes from the option table
    (`body_model`)."""

    model_config = ConfigDict(extra="allow")

    seed_resize_from_w: int = -1  # A1111's "resize seed from" (≤ 0: off)
    seed_resize_from_h: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None  # A1111's schedule type
    batch_size: int = 1
    n_iter: int = 1
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    override_settings: dict[str, Any] | None = None
    send_images: bool = True


def body_model(cls=Request, base: type[BaseModel] = A1111Fields, name: str = "Txt2Img") -> type[BaseModel]:
    """A request body: `base`'s fields, and a field for every option of `cls` that has one (`options.api_fields`),
    with the option's help as its description."""
    fields = {api: (kind, Field(default, description=help or None))
              for api, (kind, default, help) in options.api_fields(cls).items()}
    return create_model(name, __base__=base, **fields)


Txt2Img = body_model()
Txt2Img.__doc__ = """`/sdapi/v1/txt2img`'s body: A1111's fields (and latentgen's options A1111 lacks: APG, guidance
interval, dynamic threshold, the hires fix and the upscaler as objects)."""


class Img2Img(Txt2Img):
    """`/sdapi/v1/img2img`'s body: init images, and a mask for inpainting (white = repaint)."""

    init_images: list[str]
    mask: str | None = None
    denoising_strength: float | None = 0.75
    inpainting_mask_invert: int = 0


def decode_image(data: str, what: str, max_pixels: int | None = None):
    """A PIL image from base64 (with or without a `data:image/...;base64,` prefix, as A1111 takes it), decoded only
    if it has at most `max_pixels` pixels (its header read first: a small file can claim 30000×30000)."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(data, str):
        raise UserError(f"{what} must be a base64 string, got {type(data).__name__}")
    if data.startswith("data:image/"):
        data = data.split(";", 1)[1].removeprefix("base64,") if ";" in data else ""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise UserError(f"{what} is not base64") from None
    try:
        with Image.open(io.BytesIO(raw)) as im:
            width, height = im.size
            if max_pixels is None or width * height <= max_pixels:
                im.load()
                return im.copy()
    except UnidentifiedImageError:
        raise UserError(f"{what} is not an image in a format PIL reads (PNG, JPEG, WebP, ...)") from None
    except Image.DecompressionBombError:  # PIL's own limit, checked as it opens the file
        raise UserError(f"{what} is over {2 * Image.MAX_IMAGE_PIXELS} pixels; this server decodes images of at most "
                        f"{max_pixels} pixels") from None
    except (OSError, ValueError, SyntaxError) as err:  # truncated, damaged
        raise UserError(f"{what} is a damaged image ({type(err).__name__})") from None
    raise UserError(f"{what} is {width}×{height} pixels; this server decodes images of at most {max_pixels} pixels")


def encode_png(image, meta: dict | None) -> str:
    """Base64 of a PNG carrying `meta` as A1111's `parameters` (and latentgen's own JSON, for --replay)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **(image_metadata(meta, ".png", a1111_parameters(meta)) if meta else {}))
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def sampler(name: str | None, schedule: str | None) -> str | None:
    """Our sampler for A1111's `sampler_name` and `scheduler` (its schedule type); None: the model's own."""
    if not name:
        return None
    ours = from_a1111(name, schedule or "")
    if ours is None:
        raise UserError(f"sampler {name!r}{f' with schedule {schedule!r}' if schedule else ''} is not available; "
                        f"available: {', '.join(a1111_names())}")
    return ours


def to_request(body: Txt2Img, clip_skip_option: int | None = None, max_pixels: int | None = None,
               cls=Request) -> tuple[Request, str | None, list[str]]:
    """(the `cls` request, the model asked for in override_settings or None, notes on ignored fields); images are
    decoded only within `max_pixels`."""
    notes = _ignored(body)
    overrides = dict(body.override_settings or {})
    model = overrides.pop("sd_model_checkpoint", None)
    clip_skip = overrides.pop("CLIP_stop_at_last_layers", clip_skip_option)
    notes += [f"override_settings.{key} is not supported by latentgen and was ignored" for key in overrides]
    fields: dict[str, Any] = options.from_api(body, cls)  # every option with a field of its own
    fields |= dict(negative_prompt=body.negative_prompt or None, num_images_per_prompt=body.batch_size * body.n_iter,
                   scheduler=sampler(body.sampler_name or body.sampler_index, body.scheduler))
    if clip_skip is not None:  # A1111's count: 1 is the last layer
        fields["clip_skip"] = a1111_clip_skip(clip_skip, "CLIP_stop_at_last_layers")
    if body.seed_resize_from_w > 0 and body.seed_resize_from_h > 0:  # A1111 resizes only where both are set
        fields["seed_resize_from"] = (body.seed_resize_from_w, body.seed_resize_from_h)
    if not isinstance(body, Img2Img):
        fields.pop("strength", None)  # a txt2img body's denoising_strength is its hires pass's
    if isinstance(body, Img2Img):
        if not body.init_images:
            raise UserError("init_images is empty; give one image (base64)")
        images = [decode_image(data, f"init_images[{i}]", max_pixels) for i, data in enumerate(body.init_images)]
        if len(images) > 1:
            notes.append("only init_images[0] was used (latentgen takes one init image per request)")
        fields |= dict(image=images[0].convert("RGB"), strength=body.denoising_strength)
        if body.mask:
            mask = decode_image(body.mask, "mask", max_pixels).convert("L")
            if body.inpainting_mask_invert:
                from PIL import ImageOps

                mask = ImageOps.invert(mask)
            fields["mask_image"] = mask
            if fields["width"] is None and fields["height"] is None and mask.size != images[0].size:
                raise UserError(f"the mask is {mask.size[0]}×{mask.size[1]} but the init image is "
                                f"{images[0].size[0]}×{images[0].size[1]}")
    scripts = (body.model_extra or {}).get("alwayson_scripts") or {}
    if not isinstance(scripts, dict):
        raise UserError("alwayson_scripts must be an object")
    fields["control"] = control_units(scripts, max_pixels, notes) or None
    regions = regional_prompter(scripts, notes)
    if regions is not None:
        fields["regions"], fields["prompt"] = regions[0], regional_prompt(fields["prompt"], *regions[1:])
    notes += [f"alwayson_scripts.{name} is not supported by latentgen and was ignored" for name in scripts
              if name.lower() not in ("controlnet", REGIONAL_PROMPTER)]
    if not isinstance(body, Img2Img) and body.enable_hr:
        if (body.hr_upscaler or "").strip() == UPSCALER:
            fields["upscale"] = _upscale(body)
        else:
            fields["hires"] = _hires(body, notes)
    return cls(**fields), model, notes


CONTROL_MODES = {0: "balanced", 1: "prompt", 2: "control", "Balanced": "balanced",
                 "My prompt is more important": "prompt", "ControlNet is more important": "control"}
RESIZE_MODES = {0: "resize", 1: "crop", 2: "fill", "Just Resize": "resize", "Crop and Resize": "crop",
                "Resize and Fill": "fill", "Envelope (Outer Fit)": "crop", "Scale to Fit (Inner Fit)": "fill"}
HR_OPTIONS = {0: "both", 1: "low", 2: "high", "Both": "both", "Low res only": "low", "High res only": "high",
              "HiResFixOption.BOTH": "both", "HiResFixOption.LOW_RES_ONLY": "low",
              "HiResFixOption.HIGH_RES_ONLY": "high"}
UNIT_SILENT = {"enabled", "image", "input_image", "module", "model", "weight", "resize_mode", "low_vram",
               "processor_res", "threshold_a", "threshold_b", "guidance_start", "guidance_end", "control_mode",
               "pixel_perfect", "hr_option", "guessmode", "effective_region_mask"}


REGIONAL_PROMPTER = "regional prompter"
RP_SPLITS = {"Columns": "columns", "Horizontal": "columns", "Rows": "rows", "Vertical": "rows"}  # old names too
RP_ARGS = ("active", "debug", "mode", "matrix mode", "mask mode", "prompt mode", "ratios", "base ratios",
           "use base", "use common", "use negative common", "calc mode", "not change AND", "LoRA text encoder",
           "LoRA U-Net", "threshold", "mask", "LoRA stop step", "LoRA hires stop step", "flip")


def regional_prompter(scripts: dict, notes: list[str]) -> tuple[Regions, bool, bool] | None:
    """sd-webui-regional-prompter's API arguments (`alwayson_scripts["Regional Prompter"].args`, positional as its
    README lists them) as (our regions, use base, use common: see `regional_prompt`), or None where it is absent
    or inactive. Its Matrix mode with one row or column of regions is what latentgen has; the Mask and Prompt
    modes, 2D ratios (`;`) and per-region base ratios are one-line errors."""
    script = next((v for k, v in scripts.items() if k.lower() == REGIONAL_PROMPTER), None)
    args = script.get("args", []) if isinstance(script, dict) else []
    if not isinstance(args, list):
        raise UserError("alwayson_scripts.Regional Prompter.args must be a list (the regional prompter's arguments)")
    arg = dict(zip(RP_ARGS, args))
    if not arg.get("active"):
        return None
    what = "alwayson_scripts.Regional Prompter"
    if arg.get("mode", "Matrix") != "Matrix":
        raise UserError(f"{what}: mode {arg['mode']!r} is not supported; latentgen has the Matrix mode (columns or "
                        "rows by ratios)")
    split = arg.get("matrix mode", "Columns")
    if split not in RP_SPLITS:
        raise UserError(f"{what}: the matrix mode must be one of {', '.join(RP_SPLITS)}, got {split!r}")
    ratios = str(arg.get("ratios") or "1,1")
    if ";" in ratios:
        raise UserError(f"{what}: 2D ratios ({ratios!r}) are not supported; give one row or column of regions "
                        "(e.g. 1,1)")
    bases = {b.strip() for b in str(arg.get("base ratios") or "0").split(",")}
    if len(bases) > 1:
        raise UserError(f"{what}: one base ratio for every region is supported, got {arg['base ratios']!r}")
    try:
        base = float(bases.pop() or 0)
    except ValueError:
        raise UserError(f"{what}: the base ratio must be a number, got {arg['base ratios']!r}") from None
    calc = str(arg.get("calc mode") or "Attention")
    ours = {v: k for k, v in CALCS.items()}
    if calc not in ours:
        raise UserError(f"{what}: the calc mode must be one of {', '.join(ours)}, got {calc!r}")
    notes += [f"{what}: {key} is not supported by latentgen and was ignored" for key in RP_ARGS[10:]
              if key in arg and key != "calc mode" and arg[key] not in (None, "", False, "0", 0, [])]
    return Regions(ratios, RP_SPLITS[split], base, ours[calc]), bool(arg.get("use base")), bool(arg.get("use common"))


def regional_prompt(prompt: str, use_base: bool, use_common: bool) -> str:
    """The prompt as latentgen's regions read it (`[base ADDBASE] [common ADDCOMM] region BREAK ...`) from the
    regional prompter's: with "use common" its first BREAK part is prepended to every other part (the base too),
    then with "use base" the first part is the base. ADDCOMM and ADDBASE in the prompt tick their boxes, as there."""
    use_base, use_common = use_base or "ADDBASE" in prompt, use_common or "ADDCOMM" in prompt
    parts = BREAK_SPLIT.split(prompt.replace("ADDCOMM", " BREAK ").replace("ADDBASE", " BREAK ").strip())
    common = parts.pop(0) if use_common and len(parts) > 1 else None
    base = parts.pop(0) if use_base and len(parts) > 1 else None
    if common is not None:
        base = None if base is None else f"{common}, {base}"
    out = " BREAK ".join(parts)
    if common is not None:
        out = f"{common}, ADDCOMM {out}"
    return out if base is None else f"{base} ADDBASE {out}"


def control_units(scripts: dict, max_pixels: int | None, notes: list[str]) -> list[Control]:
    """AUTOMATIC1111's ControlNet extension's API units (`alwayson_scripts.controlnet.args`, what webuiapi's
    ControlNetUnit sends) as latentgen's: enabled units with a model; the image (base64) decoded within
    `max_pixels`; modes and resize modes by A1111's names or numbers; thresholds -1 (or absent): the module's
    defaults."""
    script = scripts.get("controlnet") or scripts.get("ControlNet") or {}
    args = script.get("args", []) if isinstance(script, dict) else []
    if not isinstance(args, list):
        raise UserError("alwayson_scripts.controlnet.args must be a list of ControlNet units")
    units = []
    for i, arg in enumerate(args):
        what = f"alwayson_scripts.controlnet.args[{i}]"
        if not isinstance(arg, dict):
            raise UserError(f"{what} must be an object (a ControlNet unit)")
        model = str(arg.get("model") or "None")
        if arg.get("enabled", True) is False or model == "None":
            continue
        notes += [f"{what}.{key} is not supported by latentgen and was ignored" for key, value in arg.items()
                  if key not in UNIT_SILENT and value not in (None, "", False)]
        image = arg.get("image") or arg.get("input_image")
        if isinstance(image, dict):  # the extension also takes {"image": ..., "mask": ...}
            image = image.get("image")
        if not image:
            raise UserError(f"{what} has no image (base64)")
        for key, table in (("control_mode", CONTROL_MODES), ("resize_mode", RESIZE_MODES), ("hr_option", HR_OPTIONS)):
            if arg.get(key) is not None and arg[key] not in table:
                names = [k for k in table if isinstance(k, str) and not k.startswith("HiResFixOption.")]
                raise UserError(f"{what}.{key} must be one of {', '.join(names)} (or 0-2), got {arg[key]!r}")

        def threshold(key):
            value = arg.get(key)
            return None if value is None or value == -1 else float(value)

        units.append(Control(model=model, image=decode_image(image, f"{what}.image", max_pixels).convert("RGB"),
                             weight=float(arg.get("weight", 1.0)), start=float(arg.get("guidance_start", 0.0)),
                             end=float(arg.get("guidance_end", 1.0)),
                             mode=CONTROL_MODES[arg.get("control_mode", 0)],
                             module=str(arg.get("module") or "none"),
                             resize_mode=RESIZE_MODES[arg.get("resize_mode", "Crop and Resize")],
                             threshold_a=threshold("threshold_a"), threshold_b=threshold("threshold_b"),
                             hr=HR_OPTIONS[arg.get("hr_option") or "Both"],
                             mask=decode_image(region, f"{what}.effective_region_mask", max_pixels) if (
                                 region := arg.get("effective_region_mask")) else None))
    return units


class Detect(BaseModel):
    """`/controlnet/detect`'s body (the ControlNet extension's): run a preprocessor on images."""

    controlnet_module: str = "none"
    controlnet_input_images: list[str] = []
    controlnet_images: list[str] = []  # what webuiapi's controlnet_detect sends
    controlnet_processor_res: int = 512
    controlnet_threshold_a: float = -1
    controlnet_threshold_b: float = -1


def detect(body: Detect, max_pixels: int | None) -> list[str]:
    """Each input image through the preprocessor at its own size (base64 PNGs), as the extension's route."""
    given = body.controlnet_input_images or body.controlnet_images
    if not given:
        raise UserError("controlnet_input_images is empty; give one or more images (base64)")
    module = control_images.module_name(body.controlnet_module, "controlnet_module")
    out = []
    for i, data in enumerate(given):
        image = decode_image(data, f"controlnet_input_images[{i}]", max_pixels).convert("RGB")
        a, b = (None if v == -1 else v for v in (body.controlnet_threshold_a, body.controlnet_threshold_b))
        out.append(encode_png(control_images.prepare(image, image.width, image.height, module, "resize", a, b), None))
    return out


def _upscale(body: Txt2Img) -> Upscale:
    """`hr_upscaler: "latentgen upscaler"`: the model's own upscaler as the second pass (a cascade, `infer.py
    --upscale`), by its own factor, with `hr_second_pass_steps` or its own steps, and its own noise level and
    strength (A1111's clients send a `denoising_strength` by default; the upscaler's defaults are its own)."""
    if body.hr_resize_x or body.hr_resize_y:
        raise UserError(f"hr_upscaler {UPSCALER!r} upscales by its own factor: give hr_scale, not "
                        "hr_resize_x/hr_resize_y")
    if body.hr_scale not in (2, 4):
        raise UserError(f"hr_upscaler {UPSCALER!r} upscales by its own factor, 2 or 4; hr_scale {body.hr_scale:g} "
                        "is not one")
    return Upscale(scale=int(body.hr_scale), steps=body.hr_second_pass_steps)


def _hires(body: Txt2Img, notes: list[str]) -> Hires:
    """A1111's hires fields: scale from hr_scale, or the target size hr_resize_x/y (A1111's 'Resize width/height
    to'); upscalers Latent (and its variants) and Lanczos."""
    scale = body.hr_scale
    if body.hr_resize_x or body.hr_resize_y:
        if not (body.width and body.height):
            raise UserError("hr_resize_x/hr_resize_y need width and height")
        scales = [t / s for t, s in ((body.hr_resize_x, body.width), (body.hr_resize_y, body.height)) if t]
        scale = max(scales)
        if len(set(scales)) > 1:
            notes.append("hr_resize_x and hr_resize_y scale the sides differently; both were scaled by "
                         f"{scale:g} (latentgen keeps the aspect ratio)")
    upscaler = (body.hr_upscaler or "Latent").strip()
    ours = "lanczos" if upscaler == "Lanczos" else "latent"
    if not upscaler.startswith("Latent") and upscaler not in ("Lanczos", "None"):
        notes.append(f"hr_upscaler {upscaler!r} is not available; the latent upscaler was used")
    elif upscaler not in ("Latent", "Lanczos"):
        notes.append(f"hr_upscaler {upscaler!r} was done as {'Latent' if ours == 'latent' else 'Lanczos'}")
    strength = 0.7 if body.denoising_strength is None else body.denoising_strength  # A1111's hires default
    return Hires(scale=scale, steps=body.hr_second_pass_steps, denoise=strength, upscaler=ours)


def _ignored(body: Txt2Img) -> list[str]:
    """Notes for the fields given that latentgen does not implement: A1111's own, set to other than its default,
    and fields A1111 does not have."""
    notes = []
    for key, value in (body.model_extra or {}).items():
        if key in SILENT:
            continue
        if key not in IGNORED:
            notes.append(f"{key} is not an AUTOMATIC1111 field and was ignored")
        elif value not in (IGNORED[key], None, False, "", [], {}) and not (key == "inpaint_full_res" and value):
            notes.append(f"{key} is not supported by latentgen and was ignored")
    return notes


def info(images: list[tuple[Any, dict]], request: Request, model: str, model_hash: str, notes: list[str],
         interrupted: bool = False) -> dict:
    """A1111's `info` (before json.dumps): the first image's settings, every image's seed and infotext."""
    metas = [meta for _, meta in images if meta]
    first = metas[0] if metas else {}
    prompts = [m["prompt"] for m in metas]
    negatives = [m.get("negative_prompt") or "" for m in metas]
    seeds = [m["seed"] for m in metas]
    hires = first.get("hires")
    resize_w, resize_h = first.get("seed_resize_from") or (-1, -1)  # A1111's -1: off
    out = {
        "prompt": prompts[0] if prompts else request.prompt[0], "all_prompts": prompts,
        "negative_prompt": negatives[0] if negatives else (request.negative_prompt or [""])[0],
        "all_negative_prompts": negatives,
        "seed": seeds[0] if seeds else (request.seed or [-1])[0], "all_seeds": seeds,
        "subseed": _subseed(first), "all_subseeds": [_subseed(m) for m in metas],
        "subseed_strength": first.get("variation_strength", 0),
        "width": first.get("width", request.width), "height": first.get("height", request.height),
        "sampler_name": a1111_name(first["scheduler"]) if first else None, "cfg_scale": request.guidance_scale,
        "steps": request.num_inference_steps, "batch_size": request.total, "restore_faces": False,
        "sd_model_name": model_name(model), "sd_model_hash": model_hash,
        "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": resize_w, "seed_resize_from_h": resize_h,
        "denoising_strength": hires["denoise"] if hires else first.get("strength"),
        "extra_generation_params": {}, "index_of_first_image": 0,
        "infotexts": [a1111_parameters(m) for m in metas], "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": (first.get("clip_skip") or 0) + 1,
        "is_using_inpainting_conditioning": False, "version": f"latentgen {__version__}",
    }
    if interrupted:
        notes = notes + ["interrupted: the images are as far as sampling got"]
    if notes:
        out["notes"] = notes
    return out


def _subseed(meta: dict) -> int:
    """An image's variation seed as A1111 reports it: -1 for none."""
    seed = meta.get("variation_seed")
    return -1 if seed is None else seed


def answer(body: BaseModel, images: list[tuple[Any, dict]], info_json: dict) -> dict:
    """The response body: images (base64 PNG with their parameters), the request's parameters, info as JSON text."""
    parameters = body.model_dump()
    parameters.pop("init_images", None)
    parameters.pop("mask", None)
    encoded = [encode_png(image, meta) for image, meta in images] if getattr(body, "send_images", True) else []
    return {"images": encoded, "parameters": parameters, "info": json.dumps(info_json, ensure_ascii=False)}


# ----------------------------------------------------------------------------------------------------------------
# Extras: A1111's image upscaling without a model


class ExtraSingleImage(BaseModel):
    """`/sdapi/v1/extra-single-image`'s body: the upscaling part of A1111's Extras tab, for one image."""

    model_config = ConfigDict(extra="allow")

    image: str = ""
    resize_mode: int = 0  # 0: by upscaling_resize; 1: to upscaling_resize_w × upscaling_resize_h
    upscaling_resize: float = 2.0
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = 0.0
    gfpgan_visibility: float = 0.0
    codeformer_visibility: float = 0.0


def extras_upscale(body: ExtraSingleImage, max_side: int, max_pixels: int | None = None):
    """The image upscaled as A1111's Extras does it with its model-free upscalers (`modules/upscaler.py`): to the
    factor's size rounded down to a multiple of 8, or to fill upscaling_resize_w × _h, centred and cropped to it;
    "Lanczos" and "Nearest" resize by the factor with their filter, then Lanczos takes that to the rounded size
    ("None" goes there with Lanczos at once); the second upscaler is blended in by its visibility. Returns the
    image and notes on what was not done (face restoration)."""
    from PIL import Image

    resamplers = {"None": Image.Resampling.LANCZOS, "Lanczos": Image.Resampling.LANCZOS,
                  "Nearest": Image.Resampling.NEAREST}
    for name in (body.upscaler_1, body.upscaler_2):
        if name not in resamplers:
            raise UserError(f"upscaler {name!r} is not available; available: {', '.join(resamplers)}")
    if body.resize_mode not in (0, 1):
        raise UserError(f"resize_mode must be 0 (by upscaling_resize) or 1 (to upscaling_resize_w/_h), got "
                        f"{body.resize_mode}")
    image = decode_image(body.image, "image", max_pixels).convert("RGB")
    scale = body.upscaling_resize
    if body.resize_mode == 1:
        scale = max(body.upscaling_resize_w / image.width, body.upscaling_resize_h / image.height)
    width, height = int(image.width * scale // 8 * 8), int(image.height * scale // 8 * 8)
    if not 0 < scale or min(width, height) < 8 or max(width, height) > max_side:
        raise UserError(f"the upscaled image would be {width}×{height}; each side must be from 8 to this server's "
                        f"limit of {max_side} pixels")

    def upscale(name: str):  # A1111's Upscaler.upscale: its own step unless the image covers the size, then Lanczos
        out = image
        if name != "None" and (image.width < width or image.height < height or scale == 1):
            out = image.resize((int(image.width * scale), int(image.height * scale)), resample=resamplers[name])
        return out if out.size == (width, height) else out.resize((width, height), resample=Image.Resampling.LANCZOS)

    out = upscale(body.upscaler_1)
    if body.upscaler_2 != "None" and body.extras_upscaler_2_visibility > 0:
        out = Image.blend(out, upscale(body.upscaler_2), body.extras_upscaler_2_visibility)
    if body.resize_mode == 1 and body.upscaling_crop:
        cropped = Image.new("RGB", (body.upscaling_resize_w, body.upscaling_resize_h))
        cropped.paste(out, box=(body.upscaling_resize_w // 2 - out.width // 2,
                                body.upscaling_resize_h // 2 - out.height // 2))
        out = cropped
    notes = [f"{name} is face restoration, which latentgen does not have; not applied"
             for name in ("gfpgan_visibility", "codeformer_visibility") if getattr(body, name)]
    return out, notes
