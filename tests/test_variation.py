"""AUTOMATIC1111's seed extras: variation seeds (the starting noise turned, along the sphere, towards another
seed's) and "resize seed from" (the seed's noise drawn at another size and pasted into the middle), in the Python
API, `infer.py` (metadata, replay, the A1111 infotext) and the sampler."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import infer
from latentgen import validate
from latentgen.errors import UserError
from latentgen.generation.infotext import a1111_request
from latentgen.generation.request import Request
from latentgen.generation.sampling import paste_centered, slerp

PROMPT = "a red circle on a blue background"


def test_slerp_walks_the_arc_between_two_draws():
    a, b = torch.randn(3, 4, 64, generator=torch.Generator().manual_seed(0)), \
        torch.randn(3, 4, 64, generator=torch.Generator().manual_seed(1))
    b = b * a.norm(dim=2, keepdim=True) / b.norm(dim=2, keepdim=True)  # equal norms per vector
    omega = torch.acos((a * b).sum(2) / (a.norm(dim=2) * b.norm(dim=2)))
    for t in (0.25, 0.5, 0.8):
        out = slerp(t, a, b)  # the vectors along dim 2
        angle = torch.acos((out * a).sum(2) / (out.norm(dim=2) * a.norm(dim=2)))
        torch.testing.assert_close(angle, t * omega, atol=1e-4, rtol=0)  # a fraction t of the way, on the arc
        torch.testing.assert_close(out.norm(dim=2), a.norm(dim=2))  # the norm kept; a straight line shrinks it
        assert (torch.lerp(a, b, t).norm(dim=2) < 0.99 * a.norm(dim=2)).all()
    assert torch.equal(slerp(0.0, a, b), a) and torch.equal(slerp(1.0, a, b), b)
    torch.testing.assert_close(slerp(0.3, a, 2 * a), torch.lerp(a, 2 * a, 0.3))  # parallel: the straight line


def a1111_variation_noise(seed: int, subseed: int, strength: float, shape) -> torch.Tensor:
    """AUTOMATIC1111's starting noise for one image with its CPU random numbers (modules/rng.py: `randn` is
    torch.manual_seed + torch.randn of the (C, H, W) shape; `slerp` normalizes along dim 1), written out here as
    the reference."""
    torch.manual_seed(subseed)
    high = torch.randn(shape)
    torch.manual_seed(seed)
    low = torch.randn(shape)
    low_norm, high_norm = low / low.norm(dim=1, keepdim=True), high / high.norm(dim=1, keepdim=True)
    omega = torch.acos((low_norm * high_norm).sum(1))
    so = torch.sin(omega)
    return (torch.sin((1 - strength) * omega) / so).unsqueeze(1) * low + \
        (torch.sin(strength * omega) / so).unsqueeze(1) * high


def a1111_resized_noise(seed: int, shape, resized) -> torch.Tensor:
    """AUTOMATIC1111's "resize seed from" for one image (modules/rng.py, `ImageRNG.first`), written out: the seed's
    noise drawn at the (C, h, w) `resized` shape, pasted into the middle of its noise at `shape`."""
    torch.manual_seed(seed)
    noise = torch.randn(resized)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    dx, dy = (shape[2] - resized[2]) // 2, (shape[1] - resized[1]) // 2
    w = resized[2] if dx >= 0 else resized[2] + 2 * dx
    h = resized[1] if dy >= 0 else resized[1] + 2 * dy
    tx, ty, dx, dy = max(dx, 0), max(dy, 0), max(-dx, 0), max(-dy, 0)
    x[:, ty:ty + h, tx:tx + w] = noise[:, dy:dy + h, dx:dx + w]
    return x


def starting_noise(pipe, **kwargs) -> torch.Tensor:
    """The starting noise of each image of an unguided DDIM call: the U-Net's first input."""
    seen = []

    def first_input(module, args):  # returns None: a pre-hook's other answers replace the arguments
        seen.append(args[0].clone())

    hook = pipe.unet.register_forward_pre_hook(first_input)
    try:
        pipe(PROMPT, num_inference_steps=2, scheduler="ddim", guidance_scale=1.0, output_type="latent", **kwargs)
    finally:
        hook.remove()
    return torch.cat(seen[:len(seen) // 2])  # the first step's calls (one per image where the CPU path splits)


def test_the_starting_noise_is_a1111s_with_its_cpu_random_numbers(tiny_pipe):
    first = starting_noise(tiny_pipe, seed=[10, 11], variation_seed=[20, 21], variation_strength=0.3,
                           num_images_per_prompt=2)
    assert first.shape[:2] == (2, 4)
    for k in range(2):
        torch.testing.assert_close(first[k], a1111_variation_noise(10 + k, 20 + k, 0.3, first.shape[1:]))


@pytest.mark.parametrize("size", [(16, 16), (34, 30), (40, 48), (8, 56)])  # (width, height) against 32×32
def test_seed_resize_pastes_the_seeds_noise_where_a1111_does(tiny_pipe, size):
    f = tiny_pipe.vae_scale_factor
    first = starting_noise(tiny_pipe, seed=[10, 11], num_images_per_prompt=2, seed_resize_from=size)
    plain = starting_noise(tiny_pipe, seed=[10, 11], num_images_per_prompt=2)
    shape = tuple(first.shape[1:])
    assert shape == (4, 32 // f, 32 // f)
    for k in range(2):
        torch.testing.assert_close(first[k], a1111_resized_noise(10 + k, shape, (4, size[1] // f, size[0] // f)),
                                   rtol=0, atol=0)
    assert not torch.equal(first, plain)  # every size here moves some noise
    same = starting_noise(tiny_pipe, seed=[10, 11], num_images_per_prompt=2, seed_resize_from=(32, 32))
    assert torch.equal(same, plain)  # the image's own size: its own noise


def test_paste_centered_keeps_the_middle():
    big, small = torch.zeros(1, 1, 4, 6), torch.arange(1.0, 10.0).reshape(1, 1, 3, 3)
    out = paste_centered(small, big)
    assert out[0, 0].tolist() == [[0, 1, 2, 3, 0, 0], [0, 4, 5, 6, 0, 0], [0, 7, 8, 9, 0, 0], [0, 0, 0, 0, 0, 0]]
    # larger by an odd number: A1111's rounding pastes a side one short, leaving the target's last row / column
    assert paste_centered(big + 1, small)[0, 0].tolist() == [[1, 1, 3], [1, 1, 6], [7, 8, 9]]
    assert paste_centered(torch.ones(1, 1, 5, 5), small)[0, 0].tolist() == [[1, 1, 1]] * 3  # even: all of it
    assert torch.equal(big, torch.zeros(1, 1, 4, 6))  # the target is not written in place


def test_seed_resize_with_a_variation_seed_varies_the_resized_noise(tiny_pipe):
    f = tiny_pipe.vae_scale_factor
    first = starting_noise(tiny_pipe, seed=10, variation_seed=20, variation_strength=0.4, seed_resize_from=(16, 24))
    small = a1111_variation_noise(10, 20, 0.4, (4, 24 // f, 16 // f))  # A1111 slerps at the resized shape
    expected = paste_centered(small[None], torch.randn(first.shape, generator=torch.Generator().manual_seed(10)))
    torch.testing.assert_close(first, expected)


def image(pipe, **kwargs) -> np.ndarray:
    return pipe(PROMPT, num_inference_steps=4, scheduler="ddim", output_type="np", **kwargs).images


def test_variation_strength_moves_from_the_seed_to_the_variation_seed(tiny_pipe):
    plain, other = image(tiny_pipe, seed=10), image(tiny_pipe, seed=20)
    np.testing.assert_array_equal(image(tiny_pipe, seed=10, variation_seed=20, variation_strength=0.0), plain)
    np.testing.assert_array_equal(image(tiny_pipe, seed=10, variation_seed=20, variation_strength=1.0), other)
    half = image(tiny_pipe, seed=10, variation_seed=20, variation_strength=0.5)
    near = image(tiny_pipe, seed=10, variation_seed=20, variation_strength=0.1)
    assert 0 < np.abs(near - plain).mean() < np.abs(half - plain).mean()
    assert 0 < np.abs(half - other).mean()
    # image k of a call gets variation seed + k, as its seed + k, whatever the batching
    two = tiny_pipe(PROMPT, num_inference_steps=4, scheduler="ddim", output_type="np", seed=10, variation_seed=20,
                    variation_strength=0.5, num_images_per_prompt=2)
    np.testing.assert_array_equal(two.images[:1], half)
    np.testing.assert_array_equal(two.images[1:], image(tiny_pipe, seed=11, variation_seed=21, variation_strength=0.5))
    assert [m["variation_seed"] for m in two.metadata] == [20, 21]
    assert {m["variation_strength"] for m in two.metadata} == {0.5}


def test_variation_without_a_seed_draws_one_and_records_it(tiny_pipe):
    out = tiny_pipe(PROMPT, num_inference_steps=4, scheduler="ddim", output_type="np", seed=3, variation_strength=0.3,
                    num_images_per_prompt=2)
    first, second = (m["variation_seed"] for m in out.metadata)
    assert isinstance(first, int) and second == first + 1
    np.testing.assert_array_equal(out.images[0], image(tiny_pipe, seed=3, variation_seed=first,
                                                       variation_strength=0.3)[0])
    assert tiny_pipe(PROMPT, num_inference_steps=2, seed=3, variation_seed=5).metadata[0]["variation_seed"] is None


def test_random_seeds_span_a1111s_range():
    """A run given no seed (infer.py, the servers) or no variation seed (any Request) draws it as A1111 does: below
    2**32, from one function, so seed + k stays a valid seed."""
    drawn = [validate.random_seed() for _ in range(200)]
    assert all(0 <= s < 2**32 for s in drawn) and len(set(drawn)) > 190
    assert any(s >= 2**31 for s in drawn)  # the whole range (infer.py drew below 2**31 before)
    variation = [Request(prompt="a", seed=1, variation_strength=0.5, num_images_per_prompt=3).check().variation_seed
                 for _ in range(20)]
    assert all(0 <= v[0] < 2**32 and v == [v[0], v[0] + 1, v[0] + 2] for v in variation)
    assert len({v[0] for v in variation}) > 15


@pytest.mark.parametrize("fields, message", [
    ({"variation_strength": 1.5}, "variation strength must be in [0, 1], got 1.5"),
    ({"variation_strength": 0.5, "variation_seed": -1}, "variation seed must be an integer in [0, "),
    ({"variation_strength": 0.5, "variation_seed": [1, 2]}, "variation seed must be an integer in [0, "),
    ({"seed_resize_from": (0, 32)}, "seed resize from must be a width and a height in pixels, each in [1, 16384]"),
    ({"seed_resize_from": 32}, "seed resize from must be a width and a height in pixels"),
])
def test_variation_mistakes(tiny_pipe, fields, message):
    with pytest.raises(UserError) as err:
        tiny_pipe(PROMPT, num_inference_steps=2, seed=0, **fields)
    assert message in str(err.value)
    with pytest.raises(UserError, match="^seed resize from needs seed "):
        tiny_pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), seed_resize_from=(16, 16))


def test_infer_writes_the_variation_to_the_infotext_and_replays_it(tiny_folder, tmp_path):
    r = infer("--model", tiny_folder, "--prompt", PROMPT, "--steps", 3, "--seed", 42, "--variation-seed", 7,
              "--variation-strength", 0.3, "--out", tmp_path / "a.png")
    assert r.returncode == 0, r.stderr
    im = Image.open(tmp_path / "a.png")
    params = im.info["parameters"]
    assert "Seed: 42, Size: 32x32, " in params and ", Variation seed: 7, Variation seed strength: 0.3, " in params
    meta = json.loads(im.info["latentgen"])
    assert meta["variation_seed"] == 7 and meta["variation_strength"] == 0.3
    r = infer("--replay", tmp_path / "a.png")
    assert r.returncode == 0 and "identical, bit for bit" in r.stdout, r.stderr
    settings, _, unused = a1111_request(params)  # what an A1111 text alone replays
    assert settings["variation_seed"] == 7 and math.isclose(settings["variation_strength"], 0.3) and not unused
    r = infer("--model", tiny_folder, "--prompt", PROMPT, "--variation-strength", 1.5, "--out", tmp_path / "b")
    assert r.returncode == 2 and r.stderr == "error: --variation-strength must be in [0, 1], got 1.5\n"
    assert not (tmp_path / "b").exists()


def test_infer_writes_the_seed_resize_to_the_infotext_and_replays_it(tiny_folder, tmp_path):
    r = infer("--model", tiny_folder, "--prompt", PROMPT, "--steps", 3, "--seed", 42, "--width", 48,
              "--seed-resize-from", "32x16", "--out", tmp_path / "a.png")
    assert r.returncode == 0, r.stderr
    im = Image.open(tmp_path / "a.png")
    assert "Seed: 42, Size: 48x32, " in im.info["parameters"] and ", Seed resize from: 32x16, " in im.info["parameters"]
    assert json.loads(im.info["latentgen"])["seed_resize_from"] == [32, 16]
    r = infer("--replay", tmp_path / "a.png")
    assert r.returncode == 0 and "identical, bit for bit" in r.stdout, r.stderr
    settings, _, unused = a1111_request(im.info["parameters"])
    assert settings["seed_resize_from"] == (32, 16) and not unused
    r = infer("--model", tiny_folder, "--prompt", PROMPT, "--seed-resize-from", "32", "--out", tmp_path / "b")
    assert r.returncode == 2 and r.stderr == ("error: --seed-resize-from must be WIDTHxHEIGHT in pixels (e.g. "
                                              "512x768), got '32'\n")
    assert not (tmp_path / "b").exists()
