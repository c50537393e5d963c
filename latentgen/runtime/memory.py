"""A memory guard: estimate the peak memory of a request from the models' configs, and refuse, with the size that
would fit, one that cannot fit, before any work (instead of running until the kernel kills the process).

The estimate counts what grows with the request, at each resolution level of the U-Net and the VAE decoder:
feature maps (channels × pixels, the skip connections the U-Net keeps until its up path, a few working tensors
per block) and, where the attention kernel materialises the scores (the plain "math" kernel; SDPA's flash and
xformers kernels do not), heads × tokens² of them. Weights are already loaded when it runs, so the free memory
it is compared with excludes them. It is an estimate, meant to tell 100,000² from 1,024², not to the megabyte;
`python bench/probes.py memory` compares it with measured peaks.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from latentgen.components.diffusion import vae_factor
from latentgen.errors import UserError

WORKING_TENSORS = 4  # feature maps alive at once inside a block (input, two convolutions, the residual sum)
# What the count above leaves out (the allocator's slack, fp32 post-processing of the decoded images, the
# scheduler's copies): measured peaks were 1.4-2.8 times the count from 256 px up (`python bench/probes.py memory`
# prints estimate/measured with this factor: 1.51, 1.38, 1.09, 2.08), so the
# guard takes 3 times it, an upper bound: better to name a smaller size than to let the kernel kill the process.
SLACK = 3
TRAINING_FACTOR = 6  # activations kept for the backward pass, per forward feature map, and their gradients
# What one transformer block of a U-Net keeps for the backward pass, in feature maps of its level's width and size:
# 35-36.5 measured (`python bench/probes.py transformer-depth`: the tensors autograd saves in an SDXL-shaped U-Net
# with 1, 2 and 10 blocks per attention). The factor above was fitted on U-Nets with one block per attention; SDXL's
# has 2 and 10, which only this term sees.
TRANSFORMER_SAVED = 37


def _quadratic_attention(model) -> bool | int:
    """True when the model's attention materialises every head's (tokens × tokens) scores at once; with attention
    slicing (`--attention-slicing`), the number of (image, head) rows in one slice; False for SDPA and xformers."""
    processors = list((getattr(model, "attn_processors", {}) or {}).values())
    if any(type(p).__name__ == "AttnProcessor" for p in processors):
        return True
    slices = [p.slice_size for p in processors if type(p).__name__ == "SlicedAttnProcessor"]
    return max(slices) if slices else False


def _levels(channels: list[int], height: int, width: int):
    for i, c in enumerate(channels):
        yield i, c, math.ceil(height / 2**i) * math.ceil(width / 2**i)


def unet_activation_bytes(config: Any, latent_h: int, latent_w: int, rows: int, dtype_bytes: int,
                          quadratic: bool | int) -> int:
    """Peak bytes of one U-Net call on `rows` latents of latent_h × latent_w (not counting weights); `quadratic` as
    `_quadratic_attention` gives it."""
    cfg = dict(config)
    if "transformer_config" in cfg:  # a DiT/MMDiT (components.denoisers): every block's tokens at one width
        t = cfg["transformer_config"]
        tokens = (latent_h // cfg["patch_size"]) * (latent_w // cfg["patch_size"]) + 77  # + a text's tokens
        width, heads = t["num_attention_heads"] * t["attention_head_dim"], t["num_attention_heads"]
        scored = rows * heads if quadratic is True else min(rows * heads, int(quadratic or 1))
        scores = (scored * tokens * tokens if quadratic else rows * 3 * width * tokens) * 4
        return rows * t["num_layers"] * WORKING_TENSORS * width * tokens * dtype_bytes + scores
    channels = list(cfg["block_out_channels"])
    layers = int(cfg.get("layers_per_block", 2))
    heads = cfg.get("attention_head_dim", 8)
    heads = max(heads) if isinstance(heads, (list, tuple)) else int(heads or 8)
    attention_levels = [i for i, kind in enumerate(cfg.get("down_block_types", [])) if "CrossAttn" in kind]
    maps, scores = 0, 0
    for i, c, n in _levels(channels, latent_h, latent_w):
        maps += (layers + 1) * c * n  # skip connections, kept until the up path
        maps += WORKING_TENSORS * c * n if i == 0 else 0  # the widest working set is at full latent resolution
        if i in attention_levels:
            scored = rows * heads if quadratic is True else min(rows * heads, int(quadratic))
            scores = max(scores, (scored * n * n if quadratic else rows * 3 * c * n) * 4)  # scores in fp32
    return rows * maps * dtype_bytes + scores


def vae_decode_bytes(config: Any, height: int, width: int, images: int, dtype_bytes: int, quadratic: bool) -> int:
    """Peak bytes of decoding `images` latents into height × width pixels (not counting weights)."""
    cfg = dict(config)
    channels = list(cfg["block_out_channels"])
    peak = max(WORKING_TENSORS * c * n for _, c, n in _levels(channels, height, width))
    f = vae_factor(cfg)
    tokens = math.ceil(height / f) * math.ceil(width / f)
    attention = (tokens * tokens if quadratic else 3 * channels[-1] * tokens) * 4
    return images * (peak * dtype_bytes + attention)


def sampling_bytes(unet, vae, height: int, width: int, images: int, guided: bool, offloaded: str | None = None) -> int:
    """Peak bytes of generating `images` images of height × width (U-Net calls or VAE decoding, whichever is
    larger); with guidance the U-Net sees twice the rows. `offloaded` ("model", "sequential": `LatentPipeline.
    offload`): the weights live in main memory, and what the hooks bring to the device while a model runs counts
    too (the free memory it is compared with then includes them)."""
    factor = vae_factor(vae)
    rows = images * (2 if guided else 1)
    unet_bytes = unet_activation_bytes(unet.config, height // factor, width // factor, rows,
                                       _dtype_bytes(unet), _quadratic_attention(unet))
    if getattr(vae, "use_tiling", False):  # decoded tile by tile (`--vae-tiling`): the peak is one tile's
        tile = int(vae.tile_sample_min_size)
        height, width = min(height, tile), min(width, tile)
    vae_bytes = vae_decode_bytes(vae.config, height, width, images, _dtype_bytes(vae), _quadratic_attention(vae))
    if offloaded:
        return max(SLACK * unet_bytes + resident_bytes(unet, offloaded),
                   SLACK * vae_bytes + resident_bytes(vae, offloaded))
    return SLACK * max(unet_bytes, vae_bytes)


def resident_bytes(model: torch.nn.Module, offloaded: str) -> int:
    """Bytes of an offloaded `model`'s weights on the device while it runs: all of them ("model"), or its largest
    layer's ("sequential": the hooks bring each module's own weights in for its call and take them out after)."""
    def own(m: torch.nn.Module, recurse: bool) -> int:
        return sum(t.numel() * t.element_size() for t in (*m.parameters(recurse=recurse), *m.buffers(recurse=recurse)))

    if offloaded == "model":
        return own(model, True)
    return max(own(m, False) for m in model.modules())


def _dtype_bytes(model) -> int:
    return next(model.parameters()).element_size()


def free_bytes(device: torch.device) -> int:
    """Memory this process can still take on `device`: CUDA's free memory plus what torch's cache holds unused;
    on the CPU, the kernel's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    import psutil

    return psutil.virtual_memory().available


