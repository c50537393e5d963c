"""SD3 and Flux (flow-matching transformers, latentgen.generation.flow) on tiny random parts built offline: the
flow samplers against an exact velocity, seeds, the one-line refusals, infer.py with replay, and the server."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import components as C
from latentgen.components.schedulers import FLOW_SAMPLERS as SAMPLERS
from latentgen.errors import UserError
from latentgen.generation.flow import FlowPipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=["sd3", "flux"])
def folder(request, tmp_path_factory):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    out = tmp_path_factory.mktemp(request.param) / "model"
    if request.param == "sd3":
        StableDiffusion3Pipeline(**C.sd3_components()).save_pretrained(out)
    else:
        FluxPipeline(**C.flux_components()).save_pretrained(out)
    return out


def load(folder) -> FlowPipeline:
    pipe = FlowPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_each_flow_sampler_ends_at_the_data_point_of_an_exact_velocity(folder, sampler, monkeypatch):
    """With the data a single point c, the exact velocity at x_t = (1 − σ)·c + σ·ε is (x_t − c)/σ; every correct
    flow sampler, with the timesteps it hands the model matching its sigmas, ends at c."""
    pipe = load(folder)
    flux = pipe.kind == "flux"
    if flux and sampler == "heun":
        with pytest.raises(UserError, match="the heun sampler has no dynamic shift"):
            pipe("a red circle", seed=1, num_inference_steps=4, height=32, width=32, scheduler=sampler)
        return
    plan = pipe.check_request("a red circle", seed=1, height=32, width=32)
    target = torch.randn(pipe.noise(plan).shape, generator=torch.Generator().manual_seed(9))

    def exact(hidden_states=None, timestep=None, **kwargs):
        sigma = (timestep if flux else timestep / 1000).float().view(-1, *[1] * (hidden_states.ndim - 1))
        return ((hidden_states.float() - target) / sigma,)

    monkeypatch.setattr(pipe.inner.transformer, "forward", exact)
    out = pipe("a red circle", seed=1, num_inference_steps=8, height=32, width=32, scheduler=sampler,
               guidance_scale=3.0, output_type="latent")
    # diffusers' multistep solvers hand the model integer timesteps (σ off by up to 0.0005 from their sigmas)
    tolerance = 1e-4 if SAMPLERS[sampler].cls.startswith("FlowMatch") else 1e-2
    torch.testing.assert_close(out.images.float(), target, atol=tolerance, rtol=0)
    assert (out.images.float() - target).abs().max() < 0.5  # far from the noise it started from


def test_each_image_is_its_seeds_whatever_its_batch(folder):
    pipe = load(folder)
    both = pipe(["a red circle", "a blue square"], seed=[3, 4], num_inference_steps=3, height=32, width=32,
                guidance_scale=3.5, output_type="np").images
    alone = pipe("a blue square", seed=4, num_inference_steps=3, height=32, width=32, guidance_scale=3.5,
                 output_type="np").images
    np.testing.assert_allclose(both[1], alone[0], atol=1e-5, rtol=0)  # batched matmuls round differently
    assert np.abs(both[0] - both[1]).max() > 1e-2
    meta = pipe("a red circle", seed=5, num_inference_steps=2, height=32, width=32, scheduler="dpm++").metadata[0]
    assert meta["seed"] == 5 and meta["scheduler"] == "dpm++" and meta["height"] == 32


def test_what_flow_models_do_not_run_yet_is_a_one_line_error(folder):
    pipe = load(folder)
    name = pipe.kind.upper()
    for fields, message in ((dict(tiling=True), f"tiling is not supported with {name} models yet"),
                            (dict(scheduler="lms"), "unknown scheduler 'lms'"),
                            (dict(height=33, width=32), f"height must be a multiple of {pipe.size_multiple}")):
        with pytest.raises(UserError, match=message):
            pipe("a red circle", num_inference_steps=2, **fields)
    if pipe.kind == "flux":
        with pytest.raises(UserError, match="its negative prompt acts only with true CFG"):
            pipe("a red circle", negative_prompt="blue", num_inference_steps=2, height=32, width=32)
    from latentgen import LatentPipeline

    with pytest.raises(UserError, match="holds a transformer .* load it with latentgen.FlowPipeline"):
        LatentPipeline.from_pretrained(folder)


def test_infer_writes_an_sd3_or_flux_image_and_replays_it_bit_for_bit(folder, tmp_path):
    out = tmp_path / "image.png"
    r = subprocess.run([sys.executable, "infer.py", "--model", str(folder), "--prompt", "a red circle", "--steps",
                        "3", "--width", "32", "--height", "32", "--seed", "7", "--scheduler", "unipc",
                        "--guidance", "3.5", "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    from PIL import Image

    text = Image.open(out).info["parameters"]
    assert "Sampler: UniPC" in text and "Seed: 7" in text
    if "flux" in str(folder):  # Forge's keys: the distilled guidance, and CFG scale the true CFG (off)
        assert "CFG scale: 1.0" in text and "Distilled CFG Scale: 3.5" in text
        from latentgen.generation.infotext import a1111_request

        settings, _, unused = a1111_request(text)
        assert (settings["guidance_scale"], settings["true_cfg_scale"]) == (3.5, 1.0) and not unused
    else:
        assert "CFG scale: 3.5" in text and "Distilled" not in text
    r = subprocess.run([sys.executable, "infer.py", "--replay", str(out), "--out", str(tmp_path / "again.png")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "identical, bit for bit" in r.stdout + r.stderr, r.stderr[-2000:]


def test_the_server_runs_a_flow_model_through_a1111s_api(folder):
    import webuiapi

    from conftest import Server

    server = Server(["--model", str(folder), "--dtype", "fp32"])
    try:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
        result = api.txt2img(prompt="a red circle", seed=3, steps=3, cfg_scale=3.5, width=32, height=32,
                             sampler_name="DPM++ 2M", alwayson_scripts={})
        direct = load(folder)("a red circle", seed=3, num_inference_steps=3, guidance_scale=3.5, width=32,
                              height=32, scheduler="dpm++").images[0]
        assert np.array_equal(np.asarray(result.image.convert("RGB")), np.asarray(direct))
        r = server.post("/sdapi/v1/txt2img", {"prompt": "a", "steps": 2, "width": 32, "height": 32,
                                              "enable_hr": True, "hr_scale": 2})
        assert r.status_code == 400 and "choose the Lanczos upscaler" in r.json()["detail"]
        r = server.post("/sdapi/v1/txt2img", {"prompt": "a", "steps": 2, "width": 32, "height": 32, "seed": 1,
                                              "enable_hr": True, "hr_scale": 2, "hr_upscaler": "Lanczos"})
        assert r.status_code == 200, r.text
    finally:
        server.close()


def test_a_lora_of_the_transformer_gives_the_image_of_the_transformer_it_adapts(folder, tmp_path):
    """A LoRA file saved by diffusers for the transformer, applied by a `<lora:NAME:SCALE>` tag, gives the image
    of the transformer with those LoRA layers (peft's own), scale 0 the plain image; the tag is not in the text."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    adapted = load(folder)
    torch.manual_seed(0)
    adapted.inner.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    cls = FluxPipeline if adapted.kind == "flux" else StableDiffusion3Pipeline
    cls.save_lora_weights(tmp_path / "loras", transformer_lora_layers=get_peft_model_state_dict(
        adapted.inner.transformer), weight_name="style.safetensors")
    settings = dict(seed=2, num_inference_steps=3, height=32, width=32, guidance_scale=3.5, output_type="np")
    want = adapted("a red circle", **settings).images

    pipe = load(folder)
    pipe.loras_dir = tmp_path / "loras"
    plain = pipe("a red circle", **settings).images
    got = pipe("a red circle <lora:style:1>", **settings)
    np.testing.assert_allclose(got.images, want, atol=1e-5, rtol=0)
    assert np.abs(got.images - plain).max() > 1e-3
    assert got.metadata[0]["prompt"] == "a red circle <lora:style:1>"  # the tag is the record, as in A1111
    np.testing.assert_allclose(pipe("a red circle <lora:style:0>", **settings).images, plain, atol=1e-6, rtol=0)
    np.testing.assert_allclose(pipe("a red circle", **settings).images, plain, atol=0, rtol=0)  # switched off
    with pytest.raises(UserError, match="neither a file nor a name"):
        pipe("a red circle <lora:nothing:1>", **settings)


def test_image_to_image_is_diffusers_img2img_with_the_seeds_noise(folder):
    from diffusers import FluxImg2ImgPipeline, StableDiffusion3Img2ImgPipeline
    from PIL import Image

    pipe = load(folder)
    init = Image.new("RGB", (32, 32), (200, 40, 40))
    got = pipe("a red circle", image=init, strength=0.6, seed=4, num_inference_steps=5, guidance_scale=3.5,
               output_type="np")
    cls = FluxImg2ImgPipeline if pipe.kind == "flux" else StableDiffusion3Img2ImgPipeline
    theirs = cls(**{k: v for k, v in pipe.inner.components.items() if k != "image_encoder" or pipe.kind == "sd3"})
    theirs.set_progress_bar_config(disable=True)
    want = theirs(prompt="a red circle", image=init, strength=0.6, num_inference_steps=5, guidance_scale=3.5,
                  height=32, width=32, generator=[torch.Generator().manual_seed(4)], output_type="np").images
    np.testing.assert_allclose(got.images, want, atol=1e-6, rtol=0)
    assert got.metadata[0]["strength"] == 0.6 and got.images.shape == (1, 32, 32, 3)
    weaker = pipe("a red circle", image=init, strength=0.2, seed=4, num_inference_steps=5, output_type="np").images
    assert np.abs(weaker - np.asarray(init) / 255).mean() < np.abs(got.images - np.asarray(init) / 255).mean()


def test_inpainting_is_diffusers_inpaint_pipeline_with_the_seeds_noise(folder, tmp_path):
    from diffusers import (
        FluxInpaintPipeline,
        SD3Transformer2DModel,
        StableDiffusion3InpaintPipeline,
        StableDiffusion3Pipeline,
    )
    from PIL import Image

    if "sd3" in str(folder):  # diffusers' SD3 inpainting wants SD3's 16 latent channels
        parts = C.sd3_components()
        torch.manual_seed(0)
        parts["transformer"] = SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=64).eval()
        parts["vae"] = C.flow_vae(16)
        folder = tmp_path / "sd3-16"
        StableDiffusion3Pipeline(**parts).save_pretrained(folder)
    pipe = load(folder)
    init = Image.new("RGB", (32, 32), (200, 40, 40))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))  # the left half repainted
    got = pipe("a blue square", image=init, mask_image=mask, seed=4, num_inference_steps=4, guidance_scale=3.5,
               output_type="np")
    cls = FluxInpaintPipeline if pipe.kind == "flux" else StableDiffusion3InpaintPipeline
    theirs = cls(**{k: v for k, v in pipe.inner.components.items() if k != "image_encoder" or pipe.kind == "sd3"})
    theirs.set_progress_bar_config(disable=True)
    want = theirs(prompt="a blue square", image=init, mask_image=mask, strength=1.0, num_inference_steps=4,
                  guidance_scale=3.5, height=32, width=32, generator=[torch.Generator().manual_seed(4)],
                  output_type="np").images
    np.testing.assert_allclose(got.images, want, atol=1e-6, rtol=0)
    assert got.metadata[0]["strength"] == 1.0


