"""SDXL training (#47): the U-Net, or LoRAs of it and of both text encoders, with SDXL's pooled text and its size
conditioning taken from the data; kohya-format SDXL LoRA files that diffusers' SDXL pipeline loads to the image of
the adapted models in memory; a trained SDXL folder that diffusers loads."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import components as C
from conftest import ROOT
from latentgen import LatentPipeline
from latentgen.data import DataConfig, build_dataset


@pytest.fixture(scope="module")
def xl_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl") / "xl"
    LatentPipeline(**C.sdxl_components()).save_pretrained(folder)
    return folder


def xl_image(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red circle", negative_prompt="blurry", guidance_scale=6.0, num_inference_steps=3, height=32,
                width=48, output_type="np", generator=torch.Generator().manual_seed(7), **kwargs).images


def train(out, folder, *extra, timeout=600):
    config = out.parent / f"{out.name}.yaml"
    config.write_text("max_steps: 2\ntrain_batch_size: 2\nlearning_rate: 1.0e-3\ncheckpoint_every: 100\n"
                      "mixed_precision: fp32\ntext_encoder: {kind: pipeline}\nvalidation_prompts: [a red circle]\n"
                      "validation_steps: 2\nema: false\ndata: {source: shapes, resolution: 32, num_samples: 4}\n")
    r = subprocess.run([sys.executable, str(ROOT / "train_unet.py"), "--config", str(config), f"output_dir={out}",
                        f"pretrained_pipeline={folder}", *extra], capture_output=True, text=True, timeout=timeout)
    return r


def adapted_and_saved(folder, path, **lora_settings):
    """The SDXL pipeline in `folder` with adapters (lora.algo's) on its U-Net and both text encoders, as the trainer
    adds them, their factors random (peft starts them at a zero update), written by save_lora to `path`."""
    from latentgen.training.products import add_lora, add_text_encoder_lora, save_lora
    from latentgen.training.unet_config import LoraTrainConfig, UNetTrainConfig

    lora = LoraTrainConfig(rank=4, alpha=2, text_encoder=True, **lora_settings)
    trained = LatentPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    add_lora(trained.unet, lora)
    for model in (trained.text_encoder, trained.text_encoder_2):
        add_text_encoder_lora(model, lora)
    torch.manual_seed(0)
    for model in (trained.unet, trained.text_encoder, trained.text_encoder_2):
        for name, param in model.named_parameters():
            if "lora_B" in name or "hada_" in name:
                param.data.normal_(0, 0.3)
    save_lora(UNetTrainConfig(pretrained_pipeline=str(folder), lora=lora), trained.unet,
              [trained.text_encoder, trained.text_encoder_2], path, sdxl=True)
    return trained


def test_the_data_gives_sdxls_size_conditioning():
    """Each item's (original height, width, crop top, left), as diffusers' SDXL script computes them: a 100×50
    image at 32 px is resized to 64×32 and its middle cropped (left 16); random crops and flips move the corner."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        Image.new("RGB", (100, 50), (255, 0, 0)).save(Path(tmp) / "0.png")
        (Path(tmp) / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "text": "red"}) + "\n")
        centre = build_dataset(DataConfig(source="hf", path=tmp, resolution=32)).item(0)
        assert centre["sizes"].tolist() == [50, 100, 0, 16] and centre["pixel_values"].shape == (3, 32, 32)
        lefts = {build_dataset(DataConfig(source="hf", path=tmp, resolution=32, random_crop=True)).item(0, e)["sizes"]
                 [3].item() for e in range(8)}
        assert len(lefts) > 1 and all(0 <= left <= 32 for left in lefts)
    shapes = build_dataset(DataConfig(source="shapes", resolution=32, num_samples=2)).item(0)
    assert shapes["sizes"].tolist() == [32, 32, 0, 0]


