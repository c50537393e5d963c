"""Chinese prompts (`latentgen.components.chinese`): the character tokenizer, a pipeline with a student text encoder,
and the distillation job that trains one (`latentgen.training.text_student`), on tiny components."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

import components as C
from latentgen import LatentPipeline
from latentgen.components.chinese import (
    ChineseTextEncoder,
    check_one_language,
    make_tokenizer,
    simplified,
    student_config,
    vocabulary,
)
from latentgen.errors import UserError


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(vocabulary(["蓝色背景上的红色圆形"]), 77)


def test_the_tokenizer_reads_characters_and_round_trips(tokenizer):
    text = "蓝色背景上，红色圆形在绿色正方形的左边"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text) and tokenizer.unk_token_id not in ids  # one token per character, all known
    assert tokenizer.decode(ids).replace(" ", "") == text
    assert len(tokenizer.get_vocab()) > 5000  # pypinyin's common characters, not only the dataset's
    assert simplified("紅色的圓形在藍色背景上") == "红色的圆形在蓝色背景上"


def test_unknown_characters_are_read_as_unknown_with_a_warning(tokenizer, caplog):
    from transformers import BertModel

    encoder = ChineseTextEncoder(tokenizer, BertModel(student_config(len(tokenizer.get_vocab()), 32, 1, 4, 37, 77)))
    with caplog.at_level(logging.WARNING, logger="latentgen"):
        logging.getLogger("latentgen").propagate = True
        ids = encoder.token_ids("红色𠀀圆形")  # an Extension B character: not among the common ones
    assert tokenizer.unk_token_id in ids
    assert "has not learned 𠀀" in caplog.text


def test_mixed_languages_are_one_line_errors():
    check_one_language("蓝色背景上的红色圆形")
    check_one_language("a red circle on a blue background")
    check_one_language("蓝色背景上的红色圆形 <lora:style:0.5>")  # a LoRA tag is not an English word
    with pytest.raises(UserError, match="mixes Chinese with English words \\(red, circle\\); write it in one"):
        check_one_language("a 蓝色 red circle")


@pytest.fixture(scope="module")
def zh_folder(tmp_path_factory, tokenizer):
    """The tiny pipeline with a tiny random student, saved."""
    torch.manual_seed(0)
    from transformers import BertModel

    student = BertModel(student_config(len(tokenizer.get_vocab()), 32, 1, 4, 37, 77), add_pooling_layer=False)
    folder = tmp_path_factory.mktemp("zh") / "pipe"
    LatentPipeline(**C.components(), text_encoder_zh=student.eval(), tokenizer_zh=tokenizer).save_pretrained(folder)
    return folder


def test_a_chinese_prompt_is_read_by_the_student_and_an_english_one_as_before(zh_folder, tiny_folder):
    pipe = LatentPipeline.from_pretrained(zh_folder, torch_dtype=torch.float32)
    index = json.loads((zh_folder / "model_index.json").read_text())
    assert index["text_encoder_zh"] == ["transformers", "BertModel"] and index["tokenizer_zh"][0] == "transformers"
    hidden, _ = pipe.encode_prompts(["蓝色背景上的紅色圓形"])
    tokens = pipe.tokenizer_zh(["蓝色背景上的红色圆形"], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        direct = pipe.text_encoder_zh(tokens.input_ids, attention_mask=tokens.attention_mask)[0]
    torch.testing.assert_close(hidden, direct)  # traditional characters read as simplified
    both, _ = pipe.encode_prompts(["a red circle", "蓝色背景上的红色圆形"])
    torch.testing.assert_close(both[1:], direct)
    plain = LatentPipeline.from_pretrained(tiny_folder, torch_dtype=torch.float32)
    kwargs = dict(num_inference_steps=2, seed=3, output_type="np")
    np.testing.assert_array_equal(pipe("a red circle", **kwargs).images, plain("a red circle", **kwargs).images)
    with pytest.raises(UserError, match="mixes Chinese with English words"):
        pipe("a 红色 circle", **kwargs)


def test_chinese_prompts_take_a1111_weights(zh_folder):
    pipe = LatentPipeline.from_pretrained(zh_folder, torch_dtype=torch.float32)
    plain, _ = pipe.encode_prompts(["蓝色背景上的红色圆形"])
    same, _ = pipe.encode_prompts(["蓝色背景上的(红色圆形:1.0)"])
    heavier, _ = pipe.encode_prompts(["蓝色背景上的(红色:1.3)圆形"])
    torch.testing.assert_close(same, plain)  # weight 1 is the plain prompt, the brackets read as syntax
    weighted = (heavier - plain).abs().amax(-1)[0]  # (T,) per token
    tokens = pipe.tokenizer_zh.convert_ids_to_tokens(pipe.tokenizer_zh("蓝色背景上的红色圆形").input_ids)
    assert tokens[7:9] == ["红", "色"] and weighted[7:9].min() > weighted[1:7].max()  # 红色 moved most


def test_diffusers_loads_the_folder_without_the_student(zh_folder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(zh_folder, safety_checker=None)
    assert not hasattr(pipe, "text_encoder_zh")


def distill(teacher, out, steps: int, **overrides):
    from latentgen.training.text_student import TextStudentConfig, train_text_student

    config = TextStudentConfig(output_dir=str(out), teacher=str(teacher), max_steps=steps, train_batch_size=8,
                               learning_rate=1e-3, layers=1, heads=4, intermediate_size=37, max_length=77,
                               checkpoint_every=5, log_every=5, validation_scenes=16, mixed_precision="fp32", scenes=96,
                               **overrides)
    config.check()
    return train_text_student(config)


def distance(student_folder, teacher) -> float:
    """The student's mean squared error to the teacher on seen scenes in the dataset's own Chinese phrasing."""
    from transformers import BertModel

    from latentgen.components.chinese import make_tokenizer  # noqa: F401
    from latentgen.training.text_student import teacher_states, train_scenes

    pipe = LatentPipeline.from_pretrained(teacher, torch_dtype=torch.float32)
    scenes = train_scenes()[::46][:24]  # among the 96 trained on
    want = teacher_states(pipe, [s.english() for s in scenes])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(student_folder / "tokenizer_zh")
    model = BertModel.from_pretrained(student_folder / "text_encoder_zh").float().eval()
    from latentgen.data.shapes import ZH_ONE, ZH_TWO

    texts = [s.chinese(ZH_ONE[0] if len(s.shapes) == 1 else ZH_TWO[0]) for s in scenes]
    tokens = tok(texts, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        got = model(tokens.input_ids, attention_mask=tokens.attention_mask)[0]
    return torch.nn.functional.mse_loss(got, torch.stack([want[s.english()] for s in scenes])).item()


def test_distillation_learns_resumes_bit_for_bit_and_installs(tiny_folder, tmp_path):
    from safetensors.torch import load_file

    from latentgen.training.text_student import install

    short = distill(tiny_folder, tmp_path / "short", 1)
    full = distill(tiny_folder, tmp_path / "full", 30)
    assert distance(full, tiny_folder) < 0.7 * distance(short, tiny_folder)  # it learns
    distill(tiny_folder, tmp_path / "resumed", 10)
    resumed = distill(tiny_folder, tmp_path / "resumed", 30, resume_from="latest")
    a, b = (load_file(p / "text_encoder_zh" / "model.safetensors") for p in (full, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model = tmp_path / "model"
    LatentPipeline.from_pretrained(tiny_folder, torch_dtype=torch.float32).save_pretrained(model)
    before = {p.name: p.read_bytes() for p in (model / "unet").iterdir()}
    install(full, model)
    pipe = LatentPipeline.from_pretrained(model, torch_dtype=torch.float32)
    assert pipe.text_encoder_zh is not None and {p.name: p.read_bytes() for p in (model / "unet").iterdir()} == before


def test_the_shipped_student_means_what_the_english_prompt_means():
    """The default model's Chinese student (issue #50) puts a Chinese prompt next to its English one in the text
    encoder's space, and farther from the English prompt with the colours swapped (binding is in the embedding)."""
    from latentgen.data.shapes import ZH_ONE, ZH_TWO, pair_prompt, single_prompt, zh_prompt
    from latentgen.generation.models import DEFAULT_MODEL

    pipe = LatentPipeline.from_pretrained(DEFAULT_MODEL, torch_dtype=torch.float32)

    def cosine(a: str, b: str) -> float:
        (x, _), (y, _) = pipe.encode_prompts([a]), pipe.encode_prompts([b])
        return torch.nn.functional.cosine_similarity(x.flatten(), y.flatten(), dim=0).item()

    one = zh_prompt(ZH_ONE[0], "white", [("red", "circle")])
    right = cosine(one, single_prompt("red", "circle", "white"))
    assert right > 0.99 and right > cosine(one, single_prompt("blue", "circle", "white")) + 0.05  # 0.999, 0.90
    two = zh_prompt(ZH_TWO[0], "black", [("green", "square"), ("yellow", "triangle")])
    right = cosine(two, pair_prompt(("green", "square"), ("yellow", "triangle"), "black"))
    swapped = cosine(two, pair_prompt(("yellow", "square"), ("green", "triangle"), "black"))
    assert right > 0.99 and right > swapped + 0.01, (right, swapped)  # measured 0.997 and 0.975


