"""train_vae.py: loss goes down, the saved VAE round-trips, the scaling factor, resume, bad configs."""

import importlib.util
import subprocess
import sys

import pytest
import torch
from diffusers import AutoencoderKL

from conftest import ROOT
from latentgen.config import load_config
from latentgen.errors import UserError
from latentgen.formats.checkpoint import list_checkpoints
from latentgen.training.vae import VAETrainConfig, _fixed_images, reconstruction_terms, train_vae

SMOKE = ROOT / "configs" / "vae-smoke.yaml"


@pytest.fixture(autouse=True)
def fresh_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield


def smoke(tmp_path, *overrides):
    return load_config(VAETrainConfig, SMOKE, [f"output_dir={tmp_path / 'run'}", "mixed_precision=fp32",
                                                *overrides])


def _l1(vae, images):
    with torch.no_grad():
        return reconstruction_terms(vae.eval(), images, torch.Generator().manual_seed(0))["l1"].mean().item()


def test_training_lowers_the_loss_and_the_vae_round_trips(tmp_path):
    config = smoke(tmp_path, "max_steps=60", "learning_rate=2e-3", "checkpoint_every=100")
    from latentgen.data import build_dataset
    from latentgen.training.vae import load_vae

    torch.manual_seed(config.seed)
    initial = load_vae(config)
    images = _fixed_images(build_dataset(config.data), 8)
    folder = train_vae(config)
    trained = AutoencoderKL.from_pretrained(folder)
    assert _l1(trained, images) < 0.75 * _l1(initial, images)
    # the folder is complete: config + safetensors, and loads again to the same weights
    again = AutoencoderKL.from_pretrained(folder)
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), again.state_dict().values()))
    assert (folder / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "run" / "validation" / "step-0000060.png").is_file()


