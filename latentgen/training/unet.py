"""Train a text-conditioned U-Net on VAE latents: latent diffusion with classifier-free-guidance dropout.

The objective, the forward process and caption dropout are `latentgen.components.diffusion`'s; the latent cache is
`latentgen.training.cache`; the run around the loop is `training.loop.Run`. The run's config is
`training.unet_config`, its components `training.unet_parts`, what it makes `training.products`; here is the
loop, which reads top to bottom in `train_unet`.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from latentgen.components.diffusion import (
    caption_dropout,
    diffusion_loss,
    scale_latents,
    vae_factor,
)
from latentgen.data.sources import build_dataset
from latentgen.errors import UserError
from latentgen.io import save_image
from latentgen.runtime.device import set_attention
from latentgen.runtime.distributed import deepspeed_requested, describe, fsdp_requested, say
from latentgen.runtime.memory import check_training, unet_training_bytes
from latentgen.training import sharded, zero
from latentgen.training.cache import draw_latents, load_or_build_cache
from latentgen.training.controlnet import train_controlnet
from latentgen.training.lcm import train_lcm
from latentgen.training.loop import (
    Run,
    batch_iterator,
    compute_bytes,
    log_image,
    make_ema,
    make_lr_scheduler,
    make_optimizer,
    step_batches,
    step_generator,
)
from latentgen.training.products import product, validation_grid
from latentgen.training.unet_config import LoraTrainConfig, UNetTrainConfig
from latentgen.training.unet_parts import Components, load_components
from latentgen.training.upscaler import low_resolution

log = logging.getLogger(__name__)

def train_unet(config: UNetTrainConfig) -> Path:
    """Run the training; returns the final pipeline folder (`{output_dir}/pipeline`), or what `products` says the
    run makes; a distillation (`lcm.enabled`) is `training.lcm`'s."""
    if config.lcm.enabled:
        return train_lcm(config)
    if config.controlnet.enabled:
        return train_controlnet(config)
    # 1. Components and data, checked before any training starts.
    run = Run(config, "train_unet")
    if fsdp_requested():  # accelerate launch --use_fsdp: honoured by FSDP2 here, on the CPU as on GPUs
        config.distributed.strategy = "fsdp"
    deepspeed = deepspeed_requested()  # accelerate launch --use_deepspeed: its engine (`training.zero`)
    if deepspeed:
        zero.check(config)
    shard = config.distributed.strategy == "fsdp"
    if shard and config.distributed.offload and run.state.device.type == "cpu":
        raise UserError("distributed.offload keeps a GPU's shards in CPU memory between uses; on the CPU they are "
                        "there already: set it false")
    parts = load_components(config)
    dataset = build_dataset(config.data)
    step_batches(dataset, config, run.state.num_processes, 0)  # one step fits (else a one-line error)
    kernel = set_attention(parts.unet, config.attention, run.state.device, training=True)
    latent_size = config.data.resolution // vae_factor(parts.vae)
    # on a GPU the weights are not there yet (on the CPU they are loaded: the available memory has them counted);
    # FSDP and ZeRO-3 leave each rank 1/ranks of the U-Net's weights and of their gradients and AdamW state (ZeRO-1/2
    # keep the weights whole: counted whole, an upper bound)
    shards = run.state.num_processes if shard or (deepspeed and zero.stage_asked() == 3) else 1
    resident = 0 if run.state.device.type == "cpu" else sum(
        p.numel() * p.element_size() for m in (parts.vae, *parts.text_models) for p in m.parameters()) + sum(
        p.numel() * p.element_size() for p in parts.unet.parameters()) // shards
    check_training(lambda b: resident + unet_training_bytes(parts.unet, latent_size, b, compute_bytes(config),
                                                            kernel == "math", shards),
                   config.train_batch_size, run.state.device, f"the U-Net at {config.data.resolution} px")
    accelerator = run.launch()
    device = accelerator.device
    train_text = config.trains_text
    stage = zero.configure(accelerator, config) if deepspeed else None

    # 2. Frozen parts in eval mode on the device (autocast gives them bf16/fp16 compute); cache.
    parts.vae.requires_grad_(False).eval().to(device)
    for text_model in parts.text_models:
        text_model.requires_grad_(config.text_encoder.train).train(config.text_encoder.train).to(device)
    data = load_or_build_cache(config, dataset, parts, not train_text, accelerator) if config.cache else dataset
    if config.cache and not train_text:
        data.embeddings = data.embeddings.to(device)  # row 0: the empty prompt
        data.pooled = None if data.pooled is None else data.pooled.to(device)  # SDXL's, by the same rows

    # 3. What the run makes (a pipeline, a LoRA or an upscaler); the U-Net (or its LoRA), optimizer, schedule, EMA.
    made = product(config, parts)
    unet = parts.unet
    made.adapt(unet)
    unet.train()
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if shard and accelerator.num_processes > 1:
        sharded.shard(unet, config.distributed)  # FSDP2: each rank its shards; gradients reduce-scattered
        say(f"train_unet (fsdp): {describe(run.state)} holds {sharded.resident(unet):,} of the U-Net's "
            f"{sum(p.numel() for p in unet.parameters()):,} parameters (fsdp)")
    unet_params = [p for p in unet.parameters() if p.requires_grad]
    text_params = [p for m in parts.text_models for p in m.parameters() if p.requires_grad] if train_text else []
    params = unet_params + text_params
    # sharded: the U-Net's DTensors and a text encoder's plain tensors cannot share one fused AdamW step
    optimizer = make_optimizer(unet_params, config, text_params) if shard and text_params else \
        make_optimizer(params, config)
    lr_scheduler = make_lr_scheduler(optimizer, config)
    ema = make_ema(unet, config) if config.ema else None
    # A trained text encoder stays unwrapped (the backends need its attributes); with several processes its
    # gradients are averaged by hand below, which is what DDP would do.
    if shard:
        optimizer = accelerator.prepare(optimizer)  # the sharded U-Net is not wrapped again (DDP)
    else:
        unet, optimizer = accelerator.prepare(unet, optimizer)
    raw_unet = accelerator.unwrap_model(unet)
    if deepspeed:
        say(f"train_unet (deepspeed): {describe(run.state)}, ZeRO stage {stage}")
    if ema is not None:
        ema.to(device)

    base = made.base(raw_unet)
    base_weights = _base_weights(data, config.lora)

    # 4. Resume, then train.
    texts = parts.named_text_models if train_text else {}
    whole = zero.ZeroModel(raw_unet, unet) if deepspeed else sharded.FullModel(raw_unet) if shard else None
    models = {"unet": whole or raw_unet} | texts
    # a trained text encoder is not sharded; its optimizer state is kept by parameter name beside the U-Net's
    trained = torch.nn.ModuleDict({"unet": raw_unet, **texts}) if texts else raw_unet
    # DeepSpeed's optimizer partitions are written and loaded by its engine, with the weights (`whole`)
    states = {"optimizer": None if deepspeed else
              sharded.FullOptimizer(trained, optimizer.optimizer) if shard else optimizer.optimizer,
              "lr_scheduler": lr_scheduler, "ema": sharded.FullEMA(ema) if shard and ema else ema,
              "scaler": accelerator.scaler}
    examples = made.examples(dataset, device)

    gathers = shard or stage == 3  # the weights are partitions: gathered to validate and save (a collective)

    def validate(step: int, unet=raw_unet) -> None:
        if gathers:  # gathered on every rank (with the EMA's weights, each rank swapping in its shards), sampled
            with sharded.swapped_in(ema, raw_unet):  # on the main one
                unet = sharded.unsharded(raw_unet, accelerator.is_main_process, whole)
            if unet is not None:
                _validate(config, parts, unet, None, accelerator, step, examples)
            return
        _validate(config, parts, unet, ema, accelerator, step, examples)

    run.validate_everywhere = gathers
    start = run.resume(models, states, validate)
    accum = config.gradient_accumulation_steps
    batches = batch_iterator(data, config, accelerator.num_processes, accelerator.process_index, start * accum)
    for step in range(start, config.max_steps):
        for micro in range(accum):
            g = step_generator(config.seed, step, micro, accelerator.process_index, device)
            batch = next(batches)
            with accelerator.accumulate(unet):
                with zero.autocast(accelerator):
                    latents, context, low, dropped, added = _latents_and_context(batch, data, parts, config, g,
                                                                                 device)
                    extra, levels = made.condition(low, g)
                    loss = diffusion_loss(unet, parts.noise_scheduler, latents, context, g, config.noise, extra,
                                          levels, base, base_weights(batch, dropped), added).mean()
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    for text_model in parts.text_models if train_text else ():
                        _average_gradients(text_model, accelerator)
                    if shard and text_params:
                        sharded.clip_grad_norm(params, config.max_grad_norm)
                    else:
                        accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            run.averages.add(loss=loss.item())
        lr_scheduler.step()
        if ema is not None:
            ema.step(raw_unet.parameters())
        run.end_step(step + 1)

    # 5. What the run makes, with EMA weights when on.
    target = made.target
    main = run.finish(config.train_batch_size * accum * accelerator.num_processes)
    if ema is not None:
        ema.copy_to(raw_unet.parameters())  # a sharded U-Net: each rank its shards
    # whole weights, on the main rank (DeepSpeed's: its fp32 masters, not the 16-bit copies it computes with)
    final = sharded.unsharded(raw_unet, main, whole) if whole is not None else raw_unet
    if main:
        _validate(config, parts, final, None, accelerator, config.max_steps, examples)
        made.save(final, target)
        accelerator.print(f"wrote {target}")
    run.close()
    return target


