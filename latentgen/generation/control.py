"""ControlNet units, as diffusers' ControlNet pipelines and AUTOMATIC1111's ControlNet extension run them.

A unit is a ControlNet, its control image (through a preprocessor, `components.control_images`), a weight, the
fraction of the steps it acts in (start, end) and A1111's control mode. At each step every active unit runs on the
U-Net's input rows and adds its residuals to the U-Net's skip connections and middle block
(`down_block_additional_residuals`, `mid_block_additional_residual`); several units' residuals add up, as
diffusers' `MultiControlNetModel` sums them. In the "balanced" mode the arithmetic is diffusers' own
(`StableDiffusionControlNetPipeline` with `controlnet_conditioning_scale`, `control_guidance_start`/`_end`), so
the image is diffusers' image.

A1111's other modes, as its extension implements them (`hook.py`): "prompt" ("My prompt is more important")
scales the 13 residuals of SD's ControlNet by 0.825^(12 − i), deep ones most, so the control fades towards the
fine levels; "control" ("ControlNet is more important") does that and applies the control to the prompt's rows
only, so classifier-free guidance pushes towards it. (diffusers' `guess_mode` is the latter with logspace(−1, 0)
scales: close, not equal.)

Command line: `--control MODEL:IMAGE[:WEIGHT]`, repeatable, with `,key=value` settings after it (start, end,
mode, module, resize, threshold_a, threshold_b): `--control layout:map.png:0.8,end=0.6`. `--control-preprocess
MODULE` runs every unit's image through a preprocessor.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from latentgen import validate
from latentgen.components import control_images
from latentgen.errors import UserError, one_of
from latentgen.formats import controlnet as files
from latentgen.formats import ip_adapter, lllite

MODES = {"balanced": "Balanced", "prompt": "My prompt is more important", "control": "ControlNet is more important"}
# A1111's extension's `hr_option` (its HiResFixOption): which passes of the hires fix a unit acts in
HR_OPTIONS = {"both": "Both", "low": "Low res only", "high": "High res only"}
SOFT = 0.825  # A1111's soft injection: residual i of N + 1 scaled by SOFT ** (N - i)
MAX_UNITS = 4


@dataclass(frozen=True)
class Control:
    """One ControlNet unit. `model`: a ControlNet folder or file, a name in the pipeline's `controlnets_dir`, or a
    `ControlNetModel`; `image`: a PIL image, an image file's path or an (H, W, 3) array."""

    model: Any
    image: Any = None
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: str = "balanced"
    module: str = "none"
    resize_mode: str = "crop"
    threshold_a: float | None = None
    threshold_b: float | None = None
    hr: str = "both"  # with the hires fix: in both passes, the first ("low") or the second ("high") only
    mask: Any = None  # A1111's effective region mask: where the unit acts (white), as an image, path or array

    def check(self, what: str = "control") -> "Control":
        if self.model is None or (isinstance(self.model, str) and not self.model.strip()):
            raise UserError(f"{what}: no ControlNet model given")
        if self.image is None:
            raise UserError(f"{what}: no control image given for ControlNet {self.name}")
        validate.in_range(self.weight, f"{what} weight", 0.0, 2.0)
        validate.in_range(self.start, f"{what} start", 0.0, 1.0)
        validate.in_range(self.end, f"{what} end", 0.0, 1.0)
        if self.start >= self.end:
            raise UserError(f"{what}: start must be below end (fractions of the steps), got {self.start:g} and "
                            f"{self.end:g}")
        if self.mode not in MODES:
            raise one_of(f"{what} mode", self.mode, list(MODES))
        if self.hr not in HR_OPTIONS:
            raise one_of(f"{what} hr", self.hr, list(HR_OPTIONS))
        if self.resize_mode not in control_images.RESIZE_MODES:
            raise one_of(f"{what} resize mode", self.resize_mode, list(control_images.RESIZE_MODES))
        module = control_images.module_name(self.module, f"{what} preprocessor")
        for t in (self.threshold_a, self.threshold_b):
            if t is not None:
                validate.in_range(t, f"{what} threshold", 0.0, 10000.0)
        return dataclasses.replace(self, module=module, weight=float(self.weight), start=float(self.start),
                                   end=float(self.end))

    @property
    def name(self) -> str:
        if isinstance(self.model, (str, Path)):  # a file's stem, a folder's name; A1111's " [hash]" left off
            path = Path(str(self.model).split(" [")[0])
            return path.stem if path.suffix in files.SUFFIXES else path.name
        return type(self.model).__name__

    def record(self) -> dict:
        """The unit as JSON for an image's metadata: the image by its path where it was given one (a replay reads
        it again), else None."""
        image = str(Path(self.image).resolve()) if isinstance(self.image, (str, Path)) else None
        mask = str(Path(self.mask).resolve()) if isinstance(self.mask, (str, Path)) else None
        model = str(Path(self.model).resolve()) if isinstance(self.model, (str, Path)) and Path(
            self.model).exists() else (self.model if isinstance(self.model, str) else self.name)
        return dataclasses.asdict(self) | {"model": model, "image": image, "mask": mask}

    def text(self) -> str:
        """The unit as A1111's extension writes it into `parameters` (`ControlNet 0: "..."`)."""
        fields = {"Module": self.module, "Model": self.name, "Weight": f"{self.weight:g}",
                  "Resize Mode": control_images.RESIZE_MODES[self.resize_mode], "Processor Res": "-1",
                  "Threshold A": _g(self.threshold_a), "Threshold B": _g(self.threshold_b),
                  "Guidance Start": f"{self.start:g}", "Guidance End": f"{self.end:g}", "Pixel Perfect": "True",
                  "Control Mode": MODES[self.mode], "Hr Option": HR_OPTIONS[self.hr]}
        return ", ".join(f"{k}: {v}" for k, v in fields.items() if v is not None)

    @classmethod
    def from_text(cls, text: str) -> "Control":
        """A unit from A1111's `ControlNet N` text (its image is not in the text: give it again to replay)."""
        fields = {}
        for part in text.strip().strip('"').split(", "):
            key, _, value = part.partition(": ")
            fields[key.strip()] = value.strip()
        modes = {v: k for k, v in MODES.items()}
        hrs = {v: k for k, v in HR_OPTIONS.items()}
        resizes = {v: k for k, v in control_images.RESIZE_MODES.items()}

        def number(key, default):
            value = fields.get(key)
            return default if value in (None, "", "-1") else float(value)

        model = fields.get("Model", "").split(" [")[0]
        return cls(model=model or None, weight=number("Weight", 1.0), start=number("Guidance Start", 0.0),
                   end=number("Guidance End", 1.0), mode=modes.get(fields.get("Control Mode"), "balanced"),
                   module=control_images.ALIASES.get(fields.get("Module", "none"), fields.get("Module", "none")),
                   resize_mode=resizes.get(fields.get("Resize Mode"), "crop"),
                   threshold_a=number("Threshold A", None), threshold_b=number("Threshold B", None),
                   hr=hrs.get(fields.get("Hr Option"), "both"))

    def acts_in(self, hires_pass: int) -> bool:
        """Whether the unit acts in pass 1 (the first) or 2 (the hires fix's second) of a hires request."""
        return self.hr == "both" or self.hr == ("low", "high")[hires_pass - 1]


