"""The diffusion math in one place, as improved-diffusion's `gaussian_diffusion.py` keeps it: the latent space
(the VAE's downsampling factor, scaling and shift), the forward process, the training objective.

Latents: z = (E(x) − shift)·s, s the VAE's `scaling_factor` (Stable Diffusion's 0.18215), so that z has about unit
variance. Forward process: z_t = sqrt(ᾱ_t)·z_0 + sqrt(1−ᾱ_t)·ε. Objective: ‖ε̂ − ε‖² (or the v target
v = sqrt(ᾱ_t)·ε − sqrt(1−ᾱ_t)·z_0), optionally weighted by min-SNR-γ; captions are dropped with probability p so
the same network learns the unconditional prediction that classifier-free guidance needs.

Flow matching (`prediction_type: flow`; rectified flow, Liu et al. 2022, as SD3 trains it, Esser et al. 2024):
z_σ = (1−σ)·z_0 + σ·ε for σ in [0, 1], the model predicts the velocity ε − z_0 at timestep σ·T, and sampling
integrates that velocity from σ = 1 (pure noise) to 0 (diffusers' FlowMatchEulerDiscreteScheduler and the
multistep solvers on flow sigmas).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from latentgen.components.schedulers import is_flow_config

PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")


# ----------------------------------------------------------------------------------------------------------------
# The latent space


def _config(model_or_config) -> Mapping[str, Any]:
    return getattr(model_or_config, "config", model_or_config)


def takes_sizes(unet) -> bool:
    """An SDXL U-Net (or ControlNet): its added embedding takes the pooled text and the size conditioning
    (`added_cond_kwargs` `text_embeds` and `time_ids`). `unet`: the model or its config."""
    return _config(unet).get("addition_embed_type") == "text_time"


def vae_factor(vae) -> int:
    """The VAE's downsampling factor (8 for Stable Diffusion's): one halving per encoder level after the first."""
    return 2 ** (len(_config(vae)["block_out_channels"]) - 1)


def size_multiple(vae, unet) -> int:
    """Image sides that every level of the U-Net halves evenly: the VAE factor × 2^(U-Net levels − 1); for a
    transformer, the VAE factor × its patch size."""
    cfg = _config(unet)
    if cfg.get("patch_size"):
        return vae_factor(vae) * int(cfg["patch_size"])
    return vae_factor(vae) * 2 ** (len(cfg["block_out_channels"]) - 1)


def default_size(vae, unet) -> int:
    """The image side the U-Net was made for: its `sample_size` latents × the VAE factor."""
    return int(_config(unet)["sample_size"]) * vae_factor(vae)


def scale_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """VAE latents -> the diffusion model's latents: (z − shift)·scaling_factor."""
    cfg = _config(vae)
    return (z - (cfg.get("shift_factor") or 0.0)) * cfg["scaling_factor"]


def unscale_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """The diffusion model's latents -> the VAE's: z/scaling_factor + shift."""
    cfg = _config(vae)
    return z / cfg["scaling_factor"] + (cfg.get("shift_factor") or 0.0)


# ----------------------------------------------------------------------------------------------------------------
# The forward process


@dataclass
class NoiseConfig:
    """The forward process and the objective; None means: the pretrained pipeline's, else the default shown."""

    num_train_timesteps: int | None = None  # 1000
    beta_schedule: str | None = None  # scaled_linear
    beta_start: float | None = None  # 0.00085
    beta_end: float | None = None  # 0.012
    prediction_type: str | None = None  # epsilon, v_prediction or flow (the velocity ε − z_0 of rectified flow)
    zero_terminal_snr: bool | None = None  # rescale betas so ᾱ_T = 0 (Lin et al. 2023); pair with v_prediction
    snr_gamma: float = 0.0  # min-SNR-γ loss weighting (Hang et al. 2023; 5.0 there); 0 = off
    offset_noise: float = 0.0  # ε += offset·N(0, I) per (image, channel): lets the model change mean brightness
    # which noise levels training draws: "uniform" over the timesteps (DDPM's), or "logit_normal" (SD3, Esser et
    # al. 2024): t/T = sigmoid(N(logit_mean, logit_std)), more of the middle noise levels, fewer of the ends
    timestep_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    # flow: σ → shift·σ/(1 + (shift − 1)·σ) for the drawn σ in training and for the sampler's σ (SD3's shift, 3.0
    # at 1024 px: more of the noisy end; 1.0 = none). Saved in the scheduler config, which the samplers read
    flow_shift: float | None = None  # 1.0


