"""The cascade's second stage (`latentgen.generation.cascade`): training an upscaler with train_unet.py, sampling it
against a loop written here from diffusers' parts, infer.py --upscale, replay, and the errors."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from PIL import Image

import components as C
from conftest import ROOT, infer
from latentgen import LatentPipeline
from latentgen.errors import UserError
from latentgen.formats.upscaler import UpscalerConfig, save
from latentgen.generation.cascade import Upscale, augment
from latentgen.generation.infotext import a1111_request
from latentgen.training.upscaler import training_condition


def upscaler_unet(seed: int = 0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=8, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=8, class_embed_type="timestep").eval()


def write_upscaler(folder, noise_level=60, steps=3, guidance=1.0):
    scheduler = DPMSolverMultistepScheduler.from_config(C.scheduler().config)
    save(folder, upscaler_unet(), scheduler, UpscalerConfig(scale=2, noise_level=noise_level, steps=steps,
                                                            guidance=guidance))
    return folder


@pytest.fixture
def cascade_folder(tiny_folder, tmp_path):
    """The tiny pipeline with an upscaler in its folder, as the default model ships one."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    write_upscaler(folder / "upscaler")
    return folder



def derived_generator(seed):
    """The augmentation noise's generator for an image seed, as the upscaler documents it."""
    first = torch.Generator().manual_seed(seed)
    return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=first)))


@torch.no_grad()
def reference_cascade(pipe, unet, scheduler_config, prompt, seed, steps, guidance, up_steps, level, up_guidance,
                      strength):
    """The cascade written out from diffusers' parts: the first stage's latents (the pipeline's own, checked
    elsewhere), noised to `level` and upsampled, concatenated to the upscaler's input at every step of a fresh
    DPM-Solver++ run, classifier-free guidance on [negative; prompt]; below strength 1 the run starts at its
    step (1 − strength)·steps from the first stage's image enlarged (bicubic), encoded and noised to that step."""
    low = pipe(prompt, seed=seed, num_inference_steps=steps, guidance_scale=guidance, output_type="latent").images
    forward = DDPMScheduler.from_config(scheduler_config)
    noise = torch.randn(low.shape, generator=derived_generator(seed))
    noised = forward.alphas_cumprod[level].sqrt() * low + (1 - forward.alphas_cumprod[level]).sqrt() * noise
    cond = noised.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # nearest ×2
    sampler = DPMSolverMultistepScheduler.from_config(scheduler_config)
    sampler.set_timesteps(up_steps)
    x = torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(seed))
    timesteps = sampler.timesteps
    if strength < 1:
        skip = up_steps - int(up_steps * strength)
        timesteps = timesteps[skip:]
        sampler.set_begin_index(skip)
        pixels = pipe.vae.decode(low / pipe.vae.config.scaling_factor).sample  # the first image, ×2 bicubic, encoded
        big = torch.nn.functional.interpolate(pixels, scale_factor=2, mode="bicubic").clamp(-1, 1)
        start = pipe.vae.encode(big).latent_dist.mode() * pipe.vae.config.scaling_factor
        x = sampler.add_noise(start, x, timesteps[:1])
    else:
        x = x * sampler.init_noise_sigma
    ctx = torch.cat([pipe.encode_prompts([""])[0], pipe.encode_prompts([prompt])[0]])
    for t in timesteps:
        x_in = torch.cat([torch.cat([x, cond], dim=1)] * 2)
        eps = unet(x_in, t, encoder_hidden_states=ctx, class_labels=torch.tensor([level, level])).sample
        uncond, text = eps.chunk(2)
        x = sampler.step(uncond + up_guidance * (text - uncond), t, x).prev_sample
    return pipe.image_processor.postprocess(pipe.decode(x), output_type="np")[0]


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_the_cascade_equals_the_loop_written_from_diffusers_parts(cascade_folder, strength):
    pipe = LatentPipeline.from_pretrained(cascade_folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red circle", seed=3, num_inference_steps=2, guidance_scale=3.0, output_type="np",
               upscale=Upscale(2, steps=4, noise_level=80, guidance=2.0, strength=strength))
    assert out.images.shape == (1, 64, 64, 3)
    assert out.info["upscale_height"] == 64 and out.info["upscale_noise_level"] == 80
    unet = UNet2DConditionModel.from_pretrained(cascade_folder / "upscaler" / "unet")
    config = json.loads((cascade_folder / "upscaler" / "scheduler" / "scheduler_config.json").read_text())
    ref = reference_cascade(pipe, unet, config, "a red circle", 3, 2, 3.0, 4, 80, 2.0, strength)
    np.testing.assert_allclose(out.images[0], ref, atol=1e-4)
    # the augmentation level is an input: another level, another image
    other = pipe("a red circle", seed=3, num_inference_steps=2, guidance_scale=3.0, output_type="np",
                 upscale=Upscale(2, steps=4, noise_level=300, guidance=2.0, strength=strength)).images[0]
    assert np.abs(other - out.images[0]).max() > 1e-3


