"""The latent cache: with the VAE and the text encoder frozen, every image's posterior (mean and std) and every
distinct caption's embedding are computed once and kept on disk, so a training step only runs the U-Net.
A key over the data, the VAE and the text encoder names each cache, so a change in any of them builds a new one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from latentgen.components.diffusion import public_config
from latentgen.data.sources import choose_caption
from latentgen.io import atomic_file, weights_hash
from latentgen.training.upscaler import low_resolution


class CachedData:
    """Cached latents (posterior mean and std) and unique-caption embeddings, served like a dataset."""

    def __init__(self, tensors: dict[str, torch.Tensor], texts: list[str]):
        self.mean, self.std = tensors["mean"], tensors["std"]  # (N, C, h, w)
        self.offsets, self.caption_rows = tensors["offsets"], tensors["caption_rows"]  # (N+1,), (M,)
        self.low_mean, self.low_std = tensors.get("low_mean"), tensors.get("low_std")  # an upscaler's inputs
        self.embeddings = tensors.get("embeddings")  # (U, T, D) or None when the text encoder trains
        self.pooled = tensors.get("pooled")  # (U, D'): SDXL's pooled embeddings, else None
        self.sizes = tensors.get("sizes")  # (N, 4): the size conditioning of each cached view (SDXL)
        self.texts = texts  # U unique captions; row 0 is "" (the unconditional prompt)

    def __len__(self) -> int:
        return self.mean.shape[0]

    def item(self, index: int, epoch: int = 0, seed: int = 0) -> dict[str, Any]:
        rows = self.caption_rows[self.offsets[index]:self.offsets[index + 1]].tolist()
        row = rows[0] if len(rows) == 1 else choose_caption(rows, seed, epoch, index)
        low = {} if self.low_mean is None else {"low_mean": self.low_mean[index], "low_std": self.low_std[index]}
        sizes = {} if self.sizes is None else {"sizes": self.sizes[index]}
        return {"mean": self.mean[index], "std": self.std[index], "text_row": row, "index": index} | low | sizes


def cache_key(config, parts, with_embeddings: bool) -> str:
    # public_config: the private keys would give each process of a launch its own key
    vae_hash = weights_hash(config.vae_path) if config.vae_path else json.dumps(public_config(parts.vae),
                                                                                  sort_keys=True, default=str)
    identity = {"data": asdict(config.data), "vae": vae_hash, "scaling": parts.vae.config.scaling_factor,
                "text": asdict(config.text_encoder) if with_embeddings else None,
                "pipeline": config.pretrained_pipeline, "seed": config.seed if config.vae_model else None}
    if config.upscaler.scale:  # (only then: the keys of existing caches stay as they were)
        identity["low_resolution"] = config.upscaler.scale
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


@torch.no_grad()
def build_cache(dataset, parts, with_embeddings: bool, batch_size: int, device, autocast,
                low_scale: int = 0) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Encode every image once (the un-augmented view) and every distinct caption once; with `low_scale`, also
    the image shrunk by that factor (an upscaler's low-resolution input)."""

    posteriors: dict[str, list[torch.Tensor]] = {"mean": [], "std": [], "low_mean": [], "low_std": [], "sizes": []}
    for start in tqdm(range(0, len(dataset), batch_size), desc="caching latents", leave=False):
        items = [dataset.item(i, 0, 0) for i in range(start, min(start + batch_size, len(dataset)))]
        x = torch.stack([item["pixel_values"] for item in items]).to(device)
        posteriors["sizes"].append(torch.stack([item["sizes"] for item in items]))
        for prefix, pixels in [("", x)] + ([("low_", low_resolution(x, low_scale))] if low_scale else []):
            with autocast():
                dist = parts.vae.encode(pixels).latent_dist
            posteriors[prefix + "mean"].append(dist.mean.float().cpu())
            posteriors[prefix + "std"].append(dist.std.float().cpu())
    texts, rows_of, offsets, caption_rows = [""], {"": 0}, [0], []
    for i in range(len(dataset)):
        for caption in dataset.captions(i):
            caption_rows.append(rows_of.setdefault(caption, len(texts)))
            if caption_rows[-1] == len(texts):
                texts.append(caption)
        offsets.append(len(caption_rows))
    tensors = {k: torch.cat(v) for k, v in posteriors.items() if v} | {
        "offsets": torch.tensor(offsets), "caption_rows": torch.tensor(caption_rows)}
    if with_embeddings:
        chunks, pooled = [], []
        for start in tqdm(range(0, len(texts), 256), desc="caching text embeddings", leave=False):
            with autocast():
                encoded = parts.encoder.encode(texts[start:start + 256])
            chunks.append(encoded.hidden_states.float().cpu())
            if encoded.pooled is not None:
                pooled.append(encoded.pooled.float().cpu())
        tensors["embeddings"] = torch.cat(chunks)
        if pooled:
            tensors["pooled"] = torch.cat(pooled)
    return tensors, texts


def load_or_build_cache(config, dataset, parts, with_embeddings: bool, accelerator) -> CachedData:
    """The cache for this data, VAE and text encoder: built by each machine's main process (machines of a
    multi-node run need not share a disk), read by every process."""
    from safetensors.torch import load_file, save_file

    root = Path(config.cache_dir or Path(config.output_dir) / "cache")
    key = cache_key(config, parts, with_embeddings)
    tensors_path, texts_path = root / f"{key}.safetensors", root / f"{key}.texts.json"
    with accelerator.local_main_process_first():
        if not (tensors_path.is_file() and texts_path.is_file()):
            if not accelerator.is_local_main_process:  # pragma: no cover - local_main_process_first wrote it
                raise RuntimeError("the cache was not written by this machine's main process")
            tensors, texts = build_cache(dataset, parts, with_embeddings, config.train_batch_size * 4,
                                         accelerator.device, accelerator.autocast, config.upscaler.scale)
            with atomic_file(texts_path) as tmp:
                tmp.write_text(json.dumps(texts, ensure_ascii=False))
            with atomic_file(tensors_path) as tmp:
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
            accelerator.print(f"cached {len(dataset)} latents and {len(texts)} captions in {tensors_path}")
        tensors = load_file(str(tensors_path))
        texts = json.loads(texts_path.read_text())
    return CachedData(tensors, texts)


def draw_latents(batch: dict, g: torch.Generator, device, prefix: str = "") -> torch.Tensor:
    """z = μ + σ·n from a batch's cached posterior (`{prefix}mean`, `{prefix}std`), as latent_dist.sample() would
    draw it, unscaled."""
    mean, std = batch[prefix + "mean"].to(device), batch[prefix + "std"].to(device)
    return mean + std * torch.randn(mean.shape, generator=g, device=device, dtype=mean.dtype)