def test_true_cfg_and_the_t5_length_reach_diffusers_pipeline(folder, tmp_path):
    """Flux's true CFG (negative prompt, a second pass) and the T5 sequence length give diffusers' own images with
    the same noise; a U-Net model refuses both in one line."""
    pipe = load(folder)
    plan = pipe.check_request("a red circle on a blue background", seed=6, height=32, width=32)
    settings = dict(num_inference_steps=3, height=32, width=32, guidance_scale=3.5, output_type="np")
    if pipe.kind == "flux":
        got = pipe("a red circle on a blue background", negative_prompt="green", true_cfg_scale=4.0, seed=6,
                   **settings).images
        want = pipe.inner(prompt="a red circle on a blue background", negative_prompt="green", true_cfg_scale=4.0,
                          latents=pipe.noise(plan), **settings).images
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
        assert np.abs(got - pipe("a red circle on a blue background", seed=6, **settings).images).max() > 1e-3
    else:
        with pytest.raises(UserError, match="true CFG is for guidance-distilled Flux models"):
            pipe("a red circle", true_cfg_scale=3.0, **settings)
    short = pipe("a red circle on a blue background", max_sequence_length=3, seed=6, **settings)
    want = pipe.inner(prompt="a red circle on a blue background", max_sequence_length=3, latents=pipe.noise(plan),
                      **settings).images
    np.testing.assert_allclose(short.images, want, atol=1e-6, rtol=0)
    assert short.metadata[0]["max_sequence_length"] == 3
    from latentgen import LatentPipeline

    unet = LatentPipeline(**C.components())
    with pytest.raises(UserError, match="T5 sequence length is for SD3/Flux models"):
        unet("a red circle", max_sequence_length=64, num_inference_steps=1)


