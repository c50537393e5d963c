"""The inference fast path: close to fp32, fp32 untouched by it, distributed generation covers every prompt once."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, infer_script, with_free_port
from latentgen import LatentPipeline
from latentgen.eval.analyzer import analyze
from latentgen.generation.models import DEFAULT_MODEL
from latentgen.runtime.precision import cpu_has_fast_bf16

PROMPTS = ["a red circle on a blue background", "a yellow square on a black background",
           "a green triangle on a white background", "a purple circle on a gray background"]

needs_default_model = pytest.mark.skipif(not (DEFAULT_MODEL / "model_index.json").exists(),
                                         reason="the default model is not shipped yet")


@needs_default_model
def test_auto_precision_stays_close_to_fp32_on_the_default_model():
    """bf16 keeps 8 bits of mantissa (relative error ≤ 2⁻⁸ per operation) in the U-Net and text encoder; the
    sampler runs in fp32. Over 20 steps that moves a pixel by 0.44/255 on average on the shipped model (0.30 to
    0.52 per image for these prompts; see the README), far below what changes what the image shows: we allow a
    mean absolute difference of 0.02 (5/255) and require the analyzer to read the same shapes and colors."""
    fast = LatentPipeline.from_pretrained(DEFAULT_MODEL)
    exact = LatentPipeline.from_pretrained(DEFAULT_MODEL, torch_dtype=torch.float32)
    if cpu_has_fast_bf16():
        assert fast.unet.dtype == torch.bfloat16
    kw = dict(num_inference_steps=20, scheduler="dpm++", seed=[1, 2, 3, 4])
    a = fast(PROMPTS, **kw).images
    b = exact(PROMPTS, **kw).images
    diff = np.mean([np.abs(np.asarray(x, float) - np.asarray(y, float)).mean() / 255 for x, y in zip(a, b)])
    assert diff < 0.02
    assert [analyze(x).words() for x in a] == [analyze(y).words() for y in b]


def test_fp32_is_the_parity_path_bit_for_bit(tiny_folder, tmp_path):
    """`infer.py --dtype fp32` makes exactly the image the fp32 pipeline (the one equal to diffusers) makes."""
    r = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--model", str(tiny_folder), "--prompt", PROMPTS[0],
                        "--steps", "4", "--seed", "11", "--dtype", "fp32", "--scheduler", "dpm++",
                        "--out", str(tmp_path / "a.png")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    pipe = LatentPipeline.from_pretrained(tiny_folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(PROMPTS[0], num_inference_steps=4, seed=11, scheduler="dpm++").images[0]
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(tmp_path / "a.png").convert("RGB")))


def test_prompt_cache_reuses_embeddings(tiny_pipe):
    calls = []
    forward = tiny_pipe.text_encoder.forward

    def spy(*a, **k):
        calls.append(1)
        return forward(*a, **k)

    tiny_pipe.text_encoder.forward = spy
    tiny_pipe(["a", "b", "a"], num_inference_steps=1, seed=0)
    assert len(calls) == 3  # "a", "b" and the empty negative prompt, each once
    tiny_pipe(["b", "a"], num_inference_steps=1, seed=0)
    assert len(calls) == 3


def test_prompts_file_is_split_across_two_processes(tiny_folder, tmp_path):
    """Two ranks share the run: each image written once, and without --seed one random seed (and variation seed)
    for the whole run, so image k gets seed + k on either rank and the grid finds every file."""
    from latentgen.formats.images import read_metadata

    prompts = [f"prompt number {i}" for i in range(5)]
    (tmp_path / "p.txt").write_text("\n".join(prompts))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "infer.py"), "--model", str(tiny_folder),
           "--prompts-file", str(tmp_path / "p.txt"), "--steps", "2", "--variation-strength", "0.5", "--grid",
           "--out", str(tmp_path / "out")]
    r = subprocess.run(with_free_port(cmd), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    files = sorted(p.name for p in (tmp_path / "out").glob("0*.png"))
    seed = int(files[0].split("-")[1])
    assert files == [f"{i:05d}-{seed + i}-prompt-number-{i}.png" for i in range(5)]
    variation = [read_metadata(tmp_path / "out" / name)["latentgen"]["variation_seed"] for name in files]
    assert variation == [variation[0] + i for i in range(5)]
    assert (tmp_path / "out" / "grid.png").is_file()
    written = [line for line in r.stdout.splitlines() if line.endswith(".png") and "grid" not in line]
    assert len(written) == 5 == len(set(written))  # each image written once, by one process
    shares = sorted(line for line in r.stderr.splitlines() if line.startswith("process "))
    assert shares == ["process 0 of 2 (MULTI_CPU, gloo): wrote 3 of 5 images",
                      "process 1 of 2 (MULTI_CPU, gloo): wrote 2 of 5 images"], r.stderr[-2000:]


def test_each_written_path_reaches_stdout_in_one_write(tiny_folder, tmp_path, monkeypatch):
    """Ranks share stdout; under PYTHONUNBUFFERED every write is its own system call, so a path and its newline
    written separately (tqdm.write, print) let another rank's path land between them (CI saw 'a.pngb.png')."""
    class Writes:
        def __init__(self):
            self.calls = []

        def write(self, text):
            self.calls.append(text)

        def flush(self):
            pass

    out = Writes()
    monkeypatch.setattr(sys, "stdout", out)
    written = infer_script().main(["--model", str(tiny_folder), "--prompt", "a", "--prompt", "b", "--steps", "1",
                          "--out", str(tmp_path / "out")])
    assert out.calls == [f"{path}\n" for path in written]


