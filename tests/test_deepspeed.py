"""DeepSpeed ZeRO through accelerate (`training.zero`): one process on the CPU, where accelerate runs DeepSpeed's
engine as on a GPU (more than one CPU process is refused: accelerate counts them as one)."""

import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, with_free_port
from latentgen import LatentPipeline
from latentgen.errors import UserError
from latentgen.formats.checkpoint import list_checkpoints

pytest.importorskip("deepspeed")

SMOKE = ROOT / "configs" / "smoke.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
STEPS = ["max_steps=4", "checkpoint_every=2"]


def launch(stage, out, *overrides, flags=()):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--zero_stage", str(stage), *flags,
           "--num_processes", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "train_unet.py"),
           "--config", str(SMOKE), f"output_dir={out}", *STEPS, *overrides]
    r = subprocess.run(with_free_port(cmd), capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def unet_weights(folder):
    return load_file(str(next((folder / "pipeline" / "unet").glob("*.safetensors"))))


def gap(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def train_plain(out, *overrides):
    cmd = [sys.executable, str(ROOT / "train_unet.py"), "--config", str(SMOKE), f"output_dir={out}", *STEPS, *overrides]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("plain")
    train_plain(out)
    return out


@pytest.fixture
def plain(plain_run):
    return unet_weights(plain_run)


# ZeRO-Offload (`--offload_optimizer_device cpu`, AdamW in CPU memory) also trains to plain training's weights
# (5e-7, run by hand): not a case here, its launch took 104 s of CI's 23 minutes
@pytest.mark.parametrize("stage, flags, tolerance", [(2, (), 1e-6), (3, (), 1e-4)], ids=["zero2", "zero3"])
def test_zero_trains_as_plain_training_does_and_resumes_bit_for_bit(plain, tmp_path, stage, flags, tolerance):
    """ZeRO-2 (gradients and AdamW state partitioned) and ZeRO-3 (weights too) train the U-Net to plain training's
    weights (the same AdamW, clipping and batches: fp32 summation order apart); the final pipeline holds the fp32
    master weights; a run resumed from step 2's checkpoint (DeepSpeed's partitions in `sharded/`) ends bit for bit
    where the unbroken run does."""
    out = tmp_path / "run"
    r = launch(stage, out, flags=flags)
    assert f"train_unet (deepspeed): process 0 of 1 (DEEPSPEED), ZeRO stage {stage}" in r.stdout
    weights = unet_weights(out)
    assert gap(weights, plain) < tolerance
    assert all(v.dtype == torch.float32 for v in weights.values())
    checkpoint = list_checkpoints(out)[-1]
    assert (checkpoint / "sharded" / "zero").is_dir() and gap(load_file(str(checkpoint / "unet.safetensors")),
                                                              weights) == 0
    pipe = LatentPipeline.from_pretrained(out / "pipeline", torch_dtype=torch.float32)
    assert pipe.unet.dtype == torch.float32

    if stage == 3:
        resumed = tmp_path / "resumed"
        shutil.copytree(out, resumed)
        shutil.rmtree(resumed / "pipeline")
        shutil.rmtree(list_checkpoints(resumed)[-1])
        r = launch(stage, resumed, "resume_from=latest")
        assert "resumed from" in r.stdout + r.stderr and "at step 2" in r.stdout + r.stderr
        assert gap(unet_weights(resumed), weights) == 0


def test_a_lora_trains_under_zero_3_as_it_does_plainly(plain_run, tmp_path):
    """ZeRO-3 partitions the frozen base and the LoRA; the LoRA file (diffusers' and kohya's) holds what plain
    training writes."""
    lora = ["text_encoder.kind=pipeline", f"pretrained_pipeline={plain_run / 'pipeline'}", "lora.rank=4",
            "lora.kohya=true"]
    train_plain(tmp_path / "plain", *lora)
    launch(3, tmp_path / "zero", *lora)
    for name in ("lora.safetensors", "lora_kohya.safetensors"):
        assert gap(load_file(str(tmp_path / "zero" / name)), load_file(str(tmp_path / "plain" / name))) < 1e-6


def test_deepspeed_requests_it_cannot_honour_are_one_line_errors(tmp_path, monkeypatch):
    from latentgen.runtime.distributed import check_launch_request
    from latentgen.training import zero

    env = {**ENV, "ACCELERATE_USE_DEEPSPEED": "true"}

    def refused(script, config, *overrides):
        r = subprocess.run([sys.executable, str(ROOT / script), "--config", str(ROOT / "configs" / config),
                            f"output_dir={tmp_path / script}", "max_steps=1", *overrides], capture_output=True,
                           text=True, env=env, timeout=300)
        assert r.returncode != 0 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
        return r.stderr

    assert "ema does not run under DeepSpeed here" in refused("train_unet.py", "smoke.yaml", "ema=true")
    assert "DeepSpeed was asked for, but this trainer runs data parallel" in refused("train_vae.py", "vae-smoke.yaml")
    assert not (tmp_path / "train_unet.py").exists()

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="DeepSpeed through accelerate runs 2 processes on GPUs only"):
        check_launch_request(1, zero=True)

    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": "auto", "zero_optimization": {"stage": 3}}
    accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=ds)))
    config = SimpleNamespace(train_batch_size=8, gradient_accumulation_steps=1, max_grad_norm=1.0)
    with pytest.raises(UserError, match="train_micro_batch_size_per_gpu 4 disagrees with the run's train_batch_size 8"):
        zero.configure(accelerator, config)
    ds["train_micro_batch_size_per_gpu"] = "auto"
    assert zero.configure(accelerator, config) == 3 and ds["gradient_clipping"] == 1.0
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 1

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # not installed
    with pytest.raises(UserError, match="pip install deepspeed"):
        zero.check(SimpleNamespace())