def test_a_chinese_prompt_goes_through_the_cli_infotext_replay_and_server(zh_folder, tmp_path):
    """A1111's infotext keeps the Chinese prompt, `--replay` makes the image again, and webuiapi (which sends UTF-8
    JSON) gets the pipeline's own image through the server."""
    import webuiapi
    from PIL import Image

    from conftest import Server, infer
    from latentgen.generation.infotext import a1111_request

    prompt = "蓝色背景上的红色圆形"
    out = tmp_path / "zh.png"
    r = infer("--model", zh_folder, "--prompt", prompt, "--steps", 2, "--seed", 4, "--dtype", "fp32", "--out", out)
    assert r.returncode == 0, r.stderr
    settings, _, _ = a1111_request(Image.open(out).info["parameters"])
    assert settings["prompt"] == prompt
    r = infer("--replay", out)
    assert r.returncode == 0 and "identical, bit for bit" in r.stdout, r.stderr
    server = Server(["--model", str(zh_folder), "--dtype", "fp32"])
    try:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
        got = api.txt2img(prompt=prompt, seed=4, steps=2, cfg_scale=7.5, width=64, height=64,
                          sampler_name="DPM++ 2M", alwayson_scripts={})
        assert got.info["prompt"] == prompt
        direct = LatentPipeline.from_pretrained(zh_folder, torch_dtype=torch.float32)(
            prompt, seed=4, num_inference_steps=2, guidance_scale=7.5, width=64, height=64,
            scheduler="dpm++").images[0]
        np.testing.assert_array_equal(np.asarray(got.image.convert("RGB")), np.asarray(direct))
    finally:
        server.close()
