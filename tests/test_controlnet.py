"""ControlNet units (`latentgen.generation.control`): diffusers' image in the balanced mode, A1111's other modes and
step fractions, single files in A1111's LDM layout read by an independent key map, preprocessors, the metadata,
and the errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
from PIL import Image, ImageDraw

import components as C
from conftest import ROOT
from latentgen import LatentPipeline
from latentgen.components import control_images
from latentgen.errors import UserError
from latentgen.generation.control import Control, parse_flag
from latentgen.generation.infotext import a1111_parameters, a1111_request

PROMPT = "a red circle on a blue background"


def controlnet(unet, seed: int, hint=(8, 16)) -> ControlNetModel:
    """A ControlNet copied from `unet` (diffusers' `from_unet`), its zero convolutions given random weights so the
    control changes the image."""
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=hint)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]:
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.3)
    return net.eval()


def random_images(n: int, size: int = 32) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def parts():
    return C.components()


@pytest.fixture(scope="module")
def nets(parts):
    return [controlnet(parts["unet"], 1), controlnet(parts["unet"], 2)]


@pytest.fixture(scope="module")
def ours(parts):
    pipe = LatentPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


KW = dict(num_inference_steps=6, guidance_scale=7.5, output_type="np")


def test_two_controlnets_with_step_fractions_give_diffusers_image(parts, nets, ours):
    images = random_images(2)
    got = ours(PROMPT, control=[Control(nets[0], images[0], 0.7, 0.1, 0.8), Control(nets[1], images[1], 0.5)],
               generator=torch.Generator().manual_seed(3), **KW).images
    sd = StableDiffusionControlNetPipeline(**parts, controlnet=nets, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    want = sd(PROMPT, image=images, controlnet_conditioning_scale=[0.7, 0.5], control_guidance_start=[0.1, 0.0],
              control_guidance_end=[0.8, 1.0], generator=torch.Generator().manual_seed(3), **KW).images
    plain = ours(PROMPT, generator=torch.Generator().manual_seed(3), **KW).images
    assert np.abs(got - want).max() <= 1e-4
    assert np.abs(got - plain).max() > 0.05  # the control did something


def test_a1111_modes_and_a_unit_outside_its_steps(nets, ours):
    image = random_images(1)[0]

    def run(guidance=7.5, **unit):
        kw = KW | {"guidance_scale": guidance}
        control = [Control(nets[0], image, **unit)] if unit else None
        return ours(PROMPT, control=control, generator=torch.Generator().manual_seed(5), **kw).images

    plain = run()
    assert np.array_equal(run(weight=1.0, start=0.9, end=1.0), plain)  # on at no step of 6: (i + 1) / 6 > 0.9
    balanced, prompt, control = (run(weight=1.0, mode=m) for m in ("balanced", "prompt", "control"))
    assert np.abs(prompt - balanced).max() > 1e-3 and np.abs(control - prompt).max() > 1e-3
    # the soft scales fade the control: "prompt" lies nearer the plain image than "balanced" does
    assert np.abs(prompt - plain).mean() < np.abs(balanced - plain).mean()
    # without guidance there are no unconditional rows, so "control" (cond rows only) is "prompt"
    assert np.array_equal(run(1.0, mode="control"), run(1.0, mode="prompt"))


def test_soft_injection_scales_are_a1111s(nets, ours, monkeypatch):
    """"My prompt is more important": residual i of SD's 13 scaled by 0.825^(12 - i) (A1111's hook.py)."""
    from latentgen.generation import control

    seen = {}
    unet_forward = ours.unet.forward

    def spy(*args, **kwargs):
        seen.setdefault("downs", kwargs.get("down_block_additional_residuals"))
        return unet_forward(*args, **kwargs)

    monkeypatch.setattr(ours.unet, "forward", spy)
    image = random_images(1)[0]
    ours(PROMPT, control=[Control(nets[0], image, 0.8, mode="prompt")], seed=0, num_inference_steps=1,
         guidance_scale=1.0)
    soft = seen.pop("downs")
    ours(PROMPT, control=[Control(nets[0], image, 1.0)], seed=0, num_inference_steps=1, guidance_scale=1.0)
    plain = seen.pop("downs")
    n = len(plain)
    for i, (s, p) in enumerate(zip(soft, plain)):
        torch.testing.assert_close(s, p * 0.8 * control.SOFT ** (n - i), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# A1111's single files


def ldm_state(net: ControlNetModel) -> dict[str, torch.Tensor]:
    """`net` in the LDM layout A1111's ControlNet files use (`control_model.*`), by a key map written here from
    the LDM code's module names, not by latentgen's or diffusers' converters."""
    cfg = net.config
    per = cfg.layers_per_block
    resnet = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
              "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
    hint_blocks = 2 * (len(cfg.conditioning_embedding_out_channels) - 1)
    out = {}
    for key, value in net.state_dict().items():
        parts = key.split(".")
        if parts[0] == "time_embedding":
            new = f"time_embed.{ {'linear_1': 0, 'linear_2': 2}[parts[1]] }." + ".".join(parts[2:])
        elif parts[0] == "add_embedding":  # SDXL's pooled text and sizes
            new = f"label_emb.0.{ {'linear_1': 0, 'linear_2': 2}[parts[1]] }." + ".".join(parts[2:])
        elif parts[0] == "conv_in":
            new = "input_blocks.0.0." + parts[1]
        elif parts[0] == "down_blocks":
            level, kind = int(parts[1]), parts[2]
            if kind == "downsamplers":
                new = f"input_blocks.{(level + 1) * (per + 1)}.0.op." + ".".join(parts[5:])
            else:
                block = 1 + level * (per + 1) + int(parts[3])
                rest = parts[4:]
                if kind == "resnets":
                    rest = [resnet[rest[0]], *rest[1:]]
                new = f"input_blocks.{block}.{0 if kind == 'resnets' else 1}." + ".".join(rest)
        elif parts[0] == "mid_block":
            index = {"resnets": {0: 0, 1: 2}, "attentions": {0: 1}}[parts[1]][int(parts[2])]
            rest = parts[3:]
            if parts[1] == "resnets":
                rest = [resnet[rest[0]], *rest[1:]]
            new = f"middle_block.{index}." + ".".join(rest)
        elif parts[0] == "controlnet_down_blocks":
            new = f"zero_convs.{parts[1]}.0.{parts[2]}"
        elif parts[0] == "controlnet_mid_block":
            new = f"middle_block_out.0.{parts[1]}"
        else:  # controlnet_cond_embedding: conv_in, blocks.j, conv_out -> input_hint_block.0, 2(j + 1), 2(n + 1)
            if parts[1] == "blocks":
                index, rest = 2 * (int(parts[2]) + 1), parts[3:]
            else:
                index, rest = 0 if parts[1] == "conv_in" else 2 * (hint_blocks + 1), parts[2:]
            new = f"input_hint_block.{index}." + ".".join(rest)
        out["control_model." + new] = value.contiguous()
    return out


