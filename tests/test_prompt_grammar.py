"""A1111's prompt grammar beyond weights (`latentgen.generation.schedule`): prompt editing, alternation, AND and
BREAK, against A1111's own table of prompts and their schedules, and in the sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from latentgen.generation import sampling
from latentgen.generation.schedule import at, parts, schedule

# A1111's modules/prompt_parser.py doctests (steps = 10): the schedule of each prompt, (last step, text)
A1111 = {
    "test": [(10, "test")],
    "a [b:3]": [(3, "a "), (10, "a b")],
    "a [b: 3]": [(3, "a "), (10, "a b")],
    "a [[[b]]:2]": [(2, "a "), (10, "a [[b]]")],
    "[(a:2):3]": [(3, ""), (10, "(a:2)")],
    "a [b : c : 1] d": [(1, "a b  d"), (10, "a  c  d")],
    "a[b:[c:d:2]:1]e": [(1, "abe"), (2, "ace"), (10, "ade")],
    "a [unbalanced": [(10, "a [unbalanced")],
    "a [b:.5] c": [(5, "a  c"), (10, "a b c")],
    "((a][:b:c [d:3]": [(3, "((a][:b:c "), (10, "((a][:b:c d")],
    "[a|(b:1.1)]": [(k, "a" if k % 2 else "(b:1.1)") for k in range(1, 11)],
    # more of ours: [from::when] drops, a fraction past the end, alternation of three
    "a [b::4] c": [(4, "a b c"), (10, "a  c")],
    "x [y:z:2.7]": [(2, "x y"), (10, "x z")],
    "[p|q|r] s": [(k, "pqr"[(k - 1) % 3] + " s") for k in range(1, 11)],
}


@pytest.mark.parametrize("prompt", list(A1111))
def test_schedules_are_a1111s(prompt):
    assert list(schedule(prompt, 10)) == A1111[prompt]


def test_a_step_takes_the_first_entry_that_ends_at_or_after_it():
    entries = schedule("a [b:3]", 10)
    assert [at(entries, step) for step in range(6)] == ["a "] * 4 + ["a b"] * 2  # steps 0-3, as in A1111
    alternating = schedule("[a|b]", 10)
    assert [at(alternating, step) for step in range(5)] == ["a", "a", "b", "a", "b"]


def test_and_splits_parts_with_their_weights():
    assert parts("a red circle") == [("a red circle", 1.0)]
    assert parts("a red circle :1.2 AND a blue square") == [("a red circle", 1.2), (" a blue square", 1.0)]
    assert parts("cats AND dogs:0.5 AND birds: -0.3") == [("cats", 1.0), (" dogs", 0.5), (" birds", -0.3)]
    assert parts("BANDANA") == [("BANDANA", 1.0)]  # AND as a word only


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab [](){}|:.0123456789\\AND", max_size=40))
def test_any_prompt_gives_a_schedule_never_an_exception(prompt):
    entries = schedule(prompt, 7)
    assert entries and entries[-1][0] == 7 and all(isinstance(text, str) for _, text in entries)
    assert parts(prompt)


def image(pipe, prompt, **kwargs):
    return pipe(prompt, num_inference_steps=6, seed=11, scheduler="ddim", output_type="np", **kwargs).images


def test_an_edit_at_step_k_is_prompt_a_for_steps_0_to_k_then_b(tiny_pipe, monkeypatch):
    """The sampler with `[a red circle:a blue square:2]` against the same sampler told, step by step, to condition
    on the first prompt and then the second (bit for bit in fp32)."""
    edited = image(tiny_pipe, "[a red circle:a blue square:2]")
    seen = []
    real = sampling.predict

    def switching(pipe, x, t, cond, plan, step, scheduler, known, run_step=0):
        text = "a red circle" if run_step <= 2 else "a blue square"
        seen.append(text)
        fixed = sampling.prepare_conditioning(pipe, plan_with(plan, text))
        return real(pipe, x, t, fixed, plan, step, scheduler, known, run_step)

    def plan_with(plan, text):
        import dataclasses

        return dataclasses.replace(plan, prompts=[text] * plan.batch_size)

    monkeypatch.setattr(sampling, "predict", switching)
    by_hand = image(tiny_pipe, "[a red circle:a blue square:2]")
    assert seen == ["a red circle"] * 3 + ["a blue square"] * 3
    np.testing.assert_array_equal(edited, by_hand)
    monkeypatch.undo()
    assert not np.array_equal(edited, image(tiny_pipe, "a red circle"))
    assert not np.array_equal(edited, image(tiny_pipe, "a blue square"))


def test_and_with_one_part_is_the_plain_prompt_and_halves_add_up(tiny_pipe):
    plain = image(tiny_pipe, "a red circle")
    np.testing.assert_array_equal(image(tiny_pipe, "a red circle AND"[:-4]), plain)
    np.testing.assert_array_equal(image(tiny_pipe, "a red circle :1"), image(tiny_pipe, "a red circle :1"))
    # two parts of weight 1/2 with the same text: ε∅ + 2·½·s·(ε − ε∅), the plain guided prediction
    halves = image(tiny_pipe, "a red circle :0.5 AND a red circle :0.5")
    assert np.abs(halves - plain).max() < 1e-5
    both = image(tiny_pipe, "a red circle AND a blue square", num_images_per_prompt=2)
    alone = image(tiny_pipe, "a red circle AND a blue square")
    np.testing.assert_array_equal(both[0], alone[0])  # an image is the same made alone or in a batch
    assert not np.array_equal(alone, plain)


def test_alternation_and_negative_edits_reach_the_sampler(tiny_pipe):
    assert not np.array_equal(image(tiny_pipe, "[a red circle|a blue square]"), image(tiny_pipe, "a red circle"))
    plain = image(tiny_pipe, "a red circle", negative_prompt="green")
    edited = image(tiny_pipe, "a red circle", negative_prompt="[green:blue:3]")
    assert not np.array_equal(plain, edited)


def test_break_starts_a_new_window(tiny_pipe):
    from latentgen.components.text_encoders import text_encoder_for
    from latentgen.generation.prompts import ChunkedEncoder

    encoder = ChunkedEncoder(text_encoder_for(tiny_pipe.tokenizer, tiny_pipe.text_encoder))
    with torch.no_grad():
        broken = encoder.encode("a red circle BREAK a blue square")
        first, second = encoder.encode("a red circle"), encoder.encode("a blue square")
    assert broken.shape[0] == 2 * 77
    torch.testing.assert_close(broken, torch.cat([first, second]))
    assert encoder.encode("BREAKFAST").shape[0] == 77  # a word, not a BREAK


# ----------------------------------------------------------------------------------------------------------------
# Regional prompting (latentgen.generation.regions)


def test_region_masks_cover_the_latent_once():
    from latentgen.generation.regions import Regions

    for regions in (Regions("1,1"), Regions("2,1,1", mode="rows"), Regions("3")):
        masks = regions.masks(8, 12)
        assert torch.equal(sum(masks), torch.ones(1, 1, 8, 12))
    left, right = Regions("1,2").masks(6, 9)
    assert left[..., :3].min() == 1 and left[..., 3:].max() == 0


@pytest.mark.parametrize("calc", ["latent", "attention"])
def test_regions_with_the_same_prompt_are_the_plain_prompt(tiny_pipe, calc):
    plain = image(tiny_pipe, "a red circle")
    same = image(tiny_pipe, "a red circle BREAK a red circle", regions={"ratios": "1,1", "calc": calc})
    assert np.abs(same - plain).max() < 1e-5
    based = image(tiny_pipe, "a red circle ADDBASE a red circle BREAK a red circle",
                  regions={"ratios": "2,1", "base": 0.3, "calc": calc})
    assert np.abs(based - plain).max() < 1e-5
    split = image(tiny_pipe, "a red circle BREAK a blue square", regions={"ratios": "1,1", "calc": calc})
    assert np.abs(split - plain).max() > 1e-3


def test_attention_regions_read_each_prompt_inside_its_region(tiny_pipe, monkeypatch):
    """The attention mode's cross-attention output is, at each position, its region's prompt's own: the left half
    of a 1,1 split is what the left prompt alone gives there, at every cross-attention layer."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from latentgen.generation.regions import RegionalAttention, Regions

    attn = next(m for n, m in tiny_pipe.unet.named_modules() if n.endswith("attn2"))
    torch.manual_seed(0)
    hidden = torch.randn(1, 4 * 6, attn.to_q.in_features)  # a 4×6 layer
    left, right = torch.randn(1, 5, attn.to_k.in_features), torch.randn(1, 5, attn.to_k.in_features)
    regional = RegionalAttention(AttnProcessor2_0(), Regions("1,1"), 2, False, 4 / 6)
    with torch.no_grad():
        out = regional(attn, hidden, torch.cat([left, right], dim=1)).reshape(1, 4, 6, -1)
        alone = [AttnProcessor2_0()(attn, hidden, text).reshape(1, 4, 6, -1) for text in (left, right)]
    torch.testing.assert_close(out[:, :, :3], alone[0][:, :, :3])
    torch.testing.assert_close(out[:, :, 3:], alone[1][:, :, 3:])
    assert not getattr(tiny_pipe.unet, "regional_attention", False)
    image(tiny_pipe, "a red circle BREAK a blue square", regions={"ratios": "1,1", "calc": "attention"})
    assert not tiny_pipe.unet.regional_attention  # restored after the call
    assert all(not isinstance(m.processor, RegionalAttention) for m in tiny_pipe.unet.modules()
               if hasattr(m, "processor"))


