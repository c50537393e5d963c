"""train_unet.py: learning, multi-process, exact resume after SIGKILL, atomic checkpoints, bad configs."""

import contextlib
import os
import random
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, free_port, with_free_port
from latentgen import LatentPipeline
from latentgen.config import load_config
from latentgen.formats.checkpoint import list_checkpoints, resolve_resume, save_checkpoint
from latentgen.training.unet import UNetTrainConfig, diffusion_loss, load_components, train_unet

SMOKE = ROOT / "configs" / "smoke.yaml"
TRAIN = [sys.executable, str(ROOT / "train_unet.py"), "--config", str(SMOKE)]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "train_unet.py"), "--config", str(SMOKE)]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def fresh_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield


def run(cmd, *overrides, timeout=300):
    r = subprocess.run([*with_free_port(cmd), *map(str, overrides)], capture_output=True, text=True,
                       timeout=timeout, env=ENV)
    return r


def final_unet(output_dir):
    return load_file(str(list_checkpoints(output_dir)[-1] / "unet.safetensors"))


def cached_loss(config, cache_dir):
    """model -> its mean training loss (fixed noise) on the first 32 cached examples of a finished run."""
    from latentgen.components.diffusion import scale_latents
    from latentgen.training.cache import CachedData

    data = CachedData(load_file(str(next(cache_dir.glob("*.safetensors")))), [])
    parts = load_components(config)
    latents = scale_latents(parts.vae, data.mean[:32])
    context = data.embeddings[data.caption_rows[:32]]

    def loss(unet):
        with torch.no_grad():
            return diffusion_loss(unet.eval(), parts.noise_scheduler, latents, context,
                                  torch.Generator().manual_seed(0), config.noise).mean().item()

    return loss


def test_training_lowers_the_loss_and_writes_a_loadable_pipeline(tmp_path):
    config = load_config(UNetTrainConfig, SMOKE, [f"output_dir={tmp_path}", "max_steps=40", "checkpoint_every=100"])
    torch.manual_seed(config.seed)
    initial = load_components(config).unet.eval()

    folder = train_unet(config)
    loss = cached_loss(config, tmp_path / "cache")
    pipe = LatentPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    assert loss(pipe.unet) < 0.8 * loss(initial)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle on a blue background", num_inference_steps=3, seed=0).images[0]
    assert image.size == (32, 32)
    assert (tmp_path / "validation" / "step-0000040.png").is_file()
    assert (folder / "train_config.yaml").is_file()


MULTI_CPU_CONFIG = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    str(ROOT / "configs" / "accelerate" / "multi-cpu.yaml"), str(ROOT / "train_unet.py"),
                    "--config", str(SMOKE)]


def ranks_reported(output: str) -> set[str]:
    return {line.split(": ", 1)[1] for line in output.splitlines() if line.startswith("train_unet: process ")}


@pytest.mark.parametrize("launch", [LAUNCH, MULTI_CPU_CONFIG, [a for a in LAUNCH if a != "--cpu"]],
                         ids=["flags", "config-file", "without-cpu-flag"])
