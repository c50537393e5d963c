"""The bad-input sweep: every argument and config key of every command, given wrong types, out-of-range values,
missing and unreadable files. Each case must end in one line on stderr ("error: ..."), a non-zero exit code, no
traceback, and no output written.

The commands run in-process through the same `run_cli` wrapper their scripts use (a fresh interpreter per case
would cost minutes); tests/test_infer_cli.py and others check the real subprocess exit codes.
"""

from __future__ import annotations

import functools
import importlib.util
import shutil
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import ROOT
from latentgen.cli import run_cli
from latentgen.config import load_config
from latentgen.errors import UserError
from latentgen.generation.prompts import parse


def script(name):
    spec = importlib.util.spec_from_file_location(name.replace(".py", "_script"), ROOT / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def data_main(argv):
    from latentgen.data.__main__ import main

    return main(argv)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_folder):
    """Inputs for the sweep: good ones and every kind of broken one."""
    from PIL import Image
    from safetensors.torch import load_file

    d = tmp_path_factory.mktemp("inputs")
    Image.new("RGB", (32, 32), "blue").save(d / "image.png")
    Image.new("L", (16, 16), 255).save(d / "small-mask.png")
    (d / "not-an-image.png").write_bytes(b"GIF89a but not really")
    (d / "binary.txt").write_bytes(b"\xff\xfe\x00\x81 not utf-8")
    (d / "some-file").write_text("x")
    (d / "bad.yaml").write_text("max_steps: [1, 2\n")
    (d / "folder").mkdir()
    (d / "full").mkdir()
    (d / "full" / "a.png").write_text("x")
    corrupt = d / "corrupt"
    shutil.copytree(tiny_folder, corrupt)
    weights = corrupt / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    pickled = d / "pickled"
    shutil.copytree(tiny_folder, pickled)
    import torch

    w = pickled / "vae" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(w), w.with_suffix(".bin"))
    w.unlink()
    no_index = d / "no-index"
    shutil.copytree(tiny_folder, no_index)
    (no_index / "model_index.json").unlink()
    bad_config = d / "bad-config"
    shutil.copytree(tiny_folder, bad_config)
    (bad_config / "unet" / "config.json").write_text("{not json")
    bad_index = d / "bad-index"
    shutil.copytree(tiny_folder, bad_index)
    (bad_index / "model_index.json").write_text("[1, 2]")
    shapes = d / "wrong-shapes"
    shutil.copytree(tiny_folder, shapes)
    import json

    cfg = json.loads((shapes / "unet" / "config.json").read_text())
    cfg["block_out_channels"] = [48, 64]
    (shapes / "unet" / "config.json").write_text(json.dumps(cfg))
    return {k: str(v) for k, v in dict(
        MODEL=tiny_folder, IMAGE=d / "image.png", SMALL_MASK=d / "small-mask.png", NOT_IMAGE=d / "not-an-image.png",
        BINARY=d / "binary.txt", FILE=d / "some-file", BAD_YAML=d / "bad.yaml", FOLDER=d / "folder",
        FULL=d / "full", CORRUPT=corrupt, PICKLED=pickled, NO_INDEX=no_index, WRONG_SHAPES=shapes,
        MISSING=d / "missing", BAD_CONFIG=bad_config, BAD_INDEX=bad_index, TXT_OUT=d / "result.txt",
        VAE_SMOKE=ROOT / "configs" / "vae-smoke.yaml",
        UNET_SMOKE=ROOT / "configs" / "smoke.yaml").items()}


