"""Training samples per second: `train_unet.py` against a plain diffusers training step.

The reference is the core of diffusers' examples/text_to_image/train_text_to_image.py: fp32, the VAE encodes the
images and the text encoder the captions on every step, then noise, U-Net, MSE, backward, AdamW. Ours is
train_unet.py itself with the default model's config (cached latents and embeddings, bf16 autocast where the CPU
has bf16 units, the attention kernel chosen for training). Same U-Net, batch size and data; each in its own
process for its peak memory.

    python bench/training.py [--steps 30] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time

from common import ROOT, peak_rss_mb, run_child

CONFIG = ROOT / "configs" / "unet-shapes.yaml"
# The shipped model's VAE is the one configs/vae-shapes.yaml trains, so a fresh clone needs no VAE run first;
# 2,048 samples are plenty for a throughput measurement and keep the latent cache quick to build.
OVERRIDES = [f"vae_path={ROOT / 'latentgen' / 'default_model' / 'vae'}", "data.num_samples=2048"]


def plain_diffusers(steps: int, batch: int) -> dict:
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from latentgen.components.text_encoders import load_transformers_encoder, minilm_path
    from latentgen.config import load_config
    from latentgen.data import build_dataset
    from latentgen.training.unet import UNetTrainConfig

    config = load_config(UNetTrainConfig, CONFIG, [f"train_batch_size={batch}", *OVERRIDES])
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config.unet).train()
    vae = AutoencoderKL.from_pretrained(config.vae_path, torch_dtype=torch.float32).requires_grad_(False)
    tokenizer, text_encoder = load_transformers_encoder(minilm_path(), max_length=32)
    text_encoder.requires_grad_(False)
    noise_scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    data = build_dataset(config.data)
    items = [data.item(i) for i in range(batch)]
    pixels = torch.stack([it["pixel_values"] for it in items])
    captions = [it["text"] for it in items]

    def step():
        latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        ids = tokenizer(captions, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
        hidden = text_encoder(ids.input_ids, attention_mask=ids.attention_mask)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (batch,))
        pred = unet(noise_scheduler.add_noise(latents, noise, t), t, hidden).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - start
    return {"samples_per_s": steps * batch / seconds, "rss_mb": peak_rss_mb()}


def ours(steps: int, batch: int, cache_dir: str) -> dict:
    """train_unet.py with the shipped config; the latent cache is built in the first round and reused."""
    out = tempfile.mkdtemp(prefix="bench-train-")
    cmd = [sys.executable, str(ROOT / "train_unet.py"), "--config", str(CONFIG), f"output_dir={out}",
           f"max_steps={steps + 1}", f"train_batch_size={batch}", "checkpoint_every=100000", "validate_every=0",
           f"cache_dir={cache_dir}", "validation_steps=1", "validation_prompts=[a red circle]", *OVERRIDES]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    m = re.search(r"([\d.]+) samples/s \(after the first step\), peak memory (\d+) MB", r.stdout)
    return {"samples_per_s": float(m.group(1)), "rss_mb": float(m.group(2))}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--child", action="store_true")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="alternate the two this many times; best of each")
    args = p.parse_args()
    if args.child:
        print(json.dumps(plain_diffusers(args.steps, args.batch)))
        return
    # Alternate the two, `rounds` times, and keep each one's best: the machine's speed drifts over minutes
    # (shared cores), and a drift between two back-to-back measurements would read as a speed-up or a loss.
    refs, mine_runs = [], []
    cache_dir = tempfile.mkdtemp(prefix="bench-train-cache-")
    for _ in range(args.rounds):
        refs.append(run_child("training", "--steps", str(args.steps), "--batch", str(args.batch)))
        mine_runs.append(ours(args.steps, args.batch, cache_dir))
    ref = max(refs, key=lambda r: r["samples_per_s"])
    mine = max(mine_runs, key=lambda r: r["samples_per_s"])
    print("rounds (plain, train_unet.py samples/s): " + ", ".join(
        f"({a['samples_per_s']:.1f}, {b['samples_per_s']:.1f})" for a, b in zip(refs, mine_runs)))
    print(f"plain diffusers step (fp32, VAE + text encoder every step): {ref['samples_per_s']:.1f} samples/s, "
          f"peak RSS {ref['rss_mb']:.0f} MB")
    print(f"train_unet.py (cached latents/embeddings, mixed precision auto): {mine['samples_per_s']:.1f} samples/s, "
          f"peak RSS {mine['rss_mb']:.0f} MB")
    print(f"speed-up: {mine['samples_per_s'] / ref['samples_per_s']:.2f}×")


if __name__ == "__main__":
    main()