def _average_gradients(model, accelerator) -> None:
    """The mean of each parameter's gradient over the processes: what DDP does for the U-Net, done by hand for a
    trained text encoder, which stays unwrapped (its backends need its attributes)."""
    if accelerator.num_processes > 1:
        for p in model.parameters():
            if p.grad is not None:
                p.grad = accelerator.reduce(p.grad, reduction="mean")


def _base_weights(data, lora: LoraTrainConfig):
    """A function (batch, dropped) -> (B,) weights: lora.preserve for the examples whose caption (before dropout:
    it describes the image) names none of lora.teaches, and with lora.preserve_unconditional for those whose caption
    was dropped (`dropped`, (B,) bool: caption dropout's draw), else 0; None when nothing is preserved. Captions are
    read once per cached text row, not once per step."""
    if not lora.preserve:
        return lambda batch, dropped: None
    # whole words in Latin scripts ("star" is not in "start"), substrings in scripts without spaces (中文)
    names = re.compile("|".join(f"(?<![a-z0-9]){re.escape(w.lower())}(?![a-z0-9])" for w in lora.teaches))
    is_old = lambda texts: torch.tensor([names.search(t.lower()) is None for t in texts])  # noqa: E731
    rows_old = is_old(data.texts) if hasattr(data, "texts") else None  # a cache: one caption per text row

    def weights(batch, dropped: torch.Tensor) -> torch.Tensor:
        old = rows_old[batch["text_row"]] if "text_row" in batch else is_old(batch["text"])
        old = old.to(dropped.device)
        return (old | dropped if lora.preserve_unconditional else old).float() * lora.preserve

    return weights


