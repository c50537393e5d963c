"""The checkpoints users already have: single-file SD 1.x/2.x/SDXL (read from the weights' shapes), export
folder -> file -> folder, SDXL pipelines against diffusers, --vae, --model NAME in a models directory."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from PIL import Image
from safetensors.torch import load_file, save_file

import components as C
from conftest import infer
from latentgen import LatentPipeline
from latentgen.errors import UserError
from latentgen.formats import single_file as sf

PROMPTS = ["a red circle on a blue background", "a green square"]


def _np(pipe, **kw):
    kw = dict(num_inference_steps=3, guidance_scale=6.0, negative_prompt="blurry", height=64, width=64) | kw
    return pipe(PROMPTS, output_type="np", generator=torch.Generator().manual_seed(7), **kw).images


def _weights(module) -> dict[str, torch.Tensor]:
    return {k.removeprefix("text_model."): v for k, v in module.state_dict().items()}


def _same_weights(a, b, names=("unet", "vae", "text_encoder")):
    for name in names:
        x, y = _weights(getattr(a, name)), _weights(getattr(b, name))
        assert x.keys() == y.keys(), name
        assert all(torch.equal(x[k], y[k]) for k in x), name


def _strip_metadata(src, dst, **extra):
    """The file as a third party would have written it: LDM weights only, no latentgen configs."""
    save_file(load_file(str(src)) | extra, str(dst))
    return dst


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd1") / "pipe"
    LatentPipeline(**C.sd1_components()).save_pretrained(folder)
    return folder


def test_export_uses_the_names_diffusers_converter_reads(tmp_path):
    pipe = LatentPipeline(**C.sd1_components())
    state, _ = sf.to_state(pipe)
    assert "model.diffusion_model.input_blocks.3.0.op.weight" in state  # SD's own names
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in state and state[
        "first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in state
    for module, converted in ((pipe.unet, convert_ldm_unet_checkpoint(state, pipe.unet.config)),
                              (pipe.vae, convert_ldm_vae_checkpoint(state, pipe.vae.config))):
        ours = module.state_dict()
        assert converted.keys() == ours.keys()
        assert all(torch.equal(converted[k].reshape(ours[k].shape), ours[k]) for k in ours)


def test_sd1_file_without_metadata_gives_the_folders_image(sd1, tmp_path):
    """Done-when: a file built offline from a folder of SD 1.x's topology gives through infer.py the folder's
    image (fp32), its architecture read from the weights alone."""
    pipe = LatentPipeline.from_pretrained(sd1, torch_dtype=torch.float32)
    pipe.save_single_file(tmp_path / "full.safetensors")
    bare = _strip_metadata(tmp_path / "full.safetensors", tmp_path / "model.safetensors")
    loaded = LatentPipeline.from_single_file(bare, torch_dtype=torch.float32)
    _same_weights(pipe, loaded)
    for key in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
                "cross_attention_dim", "attention_head_dim", "use_linear_projection", "in_channels"):
        assert loaded.unet.config[key] == pipe.unet.config[key] or list(loaded.unet.config[key]) == list(
            pipe.unet.config[key]), key
    assert loaded.vae.config.scaling_factor == 0.18215
    assert loaded.tokenizer.pad_token == "<|endoftext|>"

    common = ["--prompt", PROMPTS[0], "--steps", "3", "--seed", "5", "--dtype", "fp32", "--width", "64",
              "--height", "64", "--scheduler", "ddim"]
    images = {}
    for name, model in (("folder", sd1), ("file", bare)):
        r = infer(*common, "--model", model, "--out", tmp_path / f"{name}.png")
        assert r.returncode == 0, r.stderr
        images[name] = np.asarray(Image.open(tmp_path / f"{name}.png"), dtype=np.int16)
    assert np.abs(images["folder"] - images["file"]).max() <= 1
    params = Image.open(tmp_path / "file.png").info["parameters"]
    assert "Model: model," in params  # A1111 names a checkpoint file by its stem


def test_round_trip_folder_file_folder_is_bit_exact(sd1, tmp_path):
    pipe = LatentPipeline.from_pretrained(sd1, torch_dtype=torch.float32)
    pipe.save_single_file(tmp_path / "m.safetensors")
    back = LatentPipeline.from_pretrained(tmp_path / "m.safetensors", torch_dtype=torch.float32)
    back.save_pretrained(tmp_path / "again")
    for sub in ("unet", "vae", "text_encoder"):
        a = load_file(str(next((sd1 / sub).glob("*.safetensors"))))
        b = load_file(str(next((tmp_path / "again" / sub).glob("*.safetensors"))))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
        if sub != "text_encoder":
            configs = [json.loads((f / sub / "config.json").read_text()) for f in (sd1, tmp_path / "again")]
            assert [{k: v for k, v in c.items() if not k.startswith("_")} for c in configs][0] == \
                {k: v for k, v in configs[1].items() if not k.startswith("_")}
    assert type(back.scheduler) is type(pipe.scheduler)
    assert dict(back.scheduler.config) == dict(pipe.scheduler.config)


def test_fp16_export_halves_the_file_and_loads(sd1, tmp_path):
    pipe = LatentPipeline.from_pretrained(sd1, torch_dtype=torch.float32)
    full = pipe.save_single_file(tmp_path / "full.safetensors")
    half = pipe.save_single_file(tmp_path / "half.safetensors", dtype=torch.float16)
    assert half.stat().st_size < 0.55 * full.stat().st_size
    assert all(v.dtype == torch.float16 for v in load_file(str(half)).values())
    loaded = LatentPipeline.from_single_file(half, torch_dtype=torch.float32)
    ref = pipe.unet.state_dict()["conv_in.weight"]
    assert torch.equal(loaded.unet.state_dict()["conv_in.weight"], ref.half().float())


def test_convert_command_both_ways(sd1, tmp_path, capsys):
    from latentgen.cli import run_cli
    from latentgen.convert import main

    run = lambda *a: run_cli(main, [str(x) for x in a])  # noqa: E731
    assert run(sd1, tmp_path / "m.safetensors", "--fp16") == 0
    assert run(tmp_path / "m.safetensors", tmp_path / "folder") == 0
    assert (tmp_path / "folder" / "model_index.json").exists()
    capsys.readouterr()
    assert run(tmp_path / "nothing.safetensors", tmp_path / "x") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err and not (tmp_path / "x").exists()


def _sd2_components():
    """SD 2.x's topology, small: linear projections, 64-wide heads, an OpenCLIP (gelu) text tower."""
    torch.manual_seed(0)
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        block_out_channels=(64, 64, 128, 128), layers_per_block=1, sample_size=8, cross_attention_dim=64,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=[1, 1, 2, 2],
        use_linear_projection=True).eval()
    return dict(unet=unet, vae=C.sd_vae(), text_encoder=C.clip("gelu"),
                tokenizer=C.clip_tokenizer(pad_token="!"), scheduler=C.scheduler())