def test_regions_are_checked_written_and_read_back(tiny_pipe):
    from latentgen.errors import UserError

    with pytest.raises(UserError, match=r"the regions are 3 \(1,1,1\) but the prompt has 2 region prompts"):
        image(tiny_pipe, "a BREAK b", regions={"ratios": "1,1,1"})
    with pytest.raises(UserError, match="region ratios must be positive numbers"):
        image(tiny_pipe, "a BREAK b", regions={"ratios": "1,-1"})
    from latentgen.generation.infotext import a1111_parameters, a1111_request

    meta = tiny_pipe("sky ADDCOMM a red circle BREAK a blue square", regions={"ratios": "1,1", "mode": "rows",
                                                                               "calc": "attention"},
                     num_inference_steps=2, seed=1).metadata[0]
    text = a1111_parameters(meta | {"model": "m", "model_hash": "0", "version": "0"})
    assert "RP Active: True, RP Ratios: 1,1" in text or 'RP Ratios: "1,1"' in text
    assert "RP Calc Mode: Attention" in text
    settings, _, unused = a1111_request(text)
    assert unused == [] and settings["regions"].mode == "rows" and settings["regions"].ratios == "1,1"
    assert settings["regions"].calc == "attention"
    with pytest.raises(UserError, match="every prompt of a call needs the same parts"):
        tiny_pipe(["a ADDBASE b BREAK c", "b BREAK c"], regions={"ratios": "1,1", "calc": "attention", "base": 0.3},
                  num_inference_steps=1)


