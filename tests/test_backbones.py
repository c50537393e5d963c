"""Backbones and objectives (issue #45): the U-Net, DiT and MMDiT denoisers (components.denoisers) trained for ε or
rectified flow (noise.prediction_type flow), saved and sampled through LatentPipeline; flow samplers against an
exact velocity field."""

import subprocess

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from latentgen import LatentPipeline
from latentgen.components.denoisers import TransformerDenoiser, pooled
from latentgen.components.diffusion import NoiseConfig, diffusion_loss, forward_process
from latentgen.components.schedulers import FLOW_SAMPLERS, make_scheduler
from latentgen.config import load_config
from latentgen.errors import UserError
from latentgen.formats.checkpoint import resolve_resume
from latentgen.training.unet import UNetTrainConfig, load_components, train_unet
from test_train_unet import LAUNCH, SMOKE, TRAIN, _kill_at_random, cached_loss, final_unet, ranks_reported, run

# Tiny transformers for the smoke config (32 px, the tiny VAE's 16×16 latents, a 32-wide text encoder)
TINY = {
    "dit": "{num_layers: 2, num_attention_heads: 2, attention_head_dim: 16, in_channels: 4, out_channels: 4, "
           "sample_size: 16, patch_size: 2, caption_channels: 32, cross_attention_dim: 32, "
           "use_additional_conditions: false, norm_type: ada_norm_single, norm_num_groups: 8}",
    "mmdit": "{num_layers: 2, num_attention_heads: 2, attention_head_dim: 16, in_channels: 4, out_channels: 4, "
             "sample_size: 16, patch_size: 2, joint_attention_dim: 32, caption_projection_dim: 32, "
             "pooled_projection_dim: 32, pos_embed_max_size: 16}",
}
FLOW = ["noise.prediction_type=flow", "noise.timestep_sampling=logit_normal", "sampler=euler"]


def arm(backbone: str) -> list[str]:
    return [f"backbone={backbone}", *FLOW] + ([f"transformer={TINY[backbone]}"] if backbone in TINY else [])


# ----------------------------------------------------------------------------------------------------------------
# Flow samplers on an exact model


def _flow_oracle(mu: float, tau: float):
    """The exact velocity E[ε − z_0 | z_σ] for data z_0 ~ N(μ, τ²), z_σ = (1−σ)·z_0 + σ·ε, at timestep σ·1000."""

    def model(x, t):
        s = torch.as_tensor(t, dtype=torch.float64) / 1000
        var = (1 - s) ** 2 * tau**2 + s**2
        r = x - (1 - s) * mu
        return s / var * r - (mu + (1 - s) * tau**2 / var * r)

    return model


def _flow_sample(name: str, shift: float, model, mu=0.3, tau=0.5, steps=100) -> float:
    config = {"num_train_timesteps": 1000, "shift": shift, "use_dynamic_shifting": False}
    sched = make_scheduler(name, forward_process(NoiseConfig(prediction_type="flow", flow_shift=shift)).config)
    assert type(sched).__name__ == FLOW_SAMPLERS[name].cls and sched.config.get("shift", shift) == config["shift"]
    sched.set_timesteps(steps)
    x = torch.randn((8, 4, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = (x - x.mean()) / x.std() * sched.init_noise_sigma  # exactly N(0, 1) moments: only the sampler errs
    for t in sched.timesteps:
        x = sched.step(model(sched.scale_model_input(x, t), t), t, x, return_dict=False)[0]
    return abs(x.mean().item() - mu) + abs(x.std().item() - tau)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("name", list(FLOW_SAMPLERS))
def test_every_flow_sampler_draws_from_the_data_distribution(name, shift):
    """A perfect velocity model of N(0.3, 0.5²) data: every flow sampler, with or without SD3's shift, must
    reproduce that distribution (σ read from the sampler's timesteps; the multistep solvers round them to integers,
    hence the tolerance)."""
    assert _flow_sample(name, shift, _flow_oracle(0.3, 0.5)) < 0.02


@pytest.mark.parametrize("name", list(FLOW_SAMPLERS))
def test_the_flow_check_can_fail(name):
    """The exact velocity of other data (N(−0.3, 0.8²)) gives other samples."""
    assert _flow_sample(name, 1.0, _flow_oracle(-0.3, 0.8)) > 0.3


def test_flow_loss_is_the_velocity_regression_at_the_drawn_sigma():
    """diffusion_loss for flow: the model sees z_σ = (1−σ)·z_0 + σ·ε at timestep σ·T and is scored against ε − z_0;
    a model that returns exactly that velocity has loss 0."""
    z0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    config = NoiseConfig(prediction_type="flow", timestep_sampling="logit_normal")
    scheduler = forward_process(config)
    seen = {}

    def exact(x, t, encoder_hidden_states, class_labels=None, return_dict=False):
        g = torch.Generator().manual_seed(7)  # the loss's own draws: ε first, then σ
        eps = torch.randn(z0.shape, generator=g)
        sigma = torch.sigmoid(torch.normal(0.0, 1.0, (4,), generator=g))
        s = sigma.view(-1, 1, 1, 1)
        torch.testing.assert_close(x, (1 - s) * z0 + s * eps)
        seen["t"] = t
        torch.testing.assert_close(t, sigma * 1000)
        return (eps - z0,)

    loss = diffusion_loss(exact, scheduler, z0, torch.zeros(4, 3, 8), torch.Generator().manual_seed(7), config)
    assert torch.all(loss < 1e-10) and seen["t"].min() > 0 and seen["t"].max() < 1000


# ----------------------------------------------------------------------------------------------------------------
# Transformers behind the U-Net's call


@pytest.mark.parametrize("kind", ["dit", "mmdit"])
def test_a_transformer_denoiser_saves_and_loads_as_itself(tmp_path, kind):
    import yaml

    torch.manual_seed(0)
    model = TransformerDenoiser(kind, yaml.safe_load(TINY[kind])).eval()
    assert (model.config.in_channels, model.config.sample_size, model.config.patch_size,
            model.config.cross_attention_dim) == (4, 16, 2, 32)
    x, text, t = torch.randn(3, 4, 16, 16), torch.randn(3, 5, 32), torch.tensor([10.0, 500.0, 990.0])
    out = model(x, t, encoder_hidden_states=text, return_dict=False)[0]
    assert out.shape == x.shape
    # each image's prediction is its own: alone, it is the same
    torch.testing.assert_close(model(x[1:2], t[1:2], encoder_hidden_states=text[1:2]).sample, out[1:2],
                               rtol=1e-4, atol=1e-5)
    model.save_pretrained(tmp_path)
    again = TransformerDenoiser.from_pretrained(tmp_path).eval()
    assert torch.equal(again(x, t, encoder_hidden_states=text, return_dict=False)[0], out)
    with pytest.raises(UserError, match=f"the {kind} backbone takes no class_labels"):
        model(x, t, encoder_hidden_states=text, class_labels=torch.zeros(3))


def test_the_mmdits_pooled_text_is_the_mean_of_its_real_tokens():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert torch.equal(pooled(hidden, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 3.0]]))
    assert torch.equal(pooled(hidden, None), hidden.mean(dim=1))


