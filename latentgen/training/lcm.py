"""Latent consistency distillation (Luo et al. 2023, "Latent Consistency Models"): a student that makes in 4 steps
what its teacher makes in 20, trained by `train_unet.py` with an `lcm:` section. diffusers'
`train_lcm_distill_sd_wds.py` and `train_lcm_distill_lora_sd_wds.py` are the skeleton; the loop is this project's
`Run` (accelerate, exact resume after a kill, checkpoints).

Each step: latents z0 of the data and their captions; a point t_n of an N-step DDIM schedule (N = 50: t_n = 19, 39,
..., 999) and the one k = T/N before it; z at t_n by the forward process. The teacher (the pretrained U-Net,
frozen), guided by w (drawn from [w_min, w_max]; the model's own guidance, APG for the default model), takes one
DDIM step from t_n to t_{n−k}. The student's consistency function at t_n, f(z, t) = c_skip(t)·z + c_out(t)·x̂0(z, t)
with LCMScheduler's boundary scalings, must match the target's at t_{n−k} (the target is an exponential moving
average of the student), under a pseudo-Huber loss.

Two students: the full U-Net with its guidance as an input (`embed_guidance`: diffusers' `time_cond_proj_dim`,
w − 1 embedded as diffusers' pipelines embed it; its new layer starts at zero, so the student starts as the
teacher), or a LoRA on the frozen teacher (`lora.rank` > 0), which learns one guidance, `w_max`, and samples
unguided (guidance 1).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from latentgen.components.diffusion import scale_latents
from latentgen.components.schedulers import make_scheduler
from latentgen.data.sources import build_dataset
from latentgen.errors import UserError
from latentgen.generation.guidance import Apg, guide
from latentgen.generation.pipeline import LatentPipeline
from latentgen.generation.sampling import guidance_embedding
from latentgen.runtime.precision import DTYPES
from latentgen.training.cache import draw_latents, load_or_build_cache
from latentgen.training.loop import (
    Run,
    batch_iterator,
    make_lr_scheduler,
    make_optimizer,
    step_generator,
)
from latentgen.training.products import add_lora, save_lora
from latentgen.training.unet_config import LcmConfig, UNetTrainConfig
from latentgen.training.unet_parts import load_components


def boundary(t: torch.Tensor, scaling: float, sigma_data: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """LCMScheduler's c_skip(t), c_out(t): f(z, t) = c_skip·z + c_out·x̂0, so that f(z, 0) = z."""
    scaled = t.float() * scaling
    return sigma_data**2 / (scaled**2 + sigma_data**2), scaled / (scaled**2 + sigma_data**2) ** 0.5