def test_the_trackers_are_the_configs(tmp_path):
    """log_with: tensorboard (the default) writes its event file with the validation images; none writes none."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_vae(smoke(tmp_path, "max_steps=2", "checkpoint_every=100"))
    events = EventAccumulator(str(next((tmp_path / "run" / "logs").rglob("events.*")))).Reload()
    assert "validation/reconstructions" in events.Tags()["images"] and "loss" in events.Tags()["scalars"]
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    train_vae(smoke(tmp_path / "none", "max_steps=2", "checkpoint_every=100", "log_with=none"))
    assert not list((tmp_path / "none" / "run").rglob("events.*"))


def test_scaling_factor_gives_unit_variance_latents(tmp_path):
    config = smoke(tmp_path, "max_steps=3", "scaling_batches=8")
    folder = train_vae(config)
    vae = AutoencoderKL.from_pretrained(folder).eval()
    from latentgen.data import build_dataset
    from latentgen.training.vae import _scaling_batches

    with torch.no_grad():
        z = torch.cat([vae.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(1))
                       for x in _scaling_batches(build_dataset(config.data), config)])
    scaled = z * vae.config.scaling_factor
    assert vae.config.scaling_factor != 0.18215
    assert abs(scaled.std().item() - 1.0) < 0.05


def test_resume_continues_from_the_saved_step(tmp_path):
    full = train_vae(smoke(tmp_path / "a", "max_steps=6", "checkpoint_every=3"))
    AcceleratorState = __import__("accelerate.state", fromlist=["AcceleratorState"]).AcceleratorState
    AcceleratorState._reset_state(True)
    cut = smoke(tmp_path / "b", "max_steps=3", "checkpoint_every=3")
    train_vae(cut)
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "run")] == ["checkpoint-0000003"]
    AcceleratorState._reset_state(True)
    resumed = train_vae(smoke(tmp_path / "b", "max_steps=6", "checkpoint_every=3", "resume_from=latest"))
    a, b = AutoencoderKL.from_pretrained(full), AutoencoderKL.from_pretrained(resumed)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("overrides, message", [
    (["max_step=3"], "unknown config key 'max_step'; did you mean 'max_steps'?"),
    (["loss.kl_wieght=1"], "did you mean 'loss.kl_weight'?"),
    (["max_steps=abc"], "config key 'max_steps'"),
    (["data.resolution=33"], "resolution 33 is not a multiple of 2"),
    (["data.source=hf", "data.path=/nonexistent/folder"], "dataset folder /nonexistent/folder does not exist"),
    (["model.block_out_channel=[8]"], "unknown AutoencoderKL argument model.block_out_channel"),
    (["mixed_precision=fp8"], "unknown mixed_precision 'fp8'"),
    (["decoder_only=true"], "decoder_only needs a pretrained VAE"),
    (["latent_noise=-1"], "latent_noise must be ≥ 0, got -1"),
    (["log_with=tensorbord"], "unknown log_with 'tensorbord' (did you mean 'tensorboard'?)"),
    *([(["log_with=tensorboard,aim"], "log_with: aim is not installed; pip install aim")]
      if importlib.util.find_spec("aim") is None else []),
])
def test_bad_configs_fail_before_training(tmp_path, overrides, message):
    r = subprocess.run([sys.executable, str(ROOT / "train_vae.py"), "--config", str(SMOKE),
                        f"output_dir={tmp_path / 'run'}", *overrides], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(VAETrainConfig, tmp_path / "none.yaml")


def test_decoder_only_fine_tuning_keeps_the_encoder_and_its_scaling_factor(tmp_path):
    """decoder_only: the encoder (and quant_conv) and the scaling factor are the pretrained VAE's, bit for bit, so
    latents cached for a U-Net stay valid; the decoder learns, here under latent noise."""
    base = train_vae(smoke(tmp_path / "base", "max_steps=2"))
    AcceleratorState = __import__("accelerate.state", fromlist=["AcceleratorState"]).AcceleratorState
    AcceleratorState._reset_state(True)
    tuned = train_vae(smoke(tmp_path / "tuned", f"pretrained={base}", "decoder_only=true", "latent_noise=0.3",
                            "max_steps=3", "learning_rate=1e-2", "ema=true"))
    a, b = AutoencoderKL.from_pretrained(base), AutoencoderKL.from_pretrained(tuned)
    assert b.config.scaling_factor == a.config.scaling_factor
    changed = {name.split(".")[0] for (name, x), y in zip(a.state_dict().items(), b.state_dict().values())
               if not torch.equal(x, y)}
    assert changed == {"decoder", "post_quant_conv"}


def test_latent_noise_perturbs_the_decoded_latents_by_the_drawn_amount():
    """reconstruction_terms with latent_noise: the same generator gives the same noisy reconstruction, and the
    decoder's input differs from the posterior sample by std ≤ latent_noise in scaled-latent units."""
    from latentgen.training.vae import DEFAULT_VAE

    torch.manual_seed(0)
    vae = AutoencoderKL(**DEFAULT_VAE, scaling_factor=0.5).eval()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    seen = []
    vae.decode = lambda z: seen.append(z) or type("D", (), {"sample": torch.zeros_like(x)})()
    with torch.no_grad():
        for noise in (0.0, 0.3, 0.3):
            reconstruction_terms(vae, x, torch.Generator().manual_seed(1), noise)
    clean, noisy, again = seen
    assert torch.equal(noisy, again) and not torch.equal(clean, noisy)
    stds = ((noisy - clean) * 0.5).std(dim=(1, 2, 3))
    assert (stds <= 0.3 * 1.2).all() and stds.max() > 0.03


def test_validation_leaves_a_frozen_encoder_in_eval_mode(tmp_path):
    """Validation switches the VAE to eval mode and back; a decoder_only run's frozen encoder must come back in
    eval mode (vae.train() would put it in training mode too), the decoder in training mode."""
    from types import SimpleNamespace

    from latentgen.training.vae import _validate

    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4).train()
    vae.encoder.eval()
    seen = []
    decode = vae.decode
    vae.decode = lambda z: seen.append([m.training for m in vae.modules()]) or decode(z)
    _validate(SimpleNamespace(is_main_process=False), vae, None, torch.zeros(2, 3, 8, 8), tmp_path, 1)
    assert seen and not any(seen[0])  # all in eval mode while it validates
    assert not any(m.training for m in vae.encoder.modules())
    assert all(m.training for m in vae.decoder.modules()) and vae.training
    assert (tmp_path / "validation" / "step-0000001.png").is_file()
