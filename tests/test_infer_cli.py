"""infer.py end to end: images written and named, bad input answered in one line with exit code 2."""


import numpy as np
import pytest
from PIL import Image

from conftest import infer


def test_writes_every_image_and_prints_paths(tiny_folder, tmp_path):
    out = tmp_path / "imgs"
    r = infer("--model", tiny_folder, "--prompt", "a red circle", "--prompt", "a blue square", "--num-images", 2,
              "--steps", 3, "--seed", 10, "--out", out, "--scheduler", "dpm++", "--batch-size", 3,
              "--dtype", "fp32")
    assert r.returncode == 0, r.stderr
    files = sorted(out.iterdir())
    assert [f.name for f in files] == ["00000-10-a-red-circle.png", "00001-11-a-red-circle.png",
                                       "00002-12-a-blue-square.png", "00003-13-a-blue-square.png"]
    assert r.stdout.split() == [str(f) for f in files]
    assert Image.open(files[0]).size == (32, 32)
    # image 3 (seed 13) does not depend on how the run was batched
    single = tmp_path / "single.png"
    r = infer("--model", tiny_folder, "--prompt", "a blue square", "--steps", 3, "--seed", 13, "--out", single,
              "--scheduler", "dpm++", "--dtype", "fp32")
    assert r.returncode == 0, r.stderr
    a, b = (np.asarray(Image.open(p), dtype=int) for p in (files[3], single))
    assert np.abs(a - b).max() <= 1


def test_prompts_file(tiny_folder, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\na red circle\n\na green triangle\n")
    r = infer("--model", tiny_folder, "--prompts-file", prompts, "--steps", 2, "--seed", 0, "--out",
              tmp_path / "o", "--guidance", 1.0)
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "o").glob("*.png"))) == 2


@pytest.mark.parametrize("args, message", [
    (["--scheduler", "fancy"], "invalid choice: 'fancy'"),
    (["--height", 33], "height must be a positive multiple of 2"),
    (["--steps", 0], "--steps must be an integer ≥ 1"),
    (["--guidance", -2], "--guidance must be a finite number ≥ 0"),
    (["--negative-prompt", "a", "--negative-prompt", "b"], "got 1 prompts and 2 negative prompts"),
    (["--steps", "many"], "invalid int value: 'many'"),
    (["--dtype", "fp8"], "invalid choice: 'fp8'"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny_folder, tmp_path, args, message):
    out = tmp_path / "out"
    r = infer("--model", tiny_folder, "--prompt", "x", "--out", out, *args)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert message in r.stderr and r.stderr.startswith("error: ")
    assert "Traceback" not in r.stderr
    assert not out.exists()


def test_model_folder_errors(tiny_folder, tmp_path):
    r = infer("--model", tmp_path / "missing", "--prompt", "x", "--out", tmp_path / "o")
    assert r.returncode == 2 and "does not exist" in r.stderr and r.stderr.count("\n") == 1
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text("{}")
    r = infer("--model", broken, "--prompt", "x", "--out", tmp_path / "o")
    assert r.returncode == 2 and "missing the component 'unet'" in r.stderr
    assert not (tmp_path / "o").exists()