def test_a_forge_flux_text_reads_as_its_distilled_guidance():
    """Forge writes Flux images' guidance as 'Distilled CFG Scale' and the true CFG as 'CFG scale'."""
    from latentgen.generation.infotext import a1111_request

    text = ("a cat on a mat\nSteps: 20, Sampler: Euler, Schedule type: Simple, CFG scale: 1, Distilled CFG Scale: 3.5, "
            "Seed: 42, Size: 896x1152, Model hash: 0123abcd, Model: flux1-dev, Version: f2.0.1v1.10.1")
    settings, _, unused = a1111_request(text)
    assert (settings["guidance_scale"], settings["true_cfg_scale"], settings["scheduler"]) == (3.5, 1.0, "euler")
    assert (settings["num_inference_steps"], settings["seed"], settings["width"]) == (20, 42, 896)
    assert unused == ["Schedule type"]  # Forge's Simple schedule: not one of latentgen's
    settings, _, _ = a1111_request(text.replace("CFG scale: 1,", "CFG scale: 4,"))
    assert settings["true_cfg_scale"] == 4.0


def test_sd3_skip_layer_guidance_is_diffusers(tmp_path):
    """--slg SCALE --slg-layers N: diffusers' StableDiffusion3Pipeline with skip_guidance_layers and
    skip_layer_guidance_scale gives the same image; without it another one. Flux and bad layers: one line."""
    from diffusers import StableDiffusion3Pipeline

    reference = StableDiffusion3Pipeline(**C.sd3_components())
    reference.save_pretrained(tmp_path / "sd3")
    reference.set_progress_bar_config(disable=True)
    pipe = load(tmp_path / "sd3")
    call = dict(num_inference_steps=10, height=32, width=32, guidance_scale=4.0, output_type="np")
    ours = pipe("a red circle", seed=3, slg_scale=2.8, slg_layers=(1,), **call).images
    theirs = reference("a red circle", generator=torch.Generator().manual_seed(3), skip_guidance_layers=[1],
                       skip_layer_guidance_scale=2.8, **call).images
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    assert np.abs(ours - pipe("a red circle", seed=3, **call).images).max() > 1e-3
    with pytest.raises(UserError, match="--slg-layers name blocks 0-1 of this model's 2, got 7 8 9"):
        pipe("a red circle", seed=3, slg_scale=2.8, **call)


