"""Hires fix (A1111's, with one model): generate, upscale (latents or pixels), image-to-image at the larger size."""


import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from conftest import infer
from latentgen.generation.infotext import parse_a1111_parameters


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.mark.parametrize("upscaler, a1111_name", [("latent", "Latent"), ("lanczos", "Lanczos")])
def test_hires_fix_doubles_the_size_writes_a1111_fields_and_replays(tiny_folder, tmp_path, upscaler, a1111_name):
    r = infer("--model", tiny_folder, "--prompt", "a red circle", "--steps", 3, "--seed", 5, "--hires-scale", 2,
              "--hires-steps", 2, "--hires-denoise", 0.6, "--hires-upscaler", upscaler, "--out", tmp_path / "h.png")
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "h.png").size == (64, 64)
    _, _, fields = parse_a1111_parameters(Image.open(tmp_path / "h.png").info["parameters"])
    assert (fields["Size"], fields["Steps"], fields["Hires upscale"], fields["Hires steps"],
            fields["Hires upscaler"], fields["Denoising strength"]) == ("32x32", "3", "2", "2", a1111_name, "0.6")
    r = infer("--replay", tmp_path / "h.png")
    assert r.returncode == 0 and "identical, bit for bit" in r.stdout, r.stderr
    r = infer("--model", tiny_folder, "--prompt", "a red circle", "--steps", 3, "--seed", 5, "--out",
              tmp_path / "base.png")
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "base.png").size == (32, 32)


def test_an_a1111_png_with_hires_fields_replays_as_the_same_hires_run(tiny_folder, tmp_path):
    info = PngInfo()
    info.add_text("parameters", "a blue square\nSteps: 3, Sampler: Euler a, CFG scale: 5, Seed: 11, Size: 32x32, "
                                "Denoising strength: 0.5, Hires upscale: 2, Hires steps: 2, Hires upscaler: Latent")
    Image.new("RGB", (64, 64)).save(tmp_path / "a1111.png", pnginfo=info)
    r = infer("--model", tiny_folder, "--replay", tmp_path / "a1111.png", "--out", tmp_path / "replayed.png")
    assert r.returncode == 0, r.stderr
    assert "ignored AUTOMATIC1111 fields" not in r.stderr
    r = infer("--model", tiny_folder, "--prompt", "a blue square", "--steps", 3, "--scheduler", "euler-a",
              "--guidance", 5, "--seed", 11, "--hires-scale", 2, "--hires-steps", 2, "--hires-denoise", 0.5,
              "--out", tmp_path / "direct.png")
    assert r.returncode == 0, r.stderr
    assert np.array_equal(pixels(tmp_path / "replayed.png"), pixels(tmp_path / "direct.png"))


@pytest.mark.parametrize("args, message", [
    (["--hires-scale", "1"], "--hires-scale must be in (1, 8]"),
    (["--hires-scale", "2", "--hires-denoise", "0"], "--hires-denoise must be in (0, 1]"),
    (["--hires-scale", "2", "--hires-steps", "-1"], "--hires-steps must be an integer ≥ 1"),
    (["--hires-scale", "2", "--image", "IMAGE"], "--hires-scale is for text-to-image"),
    (["--hires-scale", "2", "--hires-upscaler", "esrgan"], "invalid choice: 'esrgan'"),
])
def test_bad_hires_flags(tiny_folder, tmp_path, args, message):
    Image.new("RGB", (32, 32)).save(tmp_path / "in.png")
    args = [str(tmp_path / "in.png") if a == "IMAGE" else a for a in args]
    r = infer("--model", tiny_folder, "--prompt", "x", "--out", tmp_path / "out", *args)
    assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "out").exists()