def test_sd2_original_file_uses_the_penultimate_layer_and_v_from_its_yaml(tmp_path):
    """Stability's SD 2.x files hold the whole OpenCLIP tower (with its projection) though SD 2 reads the
    penultimate layer; a 768-v file says v-prediction only in A1111's YAML beside it."""
    pipe = LatentPipeline(**_sd2_components())
    pipe.set_progress_bar_config(disable=True)
    pipe.save_single_file(tmp_path / "full.safetensors")
    width = pipe.text_encoder.config.hidden_size
    torch.manual_seed(1)
    extra_layer = {f"cond_stage_model.model.transformer.resblocks.2.{k}": torch.randn(shape) for k, shape in (
        ("ln_1.weight", (width,)), ("ln_1.bias", (width,)), ("attn.in_proj_weight", (3 * width, width)),
        ("attn.in_proj_bias", (3 * width,)), ("attn.out_proj.weight", (width, width)),
        ("attn.out_proj.bias", (width,)), ("ln_2.weight", (width,)), ("ln_2.bias", (width,)),
        ("mlp.c_fc.weight", (2 * width, width)), ("mlp.c_fc.bias", (2 * width,)),
        ("mlp.c_proj.weight", (width, 2 * width)), ("mlp.c_proj.bias", (width,)))}
    extra_layer["cond_stage_model.model.text_projection"] = torch.randn(width, width)
    path = _strip_metadata(tmp_path / "full.safetensors", tmp_path / "sd2.safetensors", **extra_layer)
    loaded = LatentPipeline.from_single_file(path, torch_dtype=torch.float32)
    assert loaded.text_encoder.config.num_hidden_layers == 2 and loaded.tokenizer.pad_token == "!"
    _same_weights(pipe, loaded)
    assert loaded.scheduler.config.prediction_type == "epsilon"
    loaded.scheduler = pipe.scheduler  # the file's is SD's default sampler
    loaded.set_progress_bar_config(disable=True)
    assert np.abs(_np(loaded) - _np(pipe)).max() <= 1e-5
    (tmp_path / "sd2.yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n")
    v = LatentPipeline.from_single_file(path, torch_dtype=torch.float32)
    assert v.scheduler.config.prediction_type == "v_prediction" and v.unet.config.upcast_attention
    assert v.unet.config.sample_size == 96  # 768 px, as SD 2.x-v


def _xl_np(pipe, **kw):
    return pipe(PROMPTS, negative_prompt=["blurry"] * 2, guidance_scale=6.0, num_inference_steps=3,
                output_type="np", height=32, width=48, generator=torch.Generator().manual_seed(7), **kw).images


def test_sdxl_parity_with_diffusers():
    parts = C.sdxl_components()
    ours = LatentPipeline(**parts)
    ref = StableDiffusionXLPipeline(**parts)
    for p in (ours, ref):
        p.set_progress_bar_config(disable=True)
    a, b = _xl_np(ours), _xl_np(ref)
    assert a.shape == b.shape == (2, 32, 48, 3)
    assert np.abs(a - b).max() <= 1e-4
    # the size conditioning is used: another original size gives another image in diffusers, and ours follows
    # the image size
    c = _xl_np(ref, original_size=(64, 64))
    assert np.abs(b - c).max() > 1e-3