def test_the_hires_fix_is_two_diffusers_passes(folder):
    """--hires-scale 2 --hires-upscaler lanczos: the first pass, decoded and Lanczos-enlarged, then diffusers'
    img2img at twice the size with the same seed; the latent upscaler is a one-line error."""
    from PIL import Image

    from latentgen.generation.hires import Hires, lanczos

    pipe = load(folder)
    hires = Hires(scale=2.0, denoise=0.6, upscaler="lanczos")
    got = pipe("a red circle", seed=3, num_inference_steps=3, height=32, width=32, guidance_scale=3.5, hires=hires,
               output_type="np")
    first = pipe("a red circle", seed=3, num_inference_steps=3, height=32, width=32, guidance_scale=3.5,
                 output_type="np").images[0]
    big = Image.fromarray((lanczos(first, 64, 64) * 255).round().astype("uint8"))
    want = pipe("a red circle", seed=3, num_inference_steps=3, height=64, width=64, guidance_scale=3.5, image=big,
                strength=0.6, output_type="np").images
    np.testing.assert_allclose(got.images, want, atol=1e-6, rtol=0)
    assert got.images.shape == (1, 64, 64, 3) and got.metadata[0]["hires"]["scale"] == 2.0
    with pytest.raises(UserError, match="choose the Lanczos upscaler"):
        pipe("a red circle", seed=3, num_inference_steps=3, height=32, width=32, hires=Hires(scale=2.0))