# ----------------------------------------------------------------------------------------------------------------
# Outpainting (latentgen.generation.outpaint)


@pytest.mark.parametrize("fill", ["noise", "edge", "mean"])
def test_outpainting_extends_the_canvas_and_keeps_the_original_pixels(tiny_pipe, fill):
    from PIL import Image

    rng = np.random.default_rng(0)
    original = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    out = tiny_pipe("a red circle", image=original, outpaint={"sides": "right=16,top=8", "fill": fill, "blur": 4},
                    num_inference_steps=3, seed=2).images[0]
    assert out.size == (48, 40)
    result = np.asarray(out)
    kept = result[8 + 4:, :32 - 4]  # beyond the 4 px blend: the original, pixel for pixel
    np.testing.assert_array_equal(kept, np.asarray(original)[4:, :28])
    from latentgen.generation.outpaint import Outpaint

    canvas, _ = Outpaint("right=16,top=8", fill, 4).canvas(original, 2)
    assert np.abs(result[:8].astype(int) - np.asarray(canvas)[:8]).mean() > 10  # the new strip is painted over


def test_outpainting_is_checked_in_one_line(tiny_pipe):
    from latentgen.errors import UserError

    with pytest.raises(UserError, match="outpainting extends an image and makes its own mask"):
        tiny_pipe("x", outpaint={"sides": "right=8"})
    with pytest.raises(UserError, match="outpaint takes SIDE=PIXELS"):
        tiny_pipe("x", image=np.zeros((8, 8, 3), dtype=np.uint8), outpaint={"sides": "sideways=3"})