def _g(value: float | None) -> str | None:
    return None if value is None else f"{value:g}"


KEYS = {"start": float, "end": float, "mode": str, "module": str, "resize": str, "threshold_a": float,
        "threshold_b": float, "weight": float, "hr": str, "mask": str}


def parse_flag(value: str) -> Control:
    """`MODEL:IMAGE[:WEIGHT][,key=value...]` -> a unit (checked later with the request)."""
    head, *settings = value.split(",")
    parts = head.rsplit(":", 2) if head.count(":") >= 2 else head.split(":")
    weight = 1.0
    if len(parts) == 3:
        try:
            weight = float(parts[2])
        except ValueError:
            parts = [":".join(parts[:2]), parts[2]]  # MODEL:IMAGE where IMAGE holds a colon: no weight
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise UserError(f"--control takes MODEL:IMAGE[:WEIGHT][,key=value...], got {value!r}")
    fields: dict[str, Any] = {"model": parts[0], "image": parts[1], "weight": weight}
    for item in settings:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or key not in KEYS:
            raise UserError(f"--control settings are key=value with key one of {', '.join(KEYS)}; got {item!r}")
        try:
            fields["resize_mode" if key == "resize" else key] = KEYS[key](text.strip())
        except ValueError:
            raise UserError(f"--control {key} must be a number, got {text!r}") from None
    return Control(**fields)


