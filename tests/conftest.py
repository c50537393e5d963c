import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Threads: under pytest-xdist each worker (one per core) runs one thread, as do the processes tests start: two
# workers of a team of two each took 262 s for test_pipeline, test_lora and test_schedulers, one thread each 88 s.
# A fixed team in every case: the images of the determinism tests are compared bit for bit, and
# `latentgen.runtime.threads` would resize the team as the other worker's load comes and goes (tests/test_threads.py
# turns it on).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("LATENTGEN_FIXED_THREADS", "1")


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


class Server:
    """`python -m latentgen.serve ARGV` in this process (uvicorn in a thread), on a free port."""

    def __init__(self, argv: list[str]):
        import threading
        import time

        import uvicorn

        from latentgen.serve import build, parse_args

        self.port = free_port()
        self.app, self.worker = build(parse_args([*argv, "--port", str(self.port)]))
        self.worker.start()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def post(self, route: str, body, **kwargs):
        import requests

        return requests.post(f"{self.url}{route}", json=body, timeout=120, **kwargs)

    def get(self, route: str, **kwargs):
        import requests

        return requests.get(f"{self.url}{route}", timeout=120, **kwargs)

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.worker.close()


def with_free_port(cmd: list[str]) -> list[str]:
    """An `accelerate launch` command on a port of its own (29500 by default), so that launches from parallel
    test workers (pytest -n) never meet."""
    if "accelerate.commands.launch" not in cmd:
        return cmd
    i = cmd.index("accelerate.commands.launch") + 1
    return [*cmd[:i], "--main_process_port", str(free_port()), *cmd[i:]]


_INFER = None


def infer_script():
    """infer.py as a module, loaded once (it is a script, not part of the package)."""
    global _INFER
    if _INFER is None:
        import importlib.util

        spec = importlib.util.spec_from_file_location("infer_script", ROOT / "infer.py")
        _INFER = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_INFER)
    return _INFER


def infer(*args, cwd=None, fresh: bool = False) -> subprocess.CompletedProcess:
    """`python infer.py ARGS` as a finished process: exit code, stdout and stderr.

    It runs in this process (`infer.main` under `run_cli`, as the script's `__main__` runs it), since a new
    interpreter spends ~9 s importing torch, diffusers and transformers; an uncaught exception is printed as the
    interpreter would and exits 1. `fresh=True` starts a new interpreter, for what only a new process shows (a
    replay bit for bit in another process)."""
    argv = [str(a) for a in args]
    if fresh:
        return subprocess.run([sys.executable, str(ROOT / "infer.py"), *argv], capture_output=True, text=True,
                              cwd=cwd, timeout=300)
    import contextlib
    import io
    import traceback

    from latentgen.cli import run_cli

    out, err = io.StringIO(), io.StringIO()
    here = os.getcwd()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            os.chdir(cwd or here)
            code = run_cli(infer_script().main, argv)
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
            if stop.code is not None and not isinstance(stop.code, int):
                print(stop.code, file=sys.stderr)
        except Exception:  # noqa: BLE001 - what the interpreter would print
            traceback.print_exc()
            code = 1
        finally:
            os.chdir(here)
    return subprocess.CompletedProcess(["infer.py", *argv], code, out.getvalue(), err.getvalue())


def generate_on_page(driver, fields: dict[str, str], wait_s: int = 120) -> str:
    """Fill the web page's fields (by element id), press Generate and return the first image's infotext; the page's
    error status, if it shows one, fails the test."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    for field, value in fields.items():
        driver.find_element(By.ID, field).clear()
        driver.find_element(By.ID, field).send_keys(value)
    driver.find_element(By.ID, "generate").click()
    WebDriverWait(driver, wait_s).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery .item pre")
                                        or d.find_element(By.ID, "status").get_attribute("class") == "error")
    status = driver.find_element(By.ID, "status")
    assert status.get_attribute("class") != "error", status.text
    return driver.find_element(By.CSS_SELECTOR, "#gallery .item pre").text


def chromium():
    """A headless Chromium driven by selenium (Debian's chromium and chromium-driver)."""
    import shutil

    from selenium import webdriver

    driver_path, browser = shutil.which("chromedriver"), shutil.which("chromium")
    assert driver_path and browser, "the browser test needs Debian's chromium and chromium-driver (README)"
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run"):
        options.add_argument(flag)
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
