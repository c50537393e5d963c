"""The CPU's ahead-of-time compiled U-Net (latentgen.runtime.compiled): same predictions as the U-Net, compiled once and
then loaded from the cache, never serving weights the U-Net no longer has."""

import logging

import numpy as np
import torch
from PIL import Image

from conftest import infer
from latentgen import LatentPipeline
from latentgen.runtime.compiled import CompiledForward

PROMPT = "a red circle on a blue background"


def unet_inputs(pipe, rows: int = 2):
    torch.manual_seed(0)
    x = torch.randn(rows, 4, 16, 16)
    hidden, _ = pipe.encode_prompts([PROMPT] * rows)
    return x, torch.tensor(500), hidden


def test_compiled_unet_predicts_as_the_unet_and_is_compiled_once(tiny_folder, tmp_path, monkeypatch):
    """Compiled in this process, then loaded from the cache by `infer.py --compile`, whose image is the uncompiled
    one's; the compiled prediction matches the U-Net's to float rounding."""
    monkeypatch.setenv("LATENTGEN_CACHE", str(tmp_path / "cache"))
    pipe = LatentPipeline.from_pretrained(tiny_folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    x, t, hidden = unet_inputs(pipe)
    with torch.no_grad():
        eager = pipe.unet(x, t, encoder_hidden_states=hidden).sample
        messages = []
        pipe.compile_unet(report=messages.append)
        assert isinstance(pipe.unet.forward, CompiledForward)
        compiled = pipe.unet(x, t, encoder_hidden_states=hidden).sample
        assert pipe.unet(x, t, encoder_hidden_states=hidden, return_dict=False)[0].shape == compiled.shape
    assert torch.allclose(compiled, eager, atol=1e-4), (compiled - eager).abs().max()
    assert not torch.equal(compiled, torch.zeros_like(compiled))
    assert len(messages) == 2 and messages[1].startswith("compiled the U-Net for 2×4×16×16 latents in ")
    assert [p.suffix for p in (tmp_path / "cache" / "compiled").iterdir()] == [".pt2"]

    r = infer("--model", tiny_folder, "--prompt", PROMPT, "--steps", "3", "--seed", "5", "--dtype", "fp32",
              "--compile", "--out", tmp_path / "compiled.png")
    assert r.returncode == 0, r.stderr
    assert "loaded the compiled U-Net from the cache for 2×4×16×16 latents in" in r.stderr
    assert "compiling" not in r.stderr
    assert len(list((tmp_path / "cache" / "compiled").iterdir())) == 1
    r = infer("--model", tiny_folder, "--prompt", PROMPT, "--steps", "3", "--seed", "5", "--dtype", "fp32",
              "--out", tmp_path / "eager.png")
    assert r.returncode == 0, r.stderr
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=int) for n in ("compiled", "eager"))
    assert np.abs(a - b).max() <= 1


def test_compiled_unet_follows_changed_weights(tiny_pipe, tmp_path, monkeypatch, caplog):
    """A package is never used for weights it was not compiled with: weights changed in place get a package of
    their own (here the compiler is a stand-in whose packages answer 7), a failed compile runs the U-Net itself with
    a warning, LoRA layers that are not fused (their scales are read at run time) and gradients run it as well;
    fused LoRA layers are compiled with the weights they changed."""
    from peft import LoraConfig

    compiled_paths = []
    forward, (x, t, hidden) = _compiled_by_stand_in(tiny_pipe, tmp_path, monkeypatch, compiled_paths)
    fake_compile = CompiledForward._compile
    unet = tiny_pipe.unet
    with torch.no_grad():
        assert (unet(x, t, encoder_hidden_states=hidden).sample == 7).all()
        assert (unet(x, t, encoder_hidden_states=hidden).sample == 7).all()
        assert len(compiled_paths) == 1
        assert (unet(x[:1], t, encoder_hidden_states=hidden[:1]).sample == 7).all()  # a shape of its own
        assert len(compiled_paths) == 2

        unet.conv_out.bias.add_(1.0)
        assert (unet(x, t, encoder_hidden_states=hidden).sample == 7).all()
        assert len(compiled_paths) == 3 and compiled_paths[2] not in compiled_paths[:2]

        unet.conv_out.bias.add_(1.0)
        monkeypatch.setattr(CompiledForward, "_compile", lambda *a: (_ for _ in ()).throw(RuntimeError("no cc")))
        expected = forward.eager(x, t, encoder_hidden_states=hidden).sample
        with caplog.at_level(logging.WARNING, logger="latentgen"):
            assert torch.equal(unet(x, t, encoder_hidden_states=hidden).sample, expected)
        assert "could not compile the U-Net (RuntimeError: no cc); it runs uncompiled" in caplog.text

        monkeypatch.setattr(CompiledForward, "_compile", fake_compile)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False))
        expected = forward.eager(x, t, encoder_hidden_states=hidden).sample
        assert torch.equal(unet(x, t, encoder_hidden_states=hidden).sample, expected)
        assert not forward.servable
        unet.fuse_lora()  # merged into the base weights: compiled again
        assert (unet(x, t, encoder_hidden_states=hidden).sample == 7).all()
        assert len(compiled_paths) == 4
    assert unet(x, t, encoder_hidden_states=hidden).sample.requires_grad  # training calls: the U-Net itself


