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

import re
from dataclasses import dataclass, field
from typing import Mapping

import torch

from latentgen import validate
from latentgen.errors import UserError, one_of
from latentgen.generation.options import option, table

MODES = ("columns", "rows")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


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

    def check(self, names: Mapping[str, str] | None = None) -> "Regions":
        name = {f.name: opt.label for f, opt in table(Regions)} | dict(names or {})
        self.widths(name["ratios"])
        if self.mode not in MODES:
            raise one_of(name["mode"], self.mode, list(MODES))
        validate.in_range(self.base, name["base"], 0.0, 1.0, high_open=True)
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
        parts = [f"{common} {p}".strip() if common else p for p in _BREAK.split(prompt)]
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

    def parts(self, prompt: str, height: int, width: int) -> list[tuple[str, float | torch.Tensor]]:
        """The prompt's composable parts with their weight maps: the base prompt's (b everywhere) and each
        region's ((1 − b) inside it)."""
        base, prompts = self.prompts(prompt)
        weight = 1.0 - self.base if base is not None else 1.0
        parts = [(p, m * weight) for p, m in zip(prompts, self.masks(height, width))]
        return ([(base, self.base)] if base is not None and self.base > 0 else []) + parts