def test_two_processes_with_accelerate_launch(tmp_path, launch):
    r = run(launch, f"output_dir={tmp_path}", "max_steps=4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert ranks_reported(r.stdout) == {"process 0 of 2 (MULTI_CPU, gloo)", "process 1 of 2 (MULTI_CPU, gloo)"}
    pipe = LatentPipeline.from_pretrained(tmp_path / "pipeline")
    assert pipe.unet.config.cross_attention_dim == 32


def test_gradients_are_averaged_across_ranks(tmp_path):
    """After one step both ranks hold the same weights, and they are not what one process makes from rank 0's
    half of the batch alone (which independent, unsynchronised processes would give)."""
    probe = [str(ROOT / "tests" / "rank_weights.py"), "--config", str(SMOKE), "max_steps=1", "checkpoint_every=10"]
    launch = LAUNCH[:LAUNCH.index(str(ROOT / "train_unet.py"))]
    r = run([*launch, *probe], f"output_dir={tmp_path / 'two'}")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run([sys.executable, *probe], f"output_dir={tmp_path / 'one'}")
    assert r.returncode == 0, r.stderr[-3000:]
    rank0, rank1 = (load_file(str(tmp_path / "two" / f"rank-{k}.safetensors")) for k in (0, 1))
    alone = load_file(str(tmp_path / "one" / "rank-0.safetensors"))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    changed = [k for k in rank0 if not torch.equal(rank0[k], alone[k])]
    assert len(changed) > len(rank0) // 2, changed


def test_two_machines_on_loopback(tmp_path):
    """Multi-node DDP as the README documents it, with two 'machines' (one process each) on this host that share
    no output folder: both join one group; the main machine writes the model."""
    procs, port = [], free_port()
    for machine in (0, 1):
        cmd = [*LAUNCH[:3], "--cpu", "--num_processes", "2", "--num_machines", "2", "--machine_rank", str(machine),
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
               "--mixed_precision", "no", str(ROOT / "train_unet.py"), "--config", str(SMOKE),
               f"output_dir={tmp_path / f'machine{machine}'}", "max_steps=2"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV))
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert ranks_reported(outs[0][0]) == {"process 0 of 2 (MULTI_CPU, gloo)"}
    assert ranks_reported(outs[1][0]) == {"process 1 of 2 (MULTI_CPU, gloo)"}
    assert (tmp_path / "machine0" / "pipeline" / "model_index.json").is_file()
    assert not (tmp_path / "machine1" / "pipeline").exists()


def test_gradient_checkpointing_trains_the_same_weights(tmp_path):
    overrides = ["max_steps=2", "checkpoint_every=10", "validate_every=0"]
    weights = []
    for flag in ("false", "true"):
        AcceleratorState = __import__("accelerate.state", fromlist=["AcceleratorState"]).AcceleratorState
        AcceleratorState._reset_state(True)
        config = load_config(UNetTrainConfig, SMOKE, [f"output_dir={tmp_path / flag}", *overrides,
                                                      f"gradient_checkpointing={flag}"])
        train_unet(config)
        weights.append(final_unet(tmp_path / flag))
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=1e-4, atol=1e-6)


def _kill_at_random(cmd, output_dir, overrides, seed):
    """Start a run, SIGKILL it (all its processes) at a random moment after it starts training."""
    rng = random.Random(seed)
    proc = subprocess.Popen([*with_free_port(cmd), f"output_dir={output_dir}", *overrides], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    deadline = time.time() + 240
    while not list_checkpoints(output_dir) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 1.5))
    # every descendant too: torch's launcher starts the ranks in sessions of their own
    tree = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for child in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    proc.wait()


@pytest.mark.parametrize("seed", [0, 1])
def test_exact_resume_after_sigkill_is_bitwise(tmp_path, seed):
    overrides = ["max_steps=30", "checkpoint_every=3", "keep_checkpoints=2", "ema=true",
                 "lr_scheduler=cosine", "lr_warmup_steps=4", "gradient_accumulation_steps=2"]
    r = run(TRAIN, f"output_dir={tmp_path / 'whole'}", *overrides)
    assert r.returncode == 0, r.stderr[-3000:]

    _kill_at_random(TRAIN, tmp_path / "cut", overrides, seed)
    killed_at = resolve_resume(tmp_path / "cut", "latest")
    assert killed_at is not None and killed_at.name != "checkpoint-0000030"  # killed mid-run
    r = run(TRAIN, f"output_dir={tmp_path / 'cut'}", *overrides, "resume_from=latest")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {killed_at}" in r.stdout

    whole, resumed = final_unet(tmp_path / "whole"), final_unet(tmp_path / "cut")
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name
    a = load_file(str(tmp_path / "whole" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the EMA weights too


def test_exact_resume_with_two_processes(tmp_path):
    overrides = ["max_steps=16", "checkpoint_every=2", "gradient_accumulation_steps=2"]
    r = run(LAUNCH, f"output_dir={tmp_path / 'whole'}", *overrides)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(ranks_reported(r.stdout)) == 2
    _kill_at_random(LAUNCH, tmp_path / "cut", overrides, 1)
    killed_at = resolve_resume(tmp_path / "cut", "latest")
    assert killed_at is not None and killed_at.name != "checkpoint-0000016"  # killed mid-run
    r = run(LAUNCH, f"output_dir={tmp_path / 'cut'}", *overrides, "resume_from=latest")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {killed_at}" in r.stdout and len(ranks_reported(r.stdout)) == 2
    whole, resumed = final_unet(tmp_path / "whole"), final_unet(tmp_path / "cut")
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name


def test_a_killed_save_never_leaves_a_checkpoint_latest_would_pick(tmp_path):
    """SIGKILL a process while it writes a large checkpoint, at random moments: `latest` stays loadable."""
    script = (
        "import sys, torch; from latentgen.formats.checkpoint import save_checkpoint;"
        "m = torch.nn.Linear(4096, 4096); opt = torch.optim.AdamW(m.parameters());"
        "[save_checkpoint(sys.argv[1], s, {'unet': m}, {'optimizer': opt}, keep=2) for s in range(1, 100)]")
    rng = random.Random(0)
    for attempt in range(4):
        proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], env=ENV, cwd=ROOT)
        while not list_checkpoints(tmp_path) and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 1.0))
        proc.kill()
        proc.wait()
        latest = resolve_resume(tmp_path, "latest")
        assert latest is not None
        m = torch.nn.Linear(4096, 4096)
        opt = torch.optim.AdamW(m.parameters())
        from latentgen.formats.checkpoint import load_checkpoint

        assert load_checkpoint(latest, {"unet": m}, {"optimizer": opt})["step"] >= 1
    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    assert all(not p.startswith("checkpoint") for p in leftovers)  # temporaries are hidden, never listed


