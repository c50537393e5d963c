"""Samplers by name, built from the model's noise configuration: ε and v models both sample correctly."""

import logging

import numpy as np
import pytest
import torch

from latentgen.components.schedulers import (
    SCHEDULERS,
    make_scheduler,
    scheduler_name_of,
    scheduler_names,
    step_kwargs,
)
from latentgen.errors import UserError

TRAIN = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
             timestep_spacing="trailing")  # sampling starts at t = T, where the marginal is closest to N(0, I)


def test_names_cover_the_required_samplers():
    assert {"ddpm", "ddim", "dpm++", "dpm++-karras", "euler", "euler-a", "heun", "unipc", "pndm"} <= set(
        scheduler_names())


def test_unknown_name_lists_valid_names():
    with pytest.raises(UserError, match=r"unknown scheduler 'dpm\+\+2'.*did you mean 'dpm\+\+'.*euler-a"):
        make_scheduler("dpm++2", TRAIN)


@pytest.mark.parametrize("name", scheduler_names())
def test_training_noise_is_carried_over(name):
    base = dict(TRAIN, prediction_type="v_prediction", beta_schedule="linear", num_train_timesteps=500,
                set_alpha_to_one=True)  # a DDIM-only option must not leak into other samplers
    s = make_scheduler(name, base)
    assert s.config.prediction_type == "v_prediction"
    assert s.config.num_train_timesteps == 500 and s.config.beta_schedule == "linear"
    assert scheduler_name_of(s) == name


def _oracle(scheduler, mu: float, tau: float, prediction_type: str):
    """The exact denoiser for Gaussian data x0 ~ N(μ, τ²) (what a perfectly trained model predicts).

    With x_t = α·x0 + σ·ε (α = sqrt(ᾱ_t), σ = sqrt(1-ᾱ_t)): E[x0|x_t] = μ + α·τ²/(α²τ² + σ²)·(x_t − α·μ),
    ε̂ = (x_t − α·x̂0)/σ, v̂ = α·ε̂ − σ·x̂0. Samplers that step in k-diffusion's σ_k = σ/α at fractional t
    read ᾱ(t) off the same interpolation they use.
    """
    acp = scheduler.alphas_cumprod.double()
    k_sigmas = ((1 - acp) / acp).sqrt().numpy()

    def model(x_t: torch.Tensor, t) -> torch.Tensor:  # x_t: scale_model_input already gave the VP form
        sigma_k = float(np.interp(float(t), np.arange(len(k_sigmas)), k_sigmas))
        abar = 1.0 / (1.0 + sigma_k**2)
        a, s = abar**0.5, (1 - abar) ** 0.5
        x0 = mu + a * tau**2 / (a**2 * tau**2 + s**2) * (x_t - a * mu)
        eps = (x_t - a * x0) / s
        return eps if prediction_type == "epsilon" else a * eps - s * x0

    return model


def _sample(name, prediction_type, model_prediction_type, mu=0.3, tau=0.5, steps=100):
    """Sample 8192 numbers with the sampler and the exact model; return |mean − μ| + |std − τ|."""
    sched = make_scheduler(name, dict(TRAIN, prediction_type=prediction_type))
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(0)
    model = _oracle(sched, mu, tau, model_prediction_type)
    x = torch.randn((8, 4, 16, 16), generator=g, dtype=torch.float64)
    x = (x - x.mean()) / x.std() * sched.init_noise_sigma  # exactly N(0, 1) moments, so only the sampler errs
    for t in sched.timesteps:
        x = sched.step(model(sched.scale_model_input(x, t), t), t, x, **step_kwargs(sched, g),
                       return_dict=False)[0]
    return abs(x.mean().item() - mu) + abs(x.std().item() - tau)


# Consistency samplers (LCM, TCD) take a consistency function as their model: with the exact denoiser each step's
# x0 is a posterior mean, and the samples collapse towards it. They are checked against diffusers' own pipelines
# instead (tests/test_few_step.py).
DENOISER_SAMPLERS = [n for n in scheduler_names() if not SCHEDULERS[n].consistency]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", DENOISER_SAMPLERS)
def test_every_sampler_draws_from_the_data_distribution(name, prediction_type):
    """A perfect ε- or v-model of N(0.3, 0.5²) data: every sampler must reproduce that distribution. (The beta
    schedule spends its steps at both ends, so first-order Euler on it errs a little more in the middle.)"""
    assert _sample(name, prediction_type, prediction_type) < (0.045 if name == "euler-beta" else 0.035)


@pytest.mark.parametrize("name", DENOISER_SAMPLERS)
def test_a_mismatched_prediction_type_fails_the_check(name):
    """The check above can fail: sampling a v-model as if it predicted ε gives the wrong distribution."""
    assert _sample(name, "epsilon", "v_prediction") > 0.2
    assert _sample(name, "v_prediction", "epsilon") > 0.2


@pytest.mark.parametrize(("name", "guidance", "warned"),
                         [("pndm", 7.5, True), ("lms", 7.5, True), ("pndm", 3.0, False), ("dpm++", 7.5, False)])
def test_multistep_samplers_warn_under_strong_guidance(tiny_pipe, caplog, monkeypatch, name, guidance, warned):
    monkeypatch.setattr(tiny_pipe, "warned", set())
    with caplog.at_level(logging.WARNING, logger="latentgen"):
        for _ in range(2):  # once per process, not once per call
            tiny_pipe("a red circle", num_inference_steps=2, guidance_scale=guidance, scheduler=name, seed=0,
                      output_type="np")
    assert caplog.text.count("can diverge at guidance") == warned
