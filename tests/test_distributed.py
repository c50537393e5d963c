"""Process set-up: precision from accelerate's launch honoured only where the training config leaves it to auto,
and the launch flags read back for starting CPU ranks."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from latentgen.errors import UserError
from latentgen.runtime.distributed import _requested_topology
from latentgen.runtime.precision import mixed_precision as resolve_mixed_precision


@pytest.mark.parametrize("config, launched, expected", [
    ("auto", "bf16", "bf16"),  # config left to auto: accelerate's flag or config file decides
    ("auto", "no", "no"),
    ("fp32", "bf16", "no"),  # the training config set it: it wins, and the run says so
    ("bf16", "no", "bf16"),
    ("bf16", None, "bf16"),
])
def test_mixed_precision_follows_the_config_then_the_launch(monkeypatch, config, launched, expected):
    if launched is None:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launched)
    value, source = resolve_mixed_precision(config, cpu=True)
    assert value == expected
    if config == "auto" and launched:
        assert source == "accelerate launch"
    elif launched and expected != launched:
        assert source.endswith(f"accelerate launch asked for {launched!r}")


def test_mixed_precision_auto_without_a_launch_is_the_hardware_choice(monkeypatch):
    from latentgen.runtime.precision import cpu_has_fast_bf16

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert resolve_mixed_precision("auto", cpu=True) == ("bf16" if cpu_has_fast_bf16() else "no",
                                                         "auto, for this hardware")


def test_fp16_from_a_launch_on_the_cpu_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        resolve_mixed_precision("auto", cpu=not torch.cuda.is_available())


def test_launch_topology_from_flags_and_from_a_config_file(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    flags = ["--cpu", "--num_processes", "4", "--num_machines", "2", "--machine_rank", "1",
             "--main_process_ip", "127.0.0.2", "train_unet.py", "--config", "x.yaml", "max_steps=3"]
    assert _requested_topology(flags) == (4, 2, 1, "127.0.0.2", 29500)
    config_file = ["--config_file", str(ROOT / "configs" / "accelerate" / "multi-cpu.yaml"), "train_unet.py"]
    assert _requested_topology(config_file) == (2, 1, 0, "127.0.0.1", 29500)


def test_a_sharded_launch_or_another_accumulation_is_refused_not_ignored(monkeypatch, tmp_path):
    """accelerate switches to FSDP only for GPUs: on the CPU `--use_fsdp` used to train plain DDP and exit 0."""
    from latentgen.runtime.distributed import check_launch_request

    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
    vae = ROOT / "configs" / "vae-smoke.yaml"
    r = subprocess.run([sys.executable, str(ROOT / "train_vae.py"), "--config", str(vae), f"output_dir={tmp_path}",
                        "max_steps=1"], capture_output=True, text=True,
                       env={**os.environ, **env})
    assert r.returncode != 0 and "FSDP (--use_fsdp or distributed_type: FSDP) was asked for" in r.stderr
    assert "distributed.strategy: fsdp" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "vae").exists()
    r = subprocess.run([sys.executable, str(ROOT / "train_unet.py"), "--config", str(ROOT / "configs" / "smoke.yaml"),
                        f"output_dir={tmp_path / 'unet'}", "max_steps=1"], capture_output=True, text=True,
                       env={**os.environ, **env})  # honoured: one process, nothing to shard, FSDP's checkpoints
    assert r.returncode == 0 and (tmp_path / "unet" / "pipeline").is_dir(), r.stderr[-2000:]
    assert "strategy: fsdp" in (tmp_path / "unet" / "train_config.yaml").read_text()
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    with pytest.raises(UserError, match="--gradient_accumulation_steps 4 disagrees with the config's 1"):
        check_launch_request(1)
    check_launch_request(4)  # the same: fine