def test_list_ignores_incomplete_folders(tmp_path):
    m = torch.nn.Linear(2, 2)
    save_checkpoint(tmp_path, 2, {"unet": m}, {}, keep=3)
    (tmp_path / "checkpoints" / ".checkpoint-0000004.abc.tmp").mkdir()
    (tmp_path / "checkpoints" / "checkpoint-0000006").mkdir()  # no state.json: not complete
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-0000002"]


@pytest.mark.parametrize("overrides, message", [
    (["max_step=3"], "unknown config key 'max_step'; did you mean 'max_steps'?"),
    (["text_encoder.knd=minilm"], "did you mean 'text_encoder.kind'?"),
    (["vae_model.latent_channels=8"], "the VAE makes 8-channel latents but the U-Net takes in_channels=4"),
    (["text_encoder.model.hidden_size=48"], "the text encoder's width is 48 but the U-Net has cross_attention_dim=32"),
    (["train_batch_size=200"], "the dataset has 96 usable samples, fewer than one step needs"),
    (["sampler=dpm2"], "unknown sampler 'dpm2'"),
    (["data.hflip=0.5"], "cache=true stores one view of each image"),
    (["resume_from=/nonexistent"], "resume_from /nonexistent is not a checkpoint folder"),
    (["upscaler.scale=3"], "upscaler.scale must be 0 (off), 2 or 4, got 3"),
    (["upscaler.scale=2"], "an upscaler U-Net takes the noisy and the low-resolution latents: in_channels must be 8"),
    (["pretrained_upscaler=up"], "pretrained_upscaler fine-tunes a cascade's upscaler: set upscaler.scale (2 or 4)"),
    (["upscaler.scale=2", "pretrained_upscaler=/nonexistent"],
     "pretrained_upscaler /nonexistent is not an upscaler folder (no upscaler.json)"),
])
def test_bad_configs_fail_before_training(tmp_path, overrides, message):
    r = run(TRAIN, f"output_dir={tmp_path / 'run'}", *overrides)
    assert r.returncode == 2, r.stderr[-2000:]
    assert message in r.stderr and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_command_line_overrides_apply(tmp_path):
    config = load_config(UNetTrainConfig, SMOKE, [f"output_dir={tmp_path}", "max_steps=3", "checkpoint_every=1",
                                                  "resume_from=latest", "seed=5", "train_batch_size=4"])
    assert (config.max_steps, config.checkpoint_every, config.resume_from, config.seed,
            config.train_batch_size) == (3, 1, "latest", 5, 4)


