"""Train or fine-tune the autoencoder (diffusers `AutoencoderKL`) with latent diffusion's recipe.

Loss per image: λ₁·L1 + λ₂·L2 + λ_KL·KL(q(z|x) ‖ N(0, I)) + λ_SSIM·(1 − SSIM) [+ λ_adv·PatchGAN hinge loss
after `disc_start`]. Pixel terms are per-pixel means, KL a per-latent-element mean.

The perceptual term is SSIM (torchmetrics, differentiable): LPIPS needs VGG/AlexNet weights that cannot be
downloaded here, while SSIM needs none and rewards the same things at these sizes (edges and local contrast).
At the end the latent scaling factor (the role 0.18215 plays in Stable Diffusion) is measured on the data so
that scaled latents have unit variance, and stored in the VAE's config.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from latentgen.components.diffusion import vae_factor
from latentgen.config import to_yaml
from latentgen.data.sources import build_dataset, check_resolution
from latentgen.errors import UserError
from latentgen.generation.outputs import contact_sheet
from latentgen.io import atomic_dir, save_image
from latentgen.runtime.device import set_attention
from latentgen.runtime.memory import check_training, vae_training_bytes
from latentgen.training.loop import (
    Run,
    StepBatches,
    TrainConfig,
    batch_iterator,
    compute_bytes,
    evaluating,
    log_image,
    make_ema,
    make_lr_scheduler,
    make_optimizer,
    step_generator,
)

log = logging.getLogger(__name__)

DEFAULT_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[32, 64, 64], layers_per_block=1,
    down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3, norm_num_groups=32,
)


@dataclass
class VAELoss:
    l1_weight: float = 1.0
    l2_weight: float = 0.0
    kl_weight: float = 1e-6
    ssim_weight: float = 0.2
    disc_weight: float = 0.0  # > 0 turns the PatchGAN discriminator on
    disc_start: int = 0  # step at which the adversarial terms start


@dataclass
class VAETrainConfig(TrainConfig):
    output_dir: str = "runs/vae"
    learning_rate: float = 4.5e-5 * 8
    pretrained: str | None = None  # an AutoencoderKL folder (or a pipeline folder with vae/) to fine-tune
    model: dict = field(default_factory=lambda: dict(DEFAULT_VAE))  # AutoencoderKL arguments
    loss: VAELoss = field(default_factory=VAELoss)
    validation_images: int = 8
    scaling_batches: int = 16  # batches used to measure the latent scaling factor
    # Decoder-only fine-tuning (as Stability's ft-MSE VAE was made): the encoder stays frozen, so its latents, the
    # scaling factor and every U-Net trained on them stay valid. Needs `pretrained`.
    decoder_only: bool = False
    # Gaussian noise added to the latents before decoding, its std drawn per image from U[0, latent_noise] in units
    # of the scaled (unit-variance) latents: teaches the decoder to draw clean images from a U-Net's imperfect ones.
    latent_noise: float = 0.0

    def check(self) -> None:
        super().check()
        for name in ("l1_weight", "l2_weight", "kl_weight", "ssim_weight", "disc_weight"):
            if getattr(self.loss, name) < 0:
                raise UserError(f"loss.{name} must be ≥ 0, got {getattr(self.loss, name)}")
        if self.data.buckets:
            raise UserError("data.buckets is for train_unet.py; the VAE trains on square crops")
        if self.latent_noise < 0:
            raise UserError(f"latent_noise must be ≥ 0, got {self.latent_noise}")
        if self.decoder_only and self.pretrained is None:
            raise UserError("decoder_only needs a pretrained VAE to keep the encoder of (set pretrained: FOLDER)")
        if self.pretrained is None:
            bad = set(self.model) - set(_vae_arguments())
            if bad:
                raise UserError(f"unknown AutoencoderKL argument model.{sorted(bad)[0]}; "
                                f"valid: {', '.join(_vae_arguments())}")


def _vae_arguments() -> list[str]:
    import inspect

    from diffusers import AutoencoderKL

    return [p for p in inspect.signature(AutoencoderKL.__init__).parameters if p != "self"]


class PatchDiscriminator(nn.Module):
    """pix2pix's N-layer PatchGAN (as latent diffusion's autoencoder uses): one real/fake logit per patch.

    Written here because neither diffusers nor torchvision ships one; it is the standard 5-conv design.
    """

    def __init__(self, in_channels: int = 3, width: int = 64, layers: int = 3):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = width
        for i in range(1, layers + 1):
            out = width * min(2 ** i, 8)
            stride = 2 if i < layers else 1
            blocks += [nn.Conv2d(ch, out, 4, stride, 1, bias=False), nn.GroupNorm(min(32, out // 4), out),
                       nn.LeakyReLU(0.2)]
            ch = out
        blocks.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, 1, h, w)


def load_vae(config: VAETrainConfig):
    from diffusers import AutoencoderKL

    if config.pretrained is None:
        return AutoencoderKL(**config.model)
    path = Path(config.pretrained)
    if (path / "vae" / "config.json").is_file():
        path = path / "vae"
    if not (path / "config.json").is_file():
        raise UserError(f"pretrained {config.pretrained} is not an AutoencoderKL folder (no config.json)")
    return AutoencoderKL.from_pretrained(path, use_safetensors=True)


def reconstruction_terms(vae, x: torch.Tensor, generator: torch.Generator,
                         latent_noise: float = 0.0) -> dict[str, torch.Tensor]:
    """Per-image loss terms and the reconstruction; x: (B, 3, H, W) in [-1, 1]. `latent_noise`: see
    VAETrainConfig (the noise is drawn from `generator` after the posterior sample)."""
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    posterior = vae.encode(x).latent_dist
    z = posterior.sample(generator=generator)  # (B, C, H/f, W/f)
    if latent_noise:
        std = latent_noise * torch.rand(len(z), 1, 1, 1, generator=generator, device=z.device, dtype=z.dtype)
        noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        z = z + std * noise / vae.config.scaling_factor
    rec = vae.decode(z).sample
    diff = (rec.float() - x.float())
    return {
        "rec": rec,
        "l1": diff.abs().mean(dim=(1, 2, 3)),
        "l2": diff.pow(2).mean(dim=(1, 2, 3)),
        "kl": posterior.kl().float() / z[0].numel(),
        "ssim": ssim((rec.float().clamp(-1, 1) + 1) / 2, (x.float() + 1) / 2, data_range=1.0, reduction="none"),
    }


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (measured on [0, 1])."""
    mse = ((a.float().clamp(-1, 1) - b.float()) / 2).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
    return -10 * torch.log10(mse)