# ----------------------------------------------------------------------------------------------------------------
# The regional prompter's API on the server (latentgen.server.a1111.regional_prompter)

RP = [True, False, "Matrix", "Columns", "Mask", "Prompt", "1,1", "0.3", False, False, False, "Latent", False, "0",
      "0", "0", "", "0", "0", False]


def rp_args(**changes):
    from latentgen.server.a1111 import RP_ARGS

    return [changes.get(key.replace(" ", "_"), value) for key, value in zip(RP_ARGS, RP)]


@pytest.mark.parametrize("prompt, base, common, want", [
    ("a BREAK b", False, False, "a BREAK b"),
    ("sky BREAK a BREAK b", False, True, "sky, ADDCOMM a BREAK b"),
    ("sky BREAK a BREAK b", True, False, "sky ADDBASE a BREAK b"),
    ("day BREAK sky BREAK a BREAK b", True, True, "day, sky ADDBASE day, ADDCOMM a BREAK b"),
    ("sky ADDBASE a BREAK b", False, False, "sky ADDBASE a BREAK b"),  # the keyword ticks the box
    ("day ADDCOMM a BREAK b", False, False, "day, ADDCOMM a BREAK b"),
])
def test_the_regional_prompters_prompt_is_read_as_its_extension_does(prompt, base, common, want):
    from latentgen.generation.regions import Regions
    from latentgen.server.a1111 import regional_prompt

    assert regional_prompt(prompt, base, common) == want
    if common:  # every region's prompt starts with the common part, as the extension's comadder makes them
        assert all(p.startswith(prompt.split(" BREAK ")[0] + ",") for p in Regions("1,1").prompts(want)[1])


def test_the_regional_prompters_arguments_are_read_or_refused_in_one_line():
    from latentgen.errors import UserError
    from latentgen.generation.regions import Regions
    from latentgen.server.a1111 import regional_prompter

    notes = []
    assert regional_prompter({"Regional Prompter": {"args": rp_args(matrix_mode="Rows", use_base=True)}}, notes) \
        == (Regions("1,1", "rows", 0.3, "latent"), True, False)
    assert notes == []
    assert regional_prompter({"regional prompter": {"args": rp_args(active=False)}}, notes) is None
    assert regional_prompter({}, notes) is None
    regional_prompter({"Regional Prompter": {"args": rp_args(LoRA_stop_step="5")}}, notes)
    assert notes == ["alwayson_scripts.Regional Prompter: LoRA stop step is not supported by latentgen and was "
                     "ignored"]
    for changes, message in ((dict(mode="Mask"), "mode 'Mask' is not supported"),
                             (dict(ratios="1,1;2,1"), "2D ratios"),
                             (dict(base_ratios="0.2,0.4"), "one base ratio for every region"),
                             (dict(calc_mode="Fast"), "the calc mode must be one of Latent, Attention"),
                             (dict(matrix_mode="Diagonal"), "the matrix mode must be one of")):
        with pytest.raises(UserError, match=message):
            regional_prompter({"Regional Prompter": {"args": rp_args(**changes)}}, [])


@pytest.fixture(scope="module")
def server(tiny_folder):
    from conftest import Server

    s = Server(["--model", str(tiny_folder), "--dtype", "fp32"])
    yield s
    s.close()


