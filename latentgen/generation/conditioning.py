"""What the U-Net is conditioned on, as one object, and the prompt encoder that makes it.

`Conditioning` holds everything a text encoder gives the U-Net for N images: per-token hidden states, their mask,
and, for models that take them (SDXL's second encoder), a pooled embedding and further added inputs. A second
text encoder is then one more backend filling the same object, not a change in the sampler.

`PromptEncoder` encodes each distinct prompt alone (weighting, windows of the encoder's length: `prompts.py`)
and keeps it in a small cache shared by concurrent callers (a lock guards it), so an embedding never depends on
which other prompts share the call.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

import torch
import torch.nn.functional as F

from latentgen.formats.lora import strip_tags
from latentgen.generation.prompts import ChunkedEncoder
from latentgen.generation.schedule import at

PROMPT_CACHE_SIZE = 512


@dataclass
class Conditioning:
    hidden_states: torch.Tensor  # (N, T, D)
    mask: torch.Tensor | None = None  # (N, T) bool, only when prompts have different lengths
    pooled: torch.Tensor | None = None  # (N, D'), for U-Nets with added text embeddings
    added: dict[str, torch.Tensor] = field(default_factory=dict)  # other added inputs, (N, ...) each

    def __len__(self) -> int:
        return self.hidden_states.shape[0]

    def __getitem__(self, rows) -> "Conditioning":
        return Conditioning(self.hidden_states[rows], None if self.mask is None else self.mask[rows],
                            None if self.pooled is None else self.pooled[rows],
                            {k: v[rows] for k, v in self.added.items()})

    def repeat_interleave(self, n: int) -> "Conditioning":
        if n == 1:
            return self
        rep = lambda t: None if t is None else t.repeat_interleave(n, 0)  # noqa: E731
        return Conditioning(rep(self.hidden_states), rep(self.mask), rep(self.pooled),
                            {k: rep(v) for k, v in self.added.items()})

    def unet_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `UNet2DConditionModel.forward`."""
        added = dict(self.added) | ({"text_embeds": self.pooled} if self.pooled is not None else {})
        images = [added.pop(k) for k in sorted(k for k in self.added if k.startswith("image_embeds."))]
        if images:  # IP-Adapters' image embeddings (`generation.control.with_image_embeds`), a list as diffusers'
            added["image_embeds"] = images
        return {"encoder_hidden_states": self.hidden_states, "encoder_attention_mask": self.mask,
                **({"added_cond_kwargs": added} if added else {})}

    @classmethod
    def concat(cls, parts: Sequence["Conditioning"]) -> "Conditioning":
        """Rows of several conditionings, token axes padded to the longest (zeros, masked out)."""
        longest = max(p.hidden_states.shape[1] for p in parts)
        same = all(p.hidden_states.shape[1] == longest and p.mask is None for p in parts)
        hidden, masks = [], []
        for p in parts:
            n, length = p.hidden_states.shape[:2]
            hidden.append(F.pad(p.hidden_states, (0, 0, 0, longest - length)))
            m = torch.ones(n, length, dtype=torch.bool, device=p.hidden_states.device) if p.mask is None else p.mask
            masks.append(F.pad(m, (0, longest - length)))
        pooled = [p.pooled for p in parts]
        return cls(torch.cat(hidden), None if same else torch.cat(masks),
                   None if any(x is None for x in pooled) else torch.cat(pooled),
                   {k: torch.cat([p.added[k] for p in parts]) for k in parts[0].added})


@dataclass
class GuidedConditioning:
    """The conditional rows, and [uncond; cond] for the guided steps (None when the request is unguided)."""

    cond: Conditioning
    both: Conditioning | None = None

    def for_step(self, guided: bool, step: int = 0) -> Conditioning:
        return self.both if guided else self.cond

    def layout(self, step: int) -> None:
        """How a step's cond rows belong to the images: None, one row each with weight 1 (see `Composable`)."""
        return None


@dataclass
class Composable:
    """Prompts whose conditioning changes with the step (A1111's prompt editing and alternation) or that have
    several weighted parts (AND), `latentgen.generation.schedule`: for each image, its parts, each a schedule of
    texts, with its weight; and each image's negative prompt's schedule. `encode(texts)` gives the rows of texts
    (cached by the pipeline's prompt cache, so each distinct text is encoded once)."""

    parts: list[list[tuple[tuple[tuple[int, str], ...], float]]]  # per image: (schedule, weight) per part
    negatives: list[tuple[tuple[int, str], ...]]  # per image: its negative prompt's schedule
    encode: Callable[[list[str]], Conditioning]

    def texts(self, step: int) -> tuple[list[str], list[int], list[float]]:
        """The cond rows' texts at a step, the image of each, and its weight."""
        texts, owners, weights = [], [], []
        for i, image in enumerate(self.parts):
            for entries, weight in image:
                texts.append(at(entries, step))
                owners.append(i)
                weights.append(weight)
        return texts, owners, weights

    @property
    def plain_parts(self) -> bool:
        """One part per image, of weight 1: guidance as for a plain prompt."""
        return all(len(image) == 1 and not torch.is_tensor(image[0][1]) and image[0][1] == 1.0
                   for image in self.parts)

    def for_step(self, guided: bool, step: int = 0) -> Conditioning:
        """The rows of a step: the cond rows, after the images' uncond rows when guided ([uncond; cond])."""
        texts, _, _ = self.texts(step)
        cond = self.encode(texts)
        if not guided:
            return cond
        return Conditioning.concat([self.encode([at(n, step) for n in self.negatives]), cond])

    def layout(self, step: int) -> tuple[list[int], list[float]] | None:
        """The image and weight of each cond row at a step; None where it is one row per image of weight 1."""
        if self.plain_parts:
            return None
        _, owners, weights = self.texts(step)
        return owners, weights


class PromptEncoder:
    """Prompts -> Conditioning through a text encoder backend, one cached encoding per distinct prompt."""

    def __init__(self, size: int = PROMPT_CACHE_SIZE):
        self.size = size
        self.entries: OrderedDict[tuple, Conditioning] = OrderedDict()
        self.lock = threading.Lock()

    def encode(self, prompts: Sequence[str], key: Hashable, backend, device, dtype,
               spell: Callable[[str], str] | None = None) -> Conditioning:
        """(B,) prompts -> hidden states (B, T, D) in `dtype` on `device`, padded and masked when prompts have
        different lengths. `key` names the encoder's state (module, clip skip, ...); `backend()` makes it;
        `spell(prompt)` rewrites a prompt's words for the tokenizer (multi-vector embeddings)."""

        rows = []
        with self.lock:
            encoder = None
            for prompt in prompts:
                entry = (key, prompt)
                if entry not in self.entries:
                    encoder = encoder or ChunkedEncoder(backend())
                    text = strip_tags(prompt) if spell is None else spell(strip_tags(prompt))
                    hidden, pooled = encoder.encode_pooled(text)
                    self.entries[entry] = Conditioning(
                        hidden[None].to(device=device, dtype=dtype),
                        pooled=None if pooled is None else pooled[None].to(device=device, dtype=dtype))
                self.entries.move_to_end(entry)
                rows.append(self.entries[entry])
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)
        return Conditioning.concat(rows)

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()
