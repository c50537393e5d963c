"""AUTOMATIC1111's prompt grammar beyond weights: prompt editing, alternation and composable parts.

- `[from:to:when]` uses `from` up to step `when`, then `to`; `[to:when]` adds `to` from then on, `[from::when]`
  drops `from` then. `when` is a step number, or below 1 a fraction of the steps. Edits nest.
- `[a|b|c]` alternates a, b, c from step to step.
- `part AND part :1.2 AND ...` is composable diffusion (Liu et al. 2022): each part is its own prompt, with its
  own weight (1 unless given), and the guided prediction sums their guidance, ε̃ = ε∅ + Σ_j w_j·s·(ε_j − ε∅).
- `BREAK` (latentgen.generation.prompts) starts a new window of the text encoder.

The behaviour is A1111's `modules/prompt_parser.py`, read with the search tool: a step's text is the schedule's
first entry that ends at or after the step (steps counted from 0, so `[a:b:3]` gives `a` for steps 0-3); a prompt
the grammar does not read (an unbalanced bracket) is one plain text; AND splits only the prompt, not the negative
prompt, which is read as text there too. The grammar is lark's (the parser A1111 uses), written here; weights and
windows stay `prompts.py`'s.
"""

from __future__ import annotations

import functools
import re

import lark

# The language of prompt editing. `emphasis` keeps its brackets in the text (weights are read later); text outside
# any construct may hold stray brackets and colons, which stay literal.
GRAMMAR = r"""
start: (sequence | STRAY)*
sequence: (emphasis | edit | alternation | text | SPACE)*
!emphasis: "(" sequence ")" | "(" sequence ":" sequence ")" | "[" sequence "]"
edit: "[" [sequence ":"] sequence ":" [SPACE] NUMBER "]"
alternation: "[" sequence ("|" sequence)+ "]"
text: /([^\\\[\]():|]|\\.)+/
STRAY: /[\]\[():]+/
SPACE: /\s+/
%import common.SIGNED_NUMBER -> NUMBER
"""

_parser = lark.Lark(GRAMMAR)
_AND = re.compile(r"\bAND\b")
_PART_WEIGHT = re.compile(r"^(\s*.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$", re.S)


def has_schedule(prompt: str) -> bool:
    """Whether a prompt may hold an edit or an alternation (it has square brackets)."""
    return "[" in prompt and ("|" in prompt or ":" in prompt)


def parts(prompt: str) -> list[tuple[str, float]]:
    """The composable parts of a prompt, `text :weight AND text ...`, with their weights (one part: itself)."""
    if "AND" not in prompt:
        return [(prompt, 1.0)]
    out = []
    for part in _AND.split(prompt):
        match = _PART_WEIGHT.match(part)
        text, weight = match.groups() if match else (part, None)
        out.append((text, float(weight) if weight is not None else 1.0))
    return out


@functools.lru_cache(maxsize=1024)
def schedule(prompt: str, steps: int) -> tuple[tuple[int, str], ...]:
    """((last step, text), ...): the prompt's text at each step, in order; one entry when nothing changes."""
    if not has_schedule(prompt):
        return ((steps, prompt),)
    try:
        tree = _parser.parse(prompt)
    except lark.exceptions.LarkError:  # not the grammar's: the prompt is plain text
        return ((steps, prompt),)
    ends = {steps}
    for node in tree.iter_subtrees():
        if node.data == "edit":
            node.children[-1] = _step(node.children[-1], steps)
            ends.add(node.children[-1])
        elif node.data == "alternation":
            ends.update(range(1, steps + 1))
    return tuple((end, "".join(_text(tree, end))) for end in sorted(ends))


def _step(number, steps: int) -> int:
    when = float(number)
    if when < 1:
        when *= steps
    return min(steps, int(when))


def _text(node, step: int):
    """The pieces of text of a parse tree at a step."""
    if isinstance(node, lark.Token):
        if node.type not in ("NUMBER",):
            yield str(node)
        return
    if node.data == "edit":  # [before:after:when], before and the space before `when` optional (None)
        before, after, _, when = node.children
        chosen = before if step <= when else after
        if chosen is not None:
            yield from _text(chosen, step)
        return
    if node.data == "alternation":
        yield from _text(node.children[(step - 1) % len(node.children)], step)
        return
    for child in node.children:
        if child is not None:
            yield from _text(child, step)


def at(entries: tuple[tuple[int, str], ...], step: int) -> str:
    """The text of a schedule at sampling step `step` (from 0): its first entry that ends at or after it."""
    for end, text in entries:
        if step <= end:
            return text
    return entries[-1][1]
