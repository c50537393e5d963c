"""Model and sequential CPU offload (`--offload`, `LatentPipeline.offload`): the same images as without it, the
memory guard counting what the hooks bring in, and what the flag does where there is no GPU.

The CPU stands in for the GPU here (diffusers' hooks take any device): with sequential offload every weight of
the models is a meta tensor between calls, so a tensor made on "the U-Net's device" rather than the hooks'
execution device fails at once; the images equal the plain pipeline's bit for bit (same arithmetic)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import components as C
from conftest import infer
from latentgen import LatentPipeline
from latentgen.errors import UserError
from latentgen.runtime import memory

REQUEST = dict(seed=3, num_inference_steps=3, height=32, width=32, guidance_scale=4.0, output_type="np")


def on_cpu(models) -> None:
    """diffusers names the offload device "cpu:0", and accelerate's layer hooks then fail on the CPU
    (`set_module_tensor_to_device` takes "cpu:0" for another device than the weights' "cpu": a TypeError in
    diffusers' own StableDiffusionPipeline too); "cuda:0" is what they see on a GPU. Here: "cpu"."""
    for model in models:
        for m in model.modules():
            if getattr(m, "_hf_hook", None) is not None and hasattr(m._hf_hook, "execution_device"):
                m._hf_hook.execution_device = torch.device("cpu")


def fresh() -> LatentPipeline:
    pipe = LatentPipeline(**C.components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_offloaded_pipelines_give_the_plain_pipelines_images(mode):
    plain = fresh()
    want = plain(["a red circle", "a blue square"], **REQUEST).images
    init = plain("a green star", **(REQUEST | dict(output_type="pil"))).images[0]
    want_i2i = plain("a red circle", image=init, strength=0.6, **REQUEST).images

    pipe = fresh()
    pipe.offload(mode, "cpu")
    if mode == "sequential":  # the weights wait in main memory, the modules hold meta tensors
        on_cpu([pipe.unet, pipe.vae, pipe.text_encoder])
        assert pipe.unet.conv_in.weight.device.type == "meta" and pipe.vae.decoder.conv_in.weight.is_meta
    got = pipe(["a red circle", "a blue square"], **REQUEST).images
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(pipe("a red circle", image=init, strength=0.6, **REQUEST).images, want_i2i)
    assert pipe.execution_device.type == "cpu"


def test_the_guard_counts_the_weights_an_offloaded_model_brings_in(monkeypatch):
    """Offloaded, the weights are not resident when the guard looks: a free memory that fits the activations
    alone fits sequential offload (a layer's weights) and not model offload (the whole U-Net's)."""
    pipe = fresh()
    activations = memory.sampling_bytes(pipe.unet, pipe.vae, 64, 64, 1, True)
    unet_weights = sum(p.numel() * p.element_size() for p in pipe.unet.parameters())
    layer = max(sum(p.numel() * p.element_size() for p in m.parameters(recurse=False)) for m in pipe.unet.modules())
    assert layer < unet_weights / 4
    monkeypatch.setattr(memory, "free_bytes", lambda device: activations + unet_weights // 2)
    memory.check_sampling(pipe, 64, 64, 1, True)  # weights already loaded: fits
    pipe.__dict__["offloaded"] = "model"
    with pytest.raises(UserError, match=r"64×64 for 1 image\(s\) needs about .* free on cpu"):
        memory.check_sampling(pipe, 64, 64, 1, True)
    pipe.__dict__["offloaded"] = "sequential"
    memory.check_sampling(pipe, 64, 64, 1, True)


def test_offload_on_the_cpu_says_it_changes_nothing_and_generates(tiny_folder, tmp_path):
    out = tmp_path / "a.png"
    r = infer("--model", tiny_folder, "--prompt", "a red circle", "--steps", "2", "--seed", "1", "--offload", "model",
              "--out", out)
    assert r.returncode == 0, r.stderr
    assert "--offload model: the models run on the CPU here" in r.stderr and out.exists()
    r = infer("--model", tiny_folder, "--prompt", "x", "--offload", "sequential", "--compile")
    assert r.returncode == 2 and "--compile and --offload do not go together" in r.stderr
    assert "Traceback" not in r.stderr
    r = infer("--model", tiny_folder, "--prompt", "x", "--offload", "layers")
    assert r.returncode == 2 and "invalid choice: 'layers' (choose from 'model', 'sequential')" in r.stderr


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_offloaded_flow_models_give_the_same_images(kind):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    from latentgen.generation.flow import FlowPipeline

    def build():
        inner = (StableDiffusion3Pipeline(**C.sd3_components()) if kind == "sd3"
                 else FluxPipeline(**C.flux_components()))
        pipe = FlowPipeline(inner, kind, None)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    request = dict(seed=2, num_inference_steps=2, height=32, width=32, output_type="np")
    want = build()("a red circle", **request).images
    pipe = build()
    pipe.offload("sequential", "cpu")
    on_cpu([m for m in pipe.inner.components.values() if isinstance(m, torch.nn.Module)])
    assert pipe.inner.transformer.pos_embed.proj.weight.is_meta if kind == "sd3" else \
        pipe.inner.transformer.x_embedder.weight.is_meta
    np.testing.assert_array_equal(pipe("a red circle", **request).images, want)
    with pytest.raises(UserError, match="offload 'layers' is not one of model, sequential"):
        pipe.offload("layers", "cpu")
    assert torch.device(pipe.device).type == "cpu"


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_the_fp32_retry_runs_under_offload(mode, monkeypatch, caplog):
    """NaN latents in bf16 make the pipeline sample again in fp32 on copies of its models; offloaded (the U-Net's
    weights in main memory, or meta tensors between calls) it gives the plain pipeline's retried image."""
    import logging

    from test_reliability import _nan_in

    def retried(pipe):
        pipe.to(torch.bfloat16)
        return pipe

    plain = retried(fresh())
    _nan_in(monkeypatch, plain.unet, torch.bfloat16)
    want = plain("a red circle", **REQUEST)
    assert want.info["fp32_retry"] == "unet"
    pipe = retried(fresh())
    pipe.offload(mode, "cpu")
    if mode == "sequential":
        on_cpu([pipe.unet, pipe.vae, pipe.text_encoder])
    with caplog.at_level(logging.WARNING, logger="latentgen"):
        got = pipe("a red circle", **REQUEST)
    assert "sampling again in fp32" in caplog.text and got.info["fp32_retry"] == "unet"
    np.testing.assert_array_equal(got.images, want.images)
    assert pipe.unet.dtype == torch.bfloat16 or pipe.unet.conv_in.weight.is_meta