def test_sdxl_folder_and_file_round_trips(tmp_path):
    pipe = LatentPipeline(**C.sdxl_components())
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "folder")
    index = json.loads((tmp_path / "folder" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["text_encoder_2"][1] == \
        "CLIPTextModelWithProjection"
    diffusers_loaded = StableDiffusionXLPipeline.from_pretrained(tmp_path / "folder", local_files_only=True)
    diffusers_loaded.set_progress_bar_config(disable=True)
    expected = _xl_np(pipe)
    assert np.abs(_xl_np(diffusers_loaded) - expected).max() <= 1e-4
    folder = LatentPipeline.from_pretrained(tmp_path / "folder", torch_dtype=torch.float32)
    assert np.array_equal(_xl_np(folder), expected)

    pipe.save_single_file(tmp_path / "xl.safetensors")
    state = load_file(str(tmp_path / "xl.safetensors"))
    assert "conditioner.embedders.1.model.text_projection" in state
    assert "model.diffusion_model.label_emb.0.0.weight" in state
    bare = LatentPipeline.from_single_file(_strip_metadata(tmp_path / "xl.safetensors", tmp_path / "bare.safetensors"),
                                           torch_dtype=torch.float32)
    _same_weights(pipe, bare, ("unet", "vae", "text_encoder", "text_encoder_2"))
    assert bare.unet.config.addition_time_embed_dim == 8 and bare.vae.config.scaling_factor == 0.13025
    assert bare.tokenizer_2.pad_token == "!"
    bare.vae.register_to_config(scaling_factor=pipe.vae.config.scaling_factor)  # SDXL's convention differs
    bare.scheduler = pipe.scheduler
    assert np.abs(_xl_np(bare) - expected).max() <= 1e-5


def test_files_that_are_not_checkpoints_get_one_line_naming_what_was_found(tmp_path):
    def error(state):
        save_file(state, str(tmp_path / "x.safetensors"))
        with pytest.raises(UserError) as e:
            LatentPipeline.from_single_file(tmp_path / "x.safetensors")
        assert "\n" not in str(e.value)
        return str(e.value)

    z = torch.zeros(1)
    assert "it is a LoRA" in error({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": z})
    assert "it is a VAE" in error({"encoder.down.0.block.0.conv1.weight": z})
    for controlnet in ("control_model.input_hint_block.0.weight", "controlnet_cond_embedding.conv_in.weight"):
        assert "it is a ControlNet: use it with --control FILE:IMAGE" in error({controlnet: z})  # A1111's, diffusers
    msg = error({"model.diffusion_model.input_blocks.0.0.weight": z})
    assert "found a U-Net (model.diffusion_model.*)" in msg and "VAE" not in msg.split("found")[1].split(";")[0]
    assert "none of a Stable Diffusion checkpoint's parts" in error({"foo": z})
    (tmp_path / "m.ckpt").write_bytes(b"not read")
    with pytest.raises(UserError, match="pickle file, which can run code"):
        LatentPipeline.from_single_file(tmp_path / "m.ckpt")


def test_ckpt_loads_weights_only_with_allow_pickle(sd1, tmp_path):
    pipe = LatentPipeline.from_pretrained(sd1, torch_dtype=torch.float32)
    state, _ = sf.to_state(pipe)
    torch.save({"state_dict": state, "global_step": 1}, tmp_path / "m.ckpt")
    loaded = LatentPipeline.from_single_file(tmp_path / "m.ckpt", torch_dtype=torch.float32, allow_pickle=True)
    _same_weights(pipe, loaded)


def test_vae_swap_and_models_dir(sd1, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    pipe = LatentPipeline.from_pretrained(sd1, torch_dtype=torch.float32)
    pipe.save_single_file(models / "mine.safetensors")
    other = C.sd_vae(seed=3)
    vae_file = tmp_path / "other-vae.safetensors"
    save_file({k.removeprefix("first_stage_model."): v for k, v in sf.vae_to_ldm(other).items()}, str(vae_file))
    common = ["--prompt", PROMPTS[0], "--steps", "2", "--seed", "1", "--dtype", "fp32", "--width", "64", "--height",
              "64", "--models-dir", str(models), "--model", "mine"]
    r = infer(*common, "--out", tmp_path / "base.png")  # in this process: four interpreter starts saved
    assert r.returncode == 0, r.stderr
    r = infer(*common, "--vae", vae_file, "--out", tmp_path / "vae.png")
    assert r.returncode == 0, r.stderr
    base, swapped = (np.asarray(Image.open(tmp_path / n), dtype=np.int16) for n in ("base.png", "vae.png"))
    assert np.abs(base - swapped).max() > 10
    params = Image.open(tmp_path / "vae.png").info["parameters"]
    assert "VAE: other-vae.safetensors" in params and "Model: mine" in params
    r = infer("--replay", tmp_path / "vae.png")
    assert r.returncode == 0 and "identical, bit for bit" in r.stdout, r.stdout + r.stderr
    r = infer(*common[:-1], "nope")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert f"model nope does not exist: it is neither a path nor a model in {models} (there: mine)" in r.stderr
