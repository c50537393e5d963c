"""Samplers by name. Each is a diffusers scheduler built from the model's own noise configuration.

`make_scheduler("dpm++", unet_scheduler.config)` carries over what the model was trained with (beta schedule,
number of train timesteps, ε/v prediction, zero-terminal-SNR rescaling, timestep spacing) the way diffusers'
`from_config` does, then fixes what defines the sampler (solver order, Karras sigmas, ...). So a v-prediction
model samples correctly with every name.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Mapping

from .errors import one_of

# name -> (diffusers class, what defines this sampler beyond the model's noise configuration).
# Class names, not classes, so that listing the names (--help, error messages) does not import diffusers.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    # clip_sample/thresholding clip x_0 to [-1, 1]: right for pixels, wrong for latents.
    "ddpm": ("DDPMScheduler", {"clip_sample": False, "thresholding": False, "variance_type": "fixed_small"}),
    "ddim": ("DDIMScheduler", {"clip_sample": False, "thresholding": False, "set_alpha_to_one": False}),
    "dpm++": ("DPMSolverMultistepScheduler",
              {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}),
    "dpm++-karras": ("DPMSolverMultistepScheduler",
                     {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "euler": ("EulerDiscreteScheduler", {"use_karras_sigmas": False}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {"use_karras_sigmas": False}),
    "unipc": ("UniPCMultistepScheduler", {"use_karras_sigmas": False}),
    # PNDM (PLMS) and LMS are 4th-order linear multistep methods: with strong guidance they extrapolate the guided
    # prediction too far and diverge (the instability DPM-Solver++ was designed against). On the default model
    # they hold up to guidance ~3 and break from ~5 on, in diffusers' own pipeline as in ours; see the README.
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {"use_karras_sigmas": False}),
}

# The keys that describe how the model was trained; everything a sampler must agree on.
NOISE_KEYS = (
    "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
    "prediction_type", "rescale_betas_zero_snr", "timestep_spacing", "steps_offset",
)


def scheduler_names() -> list[str]:
    return list(SCHEDULERS)


def make_scheduler(name: str, base_config: Mapping[str, Any] | None = None, **overrides: Any):
    """Build the sampler `name` for a model whose training noise is described by `base_config`.

    `base_config` is any diffusers scheduler config (the model folder's `scheduler/`); only its noise keys
    are used, so a setting of one sampler (say DDIM's `set_alpha_to_one`) never leaks into another.
    `overrides` set further options of the sampler (e.g. thresholding).
    """
    if name not in SCHEDULERS:
        raise one_of("scheduler", name, scheduler_names())
    import diffusers

    cls_name, defining = SCHEDULERS[name]
    cls = getattr(diffusers, cls_name)
    noise = {k: base_config[k] for k in NOISE_KEYS if base_config is not None and k in base_config}
    if noise.get("trained_betas") is None:
        noise.pop("trained_betas", None)
    if noise.get("rescale_betas_zero_snr") and "timestep_spacing" not in noise:
        noise["timestep_spacing"] = "trailing"  # a zero-SNR model must start sampling from t = T
    return cls.from_config({**noise, **defining, **overrides})


def scheduler_name_of(scheduler) -> str:
    """The name in SCHEDULERS that matches a scheduler instance ('custom:<Class>' if none does)."""
    for name, (cls_name, defining) in SCHEDULERS.items():
        if type(scheduler).__name__ == cls_name and all(scheduler.config.get(k) == v for k, v in defining.items()
                                          if k in ("algorithm_type", "use_karras_sigmas", "solver_order")):
            return name
    return f"custom:{type(scheduler).__name__}"


@functools.cache
def _step_parameters(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.step).parameters)


def step_kwargs(scheduler, generator, eta: float = 0.0) -> dict[str, Any]:
    """The keyword arguments `scheduler.step` takes among (generator, eta); samplers differ in which they accept."""
    accepted = _step_parameters(type(scheduler))
    kwargs: dict[str, Any] = {}
    if "generator" in accepted:
        kwargs["generator"] = generator
    if "eta" in accepted:
        kwargs["eta"] = eta
    return kwargs