def gb(n: float) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


def largest_fitting(need: Callable[[int, int], int], height: int, width: int, multiple: int,
                    free: int) -> tuple[int, int] | None:
    """The largest (height, width) with the same aspect ratio, multiples of `multiple`, that `need` says fits."""
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        h, w = (max(multiple, int(v * mid) // multiple * multiple) for v in (height, width))
        lo, hi = (mid, hi) if need(h, w) <= free else (lo, mid)
    h, w = (max(multiple, int(v * lo) // multiple * multiple) for v in (height, width))
    return (h, w) if need(h, w) <= free else None


def check_sampling(pipe, height: int, width: int, images: int, guided: bool) -> None:
    """A one-line error when generating `images` images of height × width cannot fit in free memory."""
    device, offloaded = pipe.execution_device, pipe.__dict__.get("offloaded")
    free = free_bytes(device)
    need = sampling_bytes(pipe.unet, pipe.vae, height, width, images, guided, offloaded)
    if need <= free:
        return
    fits = largest_fitting(lambda h, w: sampling_bytes(pipe.unet, pipe.vae, h, w, images, guided, offloaded), height,
                           width, pipe.size_multiple, free)
    hint = f"about {fits[1]}×{fits[0]} would fit" if fits else "not even the smallest size fits"
    raise UserError(f"{width}×{height} for {images} image(s) needs about {gb(need)} of memory but "
                    f"{gb(free)} is free on {device.type}; {hint}" + (" (or fewer images per call)"
                                                                      if images > 1 else ""))


def unet_training_bytes(unet, latent_size: int, batch: int, dtype_bytes: int, quadratic: bool,
                        shards: int = 1) -> int:
    """One U-Net training step on `batch` latents: activations kept for backward (with those of transformers
    deeper than one block, SDXL's), gradients and AdamW's two moments (fp32) for every trained parameter, of which
    a rank holds 1/`shards` with FSDP."""
    state = sum(p.numel() for p in unet.parameters() if p.requires_grad) * 12 // shards
    deep = deep_transformer_bytes(unet.config, latent_size, latent_size, batch, dtype_bytes)
    return SLACK * (TRAINING_FACTOR * unet_activation_bytes(unet.config, latent_size, latent_size, batch, dtype_bytes,
                                                            quadratic) + deep) + state


def saved_for_backward(model: torch.nn.Module, *args, **kwargs) -> int:
    """Bytes autograd keeps for the backward pass of one call `model(*args, **kwargs)`, its parameters left out:
    what the training estimates above stand for, measured (`python bench/probes.py transformer-depth`, the tests)."""
    params, kept = {p.data_ptr() for p in model.parameters()}, {}

    def pack(t):
        if t.data_ptr() not in params:
            kept[(t.data_ptr(), tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*args, **kwargs)
    return sum(kept.values())


def deep_transformer_bytes(config: Any, latent_h: int, latent_w: int, rows: int, dtype_bytes: int) -> int:
    """What a U-Net's transformer blocks beyond the first of each attention (SDXL's `transformer_layers_per_block`
    2 and 10) keep for the backward pass on `rows` latents; 0 for one block per attention and for DiT/MMDiT."""
    cfg = dict(config)
    if "transformer_config" in cfg:
        return 0
    channels = list(cfg["block_out_channels"])
    depth = cfg.get("transformer_layers_per_block", 1)
    depth = [int(d if isinstance(d, int) else max(d)) for d in depth] if isinstance(depth, (list, tuple)) \
        else [int(depth)] * len(channels)
    blocks = 2 * int(cfg.get("layers_per_block", 2)) + 1  # attentions of a level: its down blocks and up blocks
    attention_levels = [i for i, kind in enumerate(cfg.get("down_block_types", [])) if "CrossAttn" in kind]
    maps = sum((depth[i] - 1) * blocks * c * n for i, c, n in _levels(channels, latent_h, latent_w)
               if i in attention_levels)
    return rows * TRANSFORMER_SAVED * maps * dtype_bytes


def vae_training_bytes(vae, resolution: int, batch: int, dtype_bytes: int) -> int:
    """One VAE training step on `batch` images: encoder and decoder activations kept for backward, gradients and
    AdamW's moments."""
    state = sum(p.numel() for p in vae.parameters() if p.requires_grad) * 12
    return SLACK * TRAINING_FACTOR * 2 * vae_decode_bytes(vae.config, resolution, resolution, batch, dtype_bytes,
                                                          _quadratic_attention(vae)) + state


def check_training(model_bytes_per_sample: Callable[[int], int], batch_size: int, device: torch.device,
                   what: str) -> None:
    """A one-line error when one training step of `batch_size` samples cannot fit, naming the batch that fits."""
    free = free_bytes(device)
    need = model_bytes_per_sample(batch_size)
    if need <= free:
        return
    lo, hi = 0, batch_size - 1  # the largest batch that fits, by bisection (the need grows with the batch)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if model_bytes_per_sample(mid) <= free else (lo, mid - 1)
    fits = lo or None
    hint = f"train_batch_size={fits} would fit (with gradient_accumulation_steps for the same effective batch)" \
        if fits else "not even one sample fits; lower data.resolution"
    raise UserError(f"{what} with train_batch_size={batch_size} needs about {gb(need)} of memory but {gb(free)} is "
                    f"free on {device.type}; {hint}")
