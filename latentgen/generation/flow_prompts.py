"""A1111's prompt weights, `(word:1.3)`, for SD3 and Flux, as Forge reads them for these models: each text
encoder's token states multiplied by their words' weights, then rescaled to keep the states' mean (A1111's
"Original" emphasis, the rule `prompts.ChunkedEncoder` applies to the U-Net models' encoders), each weighted part
tokenized on its own and the parts' tokens joined, as Forge's CLIP and T5 engines do. The pooled vectors are the
plain text's: A1111's and Forge's emphasis scales token states only.

The encoders' outputs are put together as diffusers' `encode_prompt` puts them (SD3: CLIP-L and CLIP-G side by
side along the channels, padded to T5's width, then T5's tokens; Flux: T5's states, CLIP-L's pooled vector); a test
holds a prompt whose weights are all 1 to diffusers' own embeddings. diffusers has no weighted path for these
pipelines (its docs point to sd_embed, a separate project), so this one is ours."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from latentgen.generation.prompts import Segment, emphasized, parse


def token_row(tokenizer, segments: list[Segment], length: int, bos: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, length) token ids and their weights: [BOS] (CLIP's), each part's tokens, EOS, padding; cut to
    `length` as diffusers' truncation cuts, keeping the EOS. Each part starts a word, as in Forge."""
    ids: list[int] = []
    weights: list[float] = []
    for s in segments:  # stripped: SentencePiece (T5) would make a piece of a part's trailing space
        t = tokenizer(s.text.strip(), add_special_tokens=False).input_ids if s.text.strip() else []
        ids += t
        weights += [s.weight] * len(t)
    start = [tokenizer.bos_token_id] if bos else []
    room = length - len(start) - 1
    ids, weights = start + ids[:room] + [tokenizer.eos_token_id], [1.0] * len(start) + weights[:room] + [1.0]
    pad = length - len(ids)
    return (torch.tensor([ids + [tokenizer.pad_token_id] * pad]),
            torch.tensor([weights + [1.0] * pad]))


def clip_states(pipe, which: int, segments: list[Segment]) -> torch.Tensor:
    """SD3's CLIP encoder `which` (0: CLIP-L, 1: CLIP-G): the penultimate layer's states, weighted, (1, 77, D)."""
    tokenizer, encoder = (pipe.tokenizer, pipe.text_encoder) if which == 0 else (pipe.tokenizer_2, pipe.text_encoder_2)
    ids, weights = token_row(tokenizer, segments, pipe.tokenizer_max_length, bos=True)
    states = encoder(ids.to(pipe._execution_device), output_hidden_states=True).hidden_states[-2]
    return emphasized(states.to(pipe.text_encoder.dtype), weights)


def t5_states(pipe, encoder, tokenizer, segments: list[Segment], length: int) -> torch.Tensor:
    """T5's last states, weighted, (1, length, D)."""
    ids, weights = token_row(tokenizer, segments, length, bos=False)
    return emphasized(encoder(ids.to(pipe._execution_device))[0].to(encoder.dtype), weights)


def encode(pipe, kind: str, text: str, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One weighted text's (states (T, D), pooled (P,)), as the diffusers pipeline `pipe` of `kind` ("sd3" or
    "flux") gives them for plain text."""
    segments = parse(text)
    plain = "".join(s.text for s in segments)
    device = pipe._execution_device
    if kind == "flux":
        pooled = pipe._get_clip_prompt_embeds(plain, device=device)
        states = t5_states(pipe, pipe.text_encoder_2, pipe.tokenizer_2, segments, length)
        return states[0].to(device), pooled[0]
    _, pooled_l = pipe._get_clip_prompt_embeds(plain, device=device, clip_model_index=0)
    _, pooled_g = pipe._get_clip_prompt_embeds(plain, device=device, clip_model_index=1)
    clip = torch.cat([clip_states(pipe, 0, segments), clip_states(pipe, 1, segments)], dim=-1).to(device)
    if pipe.text_encoder_3 is None:  # SD3 without T5: diffusers' zeros in its place
        t5 = pipe._get_t5_prompt_embeds(plain, max_sequence_length=length, device=device)
    else:
        t5 = t5_states(pipe, pipe.text_encoder_3, pipe.tokenizer_3, segments, length).to(device)
    clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5], dim=-2)[0], torch.cat([pooled_l, pooled_g], dim=-1)[0]
