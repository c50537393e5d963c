"""IP-Adapter files as people have them (h94/IP-Adapter's `ip-adapter_sd15.safetensors`, `ip-adapter-plus_sd15`,
the SDXL ones): one safetensors file of `image_proj.*` (the image embedding's projection to text-like tokens) and
`ip_adapter.*` (each cross-attention layer's extra key/value projections) tensors, with the CLIP vision encoder it
was trained on in a folder `image_encoder/` beside it (the hub repository's layout), or given by path.

A1111 runs IP-Adapters through its ControlNet extension (module `ip-adapter_clip_sd15`, model `ip-adapter_sd15`);
latentgen does the same: a ControlNet unit whose model is an IP-Adapter file is an image prompt
(`generation.control`). The layers are diffusers' (`UNet2DConditionModel._load_ip_adapter_weights`, the
processors `IPAdapterAttnProcessor2_0`), applied for the call and taken off after (`applied`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from latentgen.errors import UserError, first_line

PREFIXES = ("image_proj.", "ip_adapter.")
ENCODER_FOLDER = "image_encoder"


def is_ip_adapter(keys) -> bool:
    return any(k.startswith(PREFIXES[0]) for k in keys) and any(k.startswith(PREFIXES[1]) for k in keys)


@dataclass
class IPAdapter:
    """An IP-Adapter's weights, split as diffusers takes them, and its image encoder and preprocessing."""

    name: str
    state: dict[str, dict[str, torch.Tensor]]  # {"image_proj": {...}, "ip_adapter": {...}}
    encoder: Any  # transformers' CLIPVisionModelWithProjection
    processor: Any  # transformers' CLIPImageProcessor

    @property
    def plus(self) -> bool:
        """IP-Adapter Plus: its projection is a resampler over the encoder's penultimate hidden states."""
        return "latents" in self.state["image_proj"]

    @property
    def cross_attention_dim(self) -> int:
        proj = self.state["image_proj"]
        if "proj.weight" in proj:
            return proj["proj.weight"].shape[0] // 4
        return proj["proj_out.weight"].shape[0]

    @property
    def layers(self) -> int:
        return sum(1 for k in self.state["ip_adapter"] if k.endswith("to_k_ip.weight"))

    @torch.no_grad()
    def embeds(self, image) -> tuple[torch.Tensor, torch.Tensor]:
        """(the image's embedding, the unconditional one), each (1, 1, ...) as the U-Net's `image_embeds` take
        them: the projected image embedding and zeros (IP-Adapter), or the penultimate hidden states of the image
        and of a black image (Plus), as diffusers' pipelines make them."""
        pixels = self.processor(images=image.convert("RGB"), return_tensors="pt").pixel_values
        pixels = pixels.to(self.encoder.device, self.encoder.dtype)
        if self.plus:
            states = [self.encoder(p, output_hidden_states=True).hidden_states[-2] for p in (pixels, pixels * 0)]
            return states[0][None].float(), states[1][None].float()
        embed = self.encoder(pixels).image_embeds[None].float()
        return embed, torch.zeros_like(embed)


def load(path: Path, encoder: Path | None = None) -> IPAdapter:
    """An IP-Adapter file and its image encoder (`encoder`, or `image_encoder/` beside the file or one folder up)."""
    from safetensors.torch import load_file
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    path = Path(path)
    try:
        flat = load_file(str(path))
    except Exception as err:  # safetensors raises its own error type for every kind of damage
        raise UserError(f"IP-Adapter {path} is not a readable safetensors file ({first_line(err)})") from None
    if not is_ip_adapter(flat):
        raise UserError(f"{path} is not an IP-Adapter (no image_proj.* and ip_adapter.* tensors)")
    state = {p[:-1]: {k[len(p):]: v for k, v in flat.items() if k.startswith(p)} for p in PREFIXES}
    candidates = [Path(encoder)] if encoder else [path.parent / ENCODER_FOLDER, path.parent.parent / ENCODER_FOLDER]
    folder = next((c for c in candidates if (c / "config.json").is_file()), None)
    if folder is None:
        raise UserError(f"IP-Adapter {path.name} needs the CLIP vision encoder it was trained with: a folder "
                        f"{ENCODER_FOLDER}/ beside it (h94/IP-Adapter's layout); looked in "
                        f"{', '.join(map(str, candidates))}")
    try:
        vision = CLIPVisionModelWithProjection.from_pretrained(folder, local_files_only=True).eval()
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load the IP-Adapter's image encoder in {folder} ({first_line(err)})") from None
    size = vision.config.image_size
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return IPAdapter(path.stem, state, vision, processor)


def check_fits(adapter: IPAdapter, unet) -> None:
    """An IP-Adapter made for another model family is a one-line error."""
    layers = sum(1 for name in unet.attn_processors if name.endswith("attn2.processor"))
    if adapter.cross_attention_dim != unet.config.cross_attention_dim or adapter.layers != layers:
        raise UserError(f"IP-Adapter {adapter.name} does not fit this model's U-Net (text width "
                        f"{adapter.cross_attention_dim} vs {unet.config.cross_attention_dim}, {adapter.layers} "
                        f"cross-attention layers vs {layers}): it was made for another base model")


@contextlib.contextmanager
def applied(unet, adapters: list[IPAdapter], masks: list | None = None):
    """Within the block the U-Net has the adapters' layers (diffusers'), their scales set per step with
    `set_scales`; its own attention processors and projection are restored after. `unet.regional_attention` is
    set meanwhile, which keeps the compiled U-Net (that has none of these layers) out of it. `masks`: one per
    adapter, (1, 1, H, W) or None, where each acts (diffusers' `ip_adapter_masks`, handed to every U-Net call)."""
    if not adapters:
        yield
        return
    processors, projection = unet.attn_processors, unet.encoder_hid_proj
    kind = unet.config.encoder_hid_dim_type
    handle = None
    try:
        unet._load_ip_adapter_weights([a.state for a in adapters])
        unet.to(unet.device, unet.dtype)  # the new layers, on the U-Net's device and in its dtype
        unet.regional_attention = True
        if masks is not None and any(m is not None for m in masks):
            def with_masks(module, args, kwargs):
                extra = dict(kwargs.get("cross_attention_kwargs") or {})
                extra["ip_adapter_masks"] = [None if m is None else m.to(args[0].device) for m in masks]
                return args, kwargs | {"cross_attention_kwargs": extra}

            handle = unet.register_forward_pre_hook(with_masks, with_kwargs=True)
        yield
    finally:
        if handle is not None:
            handle.remove()
        unet.set_attn_processor(processors)
        unet.encoder_hid_proj = projection
        unet.register_to_config(encoder_hid_dim_type=kind)
        unet.regional_attention = False


def set_scales(unet, scales: list[float]) -> None:
    """Each adapter's scale in every IP-Adapter layer (0: the adapter does nothing at this step)."""
    for processor in unet.attn_processors.values():
        if hasattr(processor, "to_k_ip"):
            processor.scale = list(scales)
