"""Every text-encoder backend: its embeddings, and that they condition the U-Net."""

import numpy as np
import open_clip
import pytest
import torch
from diffusers import StableDiffusionPipeline
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from transformers import T5Config, T5EncoderModel

import components as C
from latentgen import LatentPipeline
from latentgen.components.text_encoders import (
    OpenCLIPTextEncoder,
    TransformersTextEncoder,
    clip_tokenizer,
    load_transformers_encoder,
    minilm_path,
    openclip_to_transformers,
    text_encoder_for,
)

PROMPTS = ["a red circle on a blue background", "a green square to the left of a yellow triangle"]


def tiny_openclip(quick_gelu=False):
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=16, quick_gelu=quick_gelu,
        vision_cfg=CLIPVisionCfg(layers=1, width=32, patch_size=8, image_size=16, head_width=16),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=4, layers=3))
    return model.eval()


def tiny_t5():
    torch.manual_seed(0)
    config = T5Config(vocab_size=49408, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8)
    model = T5EncoderModel(config).eval()
    model.config.use_attention_mask = True
    return model


def test_clip_tokenizer_matches_open_clip():
    ours, ref = clip_tokenizer(), open_clip.SimpleTokenizer()
    assert len(ours) == 49408
    for text in PROMPTS + ["Hello, World! It's 3 o'clock.", "蓝色背景上的红色圆形"]:
        ids = ours(text, padding="max_length", max_length=77, truncation=True).input_ids
        expected = ref(text)[0].tolist()
        end = expected.index(49407)
        assert ids[: end + 1] == expected[: end + 1]
        assert ids[end + 1:] == [49407] * (76 - end)  # SD 1.x pads with <|endoftext|>


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_openclip_conversion_is_exact(quick_gelu):
    model = tiny_openclip(quick_gelu)
    converted = openclip_to_transformers(model).eval()
    ids = open_clip.SimpleTokenizer()(PROMPTS)
    with torch.no_grad():
        last = OpenCLIPTextEncoder(model).encode_ids(ids)
        penultimate = OpenCLIPTextEncoder(model, layer="penultimate").encode_ids(ids)
        ones = torch.ones_like(ids)
        assert torch.allclose(converted(ids).last_hidden_state, last, atol=1e-6)
        # clip-skip 1 on the converted model is SD 2's penultimate-layer OpenCLIP embedding
        skipped = TransformersTextEncoder(clip_tokenizer(), converted, clip_skip=1).encode_ids(ids, ones)
        assert torch.allclose(skipped, penultimate, atol=1e-6)
        assert not torch.allclose(skipped, last, atol=1e-3)


def test_clip_backend_shapes_and_padding():
    enc = TransformersTextEncoder(C.tokenizer(), C.clip_text_encoder())
    out = enc.encode(PROMPTS)
    assert out.hidden_states.shape == (2, 77, 32)
    assert out.attention_mask.shape == (2, 77)
    assert out.attention_mask[0].sum() == len(clip_tokenizer()(PROMPTS[0]).input_ids)


def test_minilm_is_a_real_pretrained_encoder():
    tokenizer, model = load_transformers_encoder(minilm_path(), max_length=32)
    enc = text_encoder_for(tokenizer, model)
    with torch.no_grad():
        h = enc.encode(["a red circle", "a crimson circle", "a blue square"])
    assert h.hidden_states.shape == (3, 32, 384)
    # mean-pooled sentence embeddings: a pretrained model puts paraphrases closer than different content
    m = h.attention_mask[..., None].float()
    pooled = torch.nn.functional.normalize((h.hidden_states * m).sum(1) / m.sum(1), dim=-1)
    assert pooled[0] @ pooled[1] > pooled[0] @ pooled[2] + 0.1
    # padding is masked inside the encoder: the real tokens do not depend on the padded length
    longer = TransformersTextEncoder(tokenizer, model, max_length=48).encode(["a red circle"]).hidden_states
    n = int(h.attention_mask[0].sum())
    assert torch.allclose(longer[0, :n], h.hidden_states[0, :n], atol=1e-5)


def _pipe_with(text_encoder, tokenizer, dim, clip_skip=None):
    pipe = LatentPipeline(vae=C.vae(), text_encoder=text_encoder, tokenizer=tokenizer,
                          unet=C.unet(cross_attention_dim=dim), scheduler=C.scheduler(), clip_skip=clip_skip)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _backends():
    yield "clip", lambda: _pipe_with(C.clip_text_encoder(), C.tokenizer(), 32)
    yield "clip-skip", lambda: _pipe_with(C.clip_text_encoder(), C.tokenizer(), 32, clip_skip=1)
    yield "t5", lambda: _pipe_with(tiny_t5(), C.tokenizer(), 32)
    yield "openclip", lambda: _pipe_with(tiny_openclip(), None, 32)
    yield "minilm", lambda: _pipe_with(*load_transformers_encoder(minilm_path(), max_length=32)[::-1], 384)


@pytest.mark.parametrize("name, build", list(_backends()), ids=[n for n, _ in _backends()])
def test_each_backend_feeds_the_unet(name, build, tmp_path):
    pipe = build()
    images = pipe(PROMPTS, num_inference_steps=2, seed=[0, 0], output_type="np").images
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()
    assert np.abs(images[0] - images[1]).max() > 1e-4  # same noise, different prompts: the text conditions
    pipe.save_pretrained(tmp_path / name)
    loaded = LatentPipeline.from_pretrained(tmp_path / name, torch_dtype=torch.float32)
    loaded.set_progress_bar_config(disable=True)
    again = loaded(PROMPTS, num_inference_steps=2, seed=[0, 0], output_type="np").images
    np.testing.assert_allclose(images, again, atol=1e-6)
    if name != "clip-skip":  # diffusers has no per-folder clip skip
        sd = StableDiffusionPipeline.from_pretrained(tmp_path / name, local_files_only=True)
        sd.set_progress_bar_config(disable=True)
        ref = sd(PROMPTS, num_inference_steps=2, output_type="np",
                 generator=[torch.Generator().manual_seed(0) for _ in range(2)]).images
        np.testing.assert_allclose(images, ref, atol=1e-4)
