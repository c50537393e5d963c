"""Helpers shared by the benchmarks: timing, peak memory of a child process, model folders built from configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def synchronize(device=None) -> None:
    """Wait for a CUDA `device`'s queued work (CUDA runs asynchronously); nothing on other devices."""
    if device is not None and device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], object], repeat: int = 3, warmup: int = 1, device=None) -> float:
    """Best wall time of `repeat` calls after `warmup` calls (the least disturbed measurement). On a CUDA `device`
    each call waits for the GPU's queued work before the clock is read (CUDA runs asynchronously)."""
    def call():
        fn()
        synchronize(device)

    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def peak_rss_mb() -> float:
    """Peak resident memory of this process, in MB."""
    from latentgen.runtime.device import peak_memory_mb

    return peak_memory_mb()


def run_child(module: str, *args: str, timeout: int = 3600) -> dict:
    """Run `python bench/<module>.py --child ...` and return the JSON it prints last (each measurement in its own
    process, so peak memory is its own)."""
    cmd = [sys.executable, str(ROOT / "bench" / f"{module}.py"), "--child", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def sd_shaped_folder(path: Path, width: int = 160, resolution: int = 256) -> Path:
    """A Stable-Diffusion-shaped pipeline with random weights: SD 1.x's U-Net topology (4 levels, 2 layers per
    block, cross-attention at the top 3 levels, 768-wide CLIP text encoder of 12 layers, the SD VAE), with the
    U-Net's channels scaled to `width` at the first level (SD: 320) so a CPU run takes minutes, not hours."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from latentgen import LatentPipeline
    from latentgen.components.text_encoders import clip_tokenizer

    if (path / "model_index.json").exists():
        return path
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=resolution // 8, block_out_channels=[width, 2 * width, 4 * width, 4 * width], layers_per_block=2,
        cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        sample_size=resolution)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, vocab_size=49408, max_position_embeddings=77,
                                        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              steps_offset=1)
    LatentPipeline(vae=vae, text_encoder=text, tokenizer=clip_tokenizer(), unet=unet,
                   scheduler=scheduler).save_pretrained(path)
    return path


def print_table(rows: list[dict], columns: list[str] | None = None) -> None:
    """`rows` as a Markdown table of `columns` (default: every key of any row, in first-seen order)."""
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |")
