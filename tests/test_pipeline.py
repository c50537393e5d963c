"""LatentPipeline: parity with diffusers, save/load, seeds, guidance, bad input."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline

import components as C
from latentgen import LatentPipeline
from latentgen.components.schedulers import make_scheduler, scheduler_names
from latentgen.errors import UserError

PROMPTS = ["a red circle on a blue background", "a green square"]


def _np(pipe, prompt=PROMPTS, **kw):
    kw.setdefault("num_inference_steps", 3)
    return pipe(prompt, output_type="np", **kw).images


def _sd(folder):
    sd = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    sd.set_progress_bar_config(disable=True)
    return sd


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++", "euler-a", "ddpm"])
def test_parity_with_diffusers(tiny_folder, scheduler):
    pipe = LatentPipeline.from_pretrained(tiny_folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    sd = _sd(tiny_folder)
    sd.scheduler = make_scheduler(scheduler, sd.scheduler.config)
    ours = _np(pipe, negative_prompt="blurry", scheduler=scheduler, guidance_scale=6.0,
               generator=torch.Generator().manual_seed(7), num_inference_steps=4)
    ref = sd(PROMPTS, negative_prompt=["blurry"] * 2, guidance_scale=6.0, output_type="np", num_inference_steps=4,
             generator=torch.Generator().manual_seed(7)).images
    assert ours.shape == ref.shape == (2, 32, 32, 3)
    assert np.abs(ours - ref).max() <= 1e-4


def test_parity_with_the_folders_own_scheduler(tiny_folder):
    pipe = LatentPipeline.from_pretrained(tiny_folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    ours = _np(pipe, generator=torch.Generator().manual_seed(1), num_images_per_prompt=2)
    ref = _sd(tiny_folder)(PROMPTS, output_type="np", num_inference_steps=3, num_images_per_prompt=2,
                           generator=torch.Generator().manual_seed(1)).images
    assert ours.shape == (4, 32, 32, 3)
    assert np.abs(ours - ref).max() <= 1e-4


def test_save_load_same_image(tiny_pipe, tmp_path):
    before = _np(tiny_pipe, seed=3)
    tiny_pipe.save_pretrained(tmp_path / "p")
    for sub in ("unet", "vae", "text_encoder"):
        assert list((tmp_path / "p" / sub).glob("*.safetensors")), sub
    assert not list((tmp_path / "p").rglob("*.bin"))
    loaded = LatentPipeline.from_pretrained(tmp_path / "p", torch_dtype=torch.float32)
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(before, _np(loaded, seed=3))


def test_our_folder_is_a_diffusers_folder(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "p")
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    generic = DiffusionPipeline.from_pretrained(tmp_path / "p", local_files_only=True)
    assert isinstance(generic, StableDiffusionPipeline)


def test_fp16_weights_load_in_diffusers_with_its_defaults(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "p", weights_dtype=torch.float16)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "p" / "text_encoder" / "model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
    assert tiny_pipe.unet.dtype == torch.float32  # the live pipeline keeps its precision
    sd = _sd(tmp_path / "p")
    assert {sd.text_encoder.dtype, sd.unet.dtype, sd.vae.dtype} == {torch.float32}
    image = sd("a red circle", num_inference_steps=2, output_type="np").images
    assert np.isfinite(image).all()


def test_stable_diffusion_folder_loads(tmp_path):
    """A folder written by diffusers' StableDiffusionPipeline, with the safety checker entries SD folders carry."""
    sd = StableDiffusionPipeline(**C.components(), safety_checker=None, feature_extractor=None,
                                 requires_safety_checker=False)
    sd.save_pretrained(tmp_path / "sd")
    index_path = tmp_path / "sd" / "model_index.json"
    index = json.loads(index_path.read_text())
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    (tmp_path / "sd" / "feature_extractor").mkdir()
    (tmp_path / "sd" / "feature_extractor" / "preprocessor_config.json").write_text(
        json.dumps({"crop_size": 224, "do_center_crop": True, "image_processor_type": "CLIPImageProcessor"}))
    index_path.write_text(json.dumps(index))
    pipe = LatentPipeline.from_pretrained(tmp_path / "sd", torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    sd.set_progress_bar_config(disable=True)
    ref = sd(PROMPTS, output_type="np", num_inference_steps=3, generator=torch.Generator().manual_seed(2)).images
    ours = _np(pipe, generator=torch.Generator().manual_seed(2))
    assert np.abs(ours - ref).max() <= 1e-4


@pytest.mark.parametrize("name", scheduler_names())
def test_every_scheduler_makes_an_image(tiny_pipe, name):
    images = tiny_pipe("a red circle", num_inference_steps=3, scheduler=name, seed=0).images
    assert len(images) == 1 and images[0].size == (32, 32)
    arr = _np(tiny_pipe, "a red circle", scheduler=name, seed=0)
    assert np.isfinite(arr).all() and 0 <= arr.min() and arr.max() <= 1


@pytest.mark.parametrize("scheduler", ["ddim", "euler-a", "ddpm"])
def test_batch_equals_singles_with_seed(tiny_pipe, scheduler):
    """Image k with seed s is the same alone or in a batch, also for stochastic samplers."""
    batch = _np(tiny_pipe, PROMPTS, seed=[11, 12], scheduler=scheduler)
    first = _np(tiny_pipe, PROMPTS[0], seed=11, scheduler=scheduler)
    second = _np(tiny_pipe, PROMPTS[1], seed=12, scheduler=scheduler)
    np.testing.assert_allclose(batch[0], first[0], atol=1e-5)
    np.testing.assert_allclose(batch[1], second[0], atol=1e-5)
    assert np.abs(batch[0] - batch[1]).max() > 1e-2  # different seeds, different images


def test_int_seed_numbers_images_consecutively(tiny_pipe):
    out = tiny_pipe(PROMPTS, num_inference_steps=2, seed=5, num_images_per_prompt=2, output_type="np")
    assert out.seeds == [5, 6, 7, 8]
    np.testing.assert_allclose(out.images[3], _np(tiny_pipe, PROMPTS[1], seed=8, num_inference_steps=2)[0],
                               atol=1e-5)


def test_guidance_one_is_the_conditional_prediction(tiny_pipe):
    batch_sizes = C.record_calls(tiny_pipe.unet)
    plain = _np(tiny_pipe, guidance_scale=1.0, seed=4, negative_prompt="anything")
    assert sum(batch_sizes) == 3 * 2  # the unconditional pass is skipped: one row per image and step
    other_negative = _np(tiny_pipe, guidance_scale=1.0, seed=4, negative_prompt="something else")
    np.testing.assert_array_equal(plain, other_negative)
    batch_sizes.clear()
    # w = 1 + δ with both passes: ε∅ + w(εc − ε∅) → εc as δ → 0
    nearly = _np(tiny_pipe, guidance_scale=1.0 + 1e-6, seed=4, negative_prompt="anything")
    assert sum(batch_sizes) == 3 * 4
    np.testing.assert_allclose(plain, nearly, atol=1e-4)
    far = _np(tiny_pipe, guidance_scale=8.0, seed=4, negative_prompt="anything")
    assert np.abs(plain - far).max() > 1e-3


def test_output_types(tiny_pipe):
    latents = tiny_pipe("x", num_inference_steps=2, seed=0, output_type="latent").images
    assert latents.shape == (1, 4, 16, 16)
    pt = tiny_pipe("x", num_inference_steps=2, seed=0, output_type="pt").images
    assert pt.shape == (1, 3, 32, 32)
    np.testing.assert_allclose(pt.permute(0, 2, 3, 1).numpy(), _np(tiny_pipe, "x", num_inference_steps=2, seed=0))


@pytest.mark.parametrize("kwargs, message", [
    (dict(scheduler="fancy"), "unknown scheduler 'fancy'; choose one of: ddpm, ddim, dpm++"),
    (dict(height=33), "height must be a positive multiple of 2"),
    (dict(width=0), "width must be a positive multiple of 2"),
    (dict(num_inference_steps=0), "steps must be an integer in [1, 1000]"),
    (dict(num_inference_steps=1001), "steps must be an integer in [1, 1000]"),
    (dict(guidance_scale=-1.0), "guidance must be a finite number ≥ 0"),
    (dict(guidance_scale=float("inf")), "guidance must be a finite number ≥ 0"),
    (dict(seed=2**63), "seed must be an integer in [0, "),
    (dict(seed=[1, -1]), "seed must be an integer in [0, "),
    (dict(height=65536, width=65536), "65536×65536 for 2 image(s) needs about"),
    (dict(negative_prompt=["a", "b", "c"]), "got 2 prompts and 3 negative prompts"),
    (dict(seed=[1]), "one per image"),
    (dict(output_type="jpeg"), "unknown output_type 'jpeg'"),
])
def test_bad_requests(tiny_pipe, kwargs, message):
    with pytest.raises(UserError, match=re.escape(message)):
        tiny_pipe(PROMPTS, **kwargs)


def test_missing_folder_and_component(tiny_folder, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        LatentPipeline.from_pretrained(tmp_path / "nothing")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_folder, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(UserError, match="missing the component 'vae'"):
        LatentPipeline.from_pretrained(broken)


def test_pickle_weights_refused_unless_allowed(tiny_folder, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_folder, folder)
    from safetensors.torch import load_file

    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), folder / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(UserError, match=r"pickle file, which can run code.*--allow-pickle"):
        LatentPipeline.from_pretrained(folder)
    pipe = LatentPipeline.from_pretrained(folder, allow_pickle=True)
    assert pipe.unet.config.in_channels == 4
