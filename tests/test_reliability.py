"""Nothing lost, nothing executed: untrusted files, crash-safe writes, the numerics guard, determinism."""

import logging
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from latentgen import LatentPipeline
from latentgen.cli import run_cli
from latentgen.errors import UserError
from latentgen.io import atomic_file, save_image


class Payload:
    """Unpickling this runs a shell command: what a malicious .bin/.ckpt can do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_code_is_refused_and_never_runs(tiny_folder, tmp_path):
    folder = tmp_path / "evil"
    shutil.copytree(tiny_folder, folder)
    marker = tmp_path / "pwned"
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps({"x": Payload(marker)}))
    with pytest.raises(UserError, match="is a pickle file, which can run code.*--allow-pickle"):
        LatentPipeline.from_pretrained(folder)
    # even when allowed, pickles are read with torch.load(weights_only=True): the payload is rejected, not run
    with pytest.raises(UserError, match="cannot load the model"):
        LatentPipeline.from_pretrained(folder, allow_pickle=True)
    assert not marker.exists()


def test_an_interrupted_image_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "a.png"
    save_image(Image.new("RGB", (8, 8), "red"), path)
    with pytest.raises(KeyboardInterrupt):
        with atomic_file(path) as tmp:
            tmp.write_bytes(b"\x89PNG half of a new ima")
            raise KeyboardInterrupt
    assert Image.open(path).getpixel((0, 0)) == (255, 0, 0)
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]  # no temporary left behind


def test_a_full_disk_is_reported_in_one_line(tiny_folder, tmp_path, capsys, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("infer_script", ROOT / "infer.py")
    infer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(infer)

    def full(self, fp, *a, **k):
        raise OSError(28, "No space left on device", str(fp))

    monkeypatch.setattr(Image.Image, "save", full)
    code = run_cli(infer.main, ["--model", str(tiny_folder), "--prompt", "x", "--steps", "2",
                                "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: the disk is full") and err.count("\n") == 1
    assert not list((tmp_path / "out").glob("*"))  # nothing half-written


def _nan_in(monkeypatch, module, dtype):
    """Make `module`'s class give NaN outputs while its weights are in `dtype` (the pipeline retries on fp32
    copies, which the patch reaches through the class)."""
    cls = type(module)
    forward = cls.forward

    def broken(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if next(self.parameters()).dtype == dtype:
            out = (out[0] * float("nan"),) if isinstance(out, tuple) else out
            if hasattr(out, "sample"):
                out.sample = out.sample * float("nan")
        return out

    monkeypatch.setattr(cls, "forward", broken)


def test_nan_latents_trigger_a_fp32_retry(tiny_pipe, caplog, monkeypatch):
    reference = tiny_pipe("a red circle", num_inference_steps=3, seed=5, output_type="np").images
    tiny_pipe.to(torch.bfloat16)
    _nan_in(monkeypatch, tiny_pipe.unet, torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="latentgen"):
        out = tiny_pipe("a red circle", num_inference_steps=3, seed=5, output_type="np")
    assert "NaN/Inf in the latents sampled in bfloat16; sampling again in fp32" in caplog.text
    assert out.info["fp32_retry"] == "unet" and np.isfinite(out.images).all()
    np.testing.assert_allclose(out.images, reference, atol=2e-2)  # the fp32 U-Net, a bf16 VAE
    assert tiny_pipe.unet.dtype == torch.bfloat16  # the shared pipeline itself was never converted


def test_a_nan_decode_triggers_a_fp32_vae_retry(tiny_pipe, caplog, monkeypatch):
    from diffusers import AutoencoderKL

    tiny_pipe.vae.to(torch.bfloat16)
    decode = AutoencoderKL.decode

    def broken(self, z, *a, **k):
        out = decode(self, z, *a, **k)
        return (out[0] * float("nan"),) if self.dtype == torch.bfloat16 else out

    monkeypatch.setattr(AutoencoderKL, "decode", broken)
    with caplog.at_level(logging.WARNING, logger="latentgen"):
        out = tiny_pipe("x", num_inference_steps=2, seed=0, output_type="np")
    assert "decoding again in fp32" in caplog.text and out.info["fp32_retry"] == "vae"
    assert np.isfinite(out.images).all()
    assert tiny_pipe.vae.dtype == torch.bfloat16


@pytest.mark.parametrize("force_upcast", [True, False])
def test_an_fp16_vae_runs_in_fp32_unless_its_config_says_it_was_made_for_fp16(tiny_pipe, tmp_path, force_upcast):
    """diffusers' `force_upcast` (true by default; false in fp16-fixed VAEs): an fp16 load keeps such a VAE in fp16,
    and its image is the fp32 VAE's within fp16 rounding."""
    tiny_pipe.vae.register_to_config(force_upcast=force_upcast)
    tiny_pipe.save_pretrained(tmp_path / "p")
    half = LatentPipeline.from_pretrained(tmp_path / "p", torch_dtype=torch.float16)
    assert half.unet.dtype == torch.float16
    assert half.vae.dtype == (torch.float32 if force_upcast else torch.float16)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    full = LatentPipeline.from_pretrained(tmp_path / "p", torch_dtype=torch.float32)
    with torch.no_grad():
        np.testing.assert_allclose(half.decode(z).float().numpy(), full.decode(z).numpy(), atol=1e-2)