def test_an_a1111_single_file_controlnet_loads_to_the_folders_image(tmp_path):
    """SD 1.x's topology (four levels, the 16-32-96-256 hint encoder scaled down): the LDM file loads with the
    architecture read from its weights and gives the image its diffusers folder gives."""
    from safetensors.torch import save_file

    parts = C.sd1_components()
    net = controlnet(parts["unet"], 4, hint=(4, 8, 8, 16))
    net.save_pretrained(tmp_path / "folder")
    save_file(ldm_state(net), tmp_path / "control_sd15_test.safetensors")
    pipe = LatentPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    pipe.controlnets_dir = tmp_path
    image = random_images(1, 64)[0]

    def run(model):
        return pipe(PROMPT, control=[Control(model, image, 0.9)], seed=2, num_inference_steps=3,
                    output_type="np").images

    folder = run(str(tmp_path / "folder"))
    assert np.abs(run("control_sd15_test") - folder).max() <= 1e-5  # found by name in controlnets_dir
    assert np.abs(run(net) - folder).max() <= 1e-5


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_single_files_in_diffusers_keys_and_sdxl_ldm_files_load_to_the_folders_image(tmp_path, kind):
    """The files A1111 users have besides SD 1.5's: a ControlNet as diffusers' keys in one file without its
    config.json (lllyasviel's `diffusers_xl_canny_full.safetensors`), for SD 1.x and SDXL, and SDXL's in the LDM
    layout (`label_emb`): the architecture from the weights (SDXL's time-embedding width from the model), the image
    of its diffusers folder; an SDXL ControlNet on an SD 1.x model is a one-line error."""
    from safetensors.torch import save_file

    parts = C.sd1_components() if kind == "sd1" else C.sdxl_components() | {"vae": C.sd_vae(levels=4)}  # SD's 8×
    net = controlnet(parts["unet"], 4, hint=(4, 8, 8, 16))  # SD's four-level hint encoder, scaled down
    net.save_pretrained(tmp_path / "folder")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / f"diffusers_{kind}.safetensors")
    save_file(ldm_state(net), tmp_path / f"control_{kind}.safetensors")
    pipe = LatentPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    image = random_images(1, 64)[0]

    def run(model):
        return pipe(PROMPT, control=[Control(str(model), image, 0.9)], seed=2, num_inference_steps=3, height=64,
                    width=64, output_type="np").images

    folder = run(tmp_path / "folder")
    assert np.abs(folder - pipe(PROMPT, seed=2, num_inference_steps=3, height=64, width=64,
                                output_type="np").images).max() > 1e-3  # the ControlNet steers
    for name in (f"diffusers_{kind}", f"control_{kind}"):
        assert np.abs(run(tmp_path / f"{name}.safetensors") - folder).max() <= 1e-5, name
    if kind == "sdxl":
        other = LatentPipeline(**C.sd1_components())
        other.set_progress_bar_config(disable=True)
        for name in ("diffusers_sdxl", "control_sdxl"):
            with pytest.raises(UserError, match="is an SDXL ControlNet: use it with an SDXL model"):
                other(PROMPT, control=[Control(str(tmp_path / f"{name}.safetensors"), image, 0.9)],
                      num_inference_steps=2)