def check_all(units, preprocess: list[str] | None, what: str = "control") -> list[Control] | None:
    """The request's units checked, as Control (from mappings too), with `preprocess` (one module for every unit,
    or one per unit) applied to units that name none."""
    if not units:
        if preprocess:
            raise UserError(f"a preprocessor was given without a {what} unit (--control MODEL:IMAGE)")
        return None
    if isinstance(units, (Control, Mapping)):
        units = [units]
    known = [f.name for f in dataclasses.fields(Control)]
    for u in units:
        if isinstance(u, Mapping) and (set(u) - set(known) or "model" not in u):
            raise UserError(f"a {what} unit's settings are {', '.join(known)} (model required); got {dict(u)!r}")
    units = [Control(**u) if isinstance(u, Mapping) else u for u in units]
    if not all(isinstance(u, Control) for u in units):
        raise UserError(f"{what} must be a list of Control units, got {units!r}")
    if len(units) > MAX_UNITS:
        raise UserError(f"at most {MAX_UNITS} ControlNet units per request, got {len(units)}")
    if preprocess:
        if len(preprocess) not in (1, len(units)):
            raise UserError(f"got {len(preprocess)} preprocessors for {len(units)} ControlNet units; give one for "
                            "all or one per unit")
        modules = preprocess * len(units) if len(preprocess) == 1 else preprocess
        units = [dataclasses.replace(u, module=m) if u.module == "none" else u for u, m in zip(units, modules)]
    return [u.check(f"{what} {i}" if len(units) > 1 else what) for i, u in enumerate(units)]


# ----------------------------------------------------------------------------------------------------------------
# Fitted to a pipeline


