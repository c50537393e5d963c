"""IP-Adapter (image prompts, latentgen.formats.ip_adapter) as A1111's ControlNet extension runs it: a ControlNet
unit whose model is an IP-Adapter file. Tiny random adapters and CLIP vision encoders built offline, against
diffusers' own StableDiffusionPipeline with `load_ip_adapter`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import components as C
from latentgen import LatentPipeline
from latentgen.errors import UserError
from latentgen.generation.control import Control

PROMPT = "a red circle on a blue background"
KW = dict(num_inference_steps=5, guidance_scale=7.5, output_type="np")


def vision_encoder(seed: int = 0):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=8, projection_dim=16)).eval()


def adapter_state(unet, embed_dim: int = 16, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """An IP-Adapter for `unet` in the files' layout: the projection of a CLIP image embedding to 4 text-like
    tokens, and to_k_ip/to_v_ip for each cross-attention layer (numbered as the files number them: 1, 3, 5, ...)."""
    g = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    proj = {"proj.weight": torch.randn(4 * cross, embed_dim, generator=g) * 0.3, "proj.bias": torch.zeros(4 * cross),
            "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)}
    layers, key = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            hidden = unet.get_submodule(name[:-len(".processor")]).to_k.out_features
            for kv in ("to_k_ip", "to_v_ip"):
                layers[f"{key}.{kv}.weight"] = torch.randn(hidden, cross, generator=g) * 0.3
            key += 2
    return {"image_proj": proj, "ip_adapter": layers}


@pytest.fixture(scope="module")
def parts():
    return C.components()


@pytest.fixture(scope="module")
def adapter_file(parts, tmp_path_factory):
    """h94/IP-Adapter's layout: models/ip-adapter_tiny.safetensors beside models/image_encoder/."""
    root = tmp_path_factory.mktemp("ip") / "models"
    vision_encoder().save_pretrained(root / "image_encoder")
    state = adapter_state(parts["unet"])
    save_file({f"{part}.{k}": v.contiguous() for part, tensors in state.items() for k, v in tensors.items()},
              str(root / "ip-adapter_tiny.safetensors"))
    return root / "ip-adapter_tiny.safetensors"