def test_the_layout_follows_the_device_and_precision_the_pipeline_is_moved_to():
    """channels-last where oneDNN's bf16 convolutions gain from it (the CPU, 32×32 latents or more), diffusers'
    contiguous layout in fp32; `to` chooses again, so a pipeline moved to CUDA leaves channels-last (test_cuda)."""
    import components as C

    pipe = LatentPipeline(**(C.components() | {"unet": C.unet(sample_size=32)}))

    def layouts():
        return {"unet": pipe.unet.conv_in.weight.is_contiguous(),
                "vae": pipe.vae.decoder.conv_in.weight.is_contiguous()}

    assert layouts() == {"unet": True, "vae": True}
    pipe.to(torch.bfloat16)
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert layouts() == {"unet": False, "vae": False}
    pipe.to(torch.float32)
    assert layouts() == {"unet": True, "vae": True}
    small = LatentPipeline(**C.components()).to(torch.bfloat16)  # 16×16 latents: slower channels-last
    assert small.unet.conv_in.weight.is_contiguous()


def test_vae_tiling_matches_the_whole_decode_without_seams_and_the_guard_counts_it(tiny_pipe):
    """diffusers' VAE tiling (`--vae-tiling`) on a latent four tiles wide: close to the whole decode, no seam
    sharper than the image's other edges, and the memory guard counts one tile's decode, not the whole image's."""
    from latentgen.runtime.memory import sampling_bytes

    vae = tiny_pipe.vae
    torch.manual_seed(0)
    latents = torch.randn(1, 4, 64, 64) * 0.5  # 128×128 pixels; tiles of 32 (16 latents)
    with torch.no_grad():
        whole = tiny_pipe.decode(latents)
        before = sampling_bytes(tiny_pipe.unet, vae, 1024, 1024, 1, guided=False)
        vae.enable_tiling()
        tiled = tiny_pipe.decode(latents)
        after = sampling_bytes(tiny_pipe.unet, vae, 1024, 1024, 1, guided=False)
        vae.disable_tiling()
    assert tiled.shape == whole.shape == (1, 3, 128, 128)
    # Each tile normalises its own groups: a random tiny VAE differs by ~15% of the signal (unrelated image: ~140%).
    assert (tiled - whole).abs().mean() < 0.25 * whole.abs().mean()
    # The error jumps at no column or row boundary: blended seams ≤1.9× the median jump, unblended 3-3.7×.
    for axis in (-1, -2):
        jump = (tiled - whole).diff(dim=axis).abs().mean(dim=tuple(d for d in range(4) if d != axis % 4))
        assert jump.max() < 2.5 * jump.median()
    assert after < before


def test_attention_slicing_keeps_the_image_and_the_guard_counts_one_slice_of_scores(tiny_pipe):
    """`--attention-slicing` (diffusers' sliced processor): the same image within float error, and the guard's
    estimate between SDPA's (no scores kept) and the plain kernel's (every head's scores at once)."""
    from diffusers.models.attention_processor import AttnProcessor

    from latentgen.runtime.memory import sampling_bytes

    def run():
        return tiny_pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                         output_type="pt").images

    def need():
        return sampling_bytes(tiny_pipe.unet, tiny_pipe.vae, 512, 512, 2, guided=True)

    whole, sdpa = run(), need()
    tiny_pipe.enable_attention_slicing(1)
    sliced, sliced_need = run(), need()
    tiny_pipe.unet.set_attn_processor(AttnProcessor())
    plain = need()
    tiny_pipe.disable_attention_slicing()
    torch.testing.assert_close(sliced, whole, atol=1e-4, rtol=1e-4)
    assert sdpa < sliced_need < plain


def test_infer_and_serve_flags_turn_on_vae_tiling_and_attention_slicing(tiny_folder):
    from infer import parse_args
    from latentgen.generation.models import open_pipeline

    args = parse_args(["--prompt", "x", "--vae-tiling", "--attention-slicing"])
    pipe = open_pipeline(tiny_folder, vae_tiling=args.vae_tiling, attention_slicing=args.attention_slicing)
    processors = {type(p).__name__ for p in pipe.unet.attn_processors.values()}
    assert pipe.vae.use_tiling and processors == {"SlicedAttnProcessor"}
    plain = open_pipeline(tiny_folder)
    assert not plain.vae.use_tiling and "SlicedAttnProcessor" not in {type(p).__name__ for p in
                                                                      plain.unet.attn_processors.values()}


def test_attention_processor_signatures_are_cached_as_themselves(tiny_pipe):
    """diffusers' Attention.forward reads its processor's signature on every call; `to` stores it once."""
    import inspect

    tiny_pipe.to("cpu")
    for cls in {type(p) for p in tiny_pipe.unet.attn_processors.values()}:
        cached = cls.__call__.__dict__["__signature__"]
        del cls.__call__.__signature__
        assert cached == inspect.signature(cls.__call__)
        cls.__call__.__signature__ = cached
    assert tiny_pipe.execution_device == torch.device("cpu")
