"""Regional prompting, as sd-webui-regional-prompter's latent mode does it: the canvas split into columns or rows
by ratios, one prompt per region, and each step's guided prediction made of each region's own inside its region,
ε̃ = ε∅ + s·Σ_r M_r ⊙ (ε_r − ε∅), with the masks M_r summing to 1 everywhere. A base prompt for the whole image
can be mixed in with a weight (the base ratio): M_base = b everywhere, the regions' masks scaled by 1 − b.

The prompt holds the regions' prompts as the regional prompter writes them: `BREAK` between regions (left to
right, or top to bottom), an optional base prompt before `ADDBASE`, and an optional common part before `ADDCOMM`,
prepended to every region. They run as composable parts (`conditioning.Composable`), so they may hold prompt
editing too. (The regional prompter's attention mode, which masks the cross-attention instead, is not here.)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Mapping

import torch

from latentgen import validate
from latentgen.errors import UserError, one_of
from latentgen.generation.options import option, table
from latentgen.generation.prompts import BREAK_SPLIT

MODES = ("columns", "rows")
CALCS = {"latent": "Latent", "attention": "Attention"}  # ours -> the regional prompter's `RP Calc Mode`


@dataclass(frozen=True)
class Regions:
    ratios: str = field(default="1,1", metadata=option(
        "region ratios", flag="--regions", text="RP Ratios", always=True, cli={"metavar": "R,R,..."},
        help="regional prompting: split the canvas by these ratios (the prompt's BREAKs separate the regions' "
             "prompts; ADDBASE ends a base prompt, ADDCOMM a part common to every region)"))
    mode: str = field(default="columns", metadata=option(
        "region mode", flag="--region-mode", text="RP Divide mode", always=True, cli={"choices": list(MODES)},
        help="regions side by side (columns, left to right) or stacked (rows, top to bottom)"))
    base: float = field(default=0.0, metadata=option(
        "region base ratio", flag="--region-base", text="RP Base Ratio", always=True,
        help="the weight of the base prompt (before ADDBASE) over the whole image, in [0, 1)"))
    calc: str = field(default="latent", metadata=option(
        "region calculation", flag="--region-calc", text="RP Calc Mode", always=True, cli={"choices": list(CALCS)},
        to_text=CALCS.get, from_text={v: k for k, v in CALCS.items()}.get,
        help="latent: each region's own guided prediction inside it; attention: one U-Net pass whose "
             "cross-attention reads each region's prompt inside it (the regional prompter's two modes)"))

    def check(self, names: Mapping[str, str] | None = None) -> "Regions":
        name = {f.name: opt.label for f, opt in table(Regions)} | dict(names or {})
        self.widths(name["ratios"])
        if self.mode not in MODES:
            raise one_of(name["mode"], self.mode, list(MODES))
        validate.in_range(self.base, name["base"], 0.0, 1.0, high_open=True)
        if self.calc not in CALCS:
            raise one_of(name["calc"], self.calc, list(CALCS))
        return self

    def widths(self, what: str = "region ratios") -> list[float]:
        try:
            ratios = [float(r) for r in str(self.ratios).split(",")]
        except ValueError:
            ratios = []
        if not ratios or min(ratios) <= 0:
            raise UserError(f"{what} must be positive numbers separated by commas (e.g. 1,1 or 2,1), got "
                            f"{self.ratios!r}")
        total = sum(ratios)
        return [r / total for r in ratios]

    def prompts(self, prompt: str) -> tuple[str | None, list[str]]:
        """(the base prompt or None, each region's prompt) of a prompt written for regions."""
        base = None
        if "ADDBASE" in prompt:
            base, prompt = (p.strip() for p in prompt.split("ADDBASE", 1))
        common = ""
        if "ADDCOMM" in prompt:
            common, prompt = (p.strip() for p in prompt.split("ADDCOMM", 1))
        parts = [f"{common} {p}".strip() if common else p for p in BREAK_SPLIT.split(prompt)]
        count = len(self.widths())
        if len(parts) != count:
            raise UserError(f"the regions are {count} ({self.ratios}) but the prompt has {len(parts)} region "
                            "prompts (separated by BREAK); give one per region")
        return base, parts

    def masks(self, height: int, width: int) -> list[torch.Tensor]:
        """Each region's mask over a (height, width) latent, (1, 1, h, w), 1 inside it; together they cover the
        latent once."""
        size = width if self.mode == "columns" else height
        edges = [0]
        for w in self.widths():
            edges.append(edges[-1] + w)
        cuts = [round(e * size) for e in edges]
        out = []
        for a, b in zip(cuts, cuts[1:]):
            m = torch.zeros(1, 1, height, width)
            if self.mode == "columns":
                m[..., :, a:b] = 1
            else:
                m[..., a:b, :] = 1
            out.append(m)
        return out

    def texts(self, prompt: str) -> list[str]:
        """The prompts of the parts, in `parts`' order: the base prompt (when it has a weight) and each region's."""
        base, prompts = self.prompts(prompt)
        return ([base] if base is not None and self.base > 0 else []) + prompts

    def shape_of(self, prompts: list[str]) -> tuple[int, bool]:
        """(parts, whether a base prompt is one of them), the same for every prompt of a call in attention mode
        (its images share one U-Net pass)."""
        shapes = {(len(self.texts(p)), len(self.texts(p)) > len(self.widths())) for p in prompts}
        if len(shapes) > 1:
            raise UserError("in the attention mode every prompt of a call needs the same parts: give all of them a "
                            "base prompt (ADDBASE) or none")
        return shapes.pop()

    def weight_maps(self, height: int, width: int, with_base: bool) -> torch.Tensor:
        """(P, height, width): each part's weight at each position (they sum to 1), in `texts`' order."""
        masks = torch.cat(self.masks(height, width))[:, 0]
        if not with_base:
            return masks
        return torch.cat([torch.full((1, height, width), self.base), masks * (1.0 - self.base)])

    def parts(self, prompt: str, height: int, width: int) -> list[tuple[str, float | torch.Tensor]]:
        """The prompt's composable parts with their weight maps: the base prompt's (b everywhere) and each
        region's ((1 − b) inside it)."""
        base, prompts = self.prompts(prompt)
        weight = 1.0 - self.base if base is not None else 1.0
        parts = [(p, m * weight) for p, m in zip(prompts, self.masks(height, width))]
        return ([(base, self.base)] if base is not None and self.base > 0 else []) + parts


# ----------------------------------------------------------------------------------------------------------------
# Attention mode


class RegionalAttention:
    """A cross-attention processor for the regional prompter's attention mode: the text tokens are the parts'
    prompts side by side (P chunks of T tokens); each chunk is attended to by the processor it replaces, and the
    outputs are blended by the parts' weight maps at this layer's resolution. The blend is exact where the chunks
    are equal (a negative prompt repeated P times gives plain attention), since the weights sum to 1 and the output
    projection is linear."""

    def __init__(self, inner, regions: Regions, parts: int, with_base: bool, aspect: float):
        self.inner, self.regions, self.parts, self.with_base, self.aspect = inner, regions, parts, with_base, aspect
        self.cache: dict = {}

    def weights(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """(P, 1, n, 1) weights for n positions of this layer (its height from the image's aspect ratio)."""
        key = (n, like.device, like.dtype)
        if key not in self.cache:
            height = max(1, round((n * self.aspect) ** 0.5))
            maps = self.regions.weight_maps(height, n // height, self.with_base)
            self.cache[key] = maps.reshape(self.parts, 1, n, 1).to(like.device, like.dtype)
        return self.cache[key]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is None:  # self-attention
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        chunks = encoder_hidden_states.chunk(self.parts, dim=1)
        masks = attention_mask.chunk(self.parts, dim=-1) if attention_mask is not None else [None] * self.parts
        w = self.weights(hidden_states.shape[1], hidden_states)
        out = None
        for p in range(self.parts):
            part = w[p] * self.inner(attn, hidden_states, chunks[p], masks[p], temb, **kwargs)
            out = part if out is None else out + part
        return out


@contextlib.contextmanager
def attention(unet, regions: Regions | None, parts: int, with_base: bool, height: int, width: int):
    """Within the block the U-Net's cross-attention layers are regional (`RegionalAttention`); restored after.
    `unet.regional_attention` is set meanwhile (the compiled U-Net runs none of it)."""
    if regions is None or regions.calc != "attention":
        yield
        return
    layers = [m for name, m in unet.named_modules() if name.endswith("attn2") and hasattr(m, "processor")]
    saved = [m.processor for m in layers]
    try:
        for m in layers:
            m.processor = RegionalAttention(m.processor, regions, parts, with_base, height / width)
        unet.regional_attention = True
        yield
    finally:
        for m, processor in zip(layers, saved):
            m.processor = processor
        unet.regional_attention = False
