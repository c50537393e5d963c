"""Few-step sampling (#48): the LCM and TCD samplers by name, against diffusers' own pipelines, and a
guidance-distilled (w-conditioned) LCM U-Net, on tiny components."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from diffusers import LatentConsistencyModelPipeline, LCMScheduler, StableDiffusionPipeline, TCDScheduler

import components as C
from latentgen import LatentPipeline
from latentgen.generation.infotext import a1111_parameters, a1111_request

PROMPT = "a red circle on a blue background"


def diffusers_pipe(parts, scheduler):
    sd = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    sd.scheduler = scheduler.from_config(sd.scheduler.config)
    sd.set_progress_bar_config(disable=True)
    return sd


@pytest.mark.parametrize(("name", "cls", "extra"), [("lcm", LCMScheduler, {}), ("tcd", TCDScheduler, {"eta": 0.3})])
def test_lcm_and_tcd_give_diffusers_images(name, cls, extra):
    parts = C.components()
    ours = LatentPipeline(**parts)
    ours.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=4, guidance_scale=1.5, output_type="np")
    got = ours(PROMPT, scheduler=name, generator=torch.Generator().manual_seed(3), **kwargs,
               **({"eta": extra["eta"]} if extra else {})).images
    want = diffusers_pipe(parts, cls)(PROMPT, generator=torch.Generator().manual_seed(3), **kwargs, **extra).images
    assert np.abs(got - want).max() <= 1e-4
    meta = ours(PROMPT, scheduler=name, seed=1, num_inference_steps=2).metadata[0]
    text = a1111_parameters(meta | {"model": "m", "model_hash": "0", "version": "0"})
    assert f"Sampler: {name.upper()}," in text and a1111_request(text)[0]["scheduler"] == name


def test_a_guidance_distilled_lcm_unet_embeds_its_guidance():
    """A U-Net with `time_cond_proj_dim` (a full LCM) takes w as an input and runs no unconditional pass, as
    diffusers' LatentConsistencyModelPipeline runs it."""
    parts = C.components()
    config = {k: v for k, v in C.unet().config.items() if not k.startswith("_")} | {"time_cond_proj_dim": 32}
    torch.manual_seed(0)
    parts["unet"] = type(parts["unet"])(**config).eval()
    parts["scheduler"] = LCMScheduler.from_config(parts["scheduler"].config)
    ours = LatentPipeline(**parts)
    ours.set_progress_bar_config(disable=True)
    calls = C.record_calls(ours.unet)
    got = ours(PROMPT, num_inference_steps=4, guidance_scale=8.0, generator=torch.Generator().manual_seed(2),
               output_type="np").images
    assert calls == [1, 1, 1, 1]  # one row per image: no unconditional pass
    lcm = LatentConsistencyModelPipeline(**parts, safety_checker=None, feature_extractor=None,
                                         requires_safety_checker=False)
    lcm.set_progress_bar_config(disable=True)
    want = lcm(PROMPT, num_inference_steps=4, guidance_scale=8.0, generator=torch.Generator().manual_seed(2),
               output_type="np").images
    assert np.abs(got - want).max() <= 1e-4


def test_a_consistency_sampler_warns_under_strong_guidance(tiny_pipe):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("latentgen").addHandler(handler)
    try:
        tiny_pipe(PROMPT, scheduler="lcm", guidance_scale=7.5, num_inference_steps=2, seed=0)
        tiny_pipe(PROMPT, scheduler="lcm", guidance_scale=1.5, num_inference_steps=2, seed=0)
    finally:
        logging.getLogger("latentgen").removeHandler(handler)
    assert [r.getMessage() for r in records] == [
        "lcm samples distilled models and LoRAs, which want guidance about 1-2; at 7.5 the images burn"]