def test_fine_tuning_keeps_the_pretrained_pipelines_clip_skip_and_apg(tmp_path):
    """text_encoder.kind 'pipeline' trains on the pretrained pipeline's clip-skip embeddings; the saved pipeline
    (and the validation images) must use the same clip skip, or the U-Net sees other embeddings at inference.
    The model's own guidance (APG, as the default model has) stays the fine-tune's too."""
    import json

    import components as C

    pretrained = tmp_path / "pretrained"
    apg = {"norm_threshold": 2.0, "eta": 0.0, "momentum": 0.0}
    LatentPipeline(**C.components(), clip_skip=1, apg=apg).save_pretrained(pretrained)
    config = load_config(UNetTrainConfig, SMOKE, [f"output_dir={tmp_path / 'run'}", "max_steps=2",
                                                  f"pretrained_pipeline={pretrained}", "text_encoder.kind=pipeline"])
    parts = load_components(config)
    assert parts.encoder.clip_skip == 1 and parts.clip_skip == 1
    folder = train_unet(config)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["clip_skip"] == 1 and index["apg"] == apg
    assert LatentPipeline.from_pretrained(folder).config.clip_skip == 1


def test_a_fine_tuning_run_records_the_architecture_it_trained(tmp_path):
    """With pretrained_pipeline the U-Net is the pipeline's: the run's train_config.yaml must give its
    architecture (enough to build it again), not the `unet:` defaults it never used."""
    from diffusers import UNet2DConditionModel

    import components as C

    pretrained = tmp_path / "pretrained"
    LatentPipeline(**C.components()).save_pretrained(pretrained)
    trained = LatentPipeline.from_pretrained(pretrained).unet.config
    config = load_config(UNetTrainConfig, SMOKE, [f"output_dir={tmp_path / 'run'}", "max_steps=1",
                                                  f"pretrained_pipeline={pretrained}", "text_encoder.kind=pipeline",
                                                  "unet.layers_per_block=3"])  # a U-Net the run does not train
    folder = train_unet(config)
    for recorded in (tmp_path / "run" / "train_config.yaml", folder / "train_config.yaml"):
        unet = load_config(UNetTrainConfig, recorded).unet
        assert unet["block_out_channels"] == list(trained.block_out_channels) and trained.layers_per_block == 1
        assert unet.get("layers_per_block", 2) == 1  # (2 is diffusers' default, left out when it is the value)
        rebuilt = UNet2DConditionModel(**unet).config
        assert {k: v for k, v in rebuilt.items() if not k.startswith("_")} == \
            {k: v for k, v in trained.items() if not k.startswith("_")}


def test_logit_normal_timesteps_favour_the_middle_noise_levels():
    from latentgen.components.diffusion import NoiseConfig, sample_timesteps

    def draw(config, seed=0):
        return sample_timesteps(config, 1000, 20000, torch.Generator().manual_seed(seed), "cpu")

    uniform = draw(NoiseConfig())
    assert torch.equal(uniform, torch.randint(0, 1000, (20000,), generator=torch.Generator().manual_seed(0)))
    middle = draw(NoiseConfig(timestep_sampling="logit_normal"))
    assert middle.dtype == torch.int64 and int(middle.min()) >= 0 and int(middle.max()) <= 999
    assert torch.equal(middle, draw(NoiseConfig(timestep_sampling="logit_normal")))
    # t/T = sigmoid(z), z ~ N(0, 1): P(250 ≤ t < 750) = P(|z| < logit(0.75) = 1.0986) = 0.728; uniform: 0.5
    inner = ((middle >= 250) & (middle < 750)).float().mean().item()
    assert abs(inner - 0.728) < 0.015 and abs(((uniform >= 250) & (uniform < 750)).float().mean().item() - 0.5) < 0.015
    shifted = draw(NoiseConfig(timestep_sampling="logit_normal", logit_mean=-0.5, logit_std=0.5))
    assert abs(shifted.float().median().item() - 1000 * torch.sigmoid(torch.tensor(-0.5)).item()) < 5