def _latents_and_context(batch, data, parts: Components, config: UNetTrainConfig, g, device):
    """z_0 (B, C, h, w), scaled; the text context (B, T, D), with caption dropout applied; for an upscaler the
    low-resolution latents (B, C, h/s, w/s), scaled, else None; which captions were dropped, (B,) bool; and for
    SDXL the U-Net's added conditions (the pooled text, the size conditioning), else None."""
    scale = config.upscaler.scale
    if "mean" in batch:  # cached posterior: z = μ + σ·n, as latent_dist.sample() would draw it
        z = draw_latents(batch, g, device)
        low = draw_latents(batch, g, device, "low_") if scale else None
    else:

        with torch.no_grad():
            pixels = batch["pixel_values"].to(device)
            z = parts.vae.encode(pixels).latent_dist.sample(generator=g)
            low = parts.vae.encode(low_resolution(pixels, scale)).latent_dist.sample(generator=g) if scale else None
    latents = scale_latents(parts.vae, z.float())
    low = None if low is None else scale_latents(parts.vae, low.float())
    rows = batch["text_row"].to(device) if "text_row" in batch else None
    dropped = caption_dropout(len(batch["text_row"] if rows is not None else batch["text"]),
                              config.caption_dropout, g)
    if getattr(data, "embeddings", None) is not None:  # cached embeddings; row 0 is the empty prompt
        rows = torch.where(dropped, torch.zeros_like(rows), rows)
        pooled = None if data.pooled is None else data.pooled[rows]
        context = data.embeddings[rows]
    else:
        texts = [data.texts[r] for r in rows.tolist()] if rows is not None else list(batch["text"])
        texts = ["" if d else t for t, d in zip(texts, dropped.tolist())]
        with torch.set_grad_enabled(config.trains_text):
            encoded = parts.encoder.encode(texts)
        context, pooled = encoded.hidden_states, encoded.pooled
    return latents, context, low, dropped, _added(parts, batch, pooled, latents, device)


def _added(parts: Components, batch, pooled, latents, device) -> dict[str, torch.Tensor] | None:
    """SDXL's added conditions: the pooled text (`text_embeds`) and `time_ids`, (original height, width, crop
    top, left, target height, width) as diffusers' `train_text_to_image_sdxl.py` and sd-scripts take them from the
    data (`data.buckets.Sizes`; the target is the image trained on); None for other U-Nets."""
    if not parts.is_sdxl:
        return None
    if "sizes" not in batch:
        raise UserError("this latent cache has no image sizes (SDXL's size conditioning): delete it to rebuild it")
    b, _, h, w = latents.shape
    factor = vae_factor(parts.vae)
    target = torch.tensor([[h * factor, w * factor]]).expand(b, -1)
    time_ids = torch.cat([batch["sizes"].cpu(), target], dim=1)
    return {"text_embeds": pooled, "time_ids": time_ids.to(device, latents.dtype)}


# ----------------------------------------------------------------------------------------------------------------
# Validation


def _validate(config, parts, unet, ema, accelerator, step: int, examples=None) -> None:
    if ema is not None:
        ema.store(unet.parameters())
        ema.copy_to(unet.parameters())
    grid = validation_grid(config, parts, unet, lambda: zero.autocast(accelerator), examples)
    if ema is not None:
        ema.restore(unet.parameters())
    save_image(grid, Path(config.output_dir) / "validation" / f"step-{step:07d}.png")
    log_image(accelerator, "validation/samples", grid, step)
