"""LoRA loading through diffusers' own loader: the same image as diffusers' StableDiffusionPipeline gives for the
same file, in diffusers/peft format and in kohya/A1111's."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import save_file

from latentgen import LatentPipeline


def image(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red circle", num_inference_steps=3, generator=torch.Generator().manual_seed(1),
                output_type="np").images


@pytest.fixture(scope="module")
def unet_lora(tiny_folder):
    """A U-Net LoRA on the tiny model's attention projections, with random (non-zero) up weights."""
    unet = LatentPipeline.from_pretrained(tiny_folder, torch_dtype=torch.float32).unet
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(0)
    for name, param in unet.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    return get_peft_model_state_dict(unet)


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
    ours = LatentPipeline.from_pretrained(tiny_folder, torch_dtype=torch.float32)
    before = image(ours)
    ours.load_lora_weights(str(path))
    sd = StableDiffusionPipeline.from_pretrained(tiny_folder, local_files_only=True)
    sd.load_lora_weights(str(path))
    with_lora = image(ours)
    assert np.abs(with_lora - before).max() > 0.05  # the LoRA does something
    assert np.abs(with_lora - image(sd)).max() <= 1e-4
    ours.set_adapters(ours.get_active_adapters(), adapter_weights=[0.0])  # weight 0: the base model again
    assert np.abs(image(ours) - before).max() <= 1e-5