def test_a_training_step_gives_the_unet_the_pooled_text_and_time_ids(xl_folder):
    """The loop's added conditions for SDXL: `text_embeds` the second encoder's pooled prompt (the empty prompt's
    where the caption was dropped), `time_ids` the data's sizes and the latents' size in pixels."""
    from latentgen.training.unet import _latents_and_context
    from latentgen.training.unet_config import UNetTrainConfig
    from latentgen.training.unet_parts import load_components

    config = UNetTrainConfig(pretrained_pipeline=str(xl_folder), caption_dropout=0.5, ema=False)
    config.text_encoder.kind = "pipeline"
    parts = load_components(config)
    assert parts.is_sdxl and len(parts.text_models) == 2
    batch = {"pixel_values": torch.zeros(4, 3, 32, 48), "text": ["a red circle"] * 4,
             "sizes": torch.tensor([[64, 96, 0, 8]] * 4)}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        latents, context, _, dropped, added = _latents_and_context(batch, batch, parts, config, g, "cpu")
        expected = parts.encoder.encode(["", "a red circle"])
    assert latents.shape[-2:] == (8, 12) and context.shape == (4, 77, 128) and 0 < int(dropped.sum()) < 4
    assert added["time_ids"].tolist() == [[64, 96, 0, 8, 32, 48]] * 4
    pooled = expected.pooled[dropped.long().logical_not().long()]
    torch.testing.assert_close(added["text_embeds"], pooled)


def test_an_sdxl_lora_file_gives_the_image_of_the_adapted_models_in_diffusers(xl_folder, tmp_path):
    """LoRAs of the U-Net and both text encoders, as the trainer adds them, written by save_lora: kohya's file has
    sd-scripts' SDXL names (Stability's U-Net layout, `lora_te1_`, `lora_te2_`); diffusers'
    StableDiffusionXLPipeline.load_lora_weights with it, and with the diffusers-format file, gives the image of the
    models that carried the adapters in memory."""
    from diffusers import StableDiffusionXLPipeline

    trained = adapted_and_saved(xl_folder, tmp_path / "mine.safetensors", kohya=True)
    with safe_open(str(tmp_path / "lora_kohya.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.") for k in keys)
    assert any(k.startswith("lora_unet_output_blocks_") for k in keys)
    assert not any(k.startswith("lora_unet_down_blocks_") for k in keys)
    for prefix in ("lora_te1_text_model_encoder_layers_", "lora_te2_text_model_encoder_layers_"):
        assert any(k.startswith(prefix) for k in keys), prefix
    expected = xl_image(trained)
    assert np.abs(xl_image(LatentPipeline.from_pretrained(xl_folder, torch_dtype=torch.float32))
                  - expected).max() > 1e-2  # the adapters change the image
    for name in ("lora_kohya.safetensors", "mine.safetensors"):
        reference = StableDiffusionXLPipeline.from_pretrained(xl_folder, local_files_only=True)
        reference.load_lora_weights(str(tmp_path / name))
        assert np.abs(xl_image(reference) - expected).max() <= 1e-4, name
        ours = LatentPipeline.from_pretrained(xl_folder, torch_dtype=torch.float32)
        assert np.abs(xl_image(ours, loras=[(tmp_path / name, 1.0)]) - expected).max() <= 1e-4, name


