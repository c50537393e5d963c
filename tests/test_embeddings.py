"""Textual inversion: A1111's and diffusers' embedding files give the image diffusers gives, by file name in a prompt
through infer.py's embeddings folder, with A1111's TI hashes; bad files are one-line errors."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import save_file

from conftest import infer
from latentgen import LatentPipeline
from latentgen.errors import UserError
from latentgen.formats.embeddings import load


@pytest.fixture(scope="module")
def vectors():
    torch.manual_seed(3)
    return torch.randn(2, 32) * 2  # a 2-vector embedding for the tiny 32-wide CLIP text encoder


def images(pipe, prompt, **kw):
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, num_inference_steps=3, generator=torch.Generator().manual_seed(2), output_type="np",
                **kw).images


@pytest.mark.parametrize("form", ["a1111", "diffusers"])
def test_an_embedding_gives_diffusers_image(tiny_folder, tmp_path, vectors, form):
    path = tmp_path / "shiny.safetensors"
    save_file({"emb_params": vectors} if form == "a1111" else {"shiny": vectors}, str(path))
    ours = LatentPipeline.from_pretrained(tiny_folder, torch_dtype=torch.float32)
    before = images(ours, "a shiny circle")
    assert load(ours, path) == "shiny"
    sd = StableDiffusionPipeline.from_pretrained(tiny_folder, local_files_only=True)
    sd.load_textual_inversion(vectors, token="shiny")
    with_embedding = images(ours, "a shiny circle")
    assert np.abs(with_embedding - before).max() > 0.01  # the word means the embedding now
    assert np.abs(with_embedding - images(sd, "a shiny circle")).max() <= 1e-4
    assert np.abs(images(ours, "a red circle") - images(sd, "a red circle")).max() <= 1e-4


def test_infer_loads_the_folder_and_writes_ti_hashes(tiny_folder, tmp_path, vectors):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    save_file({"emb_params": vectors}, str(folder / "shiny.safetensors"))
    r = infer("--model", tiny_folder, "--prompt", "a shiny circle", "--steps", 3, "--seed", 1, "--embeddings-dir",
              folder, "--out", tmp_path / "a.png")  # in this process, as the other infer tests
    assert r.returncode == 0, r.stderr
    from latentgen.formats.lora import short_hash

    assert f"TI hashes: \"shiny: {short_hash(folder / 'shiny.safetensors')}\"" in \
        Image.open(tmp_path / "a.png").info["parameters"]
    r = infer("--replay", tmp_path / "a.png", "--embeddings-dir", folder)
    assert r.returncode == 0 and "identical, bit for bit" in r.stdout, r.stderr


def test_bad_embeddings_are_one_line_errors(tiny_folder, tmp_path):
    pipe = LatentPipeline.from_pretrained(tiny_folder, torch_dtype=torch.float32)
    wide = tmp_path / "wide.safetensors"
    save_file({"emb_params": torch.zeros(1, 768)}, str(wide))
    several = tmp_path / "several.safetensors"
    save_file({"a": torch.zeros(1, 32), "b": torch.zeros(1, 32)}, str(several))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00")
    pickle = tmp_path / "old.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, 32)}}, pickle)
    taken = tmp_path / "circle.safetensors"
    save_file({"emb_params": torch.zeros(1, 32)}, str(taken))
    for path, message in [(wide, "width 768 but this model's text encoder takes 32"),
                          (several, "is not a textual-inversion embedding"), (corrupt, "is corrupt or truncated"),
                          (pickle, "is not a .safetensors file"), (taken, "is already in the tokenizer")]:
        with pytest.raises(UserError, match=message) as err:
            load(pipe, path)
        assert "\n" not in str(err.value)
