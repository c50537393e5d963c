"""What training an SDXL-sized U-Net takes per GPU, on paper: the memory guard's own numbers (latentgen.runtime.memory)
for SDXL's U-Net architecture (built on the meta device: no weights, no download), per strategy and number of GPUs.

    python bench/sdxl_plan.py [--batch 1] [--resolution 1024]

Per GPU: the U-Net's fp32 weights, gradients and AdamW moments (16 bytes a parameter, 20 with DDP's gradient
buckets; FSDP divides 16 by the GPUs), FSDP's gathered units (the largest unit of `training.sharded.units`, in
bf16 as `distributed.param_dtype: bf16` gathers it, two at once with prefetch), the frozen text encoders and VAE
(bf16), and the activations of one step as the guard bounds them (bf16 compute, no gradient checkpointing; the
guard's 3x slack included, an upper bound).
"""

from __future__ import annotations

import argparse

from common import print_table

# SDXL 1.0 base's U-Net (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json), written out: nothing is downloaded
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
FROZEN_PARAMETERS = 123_060_480 + 694_659_840 + 83_653_863  # CLIP-L, OpenCLIP bigG (with projection), the VAE


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=1, help="images per GPU per step")
    p.add_argument("--resolution", type=int, default=1024)
    args = p.parse_args()

    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from latentgen.runtime.memory import gb, unet_training_bytes
    from latentgen.training.sharded import units

    with init_empty_weights():
        unet = UNet2DConditionModel(**SDXL_UNET)
    params = sum(p.numel() for p in unet.parameters())
    seen: set[int] = set()
    unit = 0
    for module in units(unet):  # inner first: a unit gathers what its inner units do not
        own = [p for p in module.parameters() if id(p) not in seen]
        seen |= {id(p) for p in own}
        unit = max(unit, sum(p.numel() for p in own))
    # unet_training_bytes: activations (with slack) + 12 bytes a trainable parameter; the weights' 4 are added here
    activations = unet_training_bytes(unet, args.resolution // 8, args.batch, 2, False) - 12 * params
    frozen = 2 * FROZEN_PARAMETERS
    print(f"SDXL U-Net: {params / 1e9:.3f}B parameters; largest FSDP unit {unit / 1e9:.3f}B; "
          f"{args.batch} image(s) of {args.resolution}² a GPU; activations (guard, bf16) {gb(activations)}")
    rows = []
    for gpus, where in ((1, "1 GPU"), (8, "1 node × 8 GPUs"), (16, "2 nodes × 8 GPUs")):
        for strategy in ("ddp", "fsdp"):
            if gpus == 1 and strategy == "fsdp":
                continue
            # DDP: its all-reduce buckets are one more fp32 copy of the gradients (accelerate's default)
            state = 20 * params if strategy == "ddp" else 16 * params // gpus
            gathered = 0 if strategy == "ddp" else 2 * 2 * unit  # two bf16 units in flight (prefetch)
            total = state + gathered + frozen + activations
            rows.append({"GPUs": where, "strategy": strategy, "weights+grads+AdamW": gb(state),
                         "gathered units": gb(gathered), "frozen encoders+VAE": gb(frozen),
                         "activations": gb(activations), "total per GPU": gb(total)})
    print_table(rows)


if __name__ == "__main__":
    main()