def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())


@torch.no_grad()
def measure_scaling_factor(vae, batches, generator: torch.Generator) -> float:
    """1/std of sampled latents over `batches`, so that scaled latents have unit variance."""
    total, total_sq, count = 0.0, 0.0, 0
    for x in batches:
        z = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.sample(generator=generator).double()
        total, total_sq, count = total + z.sum().item(), total_sq + z.pow(2).sum().item(), count + z.numel()
    mean = total / count
    return float(1.0 / math.sqrt(total_sq / count - mean**2))


def _fixed_images(dataset, count: int) -> torch.Tensor:
    return torch.stack([dataset.item(i, 0, 0)["pixel_values"] for i in range(min(count, len(dataset)))])


@torch.no_grad()
def validation_grid(vae, images: torch.Tensor):
    """Originals above, reconstructions (posterior mean) below."""
    from PIL import Image

    rec = vae.decode(vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mode()).sample
    to_pil = lambda t: Image.fromarray(((t.float().clamp(-1, 1) + 1) * 127.5).round().byte()  # noqa: E731
                                       .permute(1, 2, 0).cpu().numpy())
    n = len(images)
    return contact_sheet([to_pil(t) for t in (*images, *rec)], ["original"] * n + ["reconstruction"] * n, columns=n)


def train_vae(config: VAETrainConfig) -> Path:
    """Run the training; returns the folder of the final VAE (`{output_dir}/vae`)."""
    # 1. Model and data, checked before any training starts.
    run = Run(config, "train_vae")
    vae = load_vae(config)
    check_resolution(config.data.resolution, vae_factor(vae), "the VAE")
    dataset = build_dataset(config.data)
    disc = PatchDiscriminator() if config.loss.disc_weight > 0 else None
    set_attention(vae, config.attention, run.state.device, training=True)
    check_training(lambda b: vae_training_bytes(vae, config.data.resolution, b, compute_bytes(config)),
                   config.train_batch_size, run.state.device, f"the VAE at {config.data.resolution} px")

    # 2. accelerate, optimizers, EMA.
    accelerator = run.launch()
    device = accelerator.device
    if config.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    vae.train()
    if config.decoder_only:
        for module in (vae.encoder, vae.quant_conv):
            if module is not None:
                module.requires_grad_(False).eval()
    optimizer = make_optimizer([p for p in vae.parameters() if p.requires_grad], config)
    lr_scheduler = make_lr_scheduler(optimizer, config)
    ema = make_ema(vae, config) if config.ema else None
    disc_opt = make_optimizer(disc.parameters(), config) if disc is not None else None
    if disc is not None:
        vae, optimizer, disc, disc_opt = accelerator.prepare(vae, optimizer, disc, disc_opt)
    else:
        vae, optimizer = accelerator.prepare(vae, optimizer)
    raw_vae = accelerator.unwrap_model(vae)
    raw_disc = accelerator.unwrap_model(disc) if disc is not None else None
    if ema is not None:
        ema.to(device)

    # 3. Resume, then train.
    out = Path(config.output_dir)
    models = {"vae": raw_vae} | ({"discriminator": raw_disc} if raw_disc is not None else {})
    states = {"optimizer": optimizer.optimizer, "lr_scheduler": lr_scheduler, "ema": ema,
              "disc_optimizer": disc_opt.optimizer if disc_opt is not None else None,
              "scaler": accelerator.scaler}
    fixed = _fixed_images(dataset, config.validation_images)
    start = run.resume(models, states, lambda step: _validate(accelerator, raw_vae, ema, fixed, out, step))
    accum = config.gradient_accumulation_steps
    batches = batch_iterator(dataset, config, accelerator.num_processes, accelerator.process_index, start * accum)
    for step in range(start, config.max_steps):
        for micro in range(accum):
            g = step_generator(config.seed, step, micro, accelerator.process_index, device)
            x = next(batches)["pixel_values"].to(device)
            with accelerator.accumulate(*[m for m in (vae, disc) if m is not None]):
                with accelerator.autocast():
                    terms = reconstruction_terms(vae, x, g, config.latent_noise)
                    loss = (config.loss.l1_weight * terms["l1"] + config.loss.l2_weight * terms["l2"]
                            + config.loss.kl_weight * terms["kl"]
                            + config.loss.ssim_weight * (1 - terms["ssim"])).mean()
                    adversarial = disc is not None and step >= config.loss.disc_start
                    if adversarial:
                        # the generator's term through the discriminator's weights, without training them
                        frozen = {k: v.detach() for k, v in raw_disc.named_parameters()}
                        g_adv = -torch.func.functional_call(raw_disc, frozen, (terms["rec"],)).mean()
                        loss = loss + config.loss.disc_weight * g_adv
                        d_loss = hinge_d_loss(disc(x), disc(terms["rec"].detach()))
                accelerator.backward(loss if not adversarial else loss + d_loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(vae.parameters(), config.max_grad_norm)
                    if adversarial:
                        accelerator.clip_grad_norm_(disc.parameters(), config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if disc_opt is not None:
                    if adversarial:
                        disc_opt.step()
                    disc_opt.zero_grad(set_to_none=True)
            run.averages.add(loss=loss.item(), l1=terms["l1"].mean().item(), kl=terms["kl"].mean().item(),
                             ssim=terms["ssim"].mean().item(), psnr=psnr(terms["rec"], x).mean().item(),
                             g_adv=g_adv.item() if adversarial else None,
                             d_loss=d_loss.item() if adversarial else None)
        lr_scheduler.step()
        if ema is not None:
            ema.step(raw_vae.parameters())
        run.end_step(step + 1)

    # 4. Final model: EMA weights when on, scaling factor measured on the data (kept when only the decoder
    # trained: the latents are the pretrained encoder's).
    target = out / "vae"
    if run.finish(config.train_batch_size * accum * accelerator.num_processes):
        if ema is not None:
            ema.copy_to(raw_vae.parameters())
        raw_vae.eval()
        _validate(accelerator, raw_vae, None, fixed, out, config.max_steps)
        scaling = raw_vae.config.scaling_factor if config.decoder_only else measure_scaling_factor(
            raw_vae, _scaling_batches(dataset, config), torch.Generator(device).manual_seed(config.seed))
        raw_vae.register_to_config(scaling_factor=scaling)
        with atomic_dir(target) as tmp:
            raw_vae.save_pretrained(tmp, safe_serialization=True)
            (tmp / "train_config.yaml").write_text(to_yaml(config))
        accelerator.print(f"latent scaling factor {scaling:.5f}; wrote {target}")
    run.close()
    return target


def _scaling_batches(dataset, config: VAETrainConfig):
    sampler = StepBatches(len(dataset), config.train_batch_size, 1, 0, config.seed + 1)
    for _, batch in zip(range(config.scaling_batches), sampler):
        yield torch.stack([dataset.item(i, e, config.seed)["pixel_values"] for i, e in batch])


def _validate(accelerator, vae, ema, fixed: torch.Tensor, out: Path, step: int) -> None:
    if ema is not None:
        ema.store(vae.parameters())
        ema.copy_to(vae.parameters())
    with evaluating(vae):
        grid = validation_grid(vae, fixed)
    if ema is not None:
        ema.restore(vae.parameters())
    save_image(grid, out / "validation" / f"step-{step:07d}.png")
    log_image(accelerator, "validation/reconstructions", grid, step)

