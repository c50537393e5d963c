"""Image metrics: VAE reconstruction (PSNR/SSIM), a distribution distance (KID), CLIP score.

No pretrained image network can be downloaded here (Inception for FID, CLIP, VGG), so the distribution distance
uses torchmetrics' KID over the features of a fixed, seeded random convolutional network. Random conv features
are sensitive to color, edge and texture statistics, which is what goes wrong in images of flat shapes; the
numbers compare models and samplers within this project, not with published FID/KID values. KID (unbiased, with
a polynomial kernel) rather than FID because it is reliable with a few hundred images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn


class RandomConvFeatures(nn.Module):
    """A fixed, seeded random 4-stage conv net. Its kernels are zero-mean, so they respond to edges and texture
    rather than flat color; the image's own color mean and std are a stage of their own. Each stage's
    (per-channel mean, per-channel std) vector is normalized, so blur, noise and color errors all count."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        widths, self.convs = [3, 32, 64, 128, 256], nn.ModuleList()
        for i, (a, b) in enumerate(zip(widths, widths[1:])):
            conv = nn.Conv2d(a, b, 3, stride=1 if i == 0 else 2, padding=1)
            with torch.no_grad():
                w = torch.randn(conv.weight.shape, generator=g)
                conv.weight.copy_((w - w.mean(dim=(2, 3), keepdim=True)) * (2 / (a * 9)) ** 0.5)
                conv.bias.zero_()
            self.convs.append(conv)
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8 -> (N, 966) float64."""
        x = images.float() / 127.5 - 1.0
        stages = [torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)]
        for conv in self.convs:
            x = torch.relu(conv(x))
            stages.append(torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1))
        out = torch.cat([f / f.norm(dim=1, keepdim=True).clamp_min(1e-8) for f in stages], dim=1)
        return (out * (out.shape[1] / len(stages)) ** 0.5).double()  # O(1) dot products for KID's kernel


def _uint8_batch(images: Sequence[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2)


def kid(real: Sequence[Image.Image], fake: Sequence[Image.Image], subset_size: int = 50,
        subsets: int = 100) -> tuple[float, float]:
    """Kernel Inception Distance (mean, std over subsets) with RandomConvFeatures, ×1000 as usually reported."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(subset_size, len(real), len(fake))
    metric = KernelInceptionDistance(feature=RandomConvFeatures(), subset_size=size, subsets=subsets)
    metric.update(_uint8_batch(real), real=True)
    metric.update(_uint8_batch(fake), real=False)
    with torch.random.fork_rng():  # the subsets are drawn with torch's global generator: fix them
        torch.manual_seed(0)
        mean, std = metric.compute()
    return 1000 * float(mean), 1000 * float(std)


@torch.no_grad()
def reconstruction(vae, images: Sequence[Image.Image], batch_size: int = 32) -> dict[str, float]:
    """Mean PSNR (dB) and SSIM of the VAE's reconstructions (posterior mean) of `images`."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    psnrs, ssims = [], []
    for i in range(0, len(images), batch_size):
        x = _uint8_batch(images[i:i + batch_size]).float() / 255.0
        rec = vae.decode(vae.encode((x * 2 - 1).to(vae.device, vae.dtype)).latent_dist.mode()).sample
        rec = ((rec.float().cpu() + 1) / 2).clamp(0, 1)
        rec = (rec * 255).round() / 255  # as the image would be saved
        for a, b in zip(rec, x):
            psnrs.append(float(peak_signal_noise_ratio(a[None], b[None], data_range=1.0)))
            ssims.append(float(structural_similarity_index_measure(a[None], b[None], data_range=1.0)))
    return {"psnr": float(np.mean(psnrs)), "ssim": float(np.mean(ssims)), "n": len(psnrs)}


def photographs(size: int = 128) -> list[Image.Image]:
    """scikit-image's sample photographs, center-cropped and resized to size×size."""
    from skimage import data

    names = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry"]
    out = []
    for name in names:
        arr = getattr(data, name)()
        image = Image.fromarray(arr).convert("RGB")
        w, h = image.size
        s = min(w, h)
        image = image.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        out.append(image.resize((size, size), Image.Resampling.LANCZOS))
    return out


@torch.no_grad()
def clip_score(images: Sequence[Image.Image], prompts: Sequence[str], checkpoint: str | Path,
               model_name: str = "ViT-B-32") -> float:
    """CLIP score (100·max(cos, 0), torchmetrics' definition) with a local open_clip checkpoint."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(checkpoint))
    tokenizer = open_clip.get_tokenizer(model_name)
    model.eval()
    img = model.encode_image(torch.stack([preprocess(im) for im in images]))
    txt = model.encode_text(tokenizer(list(prompts)))
    cos = torch.nn.functional.cosine_similarity(img, txt)
    return float(100 * cos.clamp_min(0).mean())