def test_a_control_lora_is_the_base_unets_encoder_with_its_low_rank_changes(tmp_path):
    """Stability's control-LoRA (SDXL): `.up`/`.down` pairs on LDM-named layers of the model's own U-Net plus whole
    tensors for the hint encoder and zero convolutions, marked `lora_controlnet`. Loaded as ComfyUI builds it, it
    gives the image of the ControlNet whose encoder is the base's plus up·down; without its model it is a one-line
    error."""
    from safetensors.torch import save_file

    from latentgen.formats import controlnet as files

    parts = C.sdxl_components() | {"vae": C.sd_vae(levels=4)}
    net = controlnet(parts["unet"], 5, hint=(4, 8, 8, 16))
    full = {k.removeprefix("control_model."): v for k, v in ldm_state(net).items()}
    g = torch.Generator().manual_seed(3)
    lora, changed = {"lora_controlnet": torch.tensor([])}, dict(full)
    for key, weight in full.items():
        if key.startswith(("input_blocks.", "middle_block.")) and key.endswith(".weight") and weight.ndim >= 2 \
                and ("attn" in key or "in_layers.2" in key):
            up, down = torch.randn(weight.shape[0], 2, generator=g) * 0.2, torch.randn(2, weight[0].numel(),
                                                                                         generator=g) * 0.2
            lora[key.replace(".weight", ".up")], lora[key.replace(".weight", ".down")] = up, down
            changed[key] = weight + (up @ down).reshape(weight.shape)
        elif key.startswith(("input_hint_block.", "zero_convs.", "middle_block_out.")):
            lora[key] = weight  # whole, as control-LoRA files carry them
    assert sum(k.endswith(".up") for k in lora) > 10
    save_file({k: v.contiguous() for k, v in lora.items()}, tmp_path / "control-lora-test.safetensors")
    reference = files.from_ldm(changed, "reference", dict(parts["unet"].config))
    pipe = LatentPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    image = random_images(1, 64)[0]

    def run(model):
        return pipe(PROMPT, control=[Control(model, image, 0.9)], seed=2, num_inference_steps=3, height=64, width=64,
                    output_type="np").images

    expected = run(reference)
    assert np.abs(run(net) - expected).max() > 1e-3  # the low-rank changes matter
    assert np.abs(run(str(tmp_path / "control-lora-test.safetensors")) - expected).max() <= 1e-5
    with pytest.raises(UserError, match="is a control-LoRA: it changes a model's own U-Net"):
        files.load(tmp_path / "control-lora-test.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# Preprocessors and resize modes


def square(size=64, fill=255, background=0) -> Image.Image:
    image = Image.new("RGB", (size, size), (background,) * 3)
    ImageDraw.Draw(image).rectangle((16, 16, 47, 47), fill=(fill,) * 3)
    return image


def test_preprocessors_give_the_maps_their_controlnets_take():
    edges = np.asarray(control_images.prepare(square(), 64, 64, "canny"))[..., 0] > 0
    assert edges[15, 20:44].all() and edges[47, 20:44].all() and edges[20:44, 15].all()  # the square's outline
    assert edges.sum() < 4 * 34 and not edges[30, 30]  # and nothing else
    inverted = np.asarray(control_images.prepare(square(), 64, 64, "invert (from white bg & black line)"))
    assert inverted[30, 30, 0] == 0 and inverted[2, 2, 0] == 255
    grey = square(fill=140, background=100)
    assert np.asarray(control_images.prepare(grey, 64, 64, "threshold", threshold_a=120))[30, 30, 0] == 255
    assert np.asarray(control_images.prepare(grey, 64, 64, "threshold", threshold_a=150))[30, 30, 0] == 0
    blurred = np.asarray(control_images.prepare(square(), 64, 64, "blur_gaussian", threshold_a=3))[..., 0]
    assert 0 < blurred[16, 30] < 255
    shuffled = control_images.prepare(square(), 64, 64, "shuffle")
    assert shuffled.size == (64, 64) and shuffled.tobytes() == control_images.prepare(square(), 64, 64,
                                                                                      "shuffle").tobytes()
    with pytest.raises(UserError, match="canny's thresholds"):
        control_images.prepare(square(), 64, 64, "canny", threshold_a=200, threshold_b=100)


def test_resize_modes_crop_stretch_or_pad_as_a1111_does():
    wide = Image.new("RGB", (128, 64), (255, 255, 255))
    ImageDraw.Draw(wide).rectangle((0, 0, 31, 63), fill=(0, 0, 0))  # a black band on the left quarter
    crop = np.asarray(control_images.resize(wide, 64, 64, "crop"))  # the middle 64×64: all white
    stretch = np.asarray(control_images.resize(wide, 64, 64, "resize"))  # the band kept, half as wide
    fill = np.asarray(control_images.resize(wide, 64, 64, "fill"))  # fitted: 64×32, black bars above and below
    assert crop.min() > 200
    assert stretch[:, :12].max() < 60 and stretch[:, 20:].min() > 200
    assert fill[:14].max() == 0 and fill[-14:].max() == 0 and fill[32, 40, 0] > 200


# ---------------------------------------------------------------------------------------------------------------
# Metadata, command line, errors


def test_the_units_are_written_as_a1111s_extension_writes_them_and_read_back(nets, ours, tmp_path):
    image = tmp_path / "map.png"
    random_images(1)[0].save(image)
    unit = Control(nets[0], str(image), 0.6, 0.2, 0.9, mode="prompt", module="canny", resize_mode="fill")
    meta = ours(PROMPT, control=[unit], seed=1, num_inference_steps=2).metadata[0]
    assert meta["control"][0]["image"] == str(image.resolve())
    json.dumps(meta)  # storable
    text = a1111_parameters(meta | {"model": "m", "model_hash": "0", "version": "0"})
    assert ('ControlNet 0: "Module: canny, Model: ControlNetModel, Weight: 0.6, Resize Mode: Resize and Fill, '
            'Processor Res: -1, Guidance Start: 0.2, Guidance End: 0.9, Pixel Perfect: True, Control Mode: My '
            'prompt is more important, Hr Option: Both"') in text
    settings, _, unused = a1111_request(text)
    back = settings["control"][0]
    assert (back.weight, back.start, back.end, back.mode, back.module, back.resize_mode) == (
        0.6, 0.2, 0.9, "prompt", "canny", "fill")
    assert "ControlNet 0" not in unused


def test_flag_syntax():
    assert parse_flag("layout:map.png") == Control("layout", "map.png")
    unit = parse_flag("dir/cn.safetensors:maps/a.png:0.5,end=0.6,mode=control,module=canny,resize=fill")
    assert (unit.model, unit.image, unit.weight, unit.end, unit.mode, unit.module, unit.resize_mode) == (
        "dir/cn.safetensors", "maps/a.png", 0.5, 0.6, "control", "canny", "fill")
    for bad, message in [("onlymodel", "MODEL:IMAGE"), ("m:i,colour=red", "key=value with key one of"),
                         ("m:i,start=soon", "start must be a number")]:
        with pytest.raises(UserError, match=message):
            parse_flag(bad)


@pytest.mark.parametrize(("unit", "message"), [
    (dict(weight=3.0), r"ControlNet weight must be in \[0, 2\], got 3.0"),
    (dict(start=0.6, end=0.5), "start must be below end"),
    (dict(mode="loud"), "unknown ControlNet mode 'loud'; choose one of: balanced, prompt, control"),
    (dict(module="depth_midas"), "unknown ControlNet preprocessor 'depth_midas'; choose one of: none, canny"),
    (dict(resize_mode="zoom"), "unknown ControlNet resize mode 'zoom'; choose one of: crop, resize, fill"),
    (dict(image=None), "no control image given"),
])
def test_bad_units_are_one_line_errors(nets, ours, unit, message):
    fields = dict(model=nets[0], image=random_images(1)[0]) | unit
    with pytest.raises(UserError, match=message):
        ours.check_request(PROMPT, control=[Control(**fields)])


def test_a_controlnet_of_another_family_or_size_is_refused(ours, tmp_path):
    xl = ControlNetModel.from_unet(C.sdxl_components()["unet"], conditioning_embedding_out_channels=(8, 16))
    with pytest.raises(UserError, match="is for SDXL models; this model is SD 1.x/2.x"):
        ours.check_request(PROMPT, control=[Control(xl, random_images(1)[0])])
    other = ControlNetModel.from_unet(C.unet(cross_attention_dim=16), conditioning_embedding_out_channels=(8, 16))
    with pytest.raises(UserError, match="does not fit this model's U-Net"):
        ours.check_request(PROMPT, control=[Control(other, random_images(1)[0])])
    with pytest.raises(UserError, match="is neither a file, a folder nor a name"):
        ours.check_request(PROMPT, control=[Control("nowhere", random_images(1)[0])])


def test_infer_with_a_controlnet_writes_the_image_and_replays_it_bit_for_bit(tiny_folder, nets, tmp_path):
    nets[0].save_pretrained(tmp_path / "controlnets" / "layout")
    random_images(1)[0].save(tmp_path / "map.png")
    out = tmp_path / "out.png"
    base = [sys.executable, str(ROOT / "infer.py"), "--model", str(tiny_folder), "--steps", "3", "--seed", "4",
            "--controlnets-dir", str(tmp_path / "controlnets")]
    r = subprocess.run(base + ["--prompt", PROMPT, "--control", f"layout:{tmp_path / 'map.png'}:0.8,end=0.7",
                               "--control-preprocess", "invert", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(base + ["--replay", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "identical, bit for bit" in r.stdout, r.stdout + r.stderr
    # an A1111 text alone names the unit but not its image: the replay asks for it, then makes the same image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", Image.open(out).text["parameters"])
    Image.open(out).save(tmp_path / "a1111.png", pnginfo=info)
    r = subprocess.run(base + ["--replay", str(tmp_path / "a1111.png")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0 and "was made with ControlNet layout; its control image is not in the text" in r.stderr
    again = tmp_path / "again.png"
    r = subprocess.run(base + ["--replay", str(tmp_path / "a1111.png"), "--control", f"layout:{tmp_path / 'map.png'}",
                               "--out", str(again)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(out)))
    bad = subprocess.run(base + ["--prompt", PROMPT, "--control", "layout:missing.png", "--out",
                                 str(tmp_path / "bad.png")], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode != 0 and "control image missing.png does not exist" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "bad.png").exists()


# ---------------------------------------------------------------------------------------------------------------
# Training


def controlnet_run(smoke_model, out, steps: int, *overrides: str):
    from conftest import ROOT
    from latentgen.config import load_config
    from latentgen.training.unet import train_unet
    from latentgen.training.unet_config import ControlNetTrainConfig, UNetTrainConfig

    config = load_config(UNetTrainConfig, str(ROOT / "configs" / "smoke.yaml"), [
        f"output_dir={out}", f"pretrained_pipeline={smoke_model}", "text_encoder.kind=pipeline", f"max_steps={steps}",
        "checkpoint_every=3", "log_every=1", "learning_rate=1e-3", "data.num_samples=64", "ema=false", *overrides])
    config.controlnet = ControlNetTrainConfig(enabled=True)
    config.check()
    return train_unet(config)


def test_controlnet_training_learns_resumes_bit_for_bit_and_the_result_steers(smoke_model, tmp_path, monkeypatch):
    """A layout ControlNet of the smoke model: it starts with no effect (zero convolutions), its loss falls, a
    resumed run ends with the same weights, and the saved folder changes the image with a layout map."""
    from safetensors.torch import load_file

    from latentgen.data.shapes import ShapesSpec, make_sample
    from latentgen.training import loop

    losses = []
    add = loop.Averages.add
    monkeypatch.setattr(loop.Averages, "add", lambda self, **v: (losses.append(v["loss"]), add(self, **v))[1])
    full = controlnet_run(smoke_model, tmp_path / "full", 24)
    assert sum(losses[-6:]) < sum(losses[:6])
    controlnet_run(smoke_model, tmp_path / "resumed", 3)
    resumed = controlnet_run(smoke_model, tmp_path / "resumed", 24, "resume_from=latest")
    a, b = (load_file(p / "diffusion_pytorch_model.safetensors") for p in (full, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    pipe = LatentPipeline.from_pretrained(smoke_model, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    layout = make_sample(ShapesSpec(resolution=pipe.default_size, max_shapes=2, two_shape_fraction=1.0), 0).render(
        layout=True)
    kw = dict(seed=0, num_inference_steps=4, output_type="np")
    plain = pipe(PROMPT, **kw).images
    fresh = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(16, 32))
    assert np.array_equal(pipe(PROMPT, control=[Control(fresh, layout)], **kw).images, plain)
    assert np.abs(pipe(PROMPT, control=[Control(str(full), layout)], **kw).images - plain).max() > 0


def test_placement_reads_where_each_shape_landed():
    from latentgen.data.shapes import ShapesSpec, make_sample
    from latentgen.eval.placement import layout_targets, placement

    targets = layout_targets(4)
    assert [len(t.target.shapes) for t in targets] == [1, 1, 2, 2]
    spec = ShapesSpec(split="heldout", seed=7, max_shapes=2, two_shape_fraction=1.0)
    sample = make_sample(spec, 0)
    two = targets[2]
    assert two.target.shapes == tuple((s.color, s.kind) for s in sample.shapes)
    exact = placement(sample.render(), two.regions)  # the dataset's own image: every shape where it was drawn
    assert all(iou > 0.9 and error < 1.0 for iou, error in exact)
    moved = Image.new("RGB", (64, 64), sample.render().getpixel((0, 0)))
    moved.paste(sample.render().crop((0, 0, 48, 64)), (16, 0))  # everything 16 px to the right
    assert all(iou < 0.5 and error > 10 for iou, error in placement(moved, two.regions))


def test_the_control_eval_reports_placement_with_and_without_the_layout(smoke_model, tmp_path):
    pipe = LatentPipeline.from_pretrained(smoke_model, torch_dtype=torch.float32)
    controlnet(pipe.unet, 3, hint=(16, 32)).save_pretrained(tmp_path / "cn")
    r = subprocess.run([sys.executable, "-m", "latentgen.eval", "control", "--model", str(smoke_model),
                        "--controlnet", str(tmp_path / "cn"), "--samples", "2", "--seeds", "1", "--steps", "2",
                        "--out", str(tmp_path / "report")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| with the layout |" in r.stdout and "| without the layout |" in r.stdout
    saved = json.loads((tmp_path / "report" / "control.json").read_text())
    assert saved["with"]["placement"]["n"] == 3  # one shape + two shapes


# ---------------------------------------------------------------------------------------------------------------
# The server: AUTOMATIC1111's ControlNet extension's API, through webuiapi


@pytest.fixture(scope="module")
def cn_server(tiny_folder, tmp_path_factory):
    from conftest import Server

    root = tmp_path_factory.mktemp("cn-served")
    pipe = LatentPipeline.from_pretrained(tiny_folder, torch_dtype=torch.float32)
    controlnet(pipe.unet, 7).save_pretrained(root / "controlnets" / "layout")
    controlnet(pipe.unet, 8).save_pretrained(root / "outside")
    s = Server(["--model", str(tiny_folder), "--controlnets-dir", str(root / "controlnets"), "--dtype", "fp32"])
    s.root = root
    yield s
    s.close()


def test_webuiapi_controlnet_units_give_the_pipelines_image(cn_server, tiny_folder):
    import webuiapi

    api = webuiapi.WebUIApi(host="127.0.0.1", port=cn_server.port)
    assert api.controlnet_model_list() == ["layout"] and "canny" in api.controlnet_module_list()
    image = square(32)
    unit = webuiapi.ControlNetUnit(image=image, module="invert", model="layout [0123abcd]", weight=0.8,
                                   resize_mode="Just Resize", guidance_end=0.7, control_mode=1)
    # a dict of our own: webuiapi adds the units to its `alwayson_scripts={}` default, which later calls would share
    result = api.txt2img(prompt=PROMPT, seed=3, steps=4, cfg_scale=6.0, width=32, height=32, sampler_name="Euler",
                         controlnet_units=[unit], alwayson_scripts={})
    assert "notes" not in result.info, result.info.get("notes")
    assert 'ControlNet 0: "Module: invert, Model: layout, Weight: 0.8, Resize Mode: Just Resize' in \
        result.info["infotexts"][0]
    pipe = LatentPipeline.from_pretrained(tiny_folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    direct = pipe(PROMPT, seed=3, num_inference_steps=4, guidance_scale=6.0, width=32, height=32, scheduler="euler",
                  control=[Control(str(cn_server.root / "controlnets" / "layout"), image, 0.8, end=0.7,
                                   mode="prompt", module="invert", resize_mode="resize")]).images[0]
    assert np.array_equal(np.asarray(result.image.convert("RGB")), np.asarray(direct))
    detected = api.controlnet_detect([square(64)], module="canny", threshold_a=100, threshold_b=200)
    assert np.array_equal(np.asarray(detected.image.convert("RGB")),
                          np.asarray(control_images.prepare(square(64), 64, 64, "canny")))


def test_the_server_finds_controlnets_only_in_its_folder(cn_server):
    import webuiapi

    for name in ("../outside", str(cn_server.root / "outside")):
        r = cn_server.post("/sdapi/v1/txt2img", {"prompt": PROMPT, "steps": 1, "width": 32, "height": 32,
                                                 "alwayson_scripts": {"controlnet": {"args": [
                                                     {"model": name, "image": webuiapi.raw_b64_img(square(32))}]}}})
        assert r.status_code == 400 and "no ControlNet named" in r.json()["detail"]
    r = cn_server.post("/sdapi/v1/txt2img", {"prompt": PROMPT, "steps": 1, "width": 32, "height": 32,
                                             "alwayson_scripts": {"controlnet": {"args": [{"model": "layout"}]}}})
    assert r.status_code == 400 and "has no image" in r.json()["detail"]


def test_the_web_page_uploads_a_control_image_shows_its_map_and_uses_it(cn_server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from conftest import chromium, generate_on_page

    square(32).save(tmp_path / "control.png")
    driver = chromium()
    try:
        driver.get(cn_server.url + "/")
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#cn_model option")) > 1)
        Select(driver.find_element(By.ID, "cn_model")).select_by_visible_text("layout")
        Select(driver.find_element(By.ID, "cn_module")).select_by_visible_text("canny")
        driver.find_element(By.ID, "cn_image").send_keys(str(tmp_path / "control.png"))
        driver.find_element(By.ID, "cn_detect").click()
        shown = driver.find_element(By.ID, "cn_map")
        wait.until(lambda d: d.execute_script("return arguments[0].naturalWidth", shown) == 32)
        Select(driver.find_element(By.ID, "cn_hr")).select_by_visible_text("Low res only")
        square(32, fill=255, background=255).save(tmp_path / "mask.png")  # a region mask: everywhere
        driver.find_element(By.ID, "cn_mask").send_keys(str(tmp_path / "mask.png"))
        text = generate_on_page(driver, {"prompt": PROMPT, "width": "32", "height": "32", "steps": "2"})
        assert 'ControlNet 0: "Module: canny, Model: layout, Weight: 1' in text and "Hr Option: Low res only" in text
    finally:
        driver.quit()


# ---------------------------------------------------------------------------------------------------------------
# T2I-Adapters (TencentARC's, as diffusers has them), which A1111's ControlNet extension runs as units too


def t2i_adapter(unet, seed: int, in_channels: int = 3, kind: str = "full_adapter"):
    from diffusers import T2IAdapter

    torch.manual_seed(seed)
    return T2IAdapter(in_channels=in_channels, channels=list(unet.config.block_out_channels), num_res_blocks=1,
                      downscale_factor=8, adapter_type=kind).eval()


def test_a_t2i_adapter_unit_gives_diffusers_adapter_pipelines_image(tmp_path):
    """On SD 1.x's topology (attention from the first level, as the adapters' features expect)."""
    from diffusers import StableDiffusionAdapterPipeline

    parts = C.sd1_components()
    ours = LatentPipeline(**parts)
    ours.set_progress_bar_config(disable=True)
    adapter = t2i_adapter(parts["unet"], 4)
    adapter.save_pretrained(tmp_path / "t2i")
    nets = [controlnet(parts["unet"], 1, hint=(4, 8, 8, 16))]
    image = random_images(1, 64)[0]
    got = ours(PROMPT, control=[Control(str(tmp_path / "t2i"), image, 0.7, resize_mode="resize")],
               generator=torch.Generator().manual_seed(3), **KW).images
    sd = StableDiffusionAdapterPipeline(**parts, adapter=adapter, safety_checker=None, feature_extractor=None,
                                        requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    want = sd(PROMPT, image=image, adapter_conditioning_scale=0.7, generator=torch.Generator().manual_seed(3),
              **KW).images
    plain = ours(PROMPT, generator=torch.Generator().manual_seed(3), **KW).images
    assert np.abs(got - want).max() <= 1e-4
    assert np.abs(got - plain).max() > 0.01
    # with a ControlNet at the same time: both act (diffusers' U-Net takes both kinds of residuals)
    both = ours(PROMPT, control=[Control(str(tmp_path / "t2i"), image, 0.7), Control(nets[0], image, 0.5)],
                generator=torch.Generator().manual_seed(3), **KW).images
    assert np.abs(both - got).max() > 1e-3
    # TencentARC's "light" adapters (the colour adapter's kind: diffusers' LightAdapter) run the same way
    light = t2i_adapter(parts["unet"], 6, kind="light_adapter")
    light.save_pretrained(tmp_path / "light")
    got = ours(PROMPT, control=[Control(str(tmp_path / "light"), image, 0.7, resize_mode="resize")],
               generator=torch.Generator().manual_seed(3), **KW).images
    sd.adapter = light
    want = sd(PROMPT, image=image, adapter_conditioning_scale=0.7, generator=torch.Generator().manual_seed(3),
              **KW).images
    assert np.abs(got - want).max() <= 1e-4 and np.abs(got - plain).max() > 0.01
    # a one-channel adapter (sketch, canny) reads the image's luminance, as diffusers' pipeline given it in "L"
    grey = t2i_adapter(parts["unet"], 5, in_channels=1)
    grey.save_pretrained(tmp_path / "grey")
    got = ours(PROMPT, control=[Control(str(tmp_path / "grey"), image, 0.7, resize_mode="resize")],
               generator=torch.Generator().manual_seed(3), **KW).images
    sd.adapter = grey
    want = sd(PROMPT, image=image.convert("L"), adapter_conditioning_scale=0.7,
              generator=torch.Generator().manual_seed(3), **KW).images
    averaged = Image.fromarray(np.asarray(image, dtype=np.float32).mean(-1).round().astype(np.uint8))
    other = sd(PROMPT, image=averaged, adapter_conditioning_scale=0.7, generator=torch.Generator().manual_seed(3),
               **KW).images
    # PIL rounds L to whole levels; the channels' mean would be another image
    assert np.abs(got - want).max() <= 5e-3 and np.abs(got - other).max() > 3 * np.abs(got - want).max()
    from diffusers import T2IAdapter

    T2IAdapter(channels=[16, 16], num_res_blocks=1, downscale_factor=8).save_pretrained(tmp_path / "t2i2")
    with pytest.raises(UserError, match="T2I-Adapter t2i2 does not fit this model's U-Net"):
        ours(PROMPT, control=[Control(str(tmp_path / "t2i2"), image)], num_inference_steps=1)


def test_t2i_adapter_single_files_load_to_the_folders_image(tmp_path):
    """A T2I-Adapter as one file: diffusers' keys in a .safetensors, and TencentARC's own layout in a .pth (a
    pickle: refused unless allowed, then read weights-only), each the image of its diffusers folder."""
    from safetensors.torch import save_file

    parts = C.sd1_components()
    ours = LatentPipeline(**parts)
    ours.set_progress_bar_config(disable=True)
    from diffusers import T2IAdapter

    torch.manual_seed(6)
    adapter = T2IAdapter(in_channels=1, channels=list(parts["unet"].config.block_out_channels), num_res_blocks=2,
                         downscale_factor=8, adapter_type="full_adapter").eval()
    adapter.save_pretrained(tmp_path / "folder")
    save_file({k: v.contiguous() for k, v in adapter.state_dict().items()}, tmp_path / "t2i-adapter_test.safetensors")
    original = {}  # TencentARC's names: body.<level·2 + block>.block1 / .in_conv, conv_in
    for key, tensor in adapter.state_dict().items():
        key = key.removeprefix("adapter.")
        if key.startswith("body."):
            _, level, rest = key.split(".", 2)
            if rest.startswith("resnets."):
                _, block, rest = rest.split(".", 2)
                key = f"body.{int(level) * 2 + int(block)}.{rest}"
            else:  # in_conv sits on a level's first block
                key = f"body.{int(level) * 2}.{rest}"
        original[key] = tensor
    torch.save(original, tmp_path / "t2iadapter_test_sd15v2.pth")
    image = random_images(1, 64)[0]

    def run(model):
        return ours(PROMPT, control=[Control(str(model), image, 0.7)], generator=torch.Generator().manual_seed(3),
                    **KW).images

    folder = run(tmp_path / "folder")
    assert np.abs(folder - ours(PROMPT, generator=torch.Generator().manual_seed(3), **KW).images).max() > 1e-2
    assert np.abs(run(tmp_path / "t2i-adapter_test.safetensors") - folder).max() <= 1e-5
    with pytest.raises(UserError, match="pickle"):
        run(tmp_path / "t2iadapter_test_sd15v2.pth")
    ours.allow_pickle = True
    assert np.abs(run(tmp_path / "t2iadapter_test_sd15v2.pth") - folder).max() <= 1e-5


def test_the_shipped_layout_controlnet_puts_the_shapes_where_the_map_says():
    """The default model's own layout ControlNet (`controlnets/layout`, found by name): each shape of a held-out
    two-shape prompt lands on its silhouette; without the map, not."""
    from latentgen.eval.placement import layout_targets, placement
    from latentgen.generation.models import DEFAULT_MODEL

    pipe = LatentPipeline.from_pretrained(DEFAULT_MODEL, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    two = layout_targets(4)[3]
    kwargs = dict(seed=3, num_inference_steps=20, guidance_scale=7.5)
    placed = pipe(two.target.prompt, control=[Control("layout", two.layout)], **kwargs).images[0]
    free = pipe(two.target.prompt, **kwargs).images[0]
    assert all(iou >= 0.7 for iou, _ in placement(placed, two.regions)), placement(placed, two.regions)
    assert min(iou for iou, _ in placement(free, two.regions)) < 0.5


# ---------------------------------------------------------------------------------------------------------------
# kohya's ControlNet-LLLite

# Stability's names of the tiny SDXL U-Net's transformers (as sd-scripts names SDXL layers) -> diffusers' paths, and
# how far each one's resolution is below the image's (LLLite's conditioning depth: 16 -> 2 stages, 32 -> 3)
LLLITE_TARGETS = {"input_blocks_4_1_transformer_blocks_0": ("down_blocks.1.attentions.0.transformer_blocks.0", 16),
                  "input_blocks_7_1_transformer_blocks_1": ("down_blocks.2.attentions.0.transformer_blocks.1", 32),
                  "middle_block_1_transformer_blocks_0": ("mid_block.attentions.0.transformer_blocks.0", 32),
                  "output_blocks_3_1_transformer_blocks_0": ("up_blocks.1.attentions.0.transformer_blocks.0", 16)}


def lllite_file(unet, path, seed: int = 0, emb: int = 8, mlp: int = 6) -> dict:
    """A ControlNet-LLLite file in kohya's layout with random weights (attn1's q/k/v and attn2's q of each target);
    returns {diffusers path of the projection: (conditioning convs, down, mid, up)} for the reference."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g) * 0.3  # noqa: E731
    state, reference = {}, {}
    for kohya, (path_, factor) in LLLITE_TARGETS.items():
        for proj in ("attn1_to_q", "attn1_to_k", "attn1_to_v", "attn2_to_q"):
            layer = unet.get_submodule(f"{path_}.{proj.replace('_to_', '.to_')}")
            name = f"lllite_unet_{kohya}_{proj}"
            convs = [(3, emb // 2, 4)] + ([(emb // 2, emb, 4)] if factor == 16 else [(emb // 2, emb // 2, 4),
                                                                                        (emb // 2, emb, 2)])
            weights = {}
            for i, (c_in, c_out, k) in enumerate(convs):
                weights[f"conditioning1.{2 * i}.weight"] = rand(c_out, c_in, k, k)
                weights[f"conditioning1.{2 * i}.bias"] = rand(c_out)
            weights |= {"down.0.weight": rand(mlp, layer.in_features), "down.0.bias": rand(mlp),
                        "mid.0.weight": rand(mlp, mlp + emb), "mid.0.bias": rand(mlp),
                        "up.0.weight": rand(layer.in_features, mlp), "up.0.bias": rand(layer.in_features)}
            state |= {f"{name}.{k}": v for k, v in weights.items()}
            reference[f"{path_}.{proj.replace('_to_', '.to_')}"] = weights
    save_file(state, path)
    return reference


def lllite_reference_hooks(unet, reference, image, weight):
    """Kohya's ComfyUI node's arithmetic, written out: x -> x + weight · up(relu(mid([emb, relu(down(x))]))) before
    each projection, emb from the convolutions (ReLU between) of the image in [-1, 1], flattened row-major."""
    import torch.nn.functional as F

    cond = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None] * 2 - 1
    handles = []
    for path_, w in reference.items():
        e, i = cond, 0
        while f"conditioning1.{2 * i}.weight" in w:
            kernel = w[f"conditioning1.{2 * i}.weight"]
            e = F.conv2d(e if i == 0 else F.relu(e), kernel, w[f"conditioning1.{2 * i}.bias"], stride=kernel.shape[-1])
            i += 1
        emb = e.flatten(2).transpose(1, 2)

        def hook(module, args, w=w, emb=emb):
            x = args[0]
            h = F.relu(F.linear(x, w["down.0.weight"], w["down.0.bias"]))
            h = F.relu(F.linear(torch.cat([emb.expand(len(x), -1, -1), h], -1), w["mid.0.weight"], w["mid.0.bias"]))
            return (x + weight * F.linear(h, w["up.0.weight"], w["up.0.bias"]), *args[1:])

        handles.append(unet.get_submodule(path_).register_forward_pre_hook(hook))
    return handles


def test_a_controlnet_lllite_file_gives_kohyas_arithmetic_and_leaves_the_unet_as_it_was(tmp_path):
    """kohya's ControlNet-LLLite for SDXL (two and three conditioning stages, self- and cross-attention projections)
    gives the image of its modules' arithmetic written out independently, times the unit's weight; outside its steps
    and after the call the U-Net is untouched; on an SD 1.x model it is a one-line error."""
    parts = C.sdxl_components() | {"vae": C.sd_vae(levels=4)}
    pipe = LatentPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    reference = lllite_file(parts["unet"], tmp_path / "lllite-test.safetensors")
    image = random_images(1, 64)[0]
    kw = dict(seed=2, num_inference_steps=3, height=64, width=64, output_type="np")

    def run(**more):
        return pipe(PROMPT, **kw, **more).images

    plain = run()
    for weight in (1.0, 0.6):
        handles = lllite_reference_hooks(pipe.unet, reference, image, weight)
        try:
            expected = run()
        finally:
            for h in handles:
                h.remove()
        assert np.abs(expected - plain).max() > 1e-2  # the modules matter
        got = run(control=[Control(str(tmp_path / "lllite-test.safetensors"), image, weight)])
        assert np.abs(got - expected).max() <= 1e-5
    assert np.array_equal(run(), plain)  # the hooks are gone
    lllite = str(tmp_path / "lllite-test.safetensors")
    black, white = np.zeros((64, 64, 1), np.uint8), np.full((64, 64, 1), 255, np.uint8)
    assert np.array_equal(run(control=[Control(lllite, image, 0.6, mask=black)]), plain)  # a region mask: nowhere
    assert np.array_equal(run(control=[Control(lllite, image, 0.6, mask=white)]), got)  # everywhere
    off = run(control=[Control(str(tmp_path / "lllite-test.safetensors"), image, 1.0, start=0.9, end=1.0)])
    assert np.array_equal(off, plain)  # 3 steps: none inside [0.9, 1]

    sd1 = LatentPipeline(**C.sd1_components())
    with pytest.raises(UserError, match="cannot load the ControlNet-LLLite lllite-test.safetensors: .* U-Net"):
        sd1(PROMPT, control=[Control(str(tmp_path / "lllite-test.safetensors"), image)], num_inference_steps=1,
            height=64, width=64)


def test_a_units_hr_option_chooses_the_hires_passes_it_acts_in(nets, ours, monkeypatch):
    """A1111's `hr_option` ("Both", "Low res only", "High res only"): with the hires fix a unit acts in both passes,
    the first only or the second only; written into the infotext and read back; from the API by name or number."""
    from latentgen.generation import control as control_module
    from latentgen.generation.hires import Hires
    from latentgen.server.a1111 import control_units

    seen = []
    real = control_module.residuals

    def spy(active, progress, x_in, t, uncond_rows):
        seen.append((x_in.shape[-1], sum(isinstance(a, control_module.Active) for a in active)))
        return real(active, progress, x_in, t, uncond_rows)

    monkeypatch.setattr(control_module, "residuals", spy)
    image = random_images(1)[0]
    images = {}
    for hr in ("both", "low", "high"):
        seen.clear()
        images[hr] = ours(PROMPT, control=[Control(nets[0], image, 1.0, hr=hr)], hires=Hires(scale=2, steps=2),
                          seed=4, num_inference_steps=3, output_type="np").images
        small, large = min(s for s, _ in seen), max(s for s, _ in seen)
        acting = {size for size, units in seen if units}
        assert acting == {"both": {small, large}, "low": {small}, "high": {large}}[hr]
    assert np.abs(images["low"] - images["both"]).max() > 1e-3 and np.abs(images["high"] - images["both"]).max() > 1e-3

    unit = Control("canny_net", image, 0.5, hr="high").check()
    assert "Hr Option: High res only" in unit.text()
    assert Control.from_text(unit.text()).hr == "high"
    import base64
    import io

    png = io.BytesIO()
    image.save(png, format="PNG")
    b64 = base64.b64encode(png.getvalue()).decode()
    args = [{"model": "net", "image": b64, "hr_option": hr} for hr in ("Low res only", 2, "Both", None)]
    assert [u.hr for u in control_units({"controlnet": {"args": args}}, None, [])] == ["low", "high", "both", "both"]
    with pytest.raises(UserError, match=r"hr_option must be one of Both, Low res only, High res only \(or 0-2\)"):
        control_units({"controlnet": {"args": [{"model": "net", "image": "x", "hr_option": "Sometimes"}]}}, None, [])
    with pytest.raises(UserError, match="unknown control hr 'never'"):
        Control("net", image, hr="never").check()


def test_a_region_mask_limits_a_unit_to_where_it_is_white(nets, ours, tmp_path):
    """A1111's effective region mask: the unit's residuals times the mask resized to each (bilinear), as its
    extension applies it; white everywhere is no mask, black everywhere no unit; from the API as base64."""
    import base64
    import io

    import torch.nn.functional as F

    from latentgen.server.a1111 import control_units

    image = random_images(1)[0]
    left = np.zeros((32, 32), np.uint8)
    left[:, :16] = 255
    kw = dict(seed=3, num_inference_steps=3, output_type="np")

    def run(**unit):
        return ours(PROMPT, control=[Control(nets[0], image, 0.9, **unit)], **kw).images

    plain = ours(PROMPT, **kw).images
    masked = run(mask=Image.fromarray(left))
    m = torch.from_numpy(left / 255.0).float()[None, None]

    def by_mask(module, args, out):
        scaled = [r * F.interpolate(m, size=r.shape[-2:], mode="bilinear") for r in (*out[0], out[1])]
        return scaled[:-1], scaled[-1]

    handle = nets[0].register_forward_hook(by_mask)
    try:
        expected = run()
    finally:
        handle.remove()
    assert np.abs(masked - expected).max() <= 1e-5
    assert np.abs(masked - run()).max() > 1e-3 and np.abs(masked - plain).max() > 1e-3
    assert np.array_equal(run(mask=Image.new("L", (32, 32), 255)), run())
    assert np.array_equal(run(mask=np.zeros((32, 32, 1), np.uint8)), plain)
    left_png = tmp_path / "left.png"
    Image.fromarray(left).save(left_png)
    assert np.array_equal(run(mask=str(left_png)), masked)  # a path, as --control ...,mask=PATH gives it
    assert parse_flag(f"net:map.png:0.5,mask={left_png}").mask == str(left_png)

    png = io.BytesIO()
    Image.fromarray(left).save(png, format="PNG")
    b64 = base64.b64encode(png.getvalue()).decode()
    notes = []
    unit, = control_units({"controlnet": {"args": [{"model": "net", "image": b64, "effective_region_mask": b64}]}},
                          None, notes)
    assert np.array_equal(np.asarray(unit.mask.convert("L")), left) and not notes
    with pytest.raises(UserError, match="region mask /nowhere.png does not exist"):
        run(mask="/nowhere.png")