def test_sdxl_training_runs_write_a_lora_and_a_folder_diffusers_loads(xl_folder, tmp_path):
    """train_unet.py on a tiny SDXL model: a LoRA run of the U-Net and both encoders resumes bit for bit and writes
    both formats (diffusers loads the kohya file to the image latentgen gives with it); a full U-Net run writes a
    folder that diffusers' StableDiffusionXLPipeline loads to latentgen's image, with the U-Net changed and the
    encoders kept."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    lora = ("lora.rank=4", "lora.text_encoder=true", "lora.kohya=true", "checkpoint_every=1", "keep_checkpoints=2")
    r = train(tmp_path / "lora", xl_folder, *lora)
    assert r.returncode == 0, r.stderr[-3000:]
    checkpoint = tmp_path / "lora" / "checkpoints" / "checkpoint-0000001"
    assert all(any("lora_" in k for k in load_file(str(checkpoint / f"{part}.safetensors")))
               for part in ("unet", "text_encoder", "text_encoder_2"))
    shutil.copytree(checkpoint, tmp_path / "cut" / "checkpoints" / checkpoint.name)
    r = train(tmp_path / "cut", xl_folder, *lora, "resume_from=latest")
    assert r.returncode == 0 and f"resumed from {tmp_path / 'cut' / 'checkpoints' / checkpoint.name}" in r.stdout
    a, b = (load_file(str(tmp_path / run / "lora.safetensors")) for run in ("lora", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # resumed bit for bit
    kohya = load_file(str(tmp_path / "lora" / "lora_kohya.safetensors"))
    assert any(k.startswith("lora_te2_") and k.endswith("lora_up.weight") and v.abs().max() > 0
               for k, v in kohya.items())  # the second encoder's LoRA learned
    reference = StableDiffusionXLPipeline.from_pretrained(xl_folder, local_files_only=True)
    reference.load_lora_weights(str(tmp_path / "lora" / "lora_kohya.safetensors"))
    ours = LatentPipeline.from_pretrained(xl_folder, torch_dtype=torch.float32)
    assert np.abs(xl_image(ours, loras=[(tmp_path / "lora" / "lora.safetensors", 1.0)])
                  - xl_image(reference)).max() <= 1e-4

    r = train(tmp_path / "full", xl_folder)
    assert r.returncode == 0, r.stderr[-3000:]
    folder = tmp_path / "full" / "pipeline"
    before, after = load_file(str(xl_folder / "unet" / "diffusion_pytorch_model.safetensors")), \
        load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    for part in ("text_encoder", "text_encoder_2"):
        a, b = (load_file(str(f / part / "model.safetensors")) for f in (xl_folder, folder))
        assert all(torch.equal(a[k], b[k]) for k in a), part
    theirs = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    mine = LatentPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    assert np.abs(xl_image(mine) - xl_image(theirs)).max() <= 1e-4


def test_sdxl_runs_that_cannot_be_done_are_one_line_errors(xl_folder, tmp_path):
    r = train(tmp_path / "minilm", xl_folder, "text_encoder.kind=minilm")
    assert r.returncode == 2 and "trains with its own two text encoders" in r.stderr, r.stderr[-2000:]
    assert r.stderr.count("\n") == 1


def test_the_memory_guard_counts_what_deeper_transformers_keep_for_backward():
    """The guard's term for transformer blocks beyond one per attention (SDXL's depths) against what autograd
    really saves (parameters left out) when a U-Net has them: within 15%, and none for one block each; with FSDP
    over two ranks, half the gradients and AdamW state."""
    from diffusers import UNet2DConditionModel

    from latentgen.runtime.memory import deep_transformer_bytes, saved_for_backward

    def saved(depth):
        config = dict(C.sdxl_components()["unet"].config) | {"transformer_layers_per_block": depth}
        unet = UNet2DConditionModel.from_config(config)
        added = {"text_embeds": torch.randn(2, 64), "time_ids": torch.randn(2, 6)}
        return saved_for_backward(unet, torch.randn(2, 4, 32, 32), torch.tensor([10, 20]), torch.randn(2, 77, 128),
                                  added_cond_kwargs=added), unet.config

    from latentgen.runtime.memory import unet_training_bytes

    unet = C.sdxl_components()["unet"]
    whole, half = (unet_training_bytes(unet, 8, 1, 4, False, shards) for shards in (1, 2))
    assert whole - half == 12 * sum(p.numel() for p in unet.parameters()) // 2  # FSDP: half the AdamW state a rank
    (one, shallow), (deep, config) = saved((1, 1, 1)), saved((1, 2, 4))
    assert deep_transformer_bytes(shallow, 32, 32, 2, 4) == 0
    assert 0.85 <= deep_transformer_bytes(config, 32, 32, 2, 4) / (deep - one) <= 1.15  # 1.08 measured


def test_an_sdxl_loha_file_gives_the_image_of_the_adapted_models(xl_folder, tmp_path):
    """lora.algo loha on SDXL: LyCORIS's file with sd-scripts' SDXL names (Stability's U-Net layout, lora_te1_,
    lora_te2_), which `loras=` loads to the image of the models that carried the adapters in memory."""
    trained = adapted_and_saved(xl_folder, tmp_path / "mine.safetensors", algo="loha")
    with safe_open(str(tmp_path / "mine.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("lora_unet_input_blocks_4_1_") and k.endswith(".hada_w1_a") for k in keys)
    assert any(k.startswith("lora_te1_text_model_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
    expected = xl_image(trained)
    ours = LatentPipeline.from_pretrained(xl_folder, torch_dtype=torch.float32)
    assert np.abs(xl_image(ours) - expected).max() > 1e-2
    assert np.abs(xl_image(ours, loras=[(tmp_path / "mine.safetensors", 1.0)]) - expected).max() <= 1e-4