def test_each_cascaded_image_is_the_one_made_alone(cascade_folder):
    pipe = LatentPipeline.from_pretrained(cascade_folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    both = pipe(["a red circle", "a blue square"], seed=[4, 9], num_inference_steps=2, output_type="np",
                upscale={"scale": 2}).images
    alone = pipe("a blue square", seed=9, num_inference_steps=2, output_type="np", upscale={"scale": 2}).images
    np.testing.assert_allclose(both[1], alone[0], atol=1e-5)


def test_training_condition_draws_levels_in_range_and_level_zero_keeps_the_latents():
    forward = DDPMScheduler.from_config(C.scheduler().config)
    low = torch.randn(64, 4, 3, 5)
    g = torch.Generator().manual_seed(0)
    cond, levels = training_condition(forward, low, UpscalerConfig(scale=2, max_noise_level=40), g)
    assert cond.shape == (64, 4, 6, 10) and 0 <= levels.min() and levels.max() <= 40 and len(levels.unique()) > 10
    same = augment(forward, low, torch.zeros(64, dtype=torch.long), torch.zeros_like(low), 2)
    np.testing.assert_allclose(same[:, :, ::2, ::2], low * forward.alphas_cumprod[0].sqrt(), rtol=1e-6)
    np.testing.assert_array_equal(same[:, :, 1::2, 1::2], same[:, :, ::2, ::2])


def test_the_cache_keeps_each_images_latents_and_those_of_its_box_filtered_half():
    import contextlib
    from types import SimpleNamespace

    from latentgen.data.sources import DataConfig, build_dataset
    from latentgen.training.cache import build_cache

    data = build_dataset(DataConfig(resolution=32, num_samples=3))
    vae = C.vae()
    tensors, texts = build_cache(data, SimpleNamespace(vae=vae), False, 2, "cpu", contextlib.nullcontext, low_scale=2)
    x = torch.stack([data.item(i)["pixel_values"] for i in range(3)])
    with torch.no_grad():
        full, half = vae.encode(x).latent_dist, vae.encode(torch.nn.functional.avg_pool2d(x, 2)).latent_dist
    assert tensors["mean"].shape == (3, 4, 16, 16) and tensors["low_mean"].shape == (3, 4, 8, 8)
    for key, want in [("mean", full.mean), ("std", full.std), ("low_mean", half.mean), ("low_std", half.std)]:
        np.testing.assert_allclose(tensors[key], want, atol=1e-5, err_msg=key)


def test_infer_upscale_writes_twice_the_size_records_it_and_replays(cascade_folder, tmp_path):
    r = infer("--model", cascade_folder, "--prompt", "a red circle", "--steps", 2, "--seed", 5, "--upscale", 2,
              "--upscale-steps", 2, "--out", tmp_path / "u.png")
    assert r.returncode == 0, r.stderr
    image = Image.open(tmp_path / "u.png")
    assert image.size == (64, 64)
    meta = json.loads(image.info["latentgen"])
    # what the upscaler ran with, its defaults (upscaler.json: level 60, guidance 1, strength 1) filled in
    assert meta["upscale"] == {"scale": 2, "steps": 2, "noise_level": 60, "guidance": 1.0, "strength": 1.0}
    assert (meta["height"], meta["width"]) == (32, 32)  # the first stage's size, as the request asked
    # A1111's text names the cascade as the server offers it, a hires upscaler, and reads back as the cascade
    text = image.info["parameters"]
    assert "Size: 32x32" in text and "Hires upscale: 2, Hires steps: 2, Hires upscaler: latentgen upscaler" in text
    settings, _, unused = a1111_request(text)
    assert settings["upscale"] == {"scale": 2, "steps": 2} and "hires" not in settings and not unused
    r = infer("--replay", tmp_path / "u.png")
    assert r.returncode == 0 and "identical, bit for bit" in r.stdout, r.stderr
    config = cascade_folder / "upscaler" / "upscaler.json"  # the upscaler's defaults change later: the image stays
    config.write_text(json.dumps(json.loads(config.read_text()) | {"noise_level": 200, "strength": 0.5}))
    r = infer("--replay", tmp_path / "u.png")
    assert r.returncode == 0 and "identical, bit for bit" in r.stdout, r.stderr


UPSCALER_UNET = {"sample_size": 32, "in_channels": 8, "out_channels": 4, "layers_per_block": 1,
                 "block_out_channels": [32, 64], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                 "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "cross_attention_dim": 32,
                 "attention_head_dim": 8, "norm_num_groups": 8, "class_embed_type": "timestep"}


def upscaler_run(launch, model, out, *overrides):
    """train_unet.py (`launch`: its command up to the script) training a 2× upscaler for `model` into `out`."""
    return subprocess.run(
        [*launch, str(ROOT / "train_unet.py"), "--config", str(ROOT / "configs" / "smoke.yaml"),
         f"output_dir={out}", "max_steps=3", "checkpoint_every=100", "validate_every=100",
         f"pretrained_pipeline={model}", "text_encoder.kind=pipeline", "vae_model={}",
         f"unet={json.dumps(UPSCALER_UNET)}", "upscaler.scale=2", "upscaler.steps=2", "data.resolution=64",
         "data.num_samples=8", "train_batch_size=4", "validation_steps=2", *overrides],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_an_upscaler_trains_sharded_as_it_does_data_parallel(tiny_folder, tmp_path):
    """distributed.strategy fsdp on two ranks writes the upscaler two DDP ranks write (fp32, 1e-5)."""
    from safetensors.torch import load_file

    from conftest import free_port

    launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines",
              "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    weights = {}
    for strategy in ("fsdp", "ddp"):
        r = upscaler_run(launch, tiny_folder, tmp_path / strategy, f"distributed.strategy={strategy}")
        assert r.returncode == 0, r.stderr[-3000:]
        weights[strategy] = load_file(str(tmp_path / strategy / "upscaler" / "unet" /
                                          "diffusion_pytorch_model.safetensors"))
    assert weights["fsdp"].keys() == weights["ddp"].keys()
    assert max((weights["fsdp"][k] - weights["ddp"][k]).abs().max().item() for k in weights["ddp"]) < 1e-5


def test_a_trained_upscaler_loads_and_upscales(tiny_folder, tmp_path):
    """train_unet.py with an upscaler: section writes a folder that a pipeline loads and runs."""

    def train(run, *overrides):
        return upscaler_run([sys.executable], tiny_folder, tmp_path / run, *overrides)

    r = train("run")
    assert r.returncode == 0, r.stderr[-3000:]
    folder = tmp_path / "run" / "upscaler"
    assert json.loads((folder / "upscaler.json").read_text())["scale"] == 2
    assert Image.open(tmp_path / "run" / "validation" / "step-0000003.png").size[0] == 3 * 128
    pipe = LatentPipeline.from_pretrained(tiny_folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_upscaler(folder)
    out = pipe("a red circle", seed=1, num_inference_steps=2, upscale=Upscale(2), output_type="np")
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all()

    # pretrained_upscaler: a second run continues that U-Net (one tiny step) instead of starting a new one
    r = train("again", "max_steps=1", "learning_rate=1e-6", "ema=false", f"pretrained_upscaler={folder}")
    assert r.returncode == 0, r.stderr[-3000:]
    before = UNet2DConditionModel.from_pretrained(folder / "unet").state_dict()
    after = UNet2DConditionModel.from_pretrained(tmp_path / "again" / "upscaler" / "unet").state_dict()
    assert after.keys() == before.keys()
    assert max((after[k] - before[k]).abs().max().item() for k in before) < 1e-3  # a fresh U-Net differs by ~0.1+
    assert yaml.safe_load((tmp_path / "again" / "train_config.yaml").read_text())["unet"]["in_channels"] == 8
    r = train("wrong", "upscaler.scale=4", f"pretrained_upscaler={folder}")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].endswith(
        f"pretrained_upscaler {folder} makes 2× latents but upscaler.scale is 4"), r.stderr


@pytest.mark.parametrize("args, message", [
    (["--upscale", "3"], "--upscale must be 2 or 4"),
    (["--upscale", "4"], "this model's upscaler makes 2× images; an upscale of 4 is not available"),
    (["--upscale", "2", "--upscale-noise", "1000"], "--upscale-noise must be a whole number in [0, 999]"),
    (["--upscale", "2", "--hires-scale", "2"], "--upscale is for text-to-image, without --hires-scale"),
])
def test_bad_upscale_requests_are_one_line_errors(cascade_folder, tmp_path, args, message):
    r = infer("--model", cascade_folder, "--prompt", "a red circle", "--steps", 2, *args, "--out", tmp_path / "x.png")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert message in r.stderr.strip().splitlines()[-1], r.stderr
    assert not (tmp_path / "x.png").exists()


def test_a_model_without_an_upscaler_says_so(tiny_folder, tmp_path):
    r = infer("--model", tiny_folder, "--prompt", "a red circle", "--steps", 2, "--upscale", "2",
              "--out", tmp_path / "x.png")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "this model has no upscaler" in r.stderr


def test_an_upscaler_for_another_text_encoder_or_a_plain_unet_is_refused(tiny_pipe, tmp_path):
    save(tmp_path / "plain", C.unet(), C.scheduler(), UpscalerConfig(scale=2))
    with pytest.raises(UserError, match="in_channels must be 8"):
        tiny_pipe.load_upscaler(tmp_path / "plain")
    wide = upscaler_unet()
    wide = UNet2DConditionModel.from_config({**wide.config, "cross_attention_dim": 48})
    save(tmp_path / "wide", wide, C.scheduler(), UpscalerConfig(scale=2))
    with pytest.raises(UserError, match="trained for a 48-wide text encoder"):
        tiny_pipe.load_upscaler(tmp_path / "wide")
    with pytest.raises(UserError, match="is not an upscaler folder"):
        tiny_pipe.load_upscaler(tmp_path)


def test_the_cascade_eval_reports_every_variant_and_draws_the_comparison(cascade_folder, tmp_path):
    from latentgen.eval.cascade import evaluate

    pipe = LatentPipeline.from_pretrained(cascade_folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    text = evaluate(pipe, seeds=1, levels=[0, 300], steps=2, up_steps=2, guidance=1.0, out=tmp_path, per_group=2)
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    names = [line.split(" | ")[0][2:] for line in rows[1:]]
    assert names == ["first stage, 32 px", "bicubic ×2", "upscaler, noise level 0", "upscaler, noise level 300",
                     "the data at 64 px (reference)"]
    assert "(8 images, 1 seeds per prompt" in text
    assert Image.open(tmp_path / "side-by-side.png").size[0] == 6 * 64


def test_the_a1111_api_offers_the_upscaler_as_a_hires_upscaler(cascade_folder, tmp_path):
    """A model with an upscaler lists it among A1111's upscalers; `hr_upscaler: "latentgen upscaler"` gives the
    cascade's image (the pipeline's own with `upscale`), and a scale it does not make is a 400 naming it."""
    from test_server import Server, api, pixels

    server = Server(["--model", str(cascade_folder), "--models-dir", str(tmp_path / "none"), "--dtype", "fp32"])
    try:
        client = api(server)
        assert {u["name"]: u["scale"] for u in client.get_upscalers()} == {"Lanczos": 4.0, "latentgen upscaler": 2.0}
        body = dict(prompt="a red circle", seed=3, steps=2, width=32, height=32, cfg_scale=3.0, sampler_name="Euler")
        result = client.txt2img(**body, enable_hr=True, hr_scale=2, hr_upscaler="latentgen upscaler")
        assert result.image.size == (64, 64) and "notes" not in result.info
        assert "Hires upscaler: latentgen upscaler" in result.info["infotexts"][0]
        pipe = LatentPipeline.from_pretrained(cascade_folder, torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        direct = pipe("a red circle", seed=3, num_inference_steps=2, guidance_scale=3.0, width=32, height=32,
                      scheduler="euler", upscale={"scale": 2}).images[0]
        np.testing.assert_array_equal(pixels(result.image), pixels(direct))
        r = server.post("/sdapi/v1/txt2img", body | {"enable_hr": True, "hr_scale": 3,
                                                     "hr_upscaler": "latentgen upscaler"})
        assert r.status_code == 400 and "2 or 4; hr_scale 3 is not one" in r.json()["detail"]
    finally:
        server.close()