def test_the_optimizer_and_ema_take_the_textbook_steps_in_one_multi_tensor_update():
    """make_optimizer's fused AdamW (weight decay, betas and eps from the config) moves the weights as torch's
    per-tensor AdamW does, and make_ema's foreach update is the textbook one: ema = d·ema + (1 − d)·w."""
    import components as C
    from latentgen.training.loop import make_ema, make_optimizer

    config = load_config(UNetTrainConfig, None, ["vae_path=unused", "learning_rate=1e-2", "adam_weight_decay=0.1",
                                                 "adam_beta1=0.8", "ema_decay=0.9"])
    unet = C.unet()
    torch.manual_seed(0)
    reference = [p.detach().clone().requires_grad_() for p in unet.parameters()]
    ours, textbook = make_optimizer(unet.parameters(), config), torch.optim.AdamW(
        reference, lr=1e-2, weight_decay=0.1, betas=(0.8, config.adam_beta2), eps=config.adam_epsilon, foreach=False)
    assert ours.defaults["fused"]
    ema = make_ema(unet, config)
    before = [p.detach().clone() for p in unet.parameters()]
    for _ in range(3):
        for p, q in zip(unet.parameters(), reference):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        ours.step()
        textbook.step()
        weights, shadow = [p.detach().clone() for p in unet.parameters()], [s.clone() for s in ema.shadow_params]
        ema.step(unet.parameters())
    for p, q, b in zip(unet.parameters(), reference, before):
        assert not torch.equal(p, b)
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
    decay = ema.get_decay(ema.optimization_step)  # diffusers' warm-up: (1 + 2) / (10 + 2) at the third update
    assert decay == 0.25
    for new, old, w in zip(ema.shadow_params, shadow, weights):
        assert not torch.equal(new, w)
        torch.testing.assert_close(new, decay * old + (1 - decay) * w, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Sharded training (FSDP2, distributed.strategy: fsdp; latentgen.training.sharded)


def pipeline_unet(output_dir):
    return load_file(str(output_dir / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"))


def test_fsdp_on_two_ranks_trains_what_ddp_trains_holding_half_the_parameters_each(tmp_path):
    """With EMA (each rank averaging its shards): the trained and the averaged weights equal DDP's (fp32, 1e-5);
    with distributed.param_dtype bf16 (FSDP's mixed-precision policy) the run differs by bf16's rounding only."""
    ema = ["ema=true", "ema_decay=0.5"]
    r = run(LAUNCH, f"output_dir={tmp_path / 'fsdp'}", "max_steps=3", "distributed.strategy=fsdp", *ema)
    assert r.returncode == 0, r.stderr[-3000:]
    held = [line for line in r.stdout.splitlines() if "parameters (fsdp)" in line]
    counts = [int(line.split(" holds ")[1].split(" of ")[0].replace(",", "")) for line in held]
    total = int(held[0].split(" of the U-Net's ")[1].split(" ")[0].replace(",", ""))
    assert len(counts) == 2 and sum(counts) == total and max(counts) < 0.55 * total, held
    r = run(LAUNCH, f"output_dir={tmp_path / 'ddp'}", "max_steps=3", *ema)
    assert r.returncode == 0, r.stderr[-3000:]
    for weights in (final_unet, pipeline_unet):  # the trained weights; the final pipeline's, the EMA's
        sharded, whole = weights(tmp_path / "fsdp"), weights(tmp_path / "ddp")
        assert sharded.keys() == whole.keys()
        assert max((sharded[k] - whole[k]).abs().max().item() for k in whole) < 1e-5  # fp32: reduction order
    assert any(not torch.equal(final_unet(tmp_path / "fsdp")[k], sharded[k]) for k in sharded)  # EMA applied
    pipe = LatentPipeline.from_pretrained(tmp_path / "fsdp" / "pipeline")  # a plain diffusers folder
    assert pipe.unet.config.cross_attention_dim == 32
    r = run(LAUNCH, f"output_dir={tmp_path / 'bf16'}", "max_steps=3", "distributed.strategy=fsdp",
            "distributed.param_dtype=bf16")
    assert r.returncode == 0, r.stderr[-3000:]
    low, fp32 = final_unet(tmp_path / "bf16"), final_unet(tmp_path / "fsdp")
    assert all(v.dtype == torch.float32 for v in low.values())  # the shards stay fp32
    gap = max((low[k] - fp32[k]).abs().max().item() for k in fp32)
    assert 1e-5 < gap < 0.02, gap  # computed in bf16: not fp32's result, but near it


def test_fsdp_resumes_exactly_from_whole_and_sharded_checkpoints_at_one_and_two_ranks(tmp_path):
    """A sharded run with EMA stopped at step 2 and resumed ends bit for bit where the unbroken run does. With
    distributed.checkpoint: sharded each of the 2 ranks writes its own shards with DCP (no whole U-Net file); that
    step-2 checkpoint loaded on one rank holds the weights, Adam moments and EMA of the whole step-2 checkpoint, and
    resumed on two ranks ends bit for bit where the unbroken run does too."""
    fsdp = ["distributed.strategy=fsdp", "checkpoint_every=2", "keep_checkpoints=5", "ema=true", "ema_decay=0.5"]
    for name, extra in (("full", ["max_steps=4"]), ("cut", ["max_steps=2"]),
                        ("sharded", ["max_steps=2", "distributed.checkpoint=sharded"])):
        r = run(LAUNCH, f"output_dir={tmp_path / name}", *extra, *fsdp)
        assert r.returncode == 0, r.stderr[-3000:]
    r = run(LAUNCH, f"output_dir={tmp_path / 'cut'}", "max_steps=4", "resume_from=latest", *fsdp)
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-3000:]
    for weights in (final_unet, pipeline_unet):  # trained; averaged
        full, cut = weights(tmp_path / "full"), weights(tmp_path / "cut")
        assert all(torch.equal(full[k], cut[k]) for k in full)

    whole, shards = list_checkpoints(tmp_path / "cut")[0], list_checkpoints(tmp_path / "sharded")[-1]
    assert {p.name for p in (shards / "sharded").glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}
    assert not (shards / "unet.safetensors").exists() and (whole / "unet.safetensors").exists()
    assert "optimizer" not in torch.load(shards / "training_state.pt", weights_only=True)
    r = run(TRAIN, f"output_dir={tmp_path / 'one'}", "max_steps=2", f"resume_from={shards}", *fsdp)
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-3000:]
    again = list_checkpoints(tmp_path / "one")[-1]  # rewritten whole on one rank, no step taken
    a, b = load_file(str(whole / "unet.safetensors")), load_file(str(again / "unet.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (torch.load(p / "training_state.pt", weights_only=True) for p in (whole, again))
    assert sa["optimizer"]["state"].keys() == sb["optimizer"]["state"].keys()
    assert all(torch.equal(sa["optimizer"]["state"][k]["exp_avg_sq"], sb["optimizer"]["state"][k]["exp_avg_sq"])
               for k in sa["optimizer"]["state"])
    assert sa["ema"]["optimization_step"] == sb["ema"]["optimization_step"] == 2
    assert all(torch.equal(x, y) for x, y in zip(sa["ema"]["shadow_params"], sb["ema"]["shadow_params"]))

    r = run(LAUNCH, f"output_dir={tmp_path / 'on'}", "max_steps=4", f"resume_from={shards}", *fsdp)
    assert r.returncode == 0, r.stderr[-3000:]
    for weights in (final_unet, pipeline_unet):
        a, b = weights(tmp_path / "on"), weights(tmp_path / "full")
        assert all(torch.equal(a[k], b[k]) for k in a)
    r = run(TRAIN, f"output_dir={tmp_path / 'bad'}", "distributed.checkpoint=sharded")
    assert r.returncode == 2 and "set distributed.strategy: fsdp" in r.stderr and r.stderr.count("\n") == 1


def test_a_lora_trains_sharded_as_it_does_data_parallel_and_resumes(smoke_model, tmp_path):
    """A LoRA of a pretrained U-Net with FSDP on two ranks: the frozen base and the LoRA sharded; its checkpoints
    hold the LoRA only (as a DDP LoRA run's), a run stopped at step 2 and resumed writes the LoRA file of the unbroken
    run bit for bit, and that file equals two DDP ranks' (fp32, 1e-5)."""
    lora = [f"pretrained_pipeline={smoke_model}", "text_encoder.kind=pipeline", "lora.rank=4", "ema=false",
            "checkpoint_every=2", "keep_checkpoints=5"]
    fsdp = [*lora, "distributed.strategy=fsdp"]
    for name, extra in (("whole", ["max_steps=3"]), ("cut", ["max_steps=2"]), ("ddp", ["max_steps=3"])):
        r = run(LAUNCH, f"output_dir={tmp_path / name}", *extra, *(lora if name == "ddp" else fsdp))
        assert r.returncode == 0, r.stderr[-3000:]
    assert all(".lora_" in k for k in load_file(str(list_checkpoints(tmp_path / "cut")[-1] / "unet.safetensors")))
    r = run(LAUNCH, f"output_dir={tmp_path / 'cut'}", "max_steps=3", "resume_from=latest", *fsdp)
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-3000:]
    whole, cut, ddp = (load_file(str(tmp_path / n / "lora.safetensors")) for n in ("whole", "cut", "ddp"))
    assert whole.keys() == cut.keys() == ddp.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)
    assert max((whole[k] - ddp[k]).abs().max().item() for k in whole) < 1e-5
    assert any(v.abs().max() > 0 for k, v in whole.items() if "lora_B" in k or "lora.up" in k)  # it learned


def test_a_text_encoder_trains_beside_a_sharded_unet_as_with_ddp_and_resumes(tmp_path):
    """text_encoder.train with FSDP: the U-Net sharded, the text encoder whole on each rank (its gradients averaged,
    its AdamW state in a group of its own, the gradient norm clipped over both); the final U-Net and text encoder
    equal two DDP ranks' (fp32, 1e-5), and a run stopped at step 2 and resumed ends bit for bit where the unbroken
    one does."""
    text = ["text_encoder.train=true", "checkpoint_every=2", "keep_checkpoints=5", "max_grad_norm=0.05"]
    fsdp = [*text, "distributed.strategy=fsdp"]
    for name, extra in (("whole", ["max_steps=3"]), ("cut", ["max_steps=2"]), ("ddp", ["max_steps=3"])):
        r = run(LAUNCH, f"output_dir={tmp_path / name}", *extra, *(text if name == "ddp" else fsdp))
        assert r.returncode == 0, r.stderr[-3000:]
    r = run(LAUNCH, f"output_dir={tmp_path / 'cut'}", "max_steps=3", "resume_from=latest", *fsdp)
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-3000:]
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        whole, cut, ddp = (load_file(str(tmp_path / n / "pipeline" / part)) for n in ("whole", "cut", "ddp"))
        assert all(torch.equal(whole[k], cut[k]) for k in whole), part
        assert max((whole[k] - ddp[k]).abs().max().item() for k in whole) < 1e-5, part
    first = load_file(str(list_checkpoints(tmp_path / "whole")[0] / "text_encoder.safetensors"))
    assert any(not torch.equal(first[k], whole[k]) for k in whole)  # the text encoder learned