def test_unfused_lycoris_layers_run_the_unet_itself(tiny_pipe, tmp_path, monkeypatch):
    """A LoHa (peft's layer, as latentgen.formats.lora loads LyCORIS files) reads its scale at run time like a LoRA:
    unfused, the U-Net itself runs; fused, its weights are compiled."""
    from peft import LoHaConfig

    forward, (x, t, hidden) = _compiled_by_stand_in(tiny_pipe, tmp_path, monkeypatch)
    unet = tiny_pipe.unet
    with torch.no_grad():
        assert (unet(x, t, encoder_hidden_states=hidden).sample == 7).all()
        unet.add_adapter(LoHaConfig(r=2, alpha=2, target_modules=["to_q", "to_v"], init_weights=False))
        expected = forward.eager(x, t, encoder_hidden_states=hidden).sample
        assert torch.equal(unet(x, t, encoder_hidden_states=hidden).sample, expected) and not forward.servable
        unet.fuse_lora()
        assert (unet(x, t, encoder_hidden_states=hidden).sample == 7).all()


def _compiled_by_stand_in(pipe, tmp_path, monkeypatch, compiled_paths: list | None = None):
    """`pipe`'s U-Net compiled by the stand-in compiler, whose packages answer 7 (cache in `tmp_path`); returns its
    CompiledForward and inputs for the U-Net."""
    monkeypatch.setenv("LATENTGEN_CACHE", str(tmp_path / "cache"))
    _stand_in_compiler(monkeypatch, lambda x, t, h: torch.full_like(x, 7.0), compiled_paths)
    inputs = unet_inputs(pipe)
    pipe.compile_unet()
    return pipe.unet.forward, inputs


def _stand_in_compiler(monkeypatch, package, compiled_paths: list | None = None):
    """Compiling writes an empty file (its path appended to `compiled_paths`), loading gives `package`; returns
    the stand-in compile."""
    def fake_compile(self, inputs, path):
        if compiled_paths is not None:
            compiled_paths.append(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")

    monkeypatch.setattr(CompiledForward, "_compile", fake_compile)
    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda path: package)
    return fake_compile


