"""Prompt weighting and prompts longer than the text encoder's window, as AUTOMATIC1111 reads them.

Syntax (A1111's): `(word:1.3)` multiplies the attention to `word` by 1.3, `(word)` by 1.1, `[word]` divides by
1.1; brackets nest and multiply (`((word))` = 1.21). `\\(`, `\\)`, `\\[`, `\\]` are literal brackets. An
unbalanced bracket is an error that names its position.

Long prompts are cut into windows of the encoder's length minus its special tokens (75 tokens for CLIP), each
window is wrapped in the special tokens, padded and encoded on its own, and the hidden states are joined along the
token axis, so a 150-token prompt conditions on all 150 tokens instead of being cut off. `BREAK` (A1111's) ends a
window where it stands. Prompt editing, alternation and AND are `latentgen.generation.schedule`'s.

Weights scale each token's hidden state, then the whole window is rescaled to keep its mean (A1111's rule), so
emphasis changes relative, not absolute, strength. compel implements a different syntax (`(word)1.3`, `word++`)
for CLIP-style encoders only; our encoders include T5, BERT and OpenCLIP, so the parser is ours.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

from latentgen.errors import UserError

UP, DOWN = 1.1, 1 / 1.1
BREAK_SPLIT = re.compile(r"\s*\bBREAK\b\s*")
_TOKEN = re.compile(r"\\[()\[\]\\]|\(|\)|\[|\]|:\s*([+-]?\d+(?:\.\d+)?)\s*\)|[^\\()\[\]:]+|:|\\", re.S)


@dataclass(frozen=True)
class Segment:
    text: str
    weight: float


def parse(prompt: str) -> list[Segment]:
    """A prompt -> [(text, weight)], merging neighbours of equal weight. Memoised: a request is checked
    (`Request.check`) and later encoded, and each prompt is parsed once."""
    return list(_parse(prompt))


@functools.lru_cache(maxsize=1024)
def _parse(prompt: str) -> tuple[Segment, ...]:
    segments: list[Segment] = []
    stack: list[tuple[str, int, int]] = []  # (bracket, position, index of its first segment)

    def add(text: str) -> None:
        weight = 1.0
        for bracket, _, _ in stack:
            weight *= UP if bracket == "(" else DOWN
        segments.append(Segment(text, weight))

    for m in _TOKEN.finditer(prompt):
        tok, pos = m.group(0), m.start()
        if tok.startswith("\\") and len(tok) == 2:
            add(tok[1])
        elif tok in ("(", "["):
            stack.append((tok, pos, len(segments)))
        elif m.group(1) is not None and stack and stack[-1][0] == "(":  # ":1.3)" closes a weighted group
            _, _, first = stack.pop()
            factor = float(m.group(1)) / UP  # its "(" counted UP for the segments inside; replace it
            segments[first:] = [Segment(s.text, s.weight * factor) for s in segments[first:]]
        elif tok in (")", "]"):
            if not stack or stack[-1][0] != {")": "(", "]": "["}[tok]:
                raise UserError(f"unbalanced {tok!r} at position {pos} of the prompt {prompt!r}; "
                                f"write \\{tok} for a literal bracket")
            stack.pop()
        else:
            add(tok)
    if stack:
        bracket, pos, _ = stack[-1]
        raise UserError(f"unbalanced {bracket!r} at position {pos} of the prompt {prompt!r}; "
                        f"close it or write \\{bracket} for a literal bracket")
    merged: list[Segment] = []
    for s in segments:
        if merged and merged[-1].weight == s.weight:
            merged[-1] = Segment(merged[-1].text + s.text, s.weight)
        elif s.text:
            merged.append(s)
    return tuple(merged) or (Segment("", 1.0),)


def has_syntax(prompt: str) -> bool:
    return any(c in prompt for c in "()[]\\")


class ChunkedEncoder:
    """Encode one prompt with weighting and windows over a TextEncoder backend: (k·T, D) hidden states."""

    def __init__(self, backend):
        self.backend = backend
        self.max_length = backend.max_length
        self.window = self.max_length - len(backend.prefix) - len(backend.suffix)

    def encode(self, prompt: str) -> torch.Tensor:
        return self.encode_pooled(prompt)[0]

    def encode_pooled(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(k·T, D) hidden states, and for backends with a pooled output (SDXL) the first window's (D',), as
        A1111 and ComfyUI pool long prompts."""
        b = self.backend
        segments = parse(prompt) if has_syntax(prompt) else [Segment(prompt, 1.0)]
        pieces: list[tuple[list[int], list[float]]] = [([], [])]  # A1111's BREAK starts a new window
        for s in segments:
            for k, text in enumerate(BREAK_SPLIT.split(s.text) if "BREAK" in s.text else [s.text]):
                if k:
                    pieces.append(([], []))
                t = b.token_ids(text)
                pieces[-1][0].extend(t)
                pieces[-1][1].extend([s.weight] * len(t))
        pieces = [p for p in pieces if p[0]] or [([], [])]
        windows = [(ids[i:i + self.window], weights[i:i + self.window])
                   for ids, weights in pieces for i in range(0, max(len(ids), 1), self.window)]
        rows, masks, scales = [], [], []
        for chunk, w in windows:
            row = b.prefix + chunk + b.suffix
            n = len(row)
            rows.append(row + [b.pad_id] * (self.max_length - n))
            masks.append([1] * n + [0] * (self.max_length - n))
            scales.append([1.0] * len(b.prefix) + w + [1.0] * (self.max_length - len(b.prefix) - len(w)))
        pooled = None
        if hasattr(b, "encode_ids_pooled"):
            hidden, pooled = b.encode_ids_pooled(torch.tensor(rows), torch.tensor(masks))  # (k, T, D), (k, D')
            pooled = pooled[0]
        else:
            hidden = b.encode_ids(torch.tensor(rows), torch.tensor(masks))  # (k, T, D)
        hidden = emphasized(hidden, torch.tensor(scales))
        return hidden.reshape(-1, hidden.shape[-1]), pooled  # (k·T, D)


def emphasized(states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(k, T, D) token states times their tokens' weights (k, T), each row rescaled to its former mean (A1111's
    rule); the states themselves where every weight is 1."""
    if (weights == 1).all():
        return states
    mean = states.float().mean(dim=(1, 2), keepdim=True)
    out = states * weights.to(states.device, states.dtype)[..., None]
    return out * (mean / out.float().mean(dim=(1, 2), keepdim=True)).to(states.dtype)
