"""LoRA loading through diffusers' own loader: the same image as diffusers' StableDiffusionPipeline gives for the
same file, in diffusers/peft format and in kohya/A1111's."""

import math

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

from latentgen import LatentPipeline


def image(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red circle", num_inference_steps=3, generator=torch.Generator().manual_seed(1),
                output_type="np").images


def load_both(folder, path):
    """Our pipeline, its image before loading the LoRA `path` and after, and diffusers' image with it."""
    ours = LatentPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    before = image(ours)
    ours.load_lora_weights(str(path))
    sd = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    sd.load_lora_weights(str(path))
    return ours, before, image(ours), image(sd)


@pytest.fixture(scope="module")
def unet_lora(tiny_folder):
    """A U-Net LoRA on the tiny model's attention projections, with random (non-zero) up weights."""
    import components as C

    return C.random_unet_lora(tiny_folder)


@pytest.mark.parametrize("form", ["diffusers", "kohya"])
def test_lora_images_equal_diffusers(tiny_folder, tmp_path, unet_lora, form):
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya

    if form == "diffusers":
        StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=convert_state_dict_to_diffusers(
            unet_lora))
        path = tmp_path / "pytorch_lora_weights.safetensors"
    else:  # kohya's names (lora_unet_..., lora_down/lora_up, alpha), as A1111 and sd-scripts share them
        kohya = {f"lora_unet_{k}": v for k, v in convert_state_dict_to_kohya(unet_lora).items()}
        assert any(k.endswith(".alpha") for k in kohya) and any(k.endswith(".lora_down.weight") for k in kohya)
        path = tmp_path / "kohya.safetensors"
        save_file({k: v.contiguous() for k, v in kohya.items()}, str(path))
    ours, before, with_lora, reference = load_both(tiny_folder, path)
    assert np.abs(with_lora - before).max() > 0.05  # the LoRA does something
    assert np.abs(with_lora - reference).max() <= 1e-4
    ours.set_adapters(ours.get_active_adapters(), adapter_weights=[0.0])  # weight 0: the base model again
    assert np.abs(image(ours) - before).max() <= 1e-5