@dataclass
class Active:
    """A unit fitted to a pipeline and an image size: its network and its control image (1, 3, H, W) in [0, 1]."""

    net: Any
    image: torch.Tensor
    unit: Control
    features: list | None = None  # a T2I-Adapter's: its features of the image, computed once
    mask: torch.Tensor | None = None  # (1, 1, H, W) in [0, 1]: where the unit acts (A1111's effective region mask)

    def masked(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Residuals or features × the region mask, resized to each (bilinear), as A1111's extension applies it."""
        if self.mask is None:
            return tensors
        return [r * F.interpolate(self.mask.to(r.device, r.dtype), size=r.shape[-2:], mode="bilinear")
                for r in tensors]

    @property
    def adapter(self) -> bool:
        """A T2I-Adapter (its features are added inside the U-Net's down blocks), not a ControlNet."""
        return type(self.net).__name__ == "T2IAdapter"

    @property
    def lllite(self) -> bool:
        """kohya's ControlNet-LLLite (its modules change the inputs of the U-Net's attention projections)."""
        return isinstance(self.net, lllite.LLLite)

    def on(self, i: int, n: int) -> bool:
        """Whether the unit acts at step i of n (diffusers' `controlnet_keep`, which A1111's percentages match)."""
        return not (i / n < self.unit.start or (i + 1) / n > self.unit.end)


@dataclass
class ImagePrompt:
    """An IP-Adapter unit fitted to a pipeline: the adapter, and its image's embedding and the unconditional one
    (`formats.ip_adapter.IPAdapter.embeds`)."""

    adapter: Any
    embed: torch.Tensor
    negative: torch.Tensor
    unit: Control
    mask: torch.Tensor | None = None  # (1, 1, H, W): diffusers' IP-Adapter mask (`ip_adapter_masks`), binarized

    on = Active.on


def image_prompts(active: list) -> list[ImagePrompt]:
    return [a for a in active if isinstance(a, ImagePrompt)]


def with_image_embeds(cond, prompts: list[ImagePrompt], uncond_rows: int):
    """The rows' conditioning with each adapter's image embedding (`image_embeds.K`, which `unet_kwargs` hands the
    U-Net as its list `image_embeds`): the unconditional one in the first `uncond_rows` rows."""
    rows = len(cond)
    added = dict(cond.added)
    for k, p in enumerate(prompts):
        embed = torch.cat([p.negative] * uncond_rows + [p.embed] * (rows - uncond_rows))
        added[f"image_embeds.{k}"] = embed.to(cond.hidden_states.device, cond.hidden_states.dtype)
    return dataclasses.replace(cond, added=added)


def networks(pipe) -> dict:
    """The pipeline's loaded ControlNets, by resolved path (loaded once, on the U-Net's device and dtype)."""
    return pipe.__dict__.setdefault("controlnets", {})


def fit(pipe, units: list[Control], height: int, width: int) -> list[Active]:
    """Each unit's network (loaded and checked against the U-Net) and control image at height × width."""
    out = []
    folders = [getattr(pipe, "controlnets_dir", None), files.shipped(pipe)]  # the user's, then the model's own
    confined = getattr(pipe, "loras_confined", False)
    for unit in units:
        net = unit.model
        if isinstance(net, (str, Path)):
            path = files.resolve(net, folders, confined).resolve()
            cache = networks(pipe)
            if path not in cache:
                cache[path] = files.load(path, getattr(pipe, "allow_pickle", False), pipe.unet)
            net = cache[path]
        image = _picture(unit.image, "control image")
        if isinstance(net, ip_adapter.IPAdapter):  # an image prompt: the image's embedding, not a control map
            ip_adapter.check_fits(net, pipe.unet)
            if unit.hr != "both":  # its attention processors are in the U-Net for the whole call
                raise UserError(f"{unit.name} is an IP-Adapter: it acts in both passes of the hires fix (hr both), "
                                f"not {HR_OPTIONS[unit.hr].lower()}")
            if pipe.__dict__.get("offloaded") == "sequential":
                raise UserError("an IP-Adapter cannot join a U-Net offloaded layer by layer (--offload sequential); "
                                "use --offload model")
            net.encoder.to(pipe.execution_device)
            mask = None
            if unit.mask is not None:  # diffusers' masks for IP-Adapters, made as its processor makes them
                from diffusers.image_processor import IPAdapterMaskProcessor

                mask = IPAdapterMaskProcessor().preprocess(_picture(unit.mask, "region mask"), height=height,
                                                           width=width)
            out.append(ImagePrompt(net, *net.embeds(image), unit, mask=mask))
            continue
        if not isinstance(net, lllite.LLLite):  # an LLLite was matched to the U-Net's layers as it loaded
            (check_adapter_fits if type(net).__name__ == "T2IAdapter" else check_fits)(net, pipe.unet, unit.name)
        if (net.device, net.dtype) != (pipe.execution_device, pipe.unet.dtype):
            net.to(device=pipe.execution_device, dtype=pipe.unet.dtype)
        prepared = control_images.prepare(image, width, height, unit.module, unit.resize_mode, unit.threshold_a,
                                          unit.threshold_b)
        mask = None
        if unit.mask is not None:  # grey, at the image's size: white acts
            mask = control_images.to_tensor(_picture(unit.mask, "region mask").convert("L").resize(
                (width, height)))[:, :1]
        out.append(Active(net, control_images.to_tensor(prepared), unit, mask=mask))
    return out


def _picture(value, what: str):
    """A PIL image from an image, a path or an (H, W, C) array."""
    from PIL import Image

    if isinstance(value, (str, Path)):
        return open_image(value, what)
    return value if isinstance(value, Image.Image) else Image.fromarray(_uint8(value))


def open_image(path, what: str = "control image") -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(f"cannot read {what} {path} ({err})") from None


def _uint8(array):
    import numpy as np

    array = np.asarray(array)
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise UserError(f"a control image as an array must be (H, W, 3), got shape {array.shape}")
    if array.dtype != np.uint8:
        array = (array.astype("float32").clip(0, 1) * 255).round().astype("uint8")
    return array[..., :3] if array.shape[-1] != 1 else array.repeat(3, -1)


def check_fits(net, unet, name: str) -> None:
    """A ControlNet made for another model family is a one-line error (an SDXL ControlNet on SD 1.x, ...)."""
    a, b = net.config, unet.config
    family = {None: "SD 1.x/2.x", "text_time": "SDXL"}
    if a.get("addition_embed_type") != b.get("addition_embed_type"):
        raise UserError(f"ControlNet {name} is for {family.get(a.get('addition_embed_type'), 'another model')} "
                        f"models; this model is {family.get(b.get('addition_embed_type'), 'another kind')}")
    if (a.cross_attention_dim != b.cross_attention_dim
            or list(a.block_out_channels) != list(b.block_out_channels)):
        raise UserError(f"ControlNet {name} does not fit this model's U-Net (text width {a.cross_attention_dim} vs "
                        f"{b.cross_attention_dim}, widths {list(a.block_out_channels)} vs "
                        f"{list(b.block_out_channels)}): it was made for another base model")


def check_adapter_fits(net, unet, name: str) -> None:
    """A T2I-Adapter whose features do not match the U-Net's down blocks is a one-line error."""
    channels = list(net.config.channels)[:len(unet.config.block_out_channels)]
    if channels != list(unet.config.block_out_channels)[:len(channels)]:
        raise UserError(f"T2I-Adapter {name} does not fit this model's U-Net (feature widths "
                        f"{list(net.config.channels)} vs {list(unet.config.block_out_channels)}): it was made for "
                        "another base model")


# ----------------------------------------------------------------------------------------------------------------
# At each step


def residuals(active: list[Active], progress: tuple[int, int], x_in: torch.Tensor, t, uncond_rows: int):
    """A function of the U-Net call's rows giving its residual keyword arguments at this step (None where no
    unit acts). `x_in`: the U-Net's input rows; the first `uncond_rows` of them are unconditional (the
    "ControlNet is more important" mode leaves them without control)."""
    for a in active:  # an LLLite acts through hooks (`formats.lllite.applied`): off unless its unit is on below
        if isinstance(a, Active) and a.lllite:
            a.net.use(a.image)
    on = [a for a in active if isinstance(a, Active) and a.on(*progress)]
    if not on:
        return None

    def kwargs(rows, unet_kwargs: dict) -> dict:
        index = torch.arange(x_in.shape[0])[rows]
        downs = mid = inner = None
        for a in on:
            if a.lllite:  # its weight for each row of this call (the "control" mode: none on unconditional rows)
                keep = (index >= uncond_rows) if a.unit.mode == "control" and uncond_rows else torch.ones(len(index))
                a.net.scale, a.net.mask = keep.float() * a.unit.weight, a.mask
                continue
            if a.adapter:  # a T2I-Adapter: its features × weight, the same at every step (diffusers' pipeline's)
                if a.features is None:
                    image = a.image.to(x_in.device, a.net.dtype)
                    if a.net.config.in_channels == 1:  # grey as PIL's "L" (ITU-R 601-2), what such adapters read
                        image = (image * torch.tensor([0.299, 0.587, 0.114], device=image.device,
                                                      dtype=image.dtype).view(1, 3, 1, 1)).sum(1, keepdim=True)
                    a.features = a.net(image)
                keep = (index >= uncond_rows) if a.unit.mode == "control" and uncond_rows else torch.ones(len(index))
                scale = keep.to(x_in.device, a.features[0].dtype).view(-1, 1, 1, 1) * a.unit.weight
                f = a.masked([v.expand(len(index), -1, -1, -1) * scale for v in a.features])
                inner = f if inner is None else [p + q for p, q in zip(inner, f)]
                continue
            net, unit = a.net, a.unit
            soft = unit.mode != "balanced"
            image = a.image.to(x_in.device, net.dtype).expand(len(index), -1, -1, -1)
            d, m = net(x_in[rows][:, :net.config.in_channels], t,
                       encoder_hidden_states=unet_kwargs["encoder_hidden_states"], controlnet_cond=image,
                       conditioning_scale=1.0 if soft else unit.weight,
                       added_cond_kwargs=unet_kwargs.get("added_cond_kwargs"),
                       timestep_cond=unet_kwargs.get("timestep_cond"), return_dict=False)
            if soft:
                n = len(d)
                d = [r * (unit.weight * SOFT ** (n - i)) for i, r in enumerate(d)]
                m = m * unit.weight
            if unit.mode == "control" and uncond_rows:
                keep = (index >= uncond_rows).to(x_in.device, d[0].dtype).view(-1, 1, 1, 1)
                d, m = [r * keep for r in d], m * keep
            *d, m = a.masked([*d, m])
            downs = d if downs is None else [p + q for p, q in zip(downs, d)]
            mid = m if mid is None else mid + m
        out = {} if downs is None else {"down_block_additional_residuals": downs,
                                        "mid_block_additional_residual": mid}
        return out | ({} if inner is None else {"down_intrablock_additional_residuals": inner})

    return kwargs
