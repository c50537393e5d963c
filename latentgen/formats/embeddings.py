"""Textual inversion: embedding files that teach the text encoder new words, as AUTOMATIC1111 and diffusers share
them. A file becomes the word its name says (A1111: `embeddings/NAME.safetensors` is used as NAME in a prompt),
with one or more vectors (a k-vector embedding is written as k tokens, which diffusers' `maybe_convert_prompt`
spells out). Loading is diffusers' (`TextualInversionLoaderMixin`, A1111's `emb_params`/`string_to_param` and
diffusers' `{token: vector}` files); what is here: safetensors only (A1111's `.pt` embeddings are pickles), one
line for a file that does not fit, the folder, and A1111's `TI hashes`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from latentgen.errors import UserError, first_line
from latentgen.formats.lora import short_hash


def load(pipe, path: str | Path, token: str | None = None) -> str:
    """Add one embedding file to the pipeline's tokenizer and text encoder as `token` (default: the file's name).
    Returns the token."""
    from safetensors.torch import load_file

    path = Path(path)
    token = token or path.stem
    if path.suffix != ".safetensors":
        raise UserError(f"embedding {path} is not a .safetensors file (A1111's .pt embeddings are pickles, which "
                        "can run code; convert them)")
    try:
        state = load_file(str(path))
    except Exception as err:  # safetensors raises its own error type for every kind of damage
        raise UserError(f"embedding {path} is corrupt or truncated ({first_line(err)})") from None
    vectors = state.get("emb_params") if "emb_params" in state else next(iter(state.values()), None) \
        if len(state) == 1 else None
    if vectors is None:
        raise UserError(f"{path} is not a textual-inversion embedding (one tensor, or A1111's emb_params); "
                        f"it holds {len(state)} tensors")
    width = pipe.text_encoder.get_input_embeddings().weight.shape[-1]
    if vectors.shape[-1] != width:
        raise UserError(f"embedding {path} has vectors of width {vectors.shape[-1]} but this model's text encoder "
                        f"takes {width}; it was made for another text encoder")
    if token in pipe.tokenizer.get_vocab():
        raise UserError(f"the word {token!r} of embedding {path} is already in the tokenizer; rename the file")
    try:
        pipe.load_textual_inversion(vectors.reshape(-1, width), token=token)
    except ValueError as err:
        raise UserError(f"cannot load embedding {path}: {first_line(err)}") from None
    pipe.__dict__.setdefault("embedding_files", {})[token] = path
    return token


def load_folder(pipe, folder: str | Path) -> list[str]:
    """Every `*.safetensors` embedding in `folder` (none if it does not exist), as A1111 loads its embeddings/."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return [load(pipe, path) for path in sorted(folder.glob("*.safetensors"))]


def used(pipe, prompts: Sequence[str]) -> dict[str, str]:
    """{word: A1111 hash} of the loaded embeddings that `prompts` use, for A1111's `TI hashes`."""
    files = pipe.__dict__.get("embedding_files", {})
    text = " ".join(prompts)
    return {token: short_hash(path) for token, path in files.items()
            if re.search(rf"(?<!\w){re.escape(token)}(?!\w)", text)}
