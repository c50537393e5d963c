"""What other Stable Diffusion tools read and write: A1111's parameters text (quoting, model hash, JPEG/WebP EXIF),
replay of a PNG made by AUTOMATIC1111 itself."""

import hashlib
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from conftest import infer
from latentgen.errors import UserError
from latentgen.generation.infotext import a1111_request, parse_a1111_parameters, quote
from latentgen.io import model_hash

# A1111 1.10's own infotext for one image (its `parameters` PNG chunk), with fields latentgen has no use for.
A1111_TEXT = ("a red circle, (sharp:1.2)\nNegative prompt: blurry, ugly\n"
              "Steps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6, Seed: 1234, Size: 32x32, "
              'Model hash: 0123456789, Model: "sd15, pruned", ADetailer model: face_yolov8n.pt, '
              "Face restoration: CodeFormer, Version: v1.10.1")


def test_quote_and_parse_follow_a1111():
    assert quote("plain") == "plain" and quote(7.5) == "7.5"
    assert quote("a, b") == '"a, b"' and quote("k: v") == '"k: v"' and quote('say "x", y') == '"say \\"x\\", y"'
    prompt, negative, fields = parse_a1111_parameters(A1111_TEXT)
    assert prompt == "a red circle, (sharp:1.2)" and negative == "blurry, ugly"
    assert fields["Model"] == "sd15, pruned" and fields["Size"] == "32x32" and fields["Schedule type"] == "Karras"


def test_a1111_settings_map_to_ours():
    settings, fields, unused = a1111_request(A1111_TEXT)
    assert settings == {"prompt": "a red circle, (sharp:1.2)", "negative_prompt": "blurry, ugly",
                        "num_inference_steps": 3, "guidance_scale": 6.0, "seed": 1234, "width": 32, "height": 32,
                        "scheduler": "dpm++-karras"}
    assert unused == ["ADetailer model", "Face restoration"]
    old_style, _, _ = a1111_request("x\nSteps: 5, Sampler: Euler a, CFG scale: 7, Seed: 1, Clip skip: 2")
    assert old_style["scheduler"] == "euler-a" and old_style["clip_skip"] == 1
    with pytest.raises(UserError, match="sampler 'DPM2 a' has no latentgen counterpart; known: "):
        a1111_request("x\nSteps: 5, Sampler: DPM2 a, CFG scale: 7, Seed: 1")
    portrait, _, _ = a1111_request("x\nSteps: 5, Seed: 1, Size: 512x768")
    assert (portrait["width"], portrait["height"]) == (512, 768)
    unreadable = r"^the AUTOMATIC1111 parameters hold a value latentgen cannot read: "
    size = r"Size must be WIDTHxHEIGHT in pixels \(e.g. 512x768\), got '512'$"
    with pytest.raises(UserError, match=unreadable + size):
        a1111_request("x\nSteps: 5, Seed: 1, Size: 512")
    with pytest.raises(UserError, match=unreadable + "invalid literal for int"):
        a1111_request("x\nSteps: five, Seed: 1, Size: 64x64")


def test_model_hash_is_a1111s_for_files_and_ten_digits_for_folders(tiny_folder, tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"weights" * 1000)
    assert model_hash(f) == hashlib.sha256(f.read_bytes()).hexdigest()[:10]
    assert len(model_hash(tiny_folder)) == 10


def test_values_with_commas_are_quoted_in_written_parameters(tiny_folder, tmp_path):
    model = tmp_path / "my, model"
    shutil.copytree(tiny_folder, model)
    r = infer("--model", model, "--prompt", "x", "--steps", 2, "--seed", 3, "--out", tmp_path / "a.png")
    assert r.returncode == 0, r.stderr
    _, _, fields = parse_a1111_parameters(Image.open(tmp_path / "a.png").info["parameters"])
    assert fields["Model"] == "my, model" and fields["Model hash"] == model_hash(tiny_folder)
    assert fields["Seed"] == "3" and fields["Version"].startswith("latentgen ")


@pytest.mark.parametrize("suffix", [".jpg", ".webp"])
def test_jpeg_and_webp_carry_the_parameters_in_exif_as_a1111_does(tiny_folder, tmp_path, suffix):
    out = tmp_path / f"a{suffix}"
    r = infer("--model", tiny_folder, "--prompt", "a blue square", "--steps", 2, "--seed", 9, "--out", out)
    assert r.returncode == 0, r.stderr
    raw = Image.open(out).getexif().get_ifd(0x8769)[0x9286]  # Exif IFD, UserComment
    assert raw[:8] == b"UNICODE\0"  # piexif.helper.UserComment.dump(..., encoding="unicode"), as A1111 writes it
    text = raw[8:].decode("utf-16-be")
    assert text.startswith("a blue square\nSteps: 2, Sampler: ") and "Seed: 9" in text
    r = infer("--model", tiny_folder, "--replay", out, "--out", tmp_path / "again.png")
    assert r.returncode == 0, r.stderr
    assert "replayed the AUTOMATIC1111 parameters" in r.stdout and (tmp_path / "again.png").is_file()


def test_replay_of_an_a1111_png_makes_the_image_its_settings_describe(tiny_folder, tmp_path):
    info = PngInfo()
    info.add_text("parameters", A1111_TEXT)
    Image.new("RGB", (32, 32)).save(tmp_path / "a1111.png", pnginfo=info)
    r = infer("--model", tiny_folder, "--replay", tmp_path / "a1111.png", "--out", tmp_path / "replayed.png")
    assert r.returncode == 0, r.stderr
    assert "ignored AUTOMATIC1111 fields: ADetailer model, Face restoration" in r.stderr
    assert "model hash 0123456789" in r.stderr  # another model made it: said, not fatal
    r = infer("--model", tiny_folder, "--prompt", "a red circle, (sharp:1.2)", "--negative-prompt", "blurry, ugly",
              "--steps", 3, "--scheduler", "dpm++-karras", "--guidance", 6, "--seed", 1234, "--height", 32,
              "--width", 32, "--out", tmp_path / "direct.png")
    assert r.returncode == 0, r.stderr
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png").convert("RGB")) for n in ("replayed", "direct"))
    assert np.array_equal(a, b)
    meta = json.loads(Image.open(tmp_path / "replayed.png").info["latentgen"])
    assert meta["scheduler"] == "dpm++-karras" and meta["seed"] == 1234


def test_an_image_with_older_latentgen_json_replays_from_its_a1111_text(tiny_folder, tmp_path):
    """Images written before the metadata used Request's names ('steps', 'guidance') fall back to their A1111
    parameters, which carry the same settings, and come out the same."""
    r = infer("--model", tiny_folder, "--prompt", "a red circle", "--steps", 3, "--seed", 7, "--scheduler", "euler-a",
              "--out", tmp_path / "new.png")
    assert r.returncode == 0, r.stderr
    im = Image.open(tmp_path / "new.png")
    meta = json.loads(im.info["latentgen"])
    meta["steps"], meta["guidance"] = meta.pop("num_inference_steps"), meta.pop("guidance_scale")
    info = PngInfo()
    info.add_text("parameters", im.info["parameters"])
    info.add_text("latentgen", json.dumps(meta))
    im.save(tmp_path / "old.png", pnginfo=info)
    r = infer("--model", tiny_folder, "--replay", tmp_path / "old.png", "--out", tmp_path / "again.png")
    assert r.returncode == 0 and "replayed the AUTOMATIC1111 parameters" in r.stdout, r.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png")), np.asarray(Image.open(tmp_path / "new.png")))