def test_compiled_fp32_batches_rows_only_where_they_are_measured_batch_invariant(tiny_folder, tmp_path,
                                                                                 monkeypatch):
    """In fp32 a compiled U-Net takes a batch's rows in one call where its package for them gives each image bit
    for bit what the one-image package gives (measured once per shape), and one image at a time where not; the
    images are the same either way as the images made alone."""
    monkeypatch.setenv("LATENTGEN_CACHE", str(tmp_path / "cache"))
    calls = []

    def row_wise(x, t, h):  # each row from its own inputs only
        calls.append(x.shape[0])
        return 0.1 * x + 1e-4 * t.view(-1, 1, 1, 1) + 0.1 * h.mean(dim=(1, 2)).view(-1, 1, 1, 1)

    def batch_dependent(x, t, h):  # rows change with the batch's size
        return row_wise(x, t, h) * (1 + 1e-6 * x.shape[0])

    prompts, kwargs = ["a red circle", "a blue square", "a green triangle"], dict(num_inference_steps=3,
                                                                                  output_type="np")
    for package, batched in [(row_wise, True), (batch_dependent, False)]:
        _stand_in_compiler(monkeypatch, package)
        pipe = LatentPipeline.from_pretrained(tiny_folder, torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        pipe.compile_unet()
        calls.clear()
        batch = pipe(prompts, seed=[7, 8, 9], **kwargs).images
        # the measurement (6 random rows at once, then images' 2 rows alone, up to the first difference), then
        # 3 steps of one call or of one call per image
        steps = [6] * 3 if batched else [2] * 9
        measured = calls[:len(calls) - len(steps)]
        assert calls[len(measured):] == steps and measured[0] == 6 and set(measured[1:]) == {2}, (batched, calls)
        assert len(measured) == (4 if batched else 2)
        calls.clear()
        alone = pipe(prompts[1], seed=8, **kwargs).images
        assert calls == [2] * 3
        np.testing.assert_array_equal(batch[1], alone[0])
        with torch.no_grad():  # an unguided batch: rows of one per image, measured for their own shape
            x, t, hidden = unet_inputs(pipe, rows=3)
            assert pipe.unet.forward.batch_invariant(x, t, 1, encoder_hidden_states=hidden) is batched
            assert not pipe.unet.forward.batch_invariant(x, t, 1, encoder_hidden_states=hidden,
                                                         encoder_attention_mask=torch.ones(3, 77))


def test_each_step_gets_its_own_copy_of_the_unet_output(tiny_pipe):
    """CUDA graphs (`compile_unet` on CUDA) replay into one static output tensor, which the U-Net's next call
    overwrites; PNDM without guidance keeps the raw outputs of earlier steps. A U-Net that reuses its output tensor
    the same way must give the plain U-Net's images."""
    kw = dict(num_inference_steps=6, seed=3, guidance_scale=1.0, scheduler="pndm", output_type="np")
    plain = tiny_pipe("a red circle", **kw).images
    forward, static = tiny_pipe.unet.forward, {}

    def replayed(*args, **kwargs):
        sample = forward(*args, **kwargs)[0]
        out = static.setdefault(sample.shape, torch.empty_like(sample))
        return (out.copy_(sample),)

    tiny_pipe.unet.forward = replayed
    np.testing.assert_array_equal(tiny_pipe("a red circle", **kw).images, plain)


def test_weights_of_a_channels_last_bf16_unet_are_hashed(tiny_pipe):
    """SD's U-Nets have 1×1 convolutions (the resnets' shortcuts), and on a bf16 CPU their weights are channels-last
    from 32×32 latents up: such a weight counts as contiguous with a last stride of C, which a byte view refuses
    (`--compile` with an SD checkpoint failed there). The hash reads it, and as the same bytes as contiguous."""
    from latentgen.runtime.compiled import _weights_digest

    unet = tiny_pipe.unet.to(torch.bfloat16)
    shortcut = unet.down_blocks[1].resnets[0].conv_shortcut.weight  # 32 -> 64 channels, 1×1
    assert shortcut.shape[-2:] == (1, 1)
    contiguous = _weights_digest(unet)
    unet.to(memory_format=torch.channels_last)
    assert shortcut.stride()[-1] != 1 and shortcut.is_contiguous()
    digest = _weights_digest(unet)  # raised before
    assert digest != contiguous  # strides are part of it: a package is compiled for one memory format
    unet.to(memory_format=torch.contiguous_format)
    assert _weights_digest(unet) == contiguous


def test_a_bf16_channels_last_unet_compiles(tmp_path, monkeypatch):
    """What `infer.py --compile` does with an SD checkpoint on a bf16 CPU (32×32 latents and up: channels-last, 1×1
    shortcut convolutions), at a tiny size: compiled, it predicts as the eager U-Net does."""
    import components as C
    from latentgen.runtime.precision import cpu_has_fast_bf16

    if not cpu_has_fast_bf16():
        import pytest

        pytest.skip("this CPU has no bf16 units: latentgen keeps fp32 and the contiguous layout here")
    monkeypatch.setenv("LATENTGEN_CACHE", str(tmp_path / "cache"))
    parts = C.components()
    parts["unet"] = C.unet(sample_size=32)
    pipe = LatentPipeline(**parts).to(torch.bfloat16)
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    x = torch.randn(2, 4, 32, 32, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    t, hidden = torch.tensor(500), pipe.encode_prompts([PROMPT] * 2)[0]
    with torch.no_grad():
        eager = pipe.unet(x, t, encoder_hidden_states=hidden).sample.float()
        pipe.compile_unet()
        compiled = pipe.unet(x, t, encoder_hidden_states=hidden).sample.float()
    assert (compiled - eager).abs().max() <= 0.05 * eager.abs().max()


def test_an_lcm_students_guidance_input_goes_into_the_compiled_package(tiny_folder, tmp_path, monkeypatch):
    """A guidance-embedding LCM student's U-Net takes `timestep_cond`: its calls are served by a package of four
    inputs (they used to fall back to the uncompiled U-Net), which computes what the U-Net does with them."""
    from diffusers import UNet2DConditionModel

    from latentgen.runtime.compiled import _Plain

    pipe = LatentPipeline.from_pretrained(tiny_folder, torch_dtype=torch.float32)
    torch.manual_seed(0)
    student = UNet2DConditionModel.from_config({**pipe.unet.config, "time_cond_proj_dim": 8}).eval()
    pipe.register_modules(unet=student)
    x, t, hidden = unet_inputs(pipe)
    cond = torch.randn(2, 8)
    with torch.no_grad():
        eager = student(x, t, encoder_hidden_states=hidden, timestep_cond=cond).sample
        exported = _Plain(student, student.forward)(x, torch.full((2,), 500.0), hidden, cond)
        assert torch.equal(exported, eager)
        assert not torch.allclose(student(x, t, encoder_hidden_states=hidden).sample, eager)  # the input matters
    calls = []

    def package(*inputs):
        calls.append(len(inputs))
        return torch.full_like(inputs[0], 7.0)

    monkeypatch.setenv("LATENTGEN_CACHE", str(tmp_path / "cache"))
    _stand_in_compiler(monkeypatch, package)
    pipe.compile_unet()
    with torch.no_grad():
        out = pipe.unet(x, t, encoder_hidden_states=hidden, timestep_cond=cond).sample
    assert calls == [4] and torch.equal(out, torch.full_like(x, 7.0))
