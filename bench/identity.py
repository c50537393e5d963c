"""Images of a fixed set of requests, as hashes: written before a change that must not change any image, checked
after it, on the same machine (the last bits of a float depend on the CPU's kernels, so the file is not portable)
and at the same thread count (oneDNN's fp32 kernels split their work by threads): the file records the count it
was written with, and a check runs with that many.

    python bench/identity.py --write before.json      # before the change
    python bench/identity.py --check before.json      # after it: every image bit for bit, or the ones that differ

The requests cover the paths a restructuring can break: text-to-image with each kind of sampler, guidance variants,
image-to-image, inpainting, the hires fix, the cascade, tiling, variation seeds, a LoRA, several images in one call;
in fp32 and in the machine's fast precision.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from common import ROOT  # noqa: F401  (puts the repository on the path)

PROMPT = "a red circle on a blue background"
THREADS = "threads"  # the file's key for the thread count it was written with


def requests(pipe) -> dict[str, dict]:
    from PIL import Image

    init = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    base = dict(prompt=PROMPT, num_inference_steps=8, seed=11)
    return {
        "txt2img": base,
        "euler-a": base | dict(scheduler="euler-a"),
        "dpm++": base | dict(scheduler="dpm++", guidance_scale=5.0),
        "negative": base | dict(negative_prompt="a green square"),
        "weights": base | dict(prompt="a (red:1.3) circle on a [blue] background"),
        "plain-cfg": base | dict(apg=False, guidance_rescale=0.5, guidance_interval=(0.1, 0.9)),
        "threshold": base | dict(dynamic_threshold=0.99, eta=0.5, scheduler="ddim"),
        "img2img": base | dict(image=init, strength=0.6),
        "inpaint": base | dict(image=init, mask_image=mask),
        "hires": base | dict(hires={"scale": 1.5, "steps": 4, "denoise": 0.5}),
        "hires-lanczos": base | dict(hires={"scale": 2, "steps": 3, "denoise": 0.6, "upscaler": "lanczos"}),
        "upscale": base | dict(upscale={"scale": 2, "steps": 4}),
        "tiling": base | dict(tiling=True),
        "variation": base | dict(variation_seed=5, variation_strength=0.3, seed_resize_from=(48, 48)),
        "batch": dict(prompt=[PROMPT, "a green triangle on a white background"], num_images_per_prompt=2,
                      num_inference_steps=6, seed=[1, 2, 3, 4]),
    }


def digest(images) -> str:
    h = hashlib.sha256()
    for image in images:
        h.update(np.asarray(image).tobytes())
    return h.hexdigest()[:16]


def run(count: int) -> dict[str, str]:
    from latentgen.cli import quiet_libraries
    from latentgen.generation.models import DEFAULT_MODEL, open_pipeline
    from latentgen.runtime import threads

    quiet_libraries()
    threads.pin(count)
    out = {}
    for dtype in ("fp32", "auto"):
        pipe = open_pipeline(DEFAULT_MODEL, dtype=dtype)
        for name, fields in requests(pipe).items():
            out[f"{dtype}/{name}"] = digest(pipe(**fields).images)
        with tempfile.TemporaryDirectory() as tmp:
            lora_file = random_lora(DEFAULT_MODEL, Path(tmp))
            out[f"{dtype}/lora"] = digest(pipe(PROMPT, num_inference_steps=8, seed=3,
                                               loras=[(str(lora_file), 0.8)]).images)
        del pipe
    return out


def random_lora(model: Path, folder: Path) -> Path:
    """A rank-4 LoRA of the model's U-Net attention with seeded random weights, in diffusers' format."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(model / "unet", torch_dtype=torch.float32)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    generator = torch.Generator().manual_seed(0)
    for name, param in unet.named_parameters():
        if "lora_" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.2
    StableDiffusionPipeline.save_lora_weights(folder, weight_name="lora.safetensors", unet_lora_layers=(
        convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))))
    return folder / "lora.safetensors"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", metavar="FILE")
    group.add_argument("--check", metavar="FILE")
    args = p.parse_args()
    import torch

    if args.write:
        found = run(torch.get_num_threads())
        with open(args.write, "w") as f:
            json.dump(found | {THREADS: torch.get_num_threads()}, f, indent=1, sort_keys=True)
        print(f"{len(found)} images hashed into {args.write} with {torch.get_num_threads()} threads")
        return
    with open(args.check) as f:
        expected = json.load(f)
    found = run(expected.pop(THREADS, torch.get_num_threads()))  # files written before the count was kept: ours
    differ = [k for k in expected if found.get(k) != expected[k]]
    missing = [k for k in expected if k not in found]
    print(f"{len(expected) - len(differ)} of {len(expected)} images bit for bit as before"
          + (f"; differ: {', '.join(differ)}" if differ else "") + (f"; missing: {', '.join(missing)}" if missing
                                                                        else ""))
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
