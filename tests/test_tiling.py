"""Seamless tiling (AUTOMATIC1111's Tiling): circular convolutions in the U-Net and the VAE for the call, and what
that promises: a circularly shifted input gives the circularly shifted output, so the image has no edges."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import components as C
from conftest import infer
from latentgen.components.tiling import circular
from latentgen.generation.infotext import a1111_request
from latentgen.runtime import compiled

PROMPT = "a red circle on a blue background"


def padding_modes(*modules) -> set[str]:
    return {m.padding_mode for module in modules for m in module.modules()
            if isinstance(m, torch.nn.Conv2d) and any(m.padding)}


def shift(z: torch.Tensor, k: int) -> torch.Tensor:
    """A circular shift by k rows and 2k columns."""
    return torch.roll(z, shifts=(k, 2 * k), dims=(-2, -1))


@torch.no_grad()
def test_circular_convolutions_make_the_unet_and_the_decoder_shift_equivariant():
    unet, vae = C.unet(), C.vae()
    g = torch.Generator().manual_seed(0)
    x, text, t = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 5, 32, generator=g), torch.tensor([500])
    plain = unet(x, t, text).sample
    with circular(unet, vae):
        assert padding_modes(unet, vae) == {"circular"}
        out = unet(x, t, text).sample
        torch.testing.assert_close(unet(shift(x, 4), t, text).sample, shift(out, 4), atol=1e-5, rtol=1e-4)
        image = vae.decode(x).sample
        f = image.shape[-1] // x.shape[-1]
        torch.testing.assert_close(vae.decode(shift(x, 4)).sample, shift(image, 4 * f), atol=1e-5, rtol=1e-4)
    assert padding_modes(unet, vae) == {"zeros"}  # restored
    assert torch.equal(unet(x, t, text).sample, plain)
    assert (unet(shift(x, 4), t, text).sample - shift(plain, 4)).abs().max() > 1e-2  # zero padding has edges
    try:  # restored after an error too
        with circular(unet):
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert padding_modes(unet) == {"zeros"}


@pytest.mark.parametrize("kind", ["loha", "lokr"])
@torch.no_grad()
def test_a_lycoris_update_of_a_convolution_wraps_too(kind):
    """peft adds a LoHa's or LoKr's convolution update with zero padding beside the base convolution; tiled, the
    update pads circularly as well, so the U-Net stays shift-equivariant, and after the block peft's own method
    is back."""
    from peft import LoHaConfig, LoKrConfig, inject_adapter_in_model

    unet = C.unet()
    g = torch.Generator().manual_seed(0)
    x, text, t = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 5, 32, generator=g), torch.tensor([500])
    config = (LoHaConfig if kind == "loha" else LoKrConfig)(r=4, alpha=4, init_weights=False,
                                                            target_modules=["conv1", "conv2", "conv_in"])
    inject_adapter_in_model(config, unet)
    layers = [m for m in unet.modules() if hasattr(m, "_get_delta_activations")]
    assert layers and all(isinstance(m.get_base_layer(), torch.nn.Conv2d) for m in layers)
    plain = unet(x, t, text).sample
    with circular(unet):
        out = unet(x, t, text).sample
        torch.testing.assert_close(unet(shift(x, 4), t, text).sample, shift(out, 4), atol=1e-5, rtol=1e-4)
    assert not any("_get_delta_activations" in m.__dict__ for m in layers)
    assert torch.equal(unet(x, t, text).sample, plain)
    for layer in layers:  # the update merged into the base convolutions, which the block makes circular
        layer.merge()
    with circular(unet):
        torch.testing.assert_close(unet(x, t, text).sample, out, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_the_encoders_own_right_and_bottom_pad_wraps_too():
    """diffusers' Downsample2D pads right and bottom itself before an unpadded stride-2 convolution; A1111's Tiling
    leaves that pad zero, so an image-to-image start from a tile has a seam there. Here it wraps: the encoder
    is shift-equivariant by whole latent pixels, and the downsamplers are as they were after."""
    vae = C.vae()
    downs = [m for m in vae.encoder.modules() if type(m).__name__ == "Downsample2D"]
    assert downs and all(d.padding == 0 for d in downs)
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    f = image.shape[-1] // vae.encode(image).latent_dist.mean.shape[-1]
    plain = vae.encode(shift(image, 3 * f)).latent_dist.mean
    with circular(vae):
        z = vae.encode(image).latent_dist.mean
        torch.testing.assert_close(vae.encode(shift(image, 3 * f)).latent_dist.mean, shift(z, 3), atol=1e-5,
                                   rtol=1e-4)
    assert (plain - shift(z, 3)).abs().max() > 1e-2  # zero padding has edges
    assert all(d.padding == 0 and not d.conv._forward_pre_hooks for d in downs)
    torch.testing.assert_close(vae.encode(shift(image, 3 * f)).latent_dist.mean, plain, atol=0, rtol=0)

@torch.no_grad()
def test_a_compiled_unet_runs_tiled_calls_eagerly():
    unet = C.unet()
    g = torch.Generator().manual_seed(0)
    x, text, t = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 5, 32, generator=g), torch.tensor([500])
    with circular(unet):
        eager = unet(x, t, text).sample
        forward = compiled.install(unet)
        assert torch.equal(unet(x, t, text).sample, eager) and forward.packages == {}  # nothing compiled


def test_tiled_generation_leaves_the_model_as_it_was(tiny_pipe):
    kw = dict(num_inference_steps=3, seed=1, output_type="np")
    before = tiny_pipe(PROMPT, **kw).images
    tiled = tiny_pipe(PROMPT, tiling=True, **kw)
    assert np.abs(tiled.images - before).mean() > 1e-3 and tiled.metadata[0]["tiling"] is True
    assert padding_modes(tiny_pipe.unet, tiny_pipe.vae) == {"zeros"}
    np.testing.assert_array_equal(tiny_pipe(PROMPT, **kw).images, before)


def test_infer_tiling_writes_the_infotext_and_replays(tiny_folder, tmp_path):
    r = infer("--model", tiny_folder, "--prompt", PROMPT, "--steps", 3, "--seed", 1, "--tiling", "--out",
              tmp_path / "t.png")
    assert r.returncode == 0, r.stderr
    im = Image.open(tmp_path / "t.png")
    assert ", Tiling: True, " in im.info["parameters"] and json.loads(im.info["latentgen"])["tiling"] is True
    settings, _, unused = a1111_request(im.info["parameters"])
    assert settings["tiling"] is True and not unused
    r = infer("--replay", tmp_path / "t.png")
    assert r.returncode == 0 and "identical, bit for bit" in r.stdout, r.stderr
