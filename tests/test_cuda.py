"""On a CUDA GPU only (skipped elsewhere; `bash bench/gpu_kit.sh on-device` runs them first: README, "On a GPU"):
the paths that only CUDA takes give what the CPU's fp32 path gives. Half-precision weights with the fp16 VAE kept
in fp32, SDPA, `torch.compile`, and mixed-precision training through `accelerate launch`."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, with_free_port
from latentgen.generation.models import open_pipeline
from latentgen.runtime.device import set_attention

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPT = "a red circle on a blue background"


def images(pipe, **kw) -> np.ndarray:
    return pipe([PROMPT, "a green square"], num_inference_steps=4, seed=[1, 2], output_type="np", **kw).images


def test_auto_precision_is_half_on_cuda_and_an_fp16_vae_stays_fp32(tiny_folder):
    pipe = open_pipeline(tiny_folder, "auto", "cuda", embeddings_dir=None)
    half = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert pipe.unet.device.type == "cuda" and pipe.unet.dtype == half
    fp16 = open_pipeline(tiny_folder, "fp16", "cuda", embeddings_dir=None)
    assert fp16.unet.dtype == torch.float16 and fp16.vae.dtype == torch.float32  # SD's VAE overflows in fp16
    assert set_attention(fp16.unet, "auto", torch.device("cuda")) in ("sdpa", "xformers")


def test_a_pipeline_moved_to_cuda_leaves_the_cpus_channels_last_layout():
    """On CUDA, GroupNorm runs only in the contiguous layout, so channels-last would convert around each one."""
    import components as C
    from latentgen import LatentPipeline

    pipe = LatentPipeline(**(C.components() | {"unet": C.unet(sample_size=32)})).to(torch.bfloat16)
    assert not pipe.unet.conv_in.weight.is_contiguous()  # channels-last on the CPU (test_fast_path)
    pipe.to("cuda")
    assert pipe.unet.conv_in.weight.is_contiguous() and pipe.vae.decoder.conv_in.weight.is_contiguous()


@pytest.mark.parametrize("dtype, tolerance", [("fp32", 2e-3), ("fp16", 2e-2), ("bf16", 5e-2)])
def test_cuda_images_match_the_cpu_fp32_ones_for_the_same_seeds(tiny_folder, dtype, tolerance):
    """The starting noise is drawn on the CPU from the seeds, so a seed gives the same image on either device."""
    cpu = images(open_pipeline(tiny_folder, "fp32", "cpu", embeddings_dir=None))
    gpu = images(open_pipeline(tiny_folder, dtype, "cuda", embeddings_dir=None))
    assert np.isfinite(gpu).all() and gpu.shape == cpu.shape
    assert np.abs(gpu - cpu).mean() < tolerance, np.abs(gpu - cpu).mean()


@pytest.mark.parametrize("mode", ["default", None])  # None: CUDA graphs (reduce-overhead)
def test_compiled_unet_on_cuda_gives_the_eager_images(tiny_folder, mode):
    """CUDA graphs (reduce-overhead, the default on CUDA: 3.0× diffusers at one image per call on an H200, README):
    each replay overwrites the last one's output, so a pipeline that kept a U-Net output across steps would go
    wrong here; PNDM without guidance keeps the raw outputs."""
    pipe = open_pipeline(tiny_folder, "fp32", "cuda", embeddings_dir=None)
    eager = images(pipe)
    messages = []
    pipe.compile_unet(mode=mode, report=messages.append)
    assert pipe.vae.decoder._compiled_call_impl is not None  # the decoder too, in the default mode
    assert len(messages) == 1 and "compile on the first call" in messages[0]
    np.testing.assert_allclose(images(pipe), eager, atol=2e-3)
    np.testing.assert_allclose(images(pipe), eager, atol=2e-3)  # the second call replays what the first recorded
    # one fp32 image without guidance: the U-Net's output reaches PNDM as it is (but for sampling's copy)
    plms = dict(num_inference_steps=4, seed=1, guidance_scale=1.0, scheduler="pndm", output_type="np")
    compiled = pipe(PROMPT, **plms).images
    plain = open_pipeline(tiny_folder, "fp32", "cuda", embeddings_dir=None)(PROMPT, **plms).images
    np.testing.assert_allclose(compiled, plain, atol=2e-3)


def test_accelerate_launch_trains_in_mixed_precision_on_the_gpu(tmp_path):
    cmd = with_free_port([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
                          "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no",
                          str(ROOT / "train_unet.py"), "--config", str(ROOT / "configs" / "smoke.yaml"),
                          f"output_dir={tmp_path}", "max_steps=4", "checkpoint_every=100", "mixed_precision=auto"])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "mixed precision bf16" in r.stdout + r.stderr
    pipe = open_pipeline(tmp_path / "pipeline", "auto", "cuda", embeddings_dir=None)
    assert np.isfinite(images(pipe)).all()