# ----------------------------------------------------------------------------------------------------------------
# Training


@pytest.mark.parametrize("backbone", ["unet", "dit", "mmdit"])
def test_flow_training_lowers_the_loss_and_samples_through_the_pipeline(tmp_path, backbone):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    config = load_config(UNetTrainConfig, SMOKE, [f"output_dir={tmp_path}", "max_steps=40", "checkpoint_every=100",
                                                  "learning_rate=2e-3", *arm(backbone)])
    torch.manual_seed(config.seed)
    initial = load_components(config).unet.eval()
    folder = train_unet(config)
    loss = cached_loss(config, tmp_path / "cache")
    pipe = LatentPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    assert type(pipe.unet).__name__ == ("UNet2DConditionModel" if backbone == "unet" else "TransformerDenoiser")
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert loss(pipe.unet) < 0.8 * loss(initial)
    pipe.set_progress_bar_config(disable=True)
    for sampler in FLOW_SAMPLERS:
        out = pipe("a red circle on a blue background", num_inference_steps=4, seed=0, scheduler=sampler,
                   output_type="np")
        assert out.images.shape == (1, 32, 32, 3) and abs(out.images.std()) > 0.01
    if backbone != "unet":
        with pytest.raises(UserError, match=f"this pipeline's denoiser is a {backbone}: keep its diffusers folder"):
            pipe.save_single_file(tmp_path / "model.safetensors")
    if backbone == "mmdit":
        from latentgen.generation.regions import Regions

        with pytest.raises(UserError, match="an MMDiT has none of"):
            pipe("a red circle BREAK a blue square", num_inference_steps=2, regions=Regions(calc="attention"))
    default = pipe("a red circle", num_inference_steps=2, seed=0)
    assert default.metadata[0]["scheduler"] == "euler"  # the model's own FlowMatchEuler, by its name
    with pytest.raises(UserError, match="unknown scheduler \\(for a flow model\\) 'ddim'"):
        pipe("a red circle", num_inference_steps=4, scheduler="ddim")
    with pytest.raises(UserError, match="this model predicts flow velocities"):
        pipe("a red circle", num_inference_steps=4, dynamic_threshold=0.9)


