"""Samplers by name: one table holds everything latentgen knows about each (its diffusers class, what defines it,
its AUTOMATIC1111 name, whether it holds up under strong guidance). Each sampler is a diffusers scheduler built
from the model's own noise configuration.

`make_scheduler("dpm++", unet_scheduler.config)` carries over what the model was trained with (beta schedule,
number of train timesteps, ε/v prediction, zero-terminal-SNR rescaling, timestep spacing) the way diffusers'
`from_config` does, then fixes what defines the sampler (solver order, Karras sigmas, ...). So a v-prediction
model samples correctly with every name.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Mapping

from latentgen.errors import one_of


@dataclass(frozen=True)
class Sampler:
    cls: str  # the diffusers class name (names, not classes: listing samplers must not import diffusers)
    defining: dict[str, Any] = field(default_factory=dict)  # what defines it beyond the model's noise config
    a1111: str = ""  # AUTOMATIC1111's name for it (the `Sampler:` field of its infotext)
    # PNDM (PLMS) and LMS are 4th-order linear multistep methods: with strong guidance they extrapolate the guided
    # prediction too far and diverge (the instability DPM-Solver++ was designed against). On the default model
    # they hold up to guidance ~3 and break from ~5 on, in diffusers' own pipeline as in ours; see the README.
    stable_with_guidance: bool = True
    # a consistency sampler (LCM, TCD): for a distilled model or LoRA, whose guidance wants to be about 1-2;
    # each step predicts x0 and noises it again, so an exact denoiser (not a consistency function) is not its model
    consistency: bool = False


SCHEDULERS: dict[str, Sampler] = {
    # clip_sample/thresholding clip x_0 to [-1, 1]: right for pixels, wrong for latents.
    "ddpm": Sampler("DDPMScheduler", {"clip_sample": False, "thresholding": False, "variance_type": "fixed_small"},
                    "DDPM"),
    "ddim": Sampler("DDIMScheduler", {"clip_sample": False, "thresholding": False, "set_alpha_to_one": False},
                    "DDIM"),
    "dpm++": Sampler("DPMSolverMultistepScheduler",
                     {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}, "DPM++ 2M"),
    "dpm++-karras": Sampler("DPMSolverMultistepScheduler",
                            {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
                            "DPM++ 2M Karras"),
    "euler": Sampler("EulerDiscreteScheduler", {"use_karras_sigmas": False}, "Euler"),
    "euler-a": Sampler("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "heun": Sampler("HeunDiscreteScheduler", {"use_karras_sigmas": False}, "Heun"),
    "unipc": Sampler("UniPCMultistepScheduler", {"use_karras_sigmas": False}, "UniPC"),
    "pndm": Sampler("PNDMScheduler", {"skip_prk_steps": True}, "PLMS", stable_with_guidance=False),
    "lms": Sampler("LMSDiscreteScheduler", {"use_karras_sigmas": False}, "LMS", stable_with_guidance=False),
    # consistency models (Luo et al. 2023) and trajectory consistency distillation (Zheng et al. 2024); TCD's gamma
    # (its stochasticity, 0.3 in its paper) is the request's eta
    "lcm": Sampler("LCMScheduler", {}, "LCM", consistency=True),
    "tcd": Sampler("TCDScheduler", {}, "TCD", consistency=True),
}
CONSISTENCY_GUIDANCE = 3.0  # above it a consistency sampler's images burn: a warning says so
UNSTABLE_ABOVE_GUIDANCE = 4.0  # where the samplers marked unstable start to diverge

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

    sampler = SCHEDULERS[name]
    cls = getattr(diffusers, sampler.cls)
    noise = {k: base_config[k] for k in NOISE_KEYS if base_config is not None and k in base_config}
    if noise.get("trained_betas") is None:
        noise.pop("trained_betas", None)
    if noise.get("rescale_betas_zero_snr") and "timestep_spacing" not in noise:
        noise["timestep_spacing"] = "trailing"  # a zero-SNR model must start sampling from t = T
    return cls.from_config({**noise, **sampler.defining, **overrides})


def scheduler_name_of(scheduler) -> str:
    """The name in SCHEDULERS that matches a scheduler instance ('custom:<Class>' if none does)."""
    for name, sampler in SCHEDULERS.items():
        if type(scheduler).__name__ == sampler.cls and all(
                scheduler.config.get(k) == v for k, v in sampler.defining.items()
                if k in ("algorithm_type", "use_karras_sigmas", "solver_order")):
            return name
    return f"custom:{type(scheduler).__name__}"


def a1111_name(name: str) -> str:
    """AUTOMATIC1111's name for a sampler (a name it does not know is written as it is)."""
    return SCHEDULERS[name].a1111 if name in SCHEDULERS else name


def from_a1111(sampler: str, schedule: str = "") -> str | None:
    """Our sampler for A1111's `Sampler` (and, since A1111 1.9, its separate `Schedule type`); None if none."""
    by_a1111 = {s.a1111: name for name, s in SCHEDULERS.items()}
    schedule = schedule.strip().lower()  # its API takes the name ("karras") or the label ("Karras")
    if schedule == "karras":
        return by_a1111.get(f"{sampler} Karras")
    if schedule in ("", "automatic"):
        return by_a1111.get(sampler)
    return None


def a1111_names() -> list[str]:
    """A1111 sampler descriptions that `from_a1111` accepts, for error messages."""
    return sorted(s.a1111 for s in SCHEDULERS.values())


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
