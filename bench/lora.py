"""LoRA cost per image, unfused (latentgen's choice: switching LoRAs between requests touches no base weight) against
fused (`fuse_lora`, the LoRA folded into the base weights) and the plain model, measured side by side.

    python bench/lora.py [--steps 20] [--rank 16]

The default model at its default size and precision, one image per call, a random rank-`rank` LoRA on every
attention projection of its U-Net (q, k, v, out), the shapes kohya's and diffusers' trainers make.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import best_time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rank", type=int, default=16)
    args = p.parse_args()
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    from latentgen import LatentPipeline
    from latentgen.generation.models import DEFAULT_MODEL

    unet = LatentPipeline.from_pretrained(DEFAULT_MODEL, torch_dtype=torch.float32).unet
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    folder = Path(tempfile.mkdtemp())
    StableDiffusionPipeline.save_lora_weights(folder, weight_name="bench.safetensors",
                                              unet_lora_layers=convert_state_dict_to_diffusers(
                                                  get_peft_model_state_dict(unet)))
    lora = [(str(folder / "bench.safetensors"), 1.0)]
    pipe = LatentPipeline.from_pretrained(DEFAULT_MODEL)
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt="a red circle on a blue background", num_inference_steps=args.steps, seed=0)
    base = best_time(lambda: pipe(**call))
    unfused = best_time(lambda: pipe(**call, loras=lora))
    from latentgen.formats import lora as loras

    loras.fuse(pipe, [(Path(p), s) for p, s in lora])  # what infer.py does for its run's one LoRA set
    fused = best_time(lambda: pipe(**call, loras=lora))
    print(f"{args.steps} steps, {pipe.unet.dtype}, rank {args.rank}: base {base:.3f} s/image, "
          f"unfused LoRA {unfused:.3f} s ({unfused / base:.2f}× base), fused {fused:.3f} s ({fused / base:.2f}× base); "
          f"unfused/fused {unfused / fused:.2f}")


if __name__ == "__main__":
    main()