# NoiseConfig's process fields -> (diffusers scheduler key, default): Stable Diffusion's forward process.
_PROCESS = {"num_train_timesteps": ("num_train_timesteps", 1000), "beta_schedule": ("beta_schedule", "scaled_linear"),
            "beta_start": ("beta_start", 0.00085), "beta_end": ("beta_end", 0.012),
            "prediction_type": ("prediction_type", "epsilon"),
            "zero_terminal_snr": ("rescale_betas_zero_snr", False)}


def forward_process(noise: NoiseConfig, pretrained: Mapping[str, Any] | None = None):
    """The forward process: for flow, a FlowMatchEulerDiscreteScheduler (its T and shift); else a DDPMScheduler,
    each setting from `noise` where set, else from the pretrained model's scheduler config, else Stable
    Diffusion's. Every sampler is later built from its config."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    if noise.prediction_type == "flow" or (noise.prediction_type is None and pretrained and is_flow_config(pretrained)):
        return FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=noise.num_train_timesteps or (pretrained or {}).get("num_train_timesteps", 1000),
            shift=noise.flow_shift or (pretrained or {}).get("shift", 1.0))
    chosen = asdict(noise)
    config = {}
    for field, (key, default) in _PROCESS.items():
        value = chosen[field]
        if value is None:
            value = (pretrained or {}).get(key, default)
        config[key] = bool(value) if key == "rescale_betas_zero_snr" else value
    return DDPMScheduler.from_config(config | dict(timestep_spacing="trailing", steps_offset=1, clip_sample=False))


# ----------------------------------------------------------------------------------------------------------------
# The objective


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ: w_t = min(SNR_t, γ)/SNR_t for ε-prediction, min(SNR_t, γ)/(SNR_t + 1) for v-prediction."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    clipped = snr.clamp(max=gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return torch.where(snr > 0, clipped / snr.clamp_min(1e-12), torch.ones_like(snr))  # SNR_T = 0: weight 1


TIMESTEP_SAMPLING = ("uniform", "logit_normal")


def sample_timesteps(noise_config: NoiseConfig, num_train_timesteps: int, count: int, generator: torch.Generator,
                     device) -> torch.Tensor:
    """(count,) training timesteps in [0, T), drawn as `noise_config.timestep_sampling` says."""
    if noise_config.timestep_sampling == "uniform":
        return torch.randint(0, num_train_timesteps, (count,), generator=generator, device=device)
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(noise_config.timestep_sampling, count, noise_config.logit_mean,
                                              noise_config.logit_std, device=device, generator=generator)
    return (u * num_train_timesteps).long().clamp(max=num_train_timesteps - 1)


def diffusion_loss(unet, noise_scheduler, latents: torch.Tensor, context: torch.Tensor, generator: torch.Generator,
                   noise_config: NoiseConfig, extra: torch.Tensor | None = None,
                   class_labels: torch.Tensor | None = None, base=None,
                   base_weight: torch.Tensor | None = None, added: dict[str, torch.Tensor] | None = None
                   ) -> torch.Tensor:
    """Per-example loss (B,) of the denoising objective for z_0 = `latents` (B, C, h, w). `extra` (B, C', h, w) is
    concatenated to the U-Net's input channels and `class_labels` (B,) passed to it (an upscaler's conditioning).

    `base` (a U-Net called like `unet`, no gradients) and `base_weight` (B,) in [0, 1]: example i's target becomes
    (1 − w_i)·target + w_i·base's prediction, so that where w = 1 the trained model learns to predict what the
    base model predicts (a LoRA keeping what its base already draws). `added`: the U-Net's `added_cond_kwargs`, each
    (B, ...) (SDXL's pooled text `text_embeds` and size conditioning `time_ids`)."""
    b = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_config.offset_noise:
        noise = noise + noise_config.offset_noise * torch.randn(
            (b, latents.shape[1], 1, 1), generator=generator, device=latents.device, dtype=latents.dtype)
    if is_flow_config(noise_scheduler.config):
        z_t, t, target = flow_noised(noise_scheduler, latents, noise, noise_config, generator)
    else:
        z_t, t, target = noised(noise_scheduler, latents, noise, noise_config, generator)
    x_in = z_t if extra is None else torch.cat([z_t, extra.to(z_t.dtype)], dim=1)
    sdxl = {} if added is None else {"added_cond_kwargs": added}  # other denoisers are called as before
    pred = unet(x_in, t, encoder_hidden_states=context, class_labels=class_labels, return_dict=False, **sdxl)[0]
    if base is not None and base_weight is not None and bool(base_weight.any()):
        keep = base_weight > 0
        kept = {} if added is None else {"added_cond_kwargs": {k: v[keep] for k, v in added.items()}}
        with torch.no_grad():
            taught = base(x_in[keep], t[keep], encoder_hidden_states=context[keep],
                          class_labels=None if class_labels is None else class_labels[keep], return_dict=False,
                          **kept)[0]
        w = base_weight[keep].view(-1, 1, 1, 1).to(target.dtype)
        target = target.clone()
        target[keep] = (1 - w) * target[keep] + w * taught.to(target.dtype)
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if noise_config.snr_gamma:
        loss = loss * min_snr_weights(noise_scheduler, t, noise_config.snr_gamma)
    return loss


def noised(noise_scheduler, latents, noise, noise_config: NoiseConfig, generator):
    """(z_t, t, target) of the variance-preserving process: t drawn, z_t = sqrt(ᾱ_t)·z_0 + sqrt(1−ᾱ_t)·ε, and ε
    or v."""
    t = sample_timesteps(noise_config, noise_scheduler.config.num_train_timesteps, latents.shape[0], generator,
                         latents.device)
    z_t = noise_scheduler.add_noise(latents, noise, t)  # sqrt(ᾱ_t)·z_0 + sqrt(1−ᾱ_t)·ε
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, t)  # sqrt(ᾱ_t)·ε − sqrt(1−ᾱ_t)·z_0
    else:
        target = noise
    return z_t, t, target