INFER = [  # (arguments after --prompt x --out OUT, what the error must say)
    (["--steps", "abc"], "invalid int value"), (["--steps", "0"], "--steps must be an integer ≥ 1"),
    (["--steps", "-3"], "--steps must be an integer ≥ 1"), (["--steps", "1.5"], "invalid int value"),
    (["--guidance", "x"], "invalid float value"), (["--guidance", "-1"], "--guidance must be a finite number ≥ 0"),
    (["--guidance", "nan"], "--guidance must be a finite number ≥ 0"),
    (["--guidance", "inf"], "--guidance must be a finite number ≥ 0, got inf"),
    (["--steps", "100000"], "steps must be an integer in [1, 1000] (the model was trained on 1000 noise levels)"),
    (["--seed", "99999999999999999999999"], "--seed must be an integer in [0, 9223372036854775807]"),
    (["--seed", "9223372036854775807", "--num-images", "2"], "--seed must be an integer in [0, 9223372036854775806]"),
    (["--height", "100000", "--width", "100000"], "100000×100000 for 1 image(s) needs about"),
    (["--out", "TXT_OUT"], "is not an image file name (a file ending in .png, .jpg, .jpeg, .webp) nor a folder"),
    (["--model", "BAD_CONFIG"], "unet/config.json is not valid JSON"),
    (["--model", "BAD_INDEX"], "model_index.json is not a diffusers model index"),
    (["--num-images", "0"], "--num-images must be ≥ 1"), (["--num-images", "x"], "invalid int value"),
    (["--batch-size", "0"], "--batch-size must be ≥ 1"),
    (["--height", "33"], "height must be a positive multiple of 2"), (["--width", "0"], "width must be a positive"),
    (["--height", "-8"], "height must be a positive"), (["--width", "x"], "invalid int value"),
    (["--seed", "-1"], "--seed must be an integer in [0, "), (["--seed", "x"], "invalid int value"),
    (["--scheduler", "nope"], "invalid choice: 'nope'"), (["--dtype", "fp8"], "invalid choice: 'fp8'"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--model", "MISSING"], "does not exist"), (["--model", "FILE"], "is not a single-file checkpoint"),
    (["--model", "NO_INDEX"], "has no model_index.json"), (["--model", "FOLDER"], "has no model_index.json"),
    (["--model", "CORRUPT"], "diffusion_pytorch_model.safetensors is corrupt or truncated"),
    (["--model", "PICKLED"], "is a pickle file"), (["--model", "WRONG_SHAPES"], "but unet/config.json needs"),
    (["--prompts-file", "MISSING"], "prompts file"), (["--prompts-file", "FOLDER"], "cannot read prompts file"),
    (["--prompts-file", "BINARY"], "cannot read prompts file"),
    (["--prompt", "a (red"], "unbalanced '(' at position 2"), (["--prompt", "  "], "a prompt is empty"),
    (["--negative-prompt", "a", "--negative-prompt", "b"], "got 1 prompts and 2 negative prompts"),
    (["--negative-prompt", "[blurry"], "unbalanced '['"),
    (["--image", "MISSING"], "image file"), (["--image", "NOT_IMAGE"], "cannot read image file"),
    (["--mask", "IMAGE"], "--mask needs --image"),
    (["--image", "IMAGE", "--mask", "SMALL_MASK"], "the mask is 16×16 but the image is 32×32"),
    (["--image", "IMAGE", "--strength", "0"], "--strength must be in (0, 1]"),
    (["--image", "IMAGE", "--strength", "1.5"], "--strength must be in (0, 1]"),
    (["--strength", "x"], "invalid float value"),
    (["--guidance-rescale", "2"], "--guidance-rescale must be in [0, 1]"),
    (["--guidance-rescale", "-1"], "--guidance-rescale must be in [0, 1]"),
    (["--dynamic-threshold", "0.2", "--scheduler", "ddim"],
     "--dynamic-threshold must be in (0.5, 1)"),
    (["--guidance-interval", "0.8", "0.2"], "guidance interval must satisfy"),
    (["--guidance-interval", "0.2"], "expected 2 arguments"),
    (["--replay", "MISSING"], "does not exist"), (["--replay", "IMAGE"], "has no generation parameters"),
    (["--replay", "NOT_IMAGE"], "cannot read image"),
    (["--bogus"], "unrecognized arguments: --bogus"),
]

TRAIN_COMMON = [  # (overrides, message) for both training scripts
    (["max_step=3"], "did you mean 'max_steps'"), (["max_steps=x"], "config key 'max_steps'"),
    (["max_steps=0"], "max_steps must be ≥ 1"), (["train_batch_size=0"], "train_batch_size must be ≥ 1"),
    (["train_batch_size=1.5"], "config key 'train_batch_size'"), (["learning_rate=-1"], "learning_rate must be > 0"),
    (["learning_rate=fast"], "config key 'learning_rate'"), (["ema_decay=1.5"], "ema_decay must be in [0, 1)"),
    (["mixed_precision=fp8"], "unknown mixed_precision 'fp8'"), (["mixed_precision=no"], "unknown mixed_precision"),
    (["lr_scheduler=cosin"], "did you mean 'cosine'"), (["gradient_accumulation_steps=0"], "must be ≥ 1"),
    (["attention=flash"], "unknown attention 'flash'"), (["lr_warmup_steps=-1"], "lr_warmup_steps must be ≥ 0"),
    (["data.source=web"], "unknown data source 'web'"), (["data.source=hf"], "data.path is empty"),
    (["data.source=hf", "data.path=MISSING"], "does not exist"),
    (["data.source=hf", "data.path=FILE"], "is a file datasets cannot read"),
    (["data.source=hf", "data.path=FOLDER"], "cannot load dataset"),
    (["data.resolution=33"], "not a multiple of"), (["data.resolution=x"], "config key 'data.resolution'"),
    (["data.hflip=2"], "data.hflip is a probability"), (["data.split=test"], "unknown shapes split 'test'"),
    (["data.language=fr"], "unknown caption language 'fr'"), (["data.num_samples=0"], "data.num_samples must be"),
    (["data.max_shapes=3"], "max_shapes must be 1 or 2"), (["resume_from=MISSING"], "is not a checkpoint folder"),
    (["max_steps"], "is not of the form key=value"), (["data=3"], "must be a mapping"),
]
TRAIN_VAE = TRAIN_COMMON + [
    (["loss.kl_weight=-1"], "loss.kl_weight must be ≥ 0"), (["loss.l1_wieght=1"], "did you mean 'loss.l1_weight'"),
    (["model.nope=1"], "unknown AutoencoderKL argument model.nope"),
    (["train_batch_size=100000", "data.num_samples=100000"], "train_batch_size=100000 needs about"),
    (["pretrained=MISSING"], "not an AutoencoderKL"),
]
TRAIN_UNET = TRAIN_COMMON + [
    (["text_encoder.kind=nope"], "unknown text_encoder.kind 'nope'"),
    (["text_encoder.kind=hf"], "needs text_encoder.path"),
    (["text_encoder.kind=hf", "text_encoder.path=MISSING"], "is not a folder"),
    (["text_encoder.kind=openclip", "text_encoder.path=MISSING"], "is not an open_clip checkpoint file"),
    (["vae_path=MISSING"], "is not an AutoencoderKL folder"), (["sampler=nope"], "unknown sampler 'nope'"),
    (["save_dtype=fp8"], "unknown save_dtype 'fp8'"), (["caption_dropout=2"], "caption_dropout is a probability"),
    (["noise.prediction_type=x0"], "unknown noise.prediction_type 'x0'"), (["noise.snr_gamma=-1"], "must be ≥ 0"),
    (["noise.timestep_sampling=cosine"], "unknown noise.timestep_sampling 'cosine'"),
    (["noise.timestep_sampling=logit_normal", "noise.logit_std=0"], "noise.logit_std must be > 0, got 0"),
    (["unet.nope=1"], "bad unet config"), (["vae_model.latent_channels=8"], "8-channel latents"),
    (["text_encoder.model.hidden_size=48"], "cross_attention_dim=32"),
    (["train_batch_size=500"], "fewer than one step needs"), (["data.hflip=0.5"], "cache=true stores one view"),
    (["pretrained_pipeline=MISSING"], "does not exist"),
    (["foo=1"], "unknown config key 'foo'; --keys lists the valid ones"),
    (["train_batch_size=20000", "data.num_samples=20000"], "train_batch_size=20000 needs about"),
]
DATA = [
    (["export", "--count", "3"], "the following arguments are required: --out"),
    (["export", "--out", "OUT", "--count", "0"], "--count must be ≥ 1"),
    (["export", "--out", "OUT", "--count", "x"], "invalid int value"),
    (["export", "--out", "OUT", "--count", "3", "--split", "test"], "invalid choice: 'test'"),
    (["export", "--out", "OUT", "--count", "3", "--resolution", "4"], "resolution must be an integer ≥ 16"),
    (["export", "--out", "OUT", "--count", "3", "--language", "fr"], "invalid choice: 'fr'"),
    (["export", "--out", "OUT", "--count", "3", "--two-shape-fraction", "2"], "two_shape_fraction must be in"),
    (["export", "--out", "FULL", "--count", "3"], "exists and is not empty"),
    (["nope"], "invalid choice: 'nope'"),
]


EVAL = [
    (["adherence", "--model", "MISSING"], "does not exist"),
    (["adherence", "--model", "BAD_CONFIG"], "unet/config.json is not valid JSON"),
    (["adherence", "--model", "MODEL", "--seeds", "0"], "--seeds and --steps must be ≥ 1"),
    (["adherence", "--model", "MODEL", "--guidance", "inf"], "guidance must be a finite number ≥ 0, got inf"),
    (["adherence", "--model", "MODEL", "--steps", "5000"], "steps must be an integer in [1, 1000]"),
    (["steps", "--model", "MODEL", "--schedulers", "nope"], "invalid choice: 'nope'"),
    (["adherence", "--model", "MODEL", "--out", "FILE"], "--out FILE is a file; give a folder"),
    (["adherence", "--model", "MODEL", "--guidance-rescale", "2"], "--guidance-rescale must be in [0, 1], got 2.0"),
    (["adherence", "--model", "MODEL", "--dynamic-threshold", "1"], "--dynamic-threshold must be in (0.5, 1), got 1.0"),
    (["nope"], "invalid choice: 'nope'"),
]


def check_one_line(main, argv, files, capsys, tmp_path, message):
    out = tmp_path / "out"
    argv = [str(out) if a == "OUT" else files.get(a, a) for a in argv]
    argv = [a.replace("=MISSING", "=" + files["MISSING"]).replace("=FILE", "=" + files["FILE"])
            .replace("=FOLDER", "=" + files["FOLDER"]) for a in argv]
    code = run_cli(main, argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("args, message", INFER, ids=[" ".join(a) for a, _ in INFER])
def test_infer(args, message, files, capsys, tmp_path):
    argv = ["--out", "OUT", *args] if args and args[0] == "--replay" else \
        ["--model", files["MODEL"], "--prompt", "x", "--out", "OUT", *args]
    if "--model" in args:
        argv = argv[2:]
    check_one_line(script("infer.py"), argv, files, capsys, tmp_path, message)


@pytest.mark.parametrize("overrides, message", TRAIN_VAE, ids=[" ".join(a) for a, _ in TRAIN_VAE])
def test_train_vae(overrides, message, files, capsys, tmp_path):
    argv = ["--config", files["VAE_SMOKE"], f"output_dir={tmp_path / 'out'}", *overrides]
    check_one_line(script("train_vae.py"), argv, files, capsys, tmp_path, message)


@pytest.mark.parametrize("overrides, message", TRAIN_UNET, ids=[" ".join(a) for a, _ in TRAIN_UNET])
def test_train_unet(overrides, message, files, capsys, tmp_path):
    argv = ["--config", files["UNET_SMOKE"], f"output_dir={tmp_path / 'out'}", *overrides]
    check_one_line(script("train_unet.py"), argv, files, capsys, tmp_path, message)


@pytest.mark.parametrize("config, message", [("MISSING", "does not exist"), ("BAD_YAML", "cannot read config"),
                                             ("FOLDER", "is a folder"), ("BINARY", "cannot read config")])
@pytest.mark.parametrize("name", ["train_vae.py", "train_unet.py"])
def test_train_config_files(name, config, message, files, capsys, tmp_path):
    check_one_line(script(name), ["--config", config], files, capsys, tmp_path, message)


@pytest.mark.parametrize("args, message", EVAL, ids=[" ".join(a) for a, _ in EVAL])
def test_eval(args, message, files, capsys, tmp_path):
    from latentgen.eval.__main__ import main as eval_main

    message = message.replace("FILE", files["FILE"])
    check_one_line(eval_main, [files.get(a, a) for a in args], files, capsys, tmp_path, message)


@pytest.mark.parametrize("args, message", DATA, ids=[" ".join(a) for a, _ in DATA])
def test_data(args, message, files, capsys, tmp_path):
    check_one_line(data_main, args, files, capsys, tmp_path, message)


# ---- property-based ------------------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ab (:)[]\\1.5, ", max_size=30))
def test_prompt_parsing_never_crashes(prompt):
    try:
        segments = parse(prompt)
    except UserError as err:
        assert "unbalanced" in str(err) and "position" in str(err)
        return
    assert all(s.weight > 0 or ":" in prompt for s in segments)
    if not any(c in prompt for c in "()[]\\"):
        assert segments == [type(segments[0])(prompt, 1.0)] or prompt == ""


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=string.ascii_letters + string.digits + " ()[]:.", min_size=1, max_size=40))
def test_plain_text_survives_parsing(words):
    text = "".join(c for c in words if c not in "()[]\\")
    assert "".join(s.text for s in parse(text)) == text


