"""Threads that fit the cores other processes leave free (`latentgen.runtime.threads`)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import torch

from latentgen.runtime import threads


@pytest.fixture
def fresh(monkeypatch):
    """The module as a process starts it, adapting; the calling thread's team restored after."""
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_last", None)
    monkeypatch.setattr(threads, "enabled", True)
    yield threads
    torch.set_num_threads(before)


def test_free_cores_from_the_time_others_used(fresh, monkeypatch):
    """Over one second of wall time on 4 cores: the machine busy 2.9 core-seconds of which 1.0 were ours leaves
    1.9 cores' worth to others: two cores taken (a process at 0.9 of a core runs whenever it can), two free."""
    snapshots = iter([(0.0, 100.0, 10.0), (1.0, 102.9, 11.0), (2.0, 103.9, 12.0), (2.1, 105.0, 12.0)])
    monkeypatch.setattr(threads, "_snapshot", lambda cpus: next(snapshots))
    monkeypatch.setattr(threads, "cores", lambda: [0, 1, 2, 3])
    assert threads.free_cores() is None  # the first look only starts the window
    assert threads.free_cores() == 2
    assert threads.free_cores() == 4  # only our own time: every core is free
    assert threads.free_cores() is None  # 0.1 s is too short a window to decide on


def test_a_spinning_process_takes_a_core(fresh):
    if len(threads.cores()) < 2:
        pytest.skip("needs two cores")
    threads.busy_elsewhere()
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.0)
        assert threads.busy_elsewhere() > threads.BUSY_FROM
        time.sleep(0.5)
        assert threads.adapt() <= len(threads.cores()) - 1
    finally:
        spinner.kill()


def test_adapt_sets_only_the_calling_threads_team_and_respects_a_users_choice(fresh, monkeypatch):
    monkeypatch.setattr(threads, "free_cores", lambda: 1)
    torch.set_num_threads(2)
    seen = []
    t = threading.Thread(target=lambda: seen.append((threads.adapt(), torch.get_num_threads())))
    t.start()
    t.join()
    assert seen == [(1, 1)] and torch.get_num_threads() == 2
    monkeypatch.setattr(threads, "enabled", False)  # OMP_NUM_THREADS or LATENTGEN_FIXED_THREADS set
    assert threads.adapt() == 2


def test_sampling_adapts_every_step_and_records_the_threads(fresh, tiny_pipe, monkeypatch):
    """A reduction split over another number of threads can change a float's last bits (it does for the tiny
    model), so an image records the team sizes its sampling used."""
    calls = []
    real = threads.adapt
    monkeypatch.setattr(threads, "adapt", lambda: calls.append(1) or real())
    for n in (1, 2):
        monkeypatch.setattr(threads, "free_cores", lambda n=n: n)
        out = tiny_pipe("x", num_inference_steps=4, seed=3, output_type="np")
        assert torch.get_num_threads() == n and out.info["threads"] == [n]
    assert len(calls) == 8
    free = iter([2, 2, 1, 1])
    monkeypatch.setattr(threads, "free_cores", lambda: next(free))
    assert tiny_pipe("x", num_inference_steps=4, seed=3).info["threads"] == [1, 2]


def test_a_replay_runs_on_the_threads_the_image_was_made_with(fresh, tiny_folder, tmp_path, monkeypatch):
    from conftest import infer

    monkeypatch.setattr(threads, "free_cores", lambda: 1)
    made = infer("--prompt", "x", "--model", tiny_folder, "--steps", "3", "--out", tmp_path / "a.png", "--dtype",
                 "fp32", "--height", "32", "--width", "32")
    assert made.returncode == 0, made.stderr
    monkeypatch.setattr(threads, "free_cores", lambda: 2)
    torch.set_num_threads(2)
    replayed = infer("--replay", tmp_path / "a.png")
    assert replayed.returncode == 0 and "identical, bit for bit" in replayed.stdout, replayed.stderr
    assert torch.get_num_threads() == 1 and not threads.enabled