def flow_noised(noise_scheduler, latents, noise, noise_config: NoiseConfig, generator):
    """(z_σ, t, target) of rectified flow: σ drawn (uniform or logit-normal in (0, 1), then the scheduler's
    shift), z_σ = (1−σ)·z_0 + σ·ε, t = σ·T, the velocity ε − z_0. diffusers' SD3 trainer draws σ from the
    scheduler's table of 1000; here σ is continuous, as in the paper."""
    b = latents.shape[0]
    if noise_config.timestep_sampling == "uniform":
        u = torch.rand(b, generator=generator, device=latents.device)
    else:
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(noise_config.timestep_sampling, b, noise_config.logit_mean,
                                                  noise_config.logit_std, device=latents.device, generator=generator)
    shift = float(noise_scheduler.config.get("shift", 1.0))
    sigma = (shift * u / (1 + (shift - 1) * u)).to(latents.dtype)
    s = sigma.view(-1, *[1] * (latents.ndim - 1))
    return (1 - s) * latents + s * noise, sigma * noise_scheduler.config.num_train_timesteps, noise - latents


def caption_dropout(count: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """(count,) bool: which captions become the empty prompt (the unconditional branch guidance needs), each with
    probability p."""
    return torch.rand(count, generator=generator, device=generator.device) < p


def public_config(model) -> dict:
    """A diffusers model's config without its private keys (`_name_or_path`, `_diffusers_version`, and
    `_use_default_values`, a set turned list whose order varies with the hash seed): what names its
    architecture the same way in every process, wherever it was loaded from."""
    return {k: v for k, v in model.config.items() if not k.startswith("_")}
