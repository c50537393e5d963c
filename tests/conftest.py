import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A tiny random pipeline saved in the diffusers layout."""
    import components as C
    from latentgen import LatentPipeline

    folder = tmp_path_factory.mktemp("tiny") / "pipe"
    LatentPipeline(**C.components()).save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_pipe():
    import components as C
    from latentgen import LatentPipeline

    pipe = LatentPipeline(**C.components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def smoke_model(tmp_path_factory):
    """The pipeline that `train_unet.py --config configs/smoke.yaml` writes (tiny, a few steps)."""
    import subprocess

    out = tmp_path_factory.mktemp("smoke")
    r = subprocess.run([sys.executable, str(ROOT / "train_unet.py"), "--config", str(ROOT / "configs" / "smoke.yaml"),
                        f"output_dir={out}", "max_steps=4", "checkpoint_every=100"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out / "pipeline"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_free_port(cmd: list[str]) -> list[str]:
    """An `accelerate launch` command on a port of its own (29500 by default), so that launches from parallel
    test workers (pytest -n) never meet."""
    if "accelerate.commands.launch" not in cmd:
        return cmd
    i = cmd.index("accelerate.commands.launch") + 1
    return [*cmd[:i], "--main_process_port", str(free_port()), *cmd[i:]]