def diffusers_with_adapter(scale: float):
    """diffusers' own StableDiffusionPipeline on the same components, with the adapter loaded by `load_ip_adapter`
    at `scale` (the reference)."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPImageProcessor

    sd = StableDiffusionPipeline(**C.components(), safety_checker=None, requires_safety_checker=False,
                                 feature_extractor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                      crop_size={"height": 32, "width": 32}),
                                 image_encoder=vision_encoder())
    sd.set_progress_bar_config(disable=True)
    sd.load_ip_adapter(adapter_state(sd.unet), subfolder="", weight_name="", image_encoder_folder=None)
    sd.set_ip_adapter_scale(scale)
    return sd


def face(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8))


def test_an_ip_adapter_unit_gives_diffusers_image_and_leaves_the_unet_as_it_was(parts, adapter_file):

    ours = LatentPipeline(**parts)
    ours.set_progress_bar_config(disable=True)
    processors = dict(ours.unet.attn_processors)
    plain = ours(PROMPT, generator=torch.Generator().manual_seed(3), **KW).images
    got = ours(PROMPT, control=[Control(str(adapter_file), face(), 0.6, module="ip-adapter_clip_sd15")],
               generator=torch.Generator().manual_seed(3), **KW).images

    sd = diffusers_with_adapter(0.6)
    want = sd(PROMPT, ip_adapter_image=face(), generator=torch.Generator().manual_seed(3), **KW).images
    assert np.abs(got - want).max() <= 1e-4
    assert np.abs(got - plain).max() > 1e-2  # the image prompt did something
    assert dict(ours.unet.attn_processors).keys() == processors.keys() and ours.unet.encoder_hid_proj is None
    assert all(type(p) is type(processors[n]) for n, p in ours.unet.attn_processors.items())
    again = ours(PROMPT, generator=torch.Generator().manual_seed(3), **KW).images
    assert np.array_equal(again, plain)  # taken off after the call


def test_an_ip_adapter_outside_its_steps_does_nothing_and_is_written_as_a_unit(parts, adapter_file):
    from latentgen.generation.infotext import a1111_parameters, a1111_request

    ours = LatentPipeline(**parts)
    ours.set_progress_bar_config(disable=True)
    plain = ours(PROMPT, seed=1, **KW).images
    idle = ours(PROMPT, seed=1, control=[Control(str(adapter_file), face(), start=0.9)], **KW).images
    np.testing.assert_allclose(idle, plain, atol=1e-6, rtol=0)  # on at no step of 5
    meta = ours(PROMPT, seed=1, control=[Control(str(adapter_file), face(), 0.8, module="ip-adapter_clip_sd15")],
                num_inference_steps=2).metadata[0]
    text = a1111_parameters(meta | {"model": "m", "model_hash": "0", "version": "0"})
    assert 'ControlNet 0: "Module: ip-adapter_clip, Model: ip-adapter_tiny, Weight: 0.8' in text
    settings, _, _ = a1111_request(text)
    assert settings["control"][0].model == "ip-adapter_tiny" and settings["control"][0].weight == 0.8


def test_an_ip_adapter_without_its_encoder_or_of_another_model_is_one_line(parts, adapter_file, tmp_path):
    lone = tmp_path / "ip-adapter_lone.safetensors"
    lone.write_bytes(adapter_file.read_bytes())
    ours = LatentPipeline(**parts)
    with pytest.raises(UserError, match="needs the CLIP vision encoder it was trained with: a folder image_encoder/"):
        ours(PROMPT, control=[Control(str(lone), face())], num_inference_steps=1)
    other = tmp_path / "models" / "ip-adapter_other.safetensors"
    vision_encoder().save_pretrained(other.parent / "image_encoder")
    state = adapter_state(C.unet(cross_attention_dim=48))
    save_file({f"{part}.{k}": v.contiguous() for part, tensors in state.items() for k, v in tensors.items()},
              str(other))
    with pytest.raises(UserError, match="IP-Adapter ip-adapter_other does not fit this model's U-Net"):
        ours(PROMPT, control=[Control(str(other), face())], num_inference_steps=1)


def test_infer_takes_ip_adapter_and_replays_its_image(tiny_folder, adapter_file, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    face().save(tmp_path / "face.png")
    out = tmp_path / "image.png"
    unit = f"{adapter_file}:{tmp_path / 'face.png'}:0.7"
    r = subprocess.run([sys.executable, "infer.py", "--model", str(tiny_folder), "--prompt", PROMPT, "--steps", "3",
                        "--seed", "2", "--ip-adapter", unit, "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    text = Image.open(out).info["parameters"]
    assert 'ControlNet 0: "Module: ip-adapter_clip, Model: ip-adapter_tiny, Weight: 0.7' in text
    r = subprocess.run([sys.executable, "infer.py", "--replay", str(out), "--out", str(tmp_path / "again.png")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "identical, bit for bit" in r.stdout + r.stderr, r.stderr[-2000:]


def test_an_ip_adapters_region_mask_gives_diffusers_masked_image(parts, adapter_file):
    """A unit's region mask on an IP-Adapter is diffusers' `ip_adapter_masks` (its IPAdapterMaskProcessor's
    binarized mask, the adapter's attention output kept where it is white)."""
    from diffusers.image_processor import IPAdapterMaskProcessor

    left = np.zeros((32, 32), np.uint8)
    left[:, :16] = 255
    mask = Image.fromarray(left)
    ours = LatentPipeline(**parts)
    ours.set_progress_bar_config(disable=True)
    unit = dict(weight=0.6, module="ip-adapter_clip_sd15")
    got = ours(PROMPT, control=[Control(str(adapter_file), face(), mask=mask, **unit)],
               generator=torch.Generator().manual_seed(3), **KW).images
    whole = ours(PROMPT, control=[Control(str(adapter_file), face(), **unit)],
                 generator=torch.Generator().manual_seed(3), **KW).images

    sd = diffusers_with_adapter(0.6)
    masks = IPAdapterMaskProcessor().preprocess([mask], height=32, width=32)
    want = sd(PROMPT, ip_adapter_image=face(), cross_attention_kwargs={"ip_adapter_masks": [masks]},
              generator=torch.Generator().manual_seed(3), **KW).images
    assert np.abs(got - want).max() <= 1e-4
    assert np.abs(got - whole).max() > 1e-3  # the mask did something