def test_fsdp_settings_that_cannot_be_honoured_are_one_line_errors(tmp_path):
    r = run(TRAIN, f"output_dir={tmp_path}", "distributed.strategy=fsdp", "distributed.offload=true")
    assert r.returncode == 2 and "on the CPU they are there already" in r.stderr, r.stderr
    r = run(TRAIN, f"output_dir={tmp_path}", "distributed.param_dtype=bf16")
    assert r.returncode == 2 and "distributed.param_dtype is a setting of sharded training" in r.stderr, r.stderr
    r = run(TRAIN, f"output_dir={tmp_path}", "distributed.strategy=zero")
    assert r.returncode == 2 and "unknown distributed.strategy 'zero'" in r.stderr, r.stderr
    r = run([sys.executable, str(ROOT / "train_vae.py"), "--config", str(ROOT / "configs" / "vae-smoke.yaml")],
            f"output_dir={tmp_path / 'vae'}", "distributed.strategy=fsdp")
    assert r.returncode == 2 and "train_vae trains data parallel only" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1


def test_accelerates_fsdp_launch_is_honoured_by_sharding(tmp_path):
    """`accelerate launch --use_fsdp` (which accelerate itself would ignore on the CPU) shards the U-Net."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2",
              "--fsdp_sync_module_states", "false", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
              "no", "--dynamo_backend", "no", str(ROOT / "train_unet.py"), "--config", str(SMOKE)]
    r = run(launch, f"output_dir={tmp_path}", "max_steps=1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert sum("parameters (fsdp)" in line for line in r.stdout.splitlines()) == 2
