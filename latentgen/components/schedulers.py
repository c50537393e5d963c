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

from latentgen.errors import UserError, one_of


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
    "euler-karras": Sampler("EulerDiscreteScheduler", {"use_karras_sigmas": True}, "Euler Karras"),
    "euler-beta": Sampler("EulerDiscreteScheduler", {"use_karras_sigmas": False, "use_beta_sigmas": True},
                          "Euler Beta"),  # A1111 1.10's and Forge's "Beta" schedule (Lee et al. 2024)
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


# A flow-matching model's samplers (SD3, Flux, and latentgen's own flow models: `noise.prediction_type: flow`),
# under the same names, each built from the model's scheduler config: its shift, and a dynamic shift where it has
# one (Flux: the shift grows with the image's size)
_FLOW = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
FLOW_SAMPLERS: dict[str, Sampler] = {
    "euler": Sampler("FlowMatchEulerDiscreteScheduler", {}, "Euler"),  # the models' own; Forge's "Euler", "Simple"
    "euler-karras": Sampler("FlowMatchEulerDiscreteScheduler", {"use_karras_sigmas": True}, "Euler Karras"),
    "euler-beta": Sampler("FlowMatchEulerDiscreteScheduler", {"use_beta_sigmas": True}, "Euler Beta"),
    "heun": Sampler("FlowMatchHeunDiscreteScheduler", {}, "Heun"),  # no dynamic shift
    "dpm++": Sampler("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2} | _FLOW,
                     "DPM++ 2M"),
    "unipc": Sampler("UniPCMultistepScheduler", _FLOW, "UniPC"),
}


def make_flow_scheduler(name: str, config: Mapping[str, Any]):
    """The flow sampler `name` built from a flow model's scheduler config (its shift; its dynamic shift where it
    has one); each can also run in `LatentPipeline`'s loop (`as_loop_sampler`)."""
    import diffusers


    if name not in FLOW_SAMPLERS:
        raise one_of("scheduler (for a flow model)", name, list(FLOW_SAMPLERS))
    sampler = FLOW_SAMPLERS[name]
    dynamic = bool(config.get("use_dynamic_shifting"))
    if sampler.cls.startswith("FlowMatch"):
        if dynamic and sampler.cls == "FlowMatchHeunDiscreteScheduler":
            raise UserError("the heun sampler has no dynamic shift, which this model's scheduler uses; take euler, "
                            "dpm++ or unipc")
        base = {k: v for k, v in config.items() if not k.startswith("_") and k not in (
            "use_karras_sigmas", "use_beta_sigmas", "use_exponential_sigmas")}
    else:  # the multistep solvers on flow sigmas, with the model's shift
        base = {"num_train_timesteps": config.get("num_train_timesteps", 1000), "flow_shift": config.get("shift", 1.0)}
        if dynamic:
            base |= {"use_dynamic_shifting": True, "time_shift_type": config.get("time_shift_type", "exponential")}
    cls = getattr(diffusers, sampler.cls)
    accepted = inspect.signature(cls.__init__).parameters
    return as_loop_sampler(cls.from_config({k: v for k, v in (base | sampler.defining).items() if k in accepted}))


def as_loop_sampler(scheduler):
    """A FlowMatch scheduler with what `LatentPipeline`'s loop asks of every sampler: `init_noise_sigma` (1: x_1 is
    the noise), `scale_model_input` (none) and `add_noise` (its `scale_noise`, z_σ = (1−σ)·z_0 + σ·ε). The
    multistep solvers on flow sigmas have these already."""
    if type(scheduler).__name__.startswith("FlowMatch") and not hasattr(scheduler, "add_noise"):
        scheduler.init_noise_sigma = 1.0
        scheduler.scale_model_input = lambda sample, timestep=None: sample
        scheduler.add_noise = lambda z0, noise, timesteps: scheduler.scale_noise(z0, timesteps, noise)
    return scheduler


def is_flow_config(config: Mapping[str, Any] | None) -> bool:
    """A flow-matching model's scheduler config (FlowMatch*, or a solver on flow sigmas)."""
    return config is not None and (str(config.get("_class_name", "")).startswith("FlowMatch")
                                   or config.get("prediction_type") == "flow_prediction"
                                   or ("shift" in config and "use_dynamic_shifting" in config))  # FlowMatch's own


def scheduler_names() -> list[str]:
    return list(SCHEDULERS)


def make_scheduler(name: str, base_config: Mapping[str, Any] | None = None, **overrides: Any):
    """Build the sampler `name` for a model whose training noise is described by `base_config`.

    `base_config` is any diffusers scheduler config (the model folder's `scheduler/`); only its noise keys
    are used, so a setting of one sampler (say DDIM's `set_alpha_to_one`) never leaks into another.
    `overrides` set further options of the sampler (e.g. thresholding).
    """
    if is_flow_config(base_config):
        return make_flow_scheduler(name, base_config)
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
    """The name in SCHEDULERS (FLOW_SAMPLERS for a flow model's) that matches a scheduler instance
    ('custom:<Class>' if none does)."""
    flow = type(scheduler).__name__.startswith("FlowMatch") or is_flow_config(scheduler.config)
    table = FLOW_SAMPLERS if flow else SCHEDULERS
    # the most specific first: euler-beta (beta sigmas, no Karras) before euler (no Karras)
    for name, sampler in sorted(table.items(), key=lambda item: -len(item[1].defining)):
        if type(scheduler).__name__ == sampler.cls and all(
                scheduler.config.get(k) == v for k, v in sampler.defining.items()
                if k in ("algorithm_type", "use_karras_sigmas", "use_beta_sigmas", "solver_order")):
            return name
    return f"custom:{type(scheduler).__name__}"


def a1111_name(name: str) -> str:
    """AUTOMATIC1111's name for a sampler (a name it does not know is written as it is)."""
    return SCHEDULERS[name].a1111 if name in SCHEDULERS else name


def from_a1111(sampler: str, schedule: str = "") -> str | None:
    """Our sampler for A1111's `Sampler` (and, since A1111 1.9, its separate `Schedule type`); None if none."""
    by_a1111 = {s.a1111: name for name, s in SCHEDULERS.items()}
    schedule = schedule.strip().lower()  # its API takes the name ("karras") or the label ("Karras")
    if schedule in ("karras", "beta"):
        return by_a1111.get(f"{sampler} {schedule.title()}")
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