@pytest.mark.parametrize("form", ["diffusers", "kohya"])
def test_text_encoder_lora_images_equal_diffusers_and_the_merged_weights(tiny_folder, tmp_path, unet_lora, form):
    """A LoRA of the U-Net and the text encoder; kohya's file carries sd-scripts' names (`lora_te_text_model_…`, which
    transformers 5's CLIPTextModel no longer has) and alphas. The prompt's embedding is cached before the LoRA loads:
    the cache must not give the old one back."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
    from peft import LoraConfig

    import components as C

    te_lora = C.random_text_encoder_lora(tiny_folder)
    unet_kohya = {f"lora_unet_{k}": torch.tensor(8.0) if k.endswith(".alpha") else v.contiguous()
                  for k, v in convert_state_dict_to_kohya(unet_lora).items()}  # alpha 8 as in the peft config
    if form == "diffusers":
        # alphas as diffusers' training scripts record them (a file without them means alpha = rank)
        StableDiffusionPipeline.save_lora_weights(
            tmp_path, unet_lora_layers=convert_state_dict_to_diffusers(unet_lora), text_encoder_lora_layers=te_lora,
            unet_lora_adapter_metadata=LoraConfig(r=4, lora_alpha=8, target_modules=[
                "to_q", "to_k", "to_v", "to_out.0"]).to_dict(),
            text_encoder_lora_adapter_metadata=LoraConfig(r=4, lora_alpha=8, target_modules=[
                "q_proj", "k_proj", "v_proj", "out_proj"]).to_dict())
        path = tmp_path / "pytorch_lora_weights.safetensors"
    else:
        kohya = dict(unet_kohya)
        for key, tensor in te_lora.items():
            module, _, kind = key.partition(".lora_")
            name = "lora_te_text_model_" + module.replace(".", "_")
            kohya[f"{name}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = tensor
            kohya[f"{name}.alpha"] = torch.tensor(8.0)
        path = tmp_path / "kohya.safetensors"
        save_file({k: v.contiguous() for k, v in kohya.items()}, str(path))
    ours, before, with_lora, reference = load_both(tiny_folder, path)
    assert np.abs(with_lora - reference).max() <= 1e-4
    # the text encoder's part by hand: W + (alpha / rank)·B·A. Compared on the embeddings: a random LoRA this
    # strong makes the tiny U-Net amplify rounding (fused and unfused images differ by 1e-2)
    merged = LatentPipeline.from_pretrained(tiny_folder, torch_dtype=torch.float32)
    layers = dict(merged.text_encoder.named_modules())
    with torch.no_grad():
        for key, down in te_lora.items():
            if ".lora_A." in key:
                layers[key.partition(".lora_A.")[0]].weight += 2.0 * te_lora[key.replace("lora_A", "lora_B")] @ down
    prompts = ["a red circle", ""]
    expected, got = merged.encode_prompts(prompts)[0], ours.encode_prompts(prompts)[0]
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert (got - LatentPipeline.from_pretrained(tiny_folder).encode_prompts(prompts)[0]).abs().max() > 0.1
    assert np.abs(with_lora - before).max() > 0.05
    ours.set_adapters(ours.get_active_adapters(), adapter_weights=[0.0])  # weight 0: the base model again
    assert np.abs(image(ours) - before).max() <= 1e-5


# ----------------------------------------------------------------------------------------------------------------
# --lora, <lora:NAME:SCALE>, Lora hashes, replay, bad LoRAs

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from PIL import Image  # noqa: E402

from conftest import ROOT, infer  # noqa: E402
from latentgen.errors import UserError  # noqa: E402


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory, unet_lora):
    from diffusers.utils import convert_state_dict_to_diffusers

    folder = tmp_path_factory.mktemp("loras")
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=convert_state_dict_to_diffusers(unet_lora),
                                              weight_name="circles.safetensors")
    return folder / "circles.safetensors"


@pytest.mark.parametrize("part", ["unet", "text_encoder"])
def test_a_request_lora_equals_diffusers_with_that_scale_and_switches_off_again(tiny_folder, lora_file, part):
    """Switched on by one request and off by the next; a text encoder LoRA's prompt embeddings are not taken from
    the cache of another LoRA state."""
    if part == "text_encoder":
        import components as C

        lora_file = lora_file.with_name("words.safetensors")
        StableDiffusionPipeline.save_lora_weights(lora_file.parent, weight_name=lora_file.name,
                                                  text_encoder_lora_layers=C.random_text_encoder_lora(tiny_folder))
    ours = LatentPipeline.from_pretrained(tiny_folder, torch_dtype=torch.float32)
    ours.set_progress_bar_config(disable=True)
    call = dict(num_inference_steps=3, seed=1, output_type="np")
    before = ours("a red circle", **call).images
    with_lora = ours("a red circle", loras=[(str(lora_file), 0.7)], **call).images
    sd = StableDiffusionPipeline.from_pretrained(tiny_folder, local_files_only=True)
    sd.load_lora_weights(str(lora_file), adapter_name="x")
    sd.set_adapters(["x"], adapter_weights=[0.7])
    sd.set_progress_bar_config(disable=True)
    reference = sd("a red circle", num_inference_steps=3, generator=torch.Generator().manual_seed(1),
                   output_type="np").images
    assert np.abs(with_lora - before).max() > 0.05
    assert np.abs(with_lora - reference).max() <= 1e-4
    tagged = ours(f"a red circle <lora:{lora_file.stem}:0.7>", **call).images if ours.__dict__.update(
        loras_dir=lora_file.parent) is None else None
    assert np.array_equal(tagged, with_lora)  # the prompt tag: the same LoRA, the tag itself not encoded
    lyco = ours(f"a red circle <lyco:{lora_file.stem}:0.7>", **call).images  # A1111's alias of the LyCORIS extension
    assert np.array_equal(lyco, with_lora)
    assert np.abs(ours("a red circle", **call).images - before).max() == 0  # the next request: no LoRA


def test_lora_flag_prompt_tag_hashes_and_replay(tiny_folder, lora_file, tmp_path):
    common = ["--model", tiny_folder, "--steps", 3, "--seed", 5, "--dtype", "fp32", "--loras-dir", lora_file.parent]
    r = infer(*common, "--prompt", "a red circle", "--lora", f"{lora_file}:0.6", "--out", tmp_path / "flag.png")
    assert r.returncode == 0, r.stderr
    r = infer(*common, "--prompt", "a red circle <lora:circles:0.6>", "--out", tmp_path / "tag.png")
    assert r.returncode == 0, r.stderr
    r = infer(*common, "--prompt", "a red circle", "--out", tmp_path / "base.png")
    assert np.array_equal(pixels(tmp_path / "flag.png"), pixels(tmp_path / "tag.png"))
    assert not np.array_equal(pixels(tmp_path / "flag.png"), pixels(tmp_path / "base.png"))
    params = Image.open(tmp_path / "tag.png").info["parameters"]
    from latentgen.formats.lora import short_hash

    assert f"Lora hashes: \"circles: {short_hash(lora_file)}\"" in params and "<lora:circles:0.6>" in params
    flag_params = Image.open(tmp_path / "flag.png").info["parameters"]
    assert flag_params.splitlines()[0] == "a red circle <lora:circles:0.6>"  # --lora written as A1111's tag
    assert json.loads(Image.open(tmp_path / "flag.png").info["latentgen"])["loras"] == [[str(lora_file), 0.6]]
    for name in ("flag.png", "tag.png"):
        r = infer("--replay", tmp_path / name, "--loras-dir", lora_file.parent)
        assert r.returncode == 0 and "identical, bit for bit" in r.stdout, r.stderr
    # A1111's own reading of the flag image: the tag found by name in --loras-dir gives the same image
    a1111 = tmp_path / "a1111.png"
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", flag_params)
    Image.open(tmp_path / "flag.png").save(a1111, pnginfo=info)
    r = infer("--replay", a1111, "--model", tiny_folder, "--dtype", "fp32", "--loras-dir", lora_file.parent,
              "--out", tmp_path / "again.png")
    assert r.returncode == 0, r.stderr
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(tmp_path / "flag.png"))


def test_bad_loras_are_one_line_errors(tiny_folder, lora_file, tmp_path):
    from safetensors.torch import load_file

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(lora_file.read_bytes()[:300])
    other = tmp_path / "other.safetensors"  # a LoRA for a wider model: the shapes do not fit
    widen = {k: (2, 1) if ("lora_B" in k or "up" in k) else (1, 2) for k in load_file(str(lora_file))}
    save_file({k: torch.zeros(v.shape[0] * widen[k][0], v.shape[1] * widen[k][1])
               for k, v in load_file(str(lora_file)).items()}, str(other))
    weights = tmp_path / "weights.safetensors"
    save_file({"conv.weight": torch.zeros(2, 2)}, str(weights))
    pipe = LatentPipeline.from_pretrained(tiny_folder, torch_dtype=torch.float32)
    pipe.loras_dir = tmp_path
    cases = [((str(corrupt), 1.0), "is corrupt or truncated"), ((str(other), 1.0), "does not fit this model"),
             ((str(weights), 1.0), "holds no LoRA weights"), (("nowhere", 1.0), "is neither a file nor a name in"),
             ((str(lora_file), float("nan")), "the scale of LoRA")]
    for lora, message in cases:
        with pytest.raises(UserError, match=message) as err:
            pipe("x", num_inference_steps=2, seed=0, loras=[lora])
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="different LoRAs"):
        pipe(["a <lora:circles:1>", "b"], num_inference_steps=2, seed=[0, 1])


def test_a_trained_lora_file_gives_the_image_of_the_unet_it_was_trained_on(tiny_folder, tmp_path):
    """save_lora writes diffusers' format and kohya's with the run's alpha: each loaded by --lora/`loras=` gives the
    image of the U-Net carrying the adapter in memory (alpha 2 / rank 4: a scale of 0.5 inside the files)."""
    from latentgen.training.products import add_lora, save_lora
    from latentgen.training.unet_config import LoraTrainConfig, UNetTrainConfig

    config = UNetTrainConfig(pretrained_pipeline=str(tiny_folder), lora=LoraTrainConfig(rank=4, alpha=2, kohya=True))
    trained = LatentPipeline.from_pretrained(tiny_folder, torch_dtype=torch.float32)
    add_lora(trained.unet, config.lora)
    assert all(("lora_" in n) == p.requires_grad for n, p in trained.unet.named_parameters())
    torch.manual_seed(0)
    for name, param in trained.unet.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    save_lora(config, trained.unet, [], tmp_path / "mine.safetensors")
    base = LatentPipeline.from_pretrained(tiny_folder, torch_dtype=torch.float32)
    base.set_progress_bar_config(disable=True)
    trained.set_progress_bar_config(disable=True)
    expected = trained("a red circle", num_inference_steps=3, seed=1, output_type="np").images
    for name in ("mine.safetensors", "lora_kohya.safetensors"):
        with_file = base("a red circle", num_inference_steps=3, seed=1, output_type="np",
                         loras=[(str(tmp_path / name), 1.0)]).images
        assert np.abs(with_file - expected).max() <= 1e-4, name
    plain = base("a red circle", num_inference_steps=3, seed=1, output_type="np").images
    assert np.abs(plain - expected).max() > 1e-2


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_a_trained_lycoris_file_gives_the_image_of_the_models_it_was_trained_on(tiny_folder, tmp_path, algo):
    """lora.algo loha/lokr: save_lora writes LyCORIS's format with sd-scripts' names, which `loras=` loads (the
    attention projections and a convolution of the U-Net, the text encoder's projections; alpha 2 / rank 4), and
    which gives the images of the models that carried the adapters in memory."""
    from safetensors import safe_open

    from latentgen.training.products import add_lora, add_text_encoder_lora, save_lora
    from latentgen.training.unet_config import LoraTrainConfig, UNetTrainConfig

    lora = LoraTrainConfig(rank=4, alpha=2, algo=algo, text_encoder=True,
                           targets=["to_q", "to_k", "to_v", "to_out.0", "conv1"])
    config = UNetTrainConfig(pretrained_pipeline=str(tiny_folder), lora=lora)
    trained = LatentPipeline.from_pretrained(tiny_folder, torch_dtype=torch.float32)
    add_lora(trained.unet, lora)
    add_text_encoder_lora(trained.text_encoder, lora)
    torch.manual_seed(0)
    factors = [p for model in (trained.unet, trained.text_encoder) for name, p in model.named_parameters()
               if ("hada_" if algo == "loha" else "lokr_") in name]
    assert factors and all(p.requires_grad for p in factors)
    for param in factors:  # peft starts with a zero update
        param.data.normal_(0, 0.5)
    save_lora(config, trained.unet, [trained.text_encoder], tmp_path / "mine.safetensors")
    with safe_open(str(tmp_path / "mine.safetensors"), "pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
    assert metadata["ss_network_module"] == "lycoris.kohya" and algo in metadata["ss_network_args"]
    factor = "hada_w1_a" if algo == "loha" else "lokr_w1"
    assert any(k.startswith("lora_unet_down_blocks_") and k.endswith(factor) for k in keys)
    assert any(k.startswith("lora_unet_") and "_resnets_0_conv1." in k for k in keys)
    if algo == "lokr":  # a convolution's second factor decomposed (the up blocks' 96 input channels): (rank, in·k·k)
        assert any("_conv1.lokr_w2_b" in k for k in keys)
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in keys)
    base = LatentPipeline.from_pretrained(tiny_folder, torch_dtype=torch.float32)
    base.set_progress_bar_config(disable=True)
    trained.set_progress_bar_config(disable=True)
    expected = trained("a red circle", num_inference_steps=3, seed=1, output_type="np").images
    with_file = base("a red circle", num_inference_steps=3, seed=1, output_type="np",
                     loras=[(str(tmp_path / "mine.safetensors"), 1.0)]).images
    assert np.abs(with_file - expected).max() <= 1e-4
    plain = base("a red circle", num_inference_steps=3, seed=1, output_type="np").images
    assert np.abs(plain - expected).max() > 1e-2


def test_lora_training_run_writes_a_file_infer_applies(tiny_folder, tmp_path):
    from latentgen.io import weights_hash

    before = weights_hash(tiny_folder)
    config = tmp_path / "lora.yaml"
    config.write_text("max_steps: 3\ntrain_batch_size: 4\nlearning_rate: 5.0e-2\ncheckpoint_every: 100\n"
                      "mixed_precision: fp32\ntext_encoder: {kind: pipeline}\nvalidation_prompts: [a red circle]\n"
                      "validation_steps: 2\nlora: {rank: 4, teaches: [star], preserve: 0.5}\n"
                      "data: {source: shapes, resolution: 32, num_samples: 8}\n")
    r = subprocess.run([sys.executable, str(ROOT / "train_unet.py"), "--config", str(config),
                        f"output_dir={tmp_path / 'run'}", f"pretrained_pipeline={tiny_folder}"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lora = tmp_path / "run" / "lora.safetensors"
    assert lora.exists() and not (tmp_path / "run" / "pipeline").exists()
    assert weights_hash(tiny_folder) == before  # the base model is untouched
    common = [sys.executable, str(ROOT / "infer.py"), "--model", str(tiny_folder), "--prompt", "a red circle",
              "--steps", "3", "--seed", "2", "--dtype", "fp32"]
    for name, extra in (("base", []), ("lora", ["--lora", str(lora)])):
        r = subprocess.run([*common, *extra, "--out", str(tmp_path / f"{name}.png")], capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    from PIL import Image

    assert not np.array_equal(np.asarray(Image.open(tmp_path / "base.png")),
                              np.asarray(Image.open(tmp_path / "lora.png")))
    r = subprocess.run([sys.executable, str(ROOT / "train_unet.py"), "--config", str(config),
                        f"output_dir={tmp_path / 'bad'}", "lora.rank=4", "text_encoder.kind=minilm"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "set pretrained_pipeline" in r.stderr and "Traceback" not in r.stderr


def test_text_encoder_lora_training_resumes_bit_for_bit_and_writes_both_formats(tiny_folder, tmp_path):
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file

    config = tmp_path / "lora.yaml"
    config.write_text("max_steps: 6\ntrain_batch_size: 4\nlearning_rate: 5.0e-2\ncheckpoint_every: 3\n"
                      "keep_checkpoints: 5\nmixed_precision: fp32\ntext_encoder: {kind: pipeline}\n"
                      "validate_every: 0\nvalidation_prompts: [a red circle]\nvalidation_steps: 2\n"
                      "lr_scheduler: cosine\nlora: {rank: 4, alpha: 8, text_encoder: true, kohya: true}\n"
                      "data: {source: shapes, resolution: 32, num_samples: 8}\n")

    def train(out, *extra):
        r = subprocess.run([sys.executable, str(ROOT / "train_unet.py"), "--config", str(config),
                            f"output_dir={out}", f"pretrained_pipeline={tiny_folder}", *extra],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train(whole)
    checkpoint = whole / "checkpoints" / "checkpoint-0000003"
    unet_part = load_file(str(checkpoint / "unet.safetensors"))
    assert unet_part and all("lora_" in k for k in unet_part)  # only the LoRA: the base comes from the model
    assert all("lora_" in k for k in load_file(str(checkpoint / "text_encoder.safetensors")))
    shutil.copytree(checkpoint, cut / "checkpoints" / checkpoint.name)
    assert f"resumed from {cut / 'checkpoints' / checkpoint.name}" in train(cut, "resume_from=latest").stdout
    a, b = load_file(str(whole / "lora.safetensors")), load_file(str(cut / "lora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("text_encoder.") for k in a) and any(k.startswith("unet.") for k in a)
    with safe_open(str(whole / "lora_kohya.safetensors"), "pt") as f:
        assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in f.keys())  # sd-scripts' names
        assert {f.get_tensor(k).item() for k in f.keys() if k.endswith(".alpha")} == {8.0}
    images = {}
    for name in ("lora.safetensors", "lora_kohya.safetensors"):
        pipe = LatentPipeline.from_pretrained(tiny_folder, torch_dtype=torch.float32)
        pipe.load_lora_weights(str(whole / name))
        images[name] = image(pipe)
    assert np.abs(images["lora.safetensors"] - images["lora_kohya.safetensors"]).max() <= 1e-4
    assert np.abs(images["lora.safetensors"] - image(LatentPipeline.from_pretrained(tiny_folder))).max() > 1e-2


def test_preserved_examples_learn_what_the_base_model_predicts(tiny_folder):
    """lora.preserve: an example whose caption names none of lora.teaches gets the base U-Net's prediction (the same
    U-Net, adapters off) as its target; the others keep the true target, and the adapters are on again after."""
    from types import SimpleNamespace

    from latentgen.components.diffusion import NoiseConfig, diffusion_loss
    from latentgen.training.products import _base_unet, add_lora
    from latentgen.training.unet import _base_weights
    from latentgen.training.unet_config import LoraTrainConfig

    lora = LoraTrainConfig(rank=4, teaches=["star", "星"], preserve=1.0)
    texts = ["a red star on blue", "a start", "红色的星", "a red circle", "a blue star"]
    dropped = torch.tensor([False, False, False, False, True])
    assert _base_weights(None, lora)({"text": texts}, dropped).tolist() == [0.0, 1.0, 0.0, 1.0, 0.0]
    cached = SimpleNamespace(texts=["", *texts])  # a cache's text rows (row 0: the empty prompt)
    assert _base_weights(cached, lora)({"text_row": torch.arange(1, 6)}, dropped).tolist() == [0, 1, 0, 1, 0]
    lora.preserve_unconditional = True  # the dropped caption's unconditional prediction is kept too
    assert _base_weights(None, lora)({"text": texts}, dropped).tolist() == [0.0, 1.0, 0.0, 1.0, 1.0]
    assert _base_weights(None, LoraTrainConfig(rank=4))({"text": texts}, dropped) is None

    pipe = LatentPipeline.from_pretrained(tiny_folder, torch_dtype=torch.float32)
    unet = pipe.unet
    add_lora(unet, lora)
    latents = torch.randn(2, unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    tokens = pipe.tokenizer(["a red circle", "a red star"], padding="max_length", return_tensors="pt").input_ids
    context = pipe.text_encoder(tokens)[0]
    noise, base = NoiseConfig(), _base_unet(unet)

    def loss(**kwargs):
        return diffusion_loss(unet, pipe.scheduler, latents, context, torch.Generator().manual_seed(3), noise,
                              **kwargs)

    with torch.no_grad():
        kept = torch.tensor([1.0, 0.0])
        assert loss(base=base, base_weight=kept)[0].item() < 1e-10  # B starts at 0: it predicts as the base
        torch.manual_seed(0)
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.5)
        plain, preserved = loss(), loss(base=base, base_weight=kept)
        half = loss(base=base, base_weight=torch.tensor([0.5, 0.0]))
    assert preserved[1] == plain[1] == half[1] and 0 < preserved[0] != plain[0]
    assert half[0] not in (preserved[0], plain[0])
    assert all(not layer.disable_adapters for layer in unet.modules() if hasattr(layer, "lora_A"))


@pytest.mark.parametrize("lora, message", [
    (["lora.preserve=0.5"], "lora.preserve needs lora.rank > 0 and lora.teaches"),
    (["lora.teaches=[star]", "lora.preserve=2"], "lora.preserve must be in [0, 1], got 2"),
    (["lora.teaches=[star]", "lora.preserve=1", "lora.text_encoder=true"], "set lora.text_encoder: false"),
])
def test_bad_preserve_settings_are_one_line_errors(tiny_folder, tmp_path, lora, message):
    r = subprocess.run([sys.executable, str(ROOT / "train_unet.py"), "--config", str(ROOT / "configs" / "smoke.yaml"),
                        f"output_dir={tmp_path / 'run'}", f"pretrained_pipeline={tiny_folder}",
                        "text_encoder.kind=pipeline", "ema=false", "lora.rank=4", *lora],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr


@pytest.mark.parametrize("form", ["diffusers", "kohya"])
def test_sdxl_loras_reach_both_text_encoders_as_in_diffusers(tmp_path, form):
    """An SDXL LoRA of the U-Net and both text encoders (kohya's `lora_te1_`/`lora_te2_`, diffusers'
    `text_encoder_2.`): the image equals diffusers' StableDiffusionXLPipeline with the same file, and the second
    encoder's part is not dropped; fused, the same image again."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
    from safetensors.torch import load_file

    import components as C
    from latentgen.formats import lora as L

    LatentPipeline(**C.sdxl_components()).save_pretrained(tmp_path / "xl")
    fresh = lambda: LatentPipeline.from_pretrained(tmp_path / "xl", torch_dtype=torch.float32)  # noqa: E731
    parts = fresh()
    attention = ["q_proj", "k_proj", "v_proj", "out_proj"]
    layers = {"unet": C.random_lora(parts.unet, ["to_q", "to_k", "to_v"], 0, alpha=4),
              "text_encoder": C.random_lora(parts.text_encoder, attention, 1, alpha=4),
              "text_encoder_2": C.random_lora(parts.text_encoder_2, attention, 2, alpha=4)}
    if form == "diffusers":
        StableDiffusionXLPipeline.save_lora_weights(tmp_path, unet_lora_layers=convert_state_dict_to_diffusers(
                                                        layers["unet"]),
                                                    text_encoder_lora_layers=layers["text_encoder"],
                                                    text_encoder_2_lora_layers=layers["text_encoder_2"])
        path = tmp_path / "pytorch_lora_weights.safetensors"
    else:
        kohya = {f"lora_unet_{k}": v for k, v in convert_state_dict_to_kohya(layers["unet"]).items()}
        for prefix, part in (("lora_te1_text_model_", "text_encoder"), ("lora_te2_text_model_", "text_encoder_2")):
            for key, tensor in layers[part].items():
                module, _, kind = key.partition(".lora_")
                name = prefix + module.removeprefix("text_model.").replace(".", "_")
                kohya[f"{name}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = tensor
                kohya[f"{name}.alpha"] = torch.tensor(4.0)
        path = tmp_path / "kohya.safetensors"
        save_file({k: v.contiguous() for k, v in kohya.items()}, str(path))

    def xl_image(pipe, **kwargs):
        pipe.set_progress_bar_config(disable=True)
        return pipe("a red circle", negative_prompt="blurry", guidance_scale=6.0, num_inference_steps=3, height=32,
                    width=48, output_type="np", generator=torch.Generator().manual_seed(7), **kwargs).images

    reference = StableDiffusionXLPipeline.from_pretrained(tmp_path / "xl", local_files_only=True)
    reference.load_lora_weights(str(path))
    expected = xl_image(reference)
    ours = fresh()
    assert np.abs(xl_image(ours, loras=[(path, 1.0)]) - expected).max() <= 1e-4
    assert any("lora_" in n for n, _ in ours.text_encoder_2.named_parameters())
    without_te2 = StableDiffusionXLPipeline.from_pretrained(tmp_path / "xl", local_files_only=True)
    without_te2.load_lora_weights({k: v for k, v in load_file(str(path)).items()
                                   if "te2" not in k and not k.startswith("text_encoder_2.")})
    assert np.abs(xl_image(without_te2) - expected).max() > 1e-3  # the second encoder's part matters
    # fused: as diffusers' SDXL pipeline fuses it (a random LoRA this strong makes the tiny U-Net amplify the
    # rounding of fusing: fused and unfused images differ by up to 0.1 in both)
    fused = fresh()
    L.fuse(fused, [(path, 1.0)])
    reference.fuse_lora()
    assert np.abs(xl_image(fused, loras=[(path, 1.0)]) - xl_image(reference)).max() <= 1e-4


def lycoris_factors(kind: str, weight: torch.Tensor, generator: torch.Generator, rank: int = 2, tucker=False):
    """Random LyCORIS factors for a layer's `weight`, as LyCORIS shapes them, and the update ΔW they stand for
    (before alpha / rank): LoHa (w1a·w1b) ⊙ (w2a·w2b), each product shaped (out, in·k·k); LoKr w1 ⊗ (w2a·w2b), or
    w1 ⊗ w2 with w2 of a convolution in full, w1 the small factor of LyCORIS's factorization of the channels;
    `tucker`: convolutions wider than 1×1 in LyCORIS's CP form (LoHa's two products, LoKr's w2: a core
    contracted with two factors)."""
    from peft.tuners.lokr.layer import factorization

    out, inner = weight.shape[0], weight[0].numel()

    def rand(*shape):
        return torch.randn(*shape, generator=generator)

    if kind == "loha" and tucker and weight[0, 0].numel() > 1:  # CP: core t (r, r, k, k), wa (r, out), wb (r, in)
        f = {f"hada_{p}": v for i in (1, 2) for p, v in ((f"t{i}", rand(rank, rank, *weight.shape[2:])),
                                                           (f"w{i}_a", rand(rank, out)),
                                                           (f"w{i}_b", rand(rank, weight.shape[1])))}
        delta = math.prod(torch.einsum("i j k l, j r, i p -> p r k l", f[f"hada_t{i}"], f[f"hada_w{i}_b"],
                                       f[f"hada_w{i}_a"]) for i in (1, 2))
    elif kind == "loha":
        f = {"hada_w1_a": rand(out, rank), "hada_w1_b": rand(rank, inner),
             "hada_w2_a": rand(out, rank), "hada_w2_b": rand(rank, inner)}
        delta = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])
    else:
        (out_l, out_k), (in_m, in_n) = factorization(out, -1), factorization(weight.shape[1], -1)
        f = {"lokr_w1": rand(out_l, in_m)}
        if tucker and weight[0, 0].numel() > 1:  # CP: w2 = core t2 (r, r, k, k) with w2_a (r, out_k), w2_b (r, in_n)
            f |= {"lokr_t2": rand(rank, rank, *weight.shape[2:]), "lokr_w2_a": rand(rank, out_k),
                  "lokr_w2_b": rand(rank, in_n)}
            w2 = torch.einsum("i j k l, i p, j r -> p r k l", f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"]).contiguous()
            delta = torch.kron(f["lokr_w1"][:, :, None, None], w2)
        elif weight.ndim == 4:  # a convolution's second factor in full, (out_k, in_n, k, k), as LyCORIS stores it
            f["lokr_w2"] = rand(out_k, in_n, *weight.shape[2:])
            delta = torch.kron(f["lokr_w1"][:, :, None, None], f["lokr_w2"])
        else:
            f |= {"lokr_w2_a": rand(out_k, rank), "lokr_w2_b": rand(rank, in_n)}
            delta = torch.kron(f["lokr_w1"], f["lokr_w2_a"] @ f["lokr_w2_b"])
    return f, delta.reshape(weight.shape)


def write_lycoris(pipe, kind: str, layers: dict, prefixes: dict, path, stability: bool, tucker=False) -> dict:
    """Write a LyCORIS file of random factors (alpha 1) on `layers` ({component: [module path]}) in kohya's names
    (`prefixes[component]` + the path with _ for .; U-Net paths in Stability's layout if `stability`, taken from
    the single-file export, which diffusers' own converter reads back: test_single_file.py); return each layer's
    update at scale 1, ΔW·α/r."""
    from latentgen.formats import single_file

    ldm = {value.data_ptr(): key.removeprefix("model.diffusion_model.").removesuffix(".weight")
           for key, value in single_file.unet_to_ldm(pipe.unet).items()}
    generator = torch.Generator().manual_seed(3)
    tensors, deltas = {}, {}
    for component, paths in layers.items():
        modules = dict(getattr(pipe, component).named_modules())
        for name in paths:
            factors, delta = lycoris_factors(kind, modules[name].weight, generator, tucker=tucker)
            named = ldm[modules[name].weight.data_ptr()] if component == "unet" and stability else name
            key = prefixes[component] + named.replace(".", "_")
            tensors |= {f"{key}.{k}": v.contiguous() for k, v in factors.items()} | {f"{key}.alpha": torch.tensor(1.0)}
            # α / r; LyCORIS does not scale a LoKr update whose factors are both stored in full
            deltas[(component, name)] = delta * (1.0 if "lokr_w2" in factors else 1.0 / 2)
    if stability:
        assert any("input_blocks" in key for key in tensors) and any("output_blocks" in key for key in tensors)
    save_file(tensors, str(path))
    return deltas


@pytest.mark.parametrize("kind,names", [("loha", "diffusers"), ("lokr", "diffusers"), ("loha", "stability"),
                                        ("loha-tucker", "diffusers"), ("lokr-tucker", "diffusers")])
def test_lycoris_files_give_the_update_merged_by_hand(tiny_folder, tmp_path, kind, names):
    """A LyCORIS LoHa or LoKr file in kohya's names (sd-scripts' with LyCORIS; A1111 reads them), on U-Net attention
    projections, a U-Net convolution (LoHa) and a text-encoder projection under sd-scripts' `text_model` name: the
    image equals the base model's with W + scale·(α/r)·ΔW written into each layer by hand, at scales 1 and 0.5;
    fused (infer.py's way) the same; the next request without it is the base model again, bit for bit. The U-Net's
    layers named as diffusers has them (sd-scripts for SD 1.x/2.x) or as Stability's single files do (SDXL)."""
    from latentgen.formats import lora

    base = LatentPipeline.from_pretrained(tiny_folder, torch_dtype=torch.float32)
    convolution = ["down_blocks.0.resnets.0.conv1"]
    layers = {"unet": ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
                       "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
                       "up_blocks.0.attentions.0.proj_out"] + convolution,
              "text_encoder": ["encoder.layers.0.self_attn.q_proj"]}
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_text_model_"}
    path = tmp_path / f"{kind}.safetensors"
    deltas = write_lycoris(base, kind.removesuffix("-tucker"), layers, prefixes, path, stability=names == "stability",
                           tucker=kind.endswith("-tucker"))

    call = dict(num_inference_steps=3, seed=1, output_type="np")

    def by_hand(scale):
        pipe = LatentPipeline.from_pretrained(tiny_folder, torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        for (component, name), delta in deltas.items():
            dict(getattr(pipe, component).named_modules())[name].weight.data += scale * delta
        return pipe("a red circle", **call).images

    base.set_progress_bar_config(disable=True)
    before = base("a red circle", **call).images
    for scale in (1.0, 0.5):
        with_file = base("a red circle", loras=[(str(path), scale)], **call).images
        assert np.abs(with_file - before).max() > 0.05  # the update does something
        assert np.abs(with_file - by_hand(scale)).max() <= 1e-4
    assert np.array_equal(base("a red circle", **call).images, before)
    fused = LatentPipeline.from_pretrained(tiny_folder, torch_dtype=torch.float32)
    fused.set_progress_bar_config(disable=True)
    lora.fuse(fused, [(path, 1.0)])
    fused_image = fused("a red circle", loras=[(path, 1.0)], **call).images
    assert fused.__dict__["fused_loras_of"] and np.abs(fused_image - by_hand(1.0)).max() <= 1e-4


def test_lycoris_kinds_not_loaded_are_one_line_errors(tiny_folder, tmp_path):
    z = torch.zeros(4, 4)
    cases = {"ia3": ({"lora_unet_a.weight": z, "lora_unet_a.on_input": torch.tensor(1.0)}, "LyCORIS \\(IA\\)³ layers"),
             "full": ({"lora_unet_a.diff": z}, "LyCORIS full \\(weight difference\\) layers"),
             "mixed": ({"lora_unet_a.hada_w1_a": z, "lora_unet_b.lokr_w1": z}, "mixes LoHa and LoKr layers"),
             "dora": ({"lora_unet_a.hada_w1_a": z, "lora_unet_a.dora_scale": z}, "LoHa file with dora_scale tensors"),
             "other": ({"lora_unet_no_such_layer.hada_w1_a": z, "lora_unet_no_such_layer.hada_w1_b": z,
                        "lora_unet_no_such_layer.hada_w2_a": z, "lora_unet_no_such_layer.hada_w2_b": z},
                       "does not fit this model .*no_such_layer")}
    # a text-encoder part that fits, loaded first (safetensors keeps keys sorted), and a U-Net part of rank 4 on a layer
    # of another width: the U-Net's factors do not fit, and the text encoder's layers must not stay behind
    base = LatentPipeline.from_pretrained(tiny_folder, torch_dtype=torch.float32)
    q_proj = base.text_encoder.get_submodule("encoder.layers.0.self_attn.q_proj")
    factors, _ = lycoris_factors("loha", q_proj.weight, torch.Generator().manual_seed(0))
    wide = {f"lora_te_text_model_encoder_layers_0_self_attn_q_proj.{k}": v for k, v in factors.items()}
    wide |= {f"lora_unet_down_blocks_1_attentions_0_proj_in.hada_w{i}_{ab}": torch.ones(4, 4) for i in (1, 2)
             for ab in "ab"}
    cases["wide"] = (wide, "does not fit this model")
    pipe = LatentPipeline.from_pretrained(tiny_folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    before = pipe("x", num_inference_steps=2, seed=0, output_type="np").images
    for name, (tensors, message) in cases.items():
        save_file({k: v.clone() for k, v in tensors.items()}, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(UserError, match=message) as err:
            pipe("x", num_inference_steps=2, seed=0, loras=[(str(tmp_path / f"{name}.safetensors"), 1.0)])
        assert "\n" not in str(err.value)
    assert np.array_equal(pipe("x", num_inference_steps=2, seed=0, output_type="np").images, before)  # no leftovers


def test_lycoris_files_stack_with_a_lora_and_each_other_on_the_same_layers(tiny_folder, lora_file, tmp_path):
    """A LoRA, a LoHa and a LoKr on one attention projection (the LoRA on every projection): peft wraps the layer
    once per kind; the image is the one of W + each update, the LoRA fused by diffusers and the others added by
    hand, in either order."""
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    weight = LatentPipeline.from_pretrained(tiny_folder, torch_dtype=torch.float32).unet.get_submodule(name).weight
    generator, files, deltas = torch.Generator().manual_seed(5), [], []
    for kind in ("loha", "lokr"):
        factors, delta = lycoris_factors(kind, weight, generator)
        files.append(tmp_path / f"{kind}.safetensors")
        save_file({f"lora_unet_{name.replace('.', '_')}.{k}": v.contiguous() for k, v in factors.items()},
                  str(files[-1]))  # no alpha: alpha = rank, the update unscaled
        deltas.append(delta)
    sd = StableDiffusionPipeline.from_pretrained(tiny_folder, local_files_only=True)
    sd.set_progress_bar_config(disable=True)
    sd.load_lora_weights(str(lora_file))
    sd.fuse_lora()
    sd.unet.get_submodule(name).base_layer.weight.data += sum(deltas)
    reference = sd("a red circle", num_inference_steps=3, generator=torch.Generator().manual_seed(1),
                   output_type="np").images
    for order in ([lora_file, *files], [files[1], lora_file, files[0]]):
        ours = LatentPipeline.from_pretrained(tiny_folder, torch_dtype=torch.float32)
        ours.set_progress_bar_config(disable=True)
        image = ours("a red circle", loras=[(str(f), 1.0) for f in order], num_inference_steps=3, seed=1,
                     output_type="np").images
        assert np.abs(image - reference).max() <= 1e-4


def test_an_sdxl_lycoris_file_reaches_the_unet_and_both_text_encoders(tmp_path):
    """SDXL's LoHa as sd-scripts writes it: U-Net layers in Stability's layout, `lora_te1_` / `lora_te2_` text
    encoders: the image equals the one of W + ΔW written into all three by hand."""
    import components as C

    LatentPipeline(**C.sdxl_components()).save_pretrained(tmp_path / "xl")
    fresh = lambda: LatentPipeline.from_pretrained(tmp_path / "xl", torch_dtype=torch.float32)  # noqa: E731
    unet = fresh().unet
    attention = [n for n, _ in unet.named_modules() if n.endswith((".attn1.to_q", ".attn2.to_v"))]
    layers = {"unet": attention, "text_encoder": ["encoder.layers.0.self_attn.q_proj"],
              "text_encoder_2": ["text_model.encoder.layers.1.self_attn.v_proj"]}  # transformers 5 keeps its prefix
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_text_model_", "text_encoder_2": "lora_te2_"}
    ours = fresh()
    path = tmp_path / "loha.safetensors"
    deltas = write_lycoris(ours, "loha", layers, prefixes, path, stability=True)

    def xl_image(pipe, **kwargs):
        pipe.set_progress_bar_config(disable=True)
        return pipe("a red circle", negative_prompt="blurry", guidance_scale=6.0, num_inference_steps=3, height=32,
                    width=48, output_type="np", seed=7, **kwargs).images

    by_hand = fresh()
    for (component, name), delta in deltas.items():
        getattr(by_hand, component).get_submodule(name).weight.data += delta
    expected = xl_image(by_hand)
    assert np.abs(expected - xl_image(fresh())).max() > 0.05
    assert np.abs(xl_image(ours, loras=[(path, 1.0)]) - expected).max() <= 1e-4
