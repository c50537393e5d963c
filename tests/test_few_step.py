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


def test_a_model_folder_with_a_student_samples_lcm_with_it(tmp_path):
    """`lcm/` in a model folder (a w-conditioned student U-Net and its LCMScheduler): `scheduler="lcm"` samples with
    the student, as diffusers' LatentConsistencyModelPipeline runs it, sharing the teacher's VAE and text
    encoder; the other samplers keep the teacher. The shipped model has one."""
    parts = C.components()
    LatentPipeline(**parts).save_pretrained(tmp_path / "model")
    config = {k: v for k, v in C.unet().config.items() if not k.startswith("_")} | {"time_cond_proj_dim": 32}
    torch.manual_seed(5)
    student = type(parts["unet"])(**config).eval()
    student.save_pretrained(tmp_path / "model" / "lcm" / "unet")
    LCMScheduler.from_config(parts["scheduler"].config).save_pretrained(tmp_path / "model" / "lcm" / "scheduler")
    ours = LatentPipeline.from_pretrained(tmp_path / "model", torch_dtype=torch.float32)
    ours.set_progress_bar_config(disable=True)
    got = ours(PROMPT, scheduler="lcm", num_inference_steps=4, guidance_scale=8.0, seed=2, output_type="np")
    lcm = LatentConsistencyModelPipeline(**(parts | {"unet": student, "scheduler": LCMScheduler.from_config(
        parts["scheduler"].config)}), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    lcm.set_progress_bar_config(disable=True)
    want = lcm(PROMPT, num_inference_steps=4, guidance_scale=8.0, generator=torch.Generator().manual_seed(2),
               output_type="np").images
    assert np.abs(got.images - want).max() <= 1e-4 and got.metadata[0]["scheduler"] == "lcm"
    assert ours.student().vae is ours.vae and ours.student().text_encoder is ours.text_encoder
    teacher = ours(PROMPT, scheduler="dpm++", num_inference_steps=4, seed=2, output_type="np").images
    assert np.abs(teacher - want).max() > 1e-2
    from latentgen.generation.models import DEFAULT_MODEL

    assert (DEFAULT_MODEL / "lcm" / "unet" / "config.json").is_file()
    assert sum(f.stat().st_size for f in DEFAULT_MODEL.rglob("*") if f.is_file()) < 100 * 2**20


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


# ----------------------------------------------------------------------------------------------------------------
# Latent consistency distillation (latentgen.training.lcm), on the smoke model


def lcm_run(smoke_model, out, steps: int, *overrides: str, **lcm):
    from conftest import ROOT
    from latentgen.config import load_config
    from latentgen.training.unet import train_unet
    from latentgen.training.unet_config import LcmConfig, UNetTrainConfig

    config = load_config(UNetTrainConfig, str(ROOT / "configs" / "smoke.yaml"), [
        f"output_dir={out}", f"pretrained_pipeline={smoke_model}", "text_encoder.kind=pipeline", f"max_steps={steps}",
        "checkpoint_every=3", "log_every=1", "learning_rate=1e-3", "data.num_samples=64", *overrides])
    config.lcm = LcmConfig(enabled=True, ddim_steps=10, time_cond_proj_dim=32, **lcm)
    config.check()
    return train_unet(config)


def test_the_full_student_starts_as_its_teacher(smoke_model):
    from latentgen.training.lcm import student_unet
    from latentgen.training.unet_config import LcmConfig

    teacher = LatentPipeline.from_pretrained(smoke_model, torch_dtype=torch.float32).unet
    student = student_unet(teacher, LcmConfig(time_cond_proj_dim=32)).eval()
    x, hidden = torch.randn(2, 4, 16, 16), torch.randn(2, 24, 32)
    with torch.no_grad():
        a = teacher(x, 500, encoder_hidden_states=hidden).sample
        b = student(x, 500, encoder_hidden_states=hidden, timestep_cond=torch.randn(2, 32)).sample
    torch.testing.assert_close(a, b)


def test_distillation_learns_resumes_bit_for_bit_and_samples(smoke_model, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from latentgen.training import loop

    losses = []
    add = loop.Averages.add
    monkeypatch.setattr(loop.Averages, "add", lambda self, **v: (losses.append(v["loss"]), add(self, **v))[1])
    full = lcm_run(smoke_model, tmp_path / "full", 24)
    assert sum(losses[-6:]) < sum(losses[:6])  # it learns
    lcm_run(smoke_model, tmp_path / "resumed", 3)
    resumed = lcm_run(smoke_model, tmp_path / "resumed", 24, "resume_from=latest")
    a, b = (load_file(next((p / "unet").glob("*.safetensors"))) for p in (full, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pipe = LatentPipeline.from_pretrained(full, torch_dtype=torch.float32)
    assert pipe.unet.config.time_cond_proj_dim == 32 and type(pipe.scheduler).__name__ == "LCMScheduler"
    image = pipe(PROMPT, num_inference_steps=4, guidance_scale=4.0, seed=0, output_type="np").images
    assert np.isfinite(image).all()


def test_a_lora_student_learns_one_guidance(smoke_model, tmp_path):
    path = lcm_run(smoke_model, tmp_path / "lora", 4, "lora.rank=4", "ema=false", embed_guidance=False)
    pipe = LatentPipeline.from_pretrained(smoke_model, torch_dtype=torch.float32)
    plain = pipe(PROMPT, scheduler="lcm", num_inference_steps=4, guidance_scale=1.0, seed=0, output_type="np").images
    with_lora = pipe(PROMPT, scheduler="lcm", num_inference_steps=4, guidance_scale=1.0, seed=0, output_type="np",
                     loras=[(str(path), 1.0)]).images
    assert path.name == "lora.safetensors" and np.abs(plain - with_lora).max() > 0