def test_sd3_and_flux_controlnets_are_diffusers_controlnet_pipelines(folder, tmp_path):
    """A diffusers SD3/Flux ControlNet folder as a unit (by path, with weight and start/end): the image of
    diffusers' StableDiffusion3ControlNetPipeline / FluxControlNetPipeline with the same noise; two units go
    through its Multi-ControlNet; a U-Net ControlNet is a one-line error."""
    import diffusers
    from PIL import Image

    from latentgen.generation.control import Control

    pipe = load(folder)
    flux = pipe.kind == "flux"
    torch.manual_seed(0)
    if flux:
        net = diffusers.FluxControlNetModel.from_transformer(pipe.inner.transformer, num_layers=1, num_single_layers=1,
                                                             attention_head_dim=16, num_attention_heads=2)
    else:
        net = diffusers.SD3ControlNetModel.from_transformer(pipe.inner.transformer, num_layers=1,
                                                            num_extra_conditioning_channels=0)
    for p in net.parameters():  # zero-initialised outputs would make the test unable to fail
        p.data.normal_(0, 0.05)
    net.eval().save_pretrained(tmp_path / "cn")
    image = Image.new("RGB", (32, 32), (0, 0, 0))
    image.paste((255, 255, 255), (8, 8, 24, 24))
    call = dict(num_inference_steps=3, height=32, width=32, guidance_scale=3.5, output_type="np")
    plan = pipe.check_request("a red circle", seed=2, height=32, width=32)
    got = pipe("a red circle", seed=2, control=[Control(str(tmp_path / "cn"), image, 0.8, 0.0, 0.9)], **call).images
    cls = diffusers.FluxControlNetPipeline if flux else diffusers.StableDiffusion3ControlNetPipeline
    accepted = inspect.signature(cls.__init__).parameters
    theirs = cls(**{k: v for k, v in pipe.inner.components.items() if k in accepted},
                 controlnet=type(net).from_pretrained(tmp_path / "cn").eval())
    theirs.set_progress_bar_config(disable=True)
    torch.manual_seed(2)  # diffusers draws the control image's latents from the global generator: ours, the seed's
    want = theirs("a red circle", control_image=image, controlnet_conditioning_scale=0.8, control_guidance_start=0.0,
                  control_guidance_end=0.9, latents=pipe.noise(plan),
                  **({} if flux else {"negative_prompt": ""}), **call).images
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    again = pipe("a red circle", seed=2, control=[Control(str(tmp_path / "cn"), image, 0.8, 0.0, 0.9)], **call).images
    assert np.array_equal(got, again)  # the image depends on its seed alone
    assert np.abs(got - pipe("a red circle", seed=2, **call).images).max() > 1e-3
    two = pipe("a red circle", seed=2, control=[Control(str(tmp_path / "cn"), image, 0.4),
                                                 Control(str(tmp_path / "cn"), image, 0.4)], **call).images
    assert two.shape == got.shape
    with pytest.raises(UserError, match="control modes other than balanced"):
        pipe("a red circle", seed=2, control=[Control(str(tmp_path / "cn"), image, mode="prompt")], **call)