def test_nan_even_in_fp32_is_an_error(tiny_pipe, monkeypatch):
    _nan_in(monkeypatch, tiny_pipe.unet, torch.float32)
    with pytest.raises(UserError, match="NaN/Inf latents even in fp32"):
        tiny_pipe("x", num_inference_steps=2, seed=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_seed_same_image_bit_for_bit_whatever_the_batch(tiny_folder, dtype):
    pipe = LatentPipeline.from_pretrained(tiny_folder, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red circle", "a blue square", "a green triangle"]
    kwargs = dict(num_inference_steps=4, output_type="np", scheduler="euler-a")
    batch = pipe(prompts, seed=[7, 8, 9], **kwargs).images
    again = pipe(prompts, seed=[7, 8, 9], **kwargs).images
    alone = pipe(prompts[1], seed=8, **kwargs).images
    pair = pipe([prompts[2], prompts[1]], seed=[9, 8], **kwargs).images
    np.testing.assert_array_equal(batch, again)
    np.testing.assert_array_equal(batch[1], alone[0])
    np.testing.assert_array_equal(batch[1], pair[1])


def test_infer_twice_gives_the_same_file(tiny_folder, tmp_path):
    for name in ("a.png", "b.png"):
        r = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--model", str(tiny_folder), "--prompt", "x",
                            "--steps", "3", "--seed", "3", "--out", str(tmp_path / name)],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))


# ---- faults: SIGKILL at random moments, file modes ---------------------------------------------------------

def _kill_repeatedly(script: str, args: list[str], done, attempts: int = 4, seed: int = 0):
    """Run `script` (a loop of writes) and SIGKILL it at random moments once `done()` shows it is writing."""
    import random
    import time

    rng = random.Random(seed)
    for _ in range(attempts):
        proc = subprocess.Popen([sys.executable, "-c", script, *args], cwd=ROOT, env={**os.environ,
                                "OMP_NUM_THREADS": "1"})
        deadline = time.time() + 120
        while not done() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))
        proc.kill()
        proc.wait()


def test_sigkill_during_save_pretrained_leaves_a_complete_folder_or_none(tiny_folder, tmp_path):
    script = ("import sys; from latentgen import LatentPipeline;"
              "pipe = LatentPipeline.from_pretrained(sys.argv[1], torch_dtype='auto');"
              "[pipe.save_pretrained(sys.argv[2]) for _ in range(1000)]")
    target = tmp_path / "saved"
    _kill_repeatedly(script, [str(tiny_folder), str(target)], lambda: target.exists())
    assert target.is_dir()
    LatentPipeline.from_pretrained(target)  # complete: every weight and config loads
    hidden = [p.name for p in tmp_path.iterdir() if p.name != "saved"]
    assert all(name.startswith(".") for name in hidden)  # temporaries and the old copy are hidden, never `saved`


def test_sigkill_during_image_writing_leaves_only_whole_images(tmp_path):
    script = ("import sys, numpy as np; from PIL import Image; from latentgen.io import save_image;"
              "rng = np.random.default_rng(0);"
              "[save_image(Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)),"
              " f'{sys.argv[1]}/{i % 3}.png') for i in range(100000)]")
    _kill_repeatedly(script, [str(tmp_path)], lambda: any(tmp_path.glob("*.png")))
    images = sorted(tmp_path.glob("*.png"))
    assert images
    for path in images:
        with Image.open(path) as im:
            im.load()  # a truncated PNG raises here
            assert im.size == (512, 512)


def test_written_files_follow_the_umask(tiny_pipe, tmp_path):
    old = os.umask(0o022)
    try:
        save_image(Image.new("RGB", (8, 8)), tmp_path / "a.png")
        tiny_pipe.save_pretrained(tmp_path / "model")
        from latentgen.formats.checkpoint import save_checkpoint

        save_checkpoint(tmp_path / "run", 1, {"unet": torch.nn.Linear(2, 2)}, {}, keep=1)
        os.umask(0o077)
        save_image(Image.new("RGB", (8, 8)), tmp_path / "private.png")
    finally:
        os.umask(old)
    assert (tmp_path / "a.png").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "private.png").stat().st_mode & 0o777 == 0o600
    for path in [tmp_path / "model", tmp_path / "run" / "checkpoints", *(tmp_path / "model").rglob("*"),
                 *(tmp_path / "run").rglob("*")]:
        assert path.stat().st_mode & 0o777 == (0o755 if path.is_dir() else 0o644), path


def test_a_full_disk_during_save_pretrained_leaves_nothing(tiny_pipe, tmp_path, monkeypatch):
    import safetensors.torch

    real = safetensors.torch.save_file

    def full(tensors, filename, *args, **kwargs):
        if "unet" in str(filename):
            raise OSError(28, "No space left on device", str(filename))
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError) as err:
        tiny_pipe.save_pretrained(tmp_path / "model")
    assert err.value.errno == 28
    assert list(tmp_path.iterdir()) == []  # no folder, no temporary


def test_one_pipeline_serves_concurrent_callers(tiny_pipe):
    """Threads sharing a pipeline (as a server's workers do) get exactly the images they would get alone."""
    from concurrent.futures import ThreadPoolExecutor

    requests = [dict(prompt=f"a {color} circle", seed=k, num_inference_steps=3, output_type="np",
                     guidance_scale=[1.0, 7.5][k % 2], scheduler=["ddim", "euler-a", "dpm++"][k % 3])
                for k, color in enumerate(["red", "green", "blue", "yellow", "purple", "orange"])]
    alone = [tiny_pipe(**r).images for r in requests]
    tiny_pipe.clear_prompt_cache()
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda r: tiny_pipe(**r).images, requests))
    for a, b in zip(alone, together):
        np.testing.assert_array_equal(a, b)