def test_a_killed_mmdit_flow_run_resumes_bit_for_bit(tmp_path):
    overrides = ["max_steps=60", "checkpoint_every=3", "ema=true", "lr_warmup_steps=4", "gradient_accumulation_steps=2",
                 *arm("mmdit")]
    r = run(TRAIN, f"output_dir={tmp_path / 'whole'}", *overrides)
    assert r.returncode == 0, r.stderr[-3000:]
    _kill_at_random(TRAIN, tmp_path / "cut", overrides, 0)
    killed_at = resolve_resume(tmp_path / "cut", "latest")
    assert killed_at is not None and killed_at.name != "checkpoint-0000060"
    r = run(TRAIN, f"output_dir={tmp_path / 'cut'}", *overrides, "resume_from=latest")
    assert r.returncode == 0 and f"resumed from {killed_at}" in r.stdout, r.stderr[-3000:]
    whole, resumed = final_unet(tmp_path / "whole"), final_unet(tmp_path / "cut")
    assert whole.keys() == resumed.keys() and all(k.startswith("transformer.") for k in whole)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_two_processes_train_a_dit_with_the_same_weights_on_both_ranks(tmp_path):
    probe = [str(ROOT / "tests" / "rank_weights.py"), "--config", str(SMOKE), "max_steps=2", "checkpoint_every=10",
             *arm("dit")]
    launch = LAUNCH[:LAUNCH.index(str(ROOT / "train_unet.py"))]
    r = run([*launch, *probe], f"output_dir={tmp_path}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(ranks_reported(r.stdout)) == 2
    rank0, rank1 = (load_file(str(tmp_path / f"rank-{k}.safetensors")) for k in (0, 1))
    assert any(k.startswith("transformer.") for k in rank0)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)


@pytest.mark.parametrize("overrides, message", [
    (["backbone=vit"], "unknown backbone 'vit'"),
    (["noise.prediction_type=flow", "noise.snr_gamma=5"], "flow matching has its own (none): set noise.snr_gamma: 0"),
    (["noise.prediction_type=flow", "sampler=ddim"], "unknown sampler (for a flow model) 'ddim'"),
    (["backbone=mmdit", "lora.rank=4", "pretrained_pipeline=x"], "backbone mmdit makes a new transformer"),
    (["backbone=dit", f"transformer={TINY['dit'].replace('caption_channels: 32', 'caption_channels: 48')}"],
     "the text encoder's width is 32 but the dit takes 48-wide text (transformer.caption_channels)"),
])
def test_bad_backbone_configs_fail_before_training(tmp_path, overrides, message):
    r = subprocess.run([*TRAIN, f"output_dir={tmp_path / 'run'}", *overrides], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert message in r.stderr and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()



@pytest.mark.parametrize("algo", ["lora", "lokr"])
def test_a_lora_of_a_trained_transformer_pipeline_trains_and_loads(tmp_path, algo):
    """A LoRA (or LoKr) run on an MMDiT flow pipeline: the pretrained pipeline's backbone is its own; the file (and
    kohya's) loads with `loras=`, changes the image, and at scale 0 gives the base model's image."""
    r = run(TRAIN, f"output_dir={tmp_path / 'base'}", "max_steps=10", *arm("mmdit"))
    assert r.returncode == 0, r.stderr[-3000:]
    r = run(TRAIN, f"output_dir={tmp_path / 'lora'}", "max_steps=10", "learning_rate=1e-2",
            "text_encoder.kind=pipeline", f"pretrained_pipeline={tmp_path / 'base' / 'pipeline'}", "lora.rank=4",
            f"lora.algo={algo}", f"lora.kohya={algo == 'lora'}", "noise.prediction_type=null", "sampler=euler")
    assert r.returncode == 0, r.stderr[-3000:]
    pipe = LatentPipeline.from_pretrained(tmp_path / "base" / "pipeline", torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    call = dict(num_inference_steps=4, seed=0, output_type="np")
    base = pipe("a red circle", **call).images
    files = ["lora.safetensors"] + (["lora_kohya.safetensors"] if algo == "lora" else [])
    for name in files:
        lora = str(tmp_path / "lora" / name)
        assert abs(pipe("a red circle", loras=[(lora, 1.0)], **call).images - base).max() > 0.01, name
        assert abs(pipe("a red circle", loras=[(lora, 0.0)], **call).images - base).max() < 1e-5, name


def test_the_memory_guard_sizes_a_transformer_step(tmp_path, monkeypatch):
    """The training memory estimate of a DiT/MMDiT grows with the batch and the latent size, and a step that
    cannot fit is a one-line error naming the batch that would, before any training."""
    import yaml

    from latentgen.runtime import memory

    model = TransformerDenoiser("mmdit", yaml.safe_load(TINY["mmdit"]))
    need = [memory.unet_training_bytes(model, side, batch, 4, False) for side, batch in ((16, 8), (16, 16), (32, 8))]
    assert need[0] < need[1] and need[0] < need[2]
    one, eight = (memory.unet_training_bytes(model, 16, b, 4, False) for b in (1, 8))
    monkeypatch.setattr(memory, "free_bytes", lambda device: (one + eight) // 2)
    config = load_config(UNetTrainConfig, SMOKE, [f"output_dir={tmp_path}", "max_steps=2", *arm("mmdit")])
    with pytest.raises(UserError, match=r"train_batch_size=\d would fit"):
        train_unet(config)
    assert not (tmp_path / "checkpoints").exists()