KEYS = ["max_steps", "learning_rate", "seed", "data.resolution", "data.source", "ema", "max_step", "data.hflip",
        "noise.snr_gamma", "text_encoder.kind", "unet.sample_size", "lr_scheduler", "data", "x.y.z"]
VALUES = st.one_of(st.integers(-5, 100).map(str), st.one_of(st.floats(-2, 2).map(str), st.just("nan"), st.just("inf")),
                   st.sampled_from(["", "abc", "true", "no", "[1, 2]", "{a: 1}", "null", "cosine", "shapes"]))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), max_size=4))
def test_config_overrides_never_crash(pairs):
    from latentgen.training.unet import UNetTrainConfig

    try:
        load_config(UNetTrainConfig, ROOT / "configs" / "smoke.yaml", [f"{k}={v}" for k, v in pairs])
    except UserError as err:
        assert "\n" not in str(err)


NUMBERS = st.one_of(st.integers(-10, 10**20), st.floats(allow_nan=True, allow_infinity=True), st.none(),
                    st.sampled_from([0, 1, 2, 8, 32, 1000, 1001, 65536, 2**63, True, "3", [1, 2]]))
SETTING_KEYS = ["scale", "steps", "denoise", "upscaler", "noise_level", "guidance", "strength", "norm_threshold",
                "eta", "momentum", "threshold"]  # the hires fix's, the upscaler's and APG's fields, and a stranger