def test_webuiapi_with_the_regional_prompter_gives_the_pipelines_image(server, tiny_folder):
    import webuiapi

    from latentgen import LatentPipeline

    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    prompt = "sky BREAK a red circle BREAK a blue square"
    result = api.txt2img(prompt=prompt, seed=3, steps=3, cfg_scale=6.0, width=32, height=32, sampler_name="Euler",
                         alwayson_scripts={"Regional Prompter": {"args": rp_args(use_base=True)}})
    assert "notes" not in result.info, result.info.get("notes")
    assert "RP Active: True" in result.info["infotexts"][0] and "RP Base Ratio: 0.3" in result.info["infotexts"][0]
    pipe = LatentPipeline.from_pretrained(tiny_folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    direct = pipe("sky ADDBASE a red circle BREAK a blue square", seed=3, num_inference_steps=3, guidance_scale=6.0,
                  width=32, height=32, scheduler="euler", regions={"ratios": "1,1", "base": 0.3}).images[0]
    assert np.array_equal(np.asarray(result.image.convert("RGB")), np.asarray(direct))
    r = server.post("/sdapi/v1/txt2img", {"prompt": "a BREAK b", "steps": 1, "width": 32, "height": 32,
                                          "alwayson_scripts": {"Regional Prompter": {"args": rp_args(mode="Prompt")}}})
    assert r.status_code == 400 and "mode 'Prompt' is not supported" in r.json()["detail"]


def test_the_web_page_sends_regions(server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from conftest import chromium, generate_on_page

    driver = chromium()
    try:
        driver.get(server.url + "/")
        Select(driver.find_element(By.ID, "rp_split")).select_by_visible_text("Rows")
        text = generate_on_page(driver, {"prompt": "a red circle BREAK a blue square", "width": "32", "height": "32",
                                         "steps": "2", "rp_ratios": "2,1"})
        assert "RP Active: True" in text and "RP Divide mode: rows" in text and "RP Calc Mode: Attention" in text
    finally:
        driver.quit()


# ----------------------------------------------------------------------------------------------------------------
# SD3 and Flux: the grammar read before diffusers' pipelines encode the prompts, edits swapped in step by step


def flow_pipe(kind):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    import components as C
    from latentgen.generation.flow import FlowPipeline

    inner = StableDiffusion3Pipeline(**C.sd3_components()) if kind == "sd3" else FluxPipeline(**C.flux_components())
    pipe = FlowPipeline(inner, kind, None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


FLOW_REQUEST = dict(seed=2, num_inference_steps=4, height=32, width=32, guidance_scale=3.0, output_type="np")


def diffusers_switching(pipe, first: str, then: str, after: int, negative: str = ""):
    """Prompt `first` for steps 0..`after`, then `then`, by diffusers' own means: the pipeline's step-end callback
    hands it the new text states (SD3: with the negative's in front, and the pooled vector; Flux's pooled vector,
    which its callback cannot hand over, overwritten in place)."""
    inner, flux = pipe.inner, pipe.kind == "flux"

    def encode(text):
        if flux:
            states, pooled, _ = inner.encode_prompt(text, None, "cpu")
            return states, pooled
        states, _, pooled, _ = inner.encode_prompt(text, None, None, "cpu", do_classifier_free_guidance=False)
        return states, pooled

    states, pooled = encode(first)
    pooled = pooled.clone()
    (new_states, new_pooled), (neg_states, neg_pooled) = encode(then), encode(negative)

    def switch(_, i, t, tensors):
        if i != after:
            return {}
        if flux:
            pooled.copy_(new_pooled)
            return {"prompt_embeds": new_states}
        return {"prompt_embeds": torch.cat([neg_states, new_states]),
                "pooled_prompt_embeds": torch.cat([neg_pooled, new_pooled])}

    extra = {} if flux else dict(negative_prompt_embeds=neg_states, negative_pooled_prompt_embeds=neg_pooled)
    plan = pipe.check_request(first, **FLOW_REQUEST)
    return inner(prompt_embeds=states, pooled_prompt_embeds=pooled, latents=pipe.noise(plan), height=32, width=32,
                 num_inference_steps=4, guidance_scale=3.0, output_type="np", callback_on_step_end=switch,
                 callback_on_step_end_tensor_inputs=["prompt_embeds", "pooled_prompt_embeds"][:1 if flux else 2],
                 **extra).images


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_flow_models_edit_prompts_as_diffusers_switching_them_would(kind):
    pipe = flow_pipe(kind)
    a, b = "a red circle", "a blue square"
    edited = pipe(f"[{a}:{b}:1]", **FLOW_REQUEST).images
    # to float rounding: handed text states instead of text, diffusers' own unswitched image differs by ~1e-6 too
    np.testing.assert_allclose(edited, diffusers_switching(pipe, a, b, after=1), atol=1e-5, rtol=0)
    # an edit past the last step is the first prompt, read as text without its brackets
    np.testing.assert_array_equal(pipe(f"[{a}:{b}:9]", **FLOW_REQUEST).images, pipe(a, **FLOW_REQUEST).images)
    assert np.abs(edited - pipe(a, **FLOW_REQUEST).images).max() > 1e-3
    assert np.abs(edited - pipe(b, **FLOW_REQUEST).images).max() > 1e-3


def test_rows_of_equal_first_texts_follow_their_own_schedules():
    """Two images whose prompts start alike, and an SD3 negative prompt equal to a prompt's first text: each row
    follows its own prompt's schedule (by its place in the batch)."""
    pipe = flow_pipe("sd3")
    request = FLOW_REQUEST | dict(seed=[2, 2])
    got = pipe(["[a red circle:a blue square:1]", "[a red circle:a green star:1]"], **request).images
    alone = [pipe(p, **FLOW_REQUEST).images[0] for p in ("[a red circle:a blue square:1]",
                                                         "[a red circle:a green star:1]")]
    np.testing.assert_allclose(got, alone, atol=1e-5, rtol=0)  # a batch's float rounding, as for plain prompts
    assert np.abs(alone[0] - alone[1]).max() > 1e-3
    late = pipe("[a red circle:2]", negative_prompt="", **FLOW_REQUEST).images
    empty = pipe("", **FLOW_REQUEST).images
    assert np.abs(late - empty).max() > 1e-3  # the prompt's rows took "a red circle" from step 3, the negatives not


def test_sd3_edits_its_negative_prompt_too():
    pipe = flow_pipe("sd3")
    got = pipe("a red circle", negative_prompt="[blurry:dark:2]", **FLOW_REQUEST).images
    plain = pipe("a red circle", negative_prompt="blurry", **FLOW_REQUEST).images
    assert np.abs(got - plain).max() > 1e-4


@pytest.mark.parametrize("kind, prompt, error", [
    ("sd3", "a red circle AND a blue square", "AND (composable prompts) is not supported with SD3 models yet"),
    ("flux", "a red circle BREAK a blue square", "BREAK is CLIP's 75-token windows; FLUX models read the prompt"),
])
def test_flow_models_refuse_and_and_break_in_one_line(kind, prompt, error):
    import re

    from latentgen.errors import UserError

    with pytest.raises(UserError, match=re.escape(error)):
        flow_pipe(kind)(prompt, **FLOW_REQUEST)


def test_flow_prompt_editing_with_an_image_is_refused():
    from PIL import Image

    from latentgen.errors import UserError

    with pytest.raises(UserError, match=r"prompt editing and alternation \(\[a:b:when\], \[a\|b\]\) run with SD3"):
        flow_pipe("sd3")("[a:b:0.5]", image=Image.new("RGB", (32, 32)), **FLOW_REQUEST)


def plain_embeddings(pipe, text):
    """diffusers' own (states (T, D), pooled (P,)) of one text."""
    if pipe.kind == "flux":
        states, pooled, _ = pipe.inner.encode_prompt(text, None, "cpu")
    else:
        states, _, pooled, _ = pipe.inner.encode_prompt(text, None, None, "cpu", do_classifier_free_guidance=False)
    return states[0], pooled[0]


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_flow_weights_scale_each_encoders_token_states_keeping_their_mean(kind):
    """`a (red:1.5) circle`: each encoder's states of `a red circle` (SD3: CLIP-L's and CLIP-G's channels of its
    first 77 rows, then T5's rows; Flux: T5's) with red's rows times 1.5, then the block rescaled to its former
    mean; the pooled vectors the plain text's. Weights of 1 give diffusers' embeddings themselves."""
    from latentgen.generation import flow_prompts

    pipe = flow_pipe(kind)
    inner, length = pipe.inner, (256 if kind == "sd3" else 512)
    states, pooled = plain_embeddings(pipe, "a red circle")
    ones = flow_prompts.encode(inner, kind, "a (red:1.0) circle", length)
    torch.testing.assert_close(ones, (states, pooled), atol=0, rtol=0)

    got_states, got_pooled = flow_prompts.encode(inner, kind, "a (red:1.5) circle", length)
    torch.testing.assert_close(got_pooled, pooled, atol=0, rtol=0)
    t5_tokenizer = inner.tokenizer_2 if kind == "flux" else inner.tokenizer_3
    blocks = []  # (rows, channels, the tokenizer that numbered those rows)
    if kind == "sd3":
        width_l, width_g = inner.text_encoder.config.hidden_size, inner.text_encoder_2.config.hidden_size
        blocks += [(slice(0, 77), slice(0, width_l), inner.tokenizer),
                   (slice(0, 77), slice(width_l, width_l + width_g), inner.tokenizer_2)]
    blocks.append((slice(77 if kind == "sd3" else 0, None), slice(None), t5_tokenizer))
    for rows, channels, tokenizer in blocks:
        plain = states[rows, channels]
        ids = tokenizer("a red circle", padding="max_length", max_length=plain.shape[0], truncation=True).input_ids
        red = tokenizer("red", add_special_tokens=False).input_ids
        scale = torch.tensor([1.5 if i in red else 1.0 for i in ids])[:, None]
        assert (scale == 1.5).sum() == len(red)
        want = plain * scale
        want = want * (plain.mean() / want.mean())
        torch.testing.assert_close(got_states[rows, channels], want, atol=1e-5, rtol=1e-5)
    if kind == "sd3":  # the CLIP block's zero padding up to T5's width stays zero
        assert not got_states[:77, width_l + width_g:].any()


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_flow_models_read_weights_instead_of_brackets(kind):
    """The image of `a (red:1.0) circle` is that of `a red circle` (the brackets are not words), `(red:1.5)`
    changes it, also in the negative prompt and with img2img; an unbalanced bracket is a one-line error."""
    from PIL import Image

    from latentgen.errors import UserError
    from latentgen.generation import flow_prompts

    pipe = flow_pipe(kind)
    plain = pipe("a red circle", **FLOW_REQUEST).images
    np.testing.assert_allclose(pipe("a (red:1.0) circle", **FLOW_REQUEST).images, plain, atol=1e-6, rtol=0)
    seen = []
    hook = pipe.inner.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"][-1].clone()), with_kwargs=True)
    weighted = pipe("a (red:1.5) circle", **FLOW_REQUEST).images
    hook.remove()
    want, _ = flow_prompts.encode(pipe.inner, kind, "a (red:1.5) circle", 256 if kind == "sd3" else 512)
    torch.testing.assert_close(seen[0], want, atol=1e-5, rtol=0)  # the transformer reads the weighted states
    assert (seen[0] - plain_embeddings(pipe, "a red circle")[0]).abs().max() > 0.1
    # the tiny Flux reads its T5 states faintly (swapping them for another prompt's moves its image by ~1e-3)
    assert np.abs(weighted - plain).max() > (1e-3 if kind == "sd3" else 2e-6)
    if kind == "sd3":
        blurry = pipe("a red circle", negative_prompt="blurry", **FLOW_REQUEST).images
        assert np.abs(pipe("a red circle", negative_prompt="(blurry:1.4)", **FLOW_REQUEST).images
                      - blurry).max() > 1e-4  # one token of the tiny model's: a small change, far above rounding
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    request = FLOW_REQUEST | dict(image=image, strength=0.7)
    np.testing.assert_allclose(pipe("a (red:1.0) circle", **request).images, pipe("a red circle", **request).images,
                               atol=1e-6, rtol=0)
    with pytest.raises(UserError, match=r"unbalanced '\(' at position 2"):
        pipe.check_request("a (red circle", **FLOW_REQUEST)
