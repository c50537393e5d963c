"""Image-to-image, inpainting, long and weighted prompts, guidance variants, metadata and replay, grids."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import components as C
from conftest import infer
from latentgen import LatentPipeline
from latentgen.errors import UserError
from latentgen.generation.models import DEFAULT_MODEL
from latentgen.generation.outputs import _wrap
from latentgen.generation.prompts import ChunkedEncoder, Segment, parse

PROMPT = "a red circle on a blue background"


def init_image(size=32):
    from latentgen.data.shapes import ShapesSpec, make_sample

    return make_sample(ShapesSpec(resolution=size, max_shapes=1), 0).render()


def count_unet_calls(pipe):
    return C.record_calls(pipe.unet)


def round_trip(pipe, image):
    x = pipe.image_processor.preprocess(image).float()
    with torch.no_grad():
        return pipe.image_processor.postprocess(pipe.decode(pipe.encode_images(x)), output_type="np")


# ---- image-to-image ------------------------------------------------------------------------------------------

def test_img2img_at_strength_near_zero_returns_the_init_image(tiny_pipe):
    image = init_image()
    calls = count_unet_calls(tiny_pipe)
    out = tiny_pipe(PROMPT, image=image, strength=0.01, num_inference_steps=10, seed=0, output_type="np").images
    assert calls == []  # no step left to run
    np.testing.assert_allclose(out, round_trip(tiny_pipe, image), atol=1e-6)


@pytest.mark.parametrize("strength, steps", [(0.3, 3), (0.5, 5), (1.0, 10)])
def test_img2img_runs_the_last_strength_fraction_of_the_steps(tiny_pipe, strength, steps):
    calls = count_unet_calls(tiny_pipe)
    out = tiny_pipe(PROMPT, image=init_image(), strength=strength, num_inference_steps=10, seed=0,
                    scheduler="ddim", output_type="np").images
    assert len(calls) == steps and out.shape == (1, 32, 32, 3)


# ---- inpainting --------------------------------------------------------------------------------------------

def half_mask(size=32):
    mask = np.zeros((size, size), np.uint8)
    mask[:, size // 2:] = 255  # repaint the right half
    return Image.fromarray(mask)


def test_inpainting_keeps_the_unmasked_latents(tiny_pipe):
    image, mask = init_image(), half_mask()
    latents = tiny_pipe(PROMPT, image=image, mask_image=mask, num_inference_steps=6, seed=1,
                        output_type="latent").images
    z0 = tiny_pipe.encode_images(tiny_pipe.image_processor.preprocess(image).float())
    assert torch.equal(latents[..., :8], z0[..., :8])  # left half of the 16×16 latents: exactly the image's
    assert not torch.allclose(latents[..., 8:], z0[..., 8:], atol=1e-2)  # the masked half was generated


@pytest.mark.skipif(not (DEFAULT_MODEL / "model_index.json").exists(), reason="the default model is not shipped")
def test_inpainting_leaves_the_unmasked_pixels_as_the_vae_round_trip():
    """Pixels are the VAE round trip's only approximately: the decoder's group norms see the whole latent. On
    the default model (a real VAE) the unmasked region moves by under 1% while the masked one is redrawn."""
    pipe = LatentPipeline.from_pretrained(DEFAULT_MODEL, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    image = init_image(64)
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 40:] = 255
    out = pipe(PROMPT, image=image, mask_image=Image.fromarray(mask), num_inference_steps=20, seed=1,
               output_type="np").images
    reference = round_trip(pipe, image)
    kept = np.abs(out[0, :, :32] - reference[0, :, :32]).mean()
    redone = np.abs(out[0, :, 44:] - reference[0, :, 44:]).mean()
    assert kept < 0.02 and kept < 0.1 * redone


def test_nine_channel_inpainting_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**C.unet().config, "in_channels": 9})
    pipe = LatentPipeline(vae=C.vae(), text_encoder=C.clip_text_encoder(), tokenizer=C.tokenizer(), unet=unet,
                          scheduler=C.scheduler())
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPT, image=init_image(), mask_image=half_mask(), num_inference_steps=3, seed=0, output_type="np")
    assert out.images.shape == (1, 32, 32, 3)
    with pytest.raises(UserError, match="inpainting model"):
        pipe(PROMPT, num_inference_steps=2)


def test_image_and_mask_errors(tiny_pipe):
    with pytest.raises(UserError, match="the mask is 16×16 but the image is 32×32"):
        tiny_pipe(PROMPT, image=init_image(), mask_image=half_mask(16))
    for s in (0.0, 1.5, -1):
        with pytest.raises(UserError, match=r"strength must be in \(0, 1\]"):
            tiny_pipe(PROMPT, image=init_image(), strength=s)
    with pytest.raises(UserError, match="its sides must be multiples of 2"):
        tiny_pipe(PROMPT, image=init_image().resize((31, 32)))


# ---- long and weighted prompts ------------------------------------------------------------------------------

def test_parse_weights():
    assert parse("a (red:1.5) circle") == [Segment("a ", 1.0), Segment("red", 1.5), Segment(" circle", 1.0)]
    assert parse("(red)") == [Segment("red", pytest.approx(1.1))]
    assert parse("[red]") == [Segment("red", pytest.approx(1 / 1.1))]
    assert parse("((red))")[0].weight == pytest.approx(1.21)
    assert parse("((red:1.5))")[0].weight == pytest.approx(1.65)
    assert parse(r"a \(red\) circle") == [Segment("a (red) circle", 1.0)]
    assert parse("ratio 16:9 image") == [Segment("ratio 16:9 image", 1.0)]


@pytest.mark.parametrize("prompt, position, bracket", [("a (red circle", 2, "("), ("a red) circle", 5, ")"),
                                                       ("a [red) circle", 6, ")"), ("((a)", 0, "(")])
def test_unbalanced_brackets_point_at_the_position(prompt, position, bracket):
    with pytest.raises(UserError, match=rf"unbalanced '\{bracket}' at position {position}"):
        parse(prompt)


def encoder():
    from latentgen.components.text_encoders import TransformersTextEncoder

    return ChunkedEncoder(TransformersTextEncoder(C.tokenizer(), C.clip_text_encoder()))


def test_a_short_prompt_encodes_as_diffusers_does():
    enc = encoder()
    ids = C.tokenizer()(PROMPT, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        expected = enc.backend.model(ids.input_ids)[0][0]
        assert torch.allclose(enc.encode(PROMPT), expected, atol=1e-6)


def test_a_150_token_prompt_keeps_its_tail():
    enc = encoder()
    head = " ".join(["red"] * 100)
    a, b = head + " " + " ".join(["circle"] * 50), head + " " + " ".join(["square"] * 50)
    assert len(C.tokenizer()(a).input_ids) == 152
    with torch.no_grad():
        ha, hb = enc.encode(a), enc.encode(b)
    assert ha.shape == (154, 32)  # two windows of 77
    assert torch.allclose(ha[:25], hb[:25])  # the first window's first tokens are the same words
    assert not torch.allclose(ha[77:], hb[77:], atol=1e-3)  # the tail, cut off by a 77-token encoder, counts


def _token_norm(hidden, position):
    return (hidden[position].norm() / hidden[1:7].norm(dim=-1).mean()).item()


def test_weighting_moves_the_embedding_in_the_expected_direction():
    enc = encoder()
    red = 2  # <bos> a red circle ...
    with torch.no_grad():
        plain = enc.encode("a red circle")
        up = enc.encode("a (red:1.5) circle")
        down = enc.encode("a [red] circle")
    assert _token_norm(up, red) > _token_norm(plain, red) > _token_norm(down, red)
    assert torch.allclose(up.mean(), plain.mean(), atol=1e-6)  # the window keeps its mean (A1111's rule)


def test_prompts_of_different_lengths_in_one_batch(tiny_pipe):
    long = " ".join(["red circle"] * 60)
    both = tiny_pipe([PROMPT, long], num_inference_steps=2, seed=[3, 4], output_type="np").images
    alone = tiny_pipe(PROMPT, num_inference_steps=2, seed=3, output_type="np").images
    np.testing.assert_allclose(both[0], alone[0], atol=1e-5)  # the short prompt's padding is masked out


# ---- guidance variants --------------------------------------------------------------------------------------

def test_guidance_rescale(tiny_pipe):
    base = tiny_pipe(PROMPT, num_inference_steps=3, seed=0, output_type="np").images
    same = tiny_pipe(PROMPT, num_inference_steps=3, seed=0, guidance_rescale=0.0, output_type="np").images
    rescaled = tiny_pipe(PROMPT, num_inference_steps=3, seed=0, guidance_rescale=0.7, output_type="np").images
    np.testing.assert_array_equal(base, same)
    assert np.abs(base - rescaled).max() > 1e-4


def test_guidance_interval_skips_the_unconditional_pass_outside_it(tiny_pipe):
    calls = count_unet_calls(tiny_pipe)
    tiny_pipe(PROMPT, num_inference_steps=4, seed=0, guidance_interval=(0.5, 1.0), scheduler="ddim")
    assert calls == [1, 1, 2, 2]


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpm++"])
def test_dynamic_thresholding(tiny_pipe, scheduler):
    kw = dict(num_inference_steps=3, seed=0, scheduler=scheduler, guidance_scale=30.0, output_type="latent")
    base = tiny_pipe(PROMPT, **kw).images
    clipped = tiny_pipe(PROMPT, dynamic_threshold=0.9, **kw).images
    assert torch.isfinite(clipped).all() and not torch.allclose(base, clipped)
    assert clipped.abs().max() < base.abs().max()  # the outliers strong guidance makes are cut


def test_clip_x0_only_clips_and_round_trips():
    from latentgen.generation.guidance import clip_x0

    torch.manual_seed(0)
    x_t, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for kind in ("epsilon", "v_prediction"):
        same = clip_x0(eps, x_t, 0.6, 0.8, kind, 0.99, floor=1e6)  # nothing reaches the floor: unchanged
        torch.testing.assert_close(same, eps)
    x0 = (x_t - 0.8 * clip_x0(eps, x_t, 0.6, 0.8, "epsilon", 0.9, floor=0.0)) / 0.6
    limit = torch.quantile(((x_t - 0.8 * eps) / 0.6).abs().flatten(1), 0.9, dim=1)
    assert (x0.abs().flatten(1).max(dim=1).values <= limit + 1e-5).all()  # clipped, not rescaled


def test_apg_splits_caps_and_carries_the_update():
    """APG's update (Sadat et al. 2024), as diffusers computes it: with η = 0 what is added to εc is orthogonal to
    εc, the cap bounds its norm before w − 1 scales it, and momentum adds β times the previous update."""
    from latentgen.generation.guidance import Apg, classifier_free_guidance, guide

    torch.manual_seed(0)
    uncond, cond = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    plain = classifier_free_guidance(uncond, cond, 7.5)
    torch.testing.assert_close(guide(uncond, cond, 7.5, Apg(eta=1.0), {}), plain)  # η = 1, no cap: CFG itself
    torch.testing.assert_close(guide(uncond, cond, 7.5, None, {}), plain)
    update = (guide(uncond, cond, 7.5, Apg(), {}) - cond) / 6.5
    assert ((update * cond).flatten(1).sum(1).abs() < 1e-4).all()  # no part along εc
    assert ((update - (cond - uncond)).flatten(1).norm(dim=1) > 1).all()  # yet not the plain update either
    capped = (guide(uncond, cond, 7.5, Apg(norm_threshold=0.5, eta=1.0), {}) - cond) / 6.5
    torch.testing.assert_close(capped.flatten(1).norm(dim=1), torch.full((2,), 0.5))  # ‖εc − ε∅‖ ≈ 11 > 0.5
    state, second = {}, torch.randn(2, 4, 8, 8)
    guide(uncond, cond, 7.5, Apg(eta=1.0, momentum=-0.5), state)
    carried = guide(uncond, second, 7.5, Apg(eta=1.0, momentum=-0.5), state)
    torch.testing.assert_close(carried, second + 6.5 * ((second - uncond) - 0.5 * (cond - uncond)))


def test_apg_in_the_pipeline_replays_and_checks(tiny_folder, tmp_path):
    pipe = LatentPipeline.from_pretrained(tiny_folder)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=3, seed=0, output_type="np")
    plain = pipe(PROMPT, **kw).images
    apg = pipe(PROMPT, apg={"norm_threshold": 0.5}, **kw)
    assert np.abs(apg.images - plain).max() > 1e-3
    assert apg.metadata[0]["apg"] == {"norm_threshold": 0.5, "eta": 0.0, "momentum": 0.0}
    with pytest.raises(UserError, match=r"^APG momentum must be in \(-1, 1\), got 1"):
        pipe(PROMPT, apg={"momentum": 1}, **kw)
    r = infer("--model", tiny_folder, "--prompt", PROMPT, "--steps", 3, "--seed", 0, "--apg-threshold", 0.5,
              "--out", tmp_path / "a.png")
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a.png")),
                                  np.round(apg.images[0] * 255).astype(np.uint8))  # the flag is the field
    r = infer("--replay", tmp_path / "a.png")
    assert r.returncode == 0 and "identical, bit for bit" in r.stdout, r.stderr
    with pytest.raises(UserError, match=r"^apg must be APG settings, False \(plain guidance\) or None"):
        pipe(PROMPT, apg=True, **kw)
    with pytest.raises(UserError, match=r"^APG settings are norm_threshold, eta, momentum; got \{'threshold': 1\}"):
        pipe(PROMPT, apg={"threshold": 1}, **kw)
    r = infer("--model", tiny_folder, "--prompt", PROMPT, "--no-apg", "--apg-eta", 0.5, "--out", tmp_path / "b")
    assert r.returncode == 2 and r.stderr.startswith("error: --no-apg turns APG off; give it without")


def test_a_models_own_apg_is_its_default_and_old_images_replay_plain(tiny_pipe, tmp_path):
    from latentgen.generation.request import Request

    tiny_pipe.save_pretrained(tmp_path / "plain")
    tiny_pipe.register_to_config(apg={"norm_threshold": 0.5, "eta": 0.0, "momentum": 0.0})
    tiny_pipe.save_pretrained(tmp_path / "own")
    assert json.loads((tmp_path / "own" / "model_index.json").read_text())["apg"]["norm_threshold"] == 0.5
    assert "apg" not in json.loads((tmp_path / "plain" / "model_index.json").read_text())
    own = LatentPipeline.from_pretrained(tmp_path / "own", torch_dtype=torch.float32)
    own.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=3, seed=0, output_type="np")
    default = own(PROMPT, **kw)
    np.testing.assert_array_equal(default.images, own(PROMPT, apg={"norm_threshold": 0.5}, **kw).images)
    assert default.metadata[0]["apg"] == {"norm_threshold": 0.5, "eta": 0.0, "momentum": 0.0}
    plain = own(PROMPT, apg=False, **kw)
    assert plain.metadata[0]["apg"] is False and np.abs(plain.images - default.images).max() > 1e-3
    before = {k: v for k, v in plain.metadata[0].items() if k != "apg"}  # an image recorded before APG existed
    assert Request.from_metadata(before).apg is False
    np.testing.assert_array_equal(own.generate(Request.from_metadata(before, output_type="np")).images, plain.images)


# ---- metadata, replay, grid ---------------------------------------------------------------------------------


def test_metadata_and_replay_bit_for_bit(tiny_folder, tmp_path):
    r = infer("--model", tiny_folder, "--prompt", "a (red:1.2) circle", "--negative-prompt", "blurry", "--steps", 3,
              "--seed", 42, "--scheduler", "euler-a", "--out", tmp_path / "a.png", "--guidance-rescale", 0.3)
    assert r.returncode == 0, r.stderr
    im = Image.open(tmp_path / "a.png")
    params = im.info["parameters"].splitlines()
    assert params[0] == "a (red:1.2) circle" and params[1] == "Negative prompt: blurry"
    assert "Steps: 3, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 32x32, Model hash: " in params[2]
    meta = json.loads(im.info["latentgen"])
    assert meta["seed"] == 42 and meta["scheduler"] == "euler-a" and meta["guidance_rescale"] == 0.3
    r = infer("--replay", tmp_path / "a.png", fresh=True)  # in another process, as a user replays it later
    assert r.returncode == 0 and "identical, bit for bit" in r.stdout, r.stderr
    # a changed image is reported
    arr = np.asarray(im.convert("RGB")).copy()
    arr[0, 0] ^= 1
    changed = Image.fromarray(arr)
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("latentgen", im.info["latentgen"])
    changed.save(tmp_path / "b.png", pnginfo=info)
    r = infer("--replay", tmp_path / "b.png")
    assert r.returncode == 1 and "differs (max |Δ| = 1 over 1 pixels)" in r.stdout


def test_img2img_cli_replay_and_grid(tiny_folder, tmp_path):
    init_image().save(tmp_path / "in.png")
    r = infer("--model", tiny_folder, "--prompt", "x", "--prompt", "y", "--image", tmp_path / "in.png",
              "--strength", 0.5, "--steps", 4, "--seed", 1, "--out", tmp_path / "o", "--grid")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o" / "grid.png").is_file()
    first = sorted((tmp_path / "o").glob("0*.png"))[0]
    meta = json.loads(Image.open(first).info["latentgen"])
    assert meta["strength"] == 0.5 and meta["image"]["path"].endswith("in.png")
    r = infer("--replay", first)
    assert r.returncode == 0 and "identical" in r.stdout, r.stderr


@pytest.mark.parametrize("args, message", [
    (["--image", "IN", "--mask", "SMALL"], "the mask is 16×16 but the image is 32×32"),
    (["--image", "IN", "--strength", 1.5], "--strength must be in (0, 1]"),
    (["--image", "BROKEN"], "cannot read image file"),
    (["--image", "MISSING"], "image file"),
    (["--prompt", "a (red circle"], "unbalanced '(' at position 2"),
    (["--mask", "SMALL"], "--mask needs --image"),
    (["--replay", "IN"], "has no generation parameters (neither latentgen's nor AUTOMATIC1111's)"),
])
def test_bad_input(tiny_folder, tmp_path, args, message):
    init_image().save(tmp_path / "in.png")
    half_mask(16).save(tmp_path / "small.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    names = {"IN": tmp_path / "in.png", "SMALL": tmp_path / "small.png", "BROKEN": tmp_path / "broken.png",
             "MISSING": tmp_path / "missing.png"}
    args = [names.get(a, a) if isinstance(a, str) else a for a in args]
    r = infer("--model", tiny_folder, "--prompt", "x", "--out", tmp_path / "out", *args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("text", "lines"), [
    ("a red circle on a gray", ["a red circle on a", "gray"]),  # broken between words, never inside one
    ("a purple circle to the left of an orange square", ["a purple circle to", "the left of an..."]),
    ("abcdefghijklmnopqrstuvwxyz", ["abcdefghijklmnopqr"]),  # one word wider than the line is cut
])
def test_grid_captions_wrap_at_words(text, lines):
    assert _wrap(text, lambda line: len(line) <= 18, lines=2) == lines