def x0_of(eps: torch.Tensor, z: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x̂0 = (z − σ·ε̂)/α."""
    return (z - sigma * eps) / alpha


def student_unet(teacher, lcm: LcmConfig):
    """The full student: the teacher's U-Net with a guidance input, its new layer zero (it starts as the
    teacher)."""
    config = {k: v for k, v in teacher.config.items() if not k.startswith("_")}
    config["time_cond_proj_dim"] = lcm.time_cond_proj_dim
    student = type(teacher)(**config)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or any(not k.startswith("time_embedding.cond_proj") for k in missing):
        raise UserError(f"cannot make the student from the teacher's U-Net: missing {missing}, unexpected {unexpected}")
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student


def train_lcm(config: UNetTrainConfig) -> Path:
    """Run the distillation; returns the student (a pipeline folder, or a LoRA file)."""
    lcm = config.lcm
    run = Run(config, "train_lcm")
    parts = load_components(config)
    teacher = parts.unet.requires_grad_(False).eval()
    dataset = build_dataset(config.data)
    accelerator = run.launch()
    device = accelerator.device
    parts.vae.requires_grad_(False).eval().to(device)
    parts.text_model.requires_grad_(False).eval().to(device)
    data = load_or_build_cache(config, dataset, parts, True, accelerator) if config.cache else dataset
    if not config.cache:
        raise UserError("lcm distils on cached latents and text states: set cache: true")
    embeddings = data.embeddings.to(device)  # row 0: the empty prompt
    teacher.to(device)
    if config.lora.rank:
        student = copy.deepcopy(teacher)
        add_lora(student, config.lora)  # the rest frozen
    else:
        student = student_unet(teacher, lcm).to(device)
    student.train()
    target = copy.deepcopy(student).requires_grad_(False).eval()
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, config)
    lr_scheduler = make_lr_scheduler(optimizer, config)
    student, optimizer = accelerator.prepare(student, optimizer)
    raw = accelerator.unwrap_model(student)
    apg = Apg.of(parts.apg) if parts.apg else None  # the teacher's own guidance (APG for the default model)
    noise_scheduler = parts.noise_scheduler
    acp = noise_scheduler.alphas_cumprod.to(device)
    T = len(acp)
    k = T // lcm.ddim_steps
    ddim = torch.arange(1, lcm.ddim_steps + 1, device=device) * k - 1  # t_n: k−1, 2k−1, ..., T−1

    start = run.resume({"unet": raw, "target": target}, {"optimizer": optimizer.optimizer,
                                                         "lr_scheduler": lr_scheduler, "scaler": accelerator.scaler},
                       lambda step: None)
    batches = batch_iterator(data, config, accelerator.num_processes, accelerator.process_index, start)
    for step in range(start, config.max_steps):
        g = step_generator(config.seed, step, 0, accelerator.process_index, device)
        batch = next(batches)
        z0 = scale_latents(parts.vae, draw_latents(batch, g, device).float())
        b = z0.shape[0]
        cond = embeddings[batch["text_row"].to(device)]
        uncond = embeddings[torch.zeros(b, dtype=torch.long, device=device)]
        index = torch.randint(0, lcm.ddim_steps, (b,), generator=g, device=device)
        t = ddim[index]
        t_prev = (t - k).clamp_min(0)
        noise = torch.randn(z0.shape, generator=g, device=device)
        z_t = noise_scheduler.add_noise(z0, noise, t)
        w = lcm.w_min + (lcm.w_max - lcm.w_min) * torch.rand(b, generator=g, device=device)
        if not lcm.embed_guidance:
            w = torch.full_like(w, lcm.w_max)
        w_cond = guidance_embedding(lcm.time_cond_proj_dim, w, cond) if lcm.embed_guidance else None
        a_t, s_t = (acp[t] ** 0.5).view(-1, 1, 1, 1), ((1 - acp[t]) ** 0.5).view(-1, 1, 1, 1)
        a_p, s_p = (acp[t_prev] ** 0.5).view(-1, 1, 1, 1), ((1 - acp[t_prev]) ** 0.5).view(-1, 1, 1, 1)
        skip_t, out_t = (c.view(-1, 1, 1, 1) for c in boundary(t, lcm.timestep_scaling))
        skip_p, out_p = (c.view(-1, 1, 1, 1) for c in boundary(t_prev, lcm.timestep_scaling))
        with accelerator.autocast():
            eps = student(z_t, t, encoder_hidden_states=cond, timestep_cond=w_cond).sample.float()
            predicted = skip_t * z_t + out_t * x0_of(eps, z_t, a_t, s_t)
            with torch.no_grad():
                both = teacher(torch.cat([z_t, z_t]), torch.cat([t, t]),
                               encoder_hidden_states=torch.cat([uncond, cond])).sample.float()
                eps_u, eps_c = both.chunk(2)
                guided = torch.stack([guide(eps_u[i:i + 1], eps_c[i:i + 1], float(w[i]), apg, {})[0]
                                      for i in range(b)])  # each example its own w (APG's cap per image)
                x0 = x0_of(guided, z_t, a_t, s_t)
                z_prev = a_p * x0 + s_p * guided  # one DDIM step, t_n -> t_n−k
                eps_target = target(z_prev, t_prev, encoder_hidden_states=cond, timestep_cond=w_cond).sample.float()
                wanted = skip_p * z_prev + out_p * x0_of(eps_target, z_prev, a_p, s_p)
            loss = (torch.sqrt((predicted - wanted) ** 2 + lcm.huber_c**2) - lcm.huber_c).mean()
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr_scheduler.step()
        with torch.no_grad():  # the target follows the student
            for tp, sp in zip(target.parameters(), raw.parameters()):
                tp.mul_(lcm.target_decay).add_(sp.detach(), alpha=1 - lcm.target_decay)
        run.averages.add(loss=loss.item())
        run.end_step(step + 1)

    out = Path(config.output_dir) / ("lora.safetensors" if config.lora.rank else "pipeline")
    if run.finish(config.train_batch_size * accelerator.num_processes):
        if config.lora.rank:
            save_lora(config, raw, [], out)
        else:
            pipe = _pipeline(parts, raw)
            dtype = DTYPES[config.save_dtype]
            pipe.save_pretrained(out, weights_dtype=None if dtype == torch.float32 else dtype)
        accelerator.print(f"wrote {out}")
    run.close()
    return out


def _pipeline(parts, unet) -> LatentPipeline:
    """The student as a pipeline: the teacher's VAE and text encoder, LCM's sampler from the teacher's noise."""
    pipe = LatentPipeline(vae=parts.vae, text_encoder=parts.text_model, tokenizer=parts.tokenizer, unet=unet,
                          scheduler=make_scheduler("lcm", parts.noise_scheduler.config), clip_skip=parts.clip_skip,
                          apg=parts.apg)
    pipe.set_progress_bar_config(disable=True)
    return pipe