SETTINGS = st.one_of(NUMBERS, st.dictionaries(st.sampled_from(SETTING_KEYS), NUMBERS, max_size=3))


@functools.cache
def _fuzz_pipe():
    import components as C
    from latentgen import LatentPipeline

    return LatentPipeline(**C.components())


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({}, optional={
    "num_inference_steps": NUMBERS, "guidance_scale": NUMBERS, "height": NUMBERS, "width": NUMBERS,
    "seed": NUMBERS, "num_images_per_prompt": NUMBERS, "strength": NUMBERS, "guidance_rescale": NUMBERS,
    "dynamic_threshold": NUMBERS, "eta": NUMBERS, "hires": SETTINGS, "upscale": SETTINGS, "apg": SETTINGS}))
def test_request_fields_never_crash(fields):
    """Any value in any request field: a checked request or one UserError line, never another exception."""
    try:
        _fuzz_pipe().check_request("a red circle", **fields)
    except UserError as err:
        assert "\n" not in str(err)


HIRES = "the hires fix settings are scale, steps, denoise, upscaler (scale required); got "
UPSCALE = "the upscaler settings are scale, steps, noise_level, guidance, strength; got "


@pytest.mark.parametrize("field, value, message", [
    ("hires", {"scale": 2, "denoise_strength": 0.5}, HIRES + "{'scale': 2, 'denoise_strength': 0.5}"),
    ("hires", {"steps": 4}, HIRES + "{'steps': 4}"),
    ("upscale", {"noise": 100}, UPSCALE + "{'noise': 100}"),
    ("upscale", 2, UPSCALE + "2"),
    ("apg", {"threshold": 1}, "APG settings are norm_threshold, eta, momentum; got {'threshold': 1}"),
])
def test_settings_given_as_a_mapping_name_their_fields(field, value, message):
    """The hires fix, the upscaler and APG given as JSON-like mappings (the Python API, the server, a model's
    model_index.json): a wrong or missing key is one line naming the fields, not a TypeError."""
    with pytest.raises(UserError) as err:
        _fuzz_pipe().check_request("a red circle", **{field: value})
    assert str(err.value) == message
