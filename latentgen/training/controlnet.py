"""ControlNet training (Zhang et al. 2023), through `train_unet.py` with a `controlnet:` section. diffusers'
`train_controlnet.py` is the skeleton (a trainable copy of the U-Net's encoder, `ControlNetModel.from_unet`, whose
zero convolutions start at zero so the pipeline starts as it was; the U-Net and text encoder frozen; the U-Net's
own denoising loss with the ControlNet's residuals added); the loop is this project's `Run` (accelerate, exact
resume after a kill, checkpoints, the memory guard).

The control image of an example is the dataset's: for the shapes dataset its layout map (each shape's silhouette,
white on black: `ShapesSample.render(layout=True)`), for an hf dataset a conditioning-image column. Captions are
dropped with `caption_dropout`, so the ControlNet also learns to steer the unconditional prediction that guidance
subtracts (A1111's balanced mode runs it on both).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from latentgen.components.diffusion import caption_dropout, min_snr_weights, sample_timesteps, scale_latents, vae_factor
from latentgen.data.sources import build_dataset
from latentgen.errors import UserError
from latentgen.formats.controlnet import load
from latentgen.io import atomic_dir
from latentgen.runtime.memory import check_training, unet_training_bytes
from latentgen.runtime.precision import DTYPES
from latentgen.training.cache import draw_latents, load_or_build_cache
from latentgen.training.loop import Run, batch_iterator, make_lr_scheduler, make_optimizer, step_generator
from latentgen.training.unet_config import UNetTrainConfig
from latentgen.training.unet_parts import load_components

SD_HINT = (16, 32, 96, 256)  # SD's hint encoder: 8× down to its latents


def hint_channels(config: UNetTrainConfig, vae_factor: int) -> tuple[int, ...]:
    """The hint encoder's widths: the config's, or SD's first ones, one stride-2 step per factor of 2."""
    levels = vae_factor.bit_length()  # 8 -> 4 widths (3 downsamplings), 4 -> 3
    widths = tuple(config.controlnet.hint_channels) or SD_HINT[:levels]
    if 2 ** (len(widths) - 1) != vae_factor:
        raise UserError(f"controlnet.hint_channels must have {levels} widths (the VAE shrinks {vae_factor}×), got "
                        f"{list(widths)}")
    return widths


def new_controlnet(unet, config: UNetTrainConfig, vae_factor: int):
    """The ControlNet to train: a pretrained one, or a copy of the U-Net's encoder with zero convolutions."""
    from diffusers import ControlNetModel

    if config.controlnet.pretrained_controlnet:
        return load(Path(config.controlnet.pretrained_controlnet), base=unet)
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=hint_channels(config, vae_factor))


def train_controlnet(config: UNetTrainConfig) -> Path:
    """Run the training; returns the ControlNet folder (`{output_dir}/controlnet`)."""
    run = Run(config, "train_controlnet")
    parts = load_components(config)
    dataset = build_dataset(config.data)
    if not hasattr(dataset, "condition"):
        raise UserError("controlnet training needs a map-style dataset with control images (the shapes dataset, "
                        "or an hf dataset with a conditioning image column; not streaming)")
    accelerator = run.launch()
    device = accelerator.device
    unet = parts.unet.requires_grad_(False).eval()
    parts.vae.requires_grad_(False).eval().to(device)
    parts.text_model.requires_grad_(False).eval().to(device)
    net = new_controlnet(unet, config, vae_factor(parts.vae)).train()
    latent_size = config.data.resolution // vae_factor(parts.vae)
    # the gradients go back through the frozen U-Net into the residuals, and through the ControlNet (its encoder
    # half): about one and a half U-Net training steps' activations
    check_training(lambda b: 3 * unet_training_bytes(unet, latent_size, b, 4, False) // 2, config.train_batch_size,
                   device, f"the ControlNet at {config.data.resolution} px")
    data = load_or_build_cache(config, dataset, parts, True, accelerator)
    embeddings = data.embeddings.to(device)  # row 0: the empty prompt
    unet.to(device)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, config)
    lr_scheduler = make_lr_scheduler(optimizer, config)
    net, optimizer = accelerator.prepare(net, optimizer)
    raw = accelerator.unwrap_model(net)
    noise_scheduler = parts.noise_scheduler
    column = None if config.data.source == "shapes" else config.controlnet.condition

    start = run.resume({"controlnet": raw}, {"optimizer": optimizer.optimizer, "lr_scheduler": lr_scheduler,
                                             "scaler": accelerator.scaler}, lambda step: None)
    batches = batch_iterator(data, config, accelerator.num_processes, accelerator.process_index, start)
    for step in range(start, config.max_steps):
        g = step_generator(config.seed, step, 0, accelerator.process_index, device)
        batch = next(batches)
        z0 = scale_latents(parts.vae, draw_latents(batch, g, device).float())
        b = z0.shape[0]
        rows = batch["text_row"].to(device)
        rows = torch.where(caption_dropout(b, config.caption_dropout, g), torch.zeros_like(rows), rows)
        context = embeddings[rows]
        control = torch.stack([dataset.condition(int(i)) if column is None else dataset.condition(int(i), column)
                               for i in batch["index"]]).to(device)
        noise = torch.randn(z0.shape, generator=g, device=device)
        t = sample_timesteps(config.noise, noise_scheduler.config.num_train_timesteps, b, g, device)
        z_t = noise_scheduler.add_noise(z0, noise, t)
        target = noise_scheduler.get_velocity(z0, noise, t) \
            if noise_scheduler.config.prediction_type == "v_prediction" else noise
        with accelerator.autocast():
            down, mid = net(z_t, t, encoder_hidden_states=context, controlnet_cond=control, return_dict=False)
            pred = unet(z_t, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid, return_dict=False)[0]
            loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
            if config.noise.snr_gamma:
                loss = loss * min_snr_weights(noise_scheduler, t, config.noise.snr_gamma)
            loss = loss.mean()
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr_scheduler.step()
        run.averages.add(loss=loss.item())
        run.end_step(step + 1)

    out = Path(config.output_dir) / "controlnet"
    if run.finish(config.train_batch_size * accelerator.num_processes):
        with atomic_dir(out) as tmp:  # diffusers' ControlNet folder, whole or not at all
            raw.to(DTYPES[config.save_dtype]).save_pretrained(tmp, safe_serialization=True)
        raw.to(torch.float32)
        accelerator.print(f"wrote {out}")
    run.close()
    return out
