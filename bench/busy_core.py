"""One image of the default model when another process keeps a core busy, against the same image on an idle machine.

    python bench/busy_core.py [--steps 20] [--repeat 3] [--busy 1]

Each row runs in a fresh process: `adaptive` is latentgen's default (threads sized to the free cores, see
`latentgen.runtime.threads`), `fixed` is PyTorch's default team of one thread per core, `one` a single thread,
`passive` the fixed team with OpenMP's passive wait policy. Every row is measured idle and beside `--busy`
processes that spin on a core each; the ratio busy/idle is what a user with a browser open sees. Target (#43):
adaptive ≤ 2×.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from common import ROOT, best_time

MODES = {"adaptive": {}, "fixed": {"LATENTGEN_FIXED_THREADS": "1"}, "one": {"OMP_NUM_THREADS": "1"},
         "passive": {"LATENTGEN_FIXED_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}}


def child(steps: int, repeat: int) -> None:
    import torch

    from latentgen.cli import quiet_libraries
    from latentgen.generation.models import DEFAULT_MODEL, open_pipeline

    quiet_libraries()
    pipe = open_pipeline(DEFAULT_MODEL)
    seconds = best_time(lambda: pipe("a red circle on a blue background", num_inference_steps=steps, seed=0),
                        repeat=repeat)
    print(json.dumps({"seconds": seconds, "threads": torch.get_num_threads()}))


def spin() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def measure(mode: str, steps: int, repeat: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **MODES[mode]}
    r = subprocess.run([sys.executable, __file__, "--child", "--steps", str(steps), "--repeat", str(repeat)],
                       capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--busy", type=int, default=1, help="spinning processes beside the measured one")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.steps, args.repeat)
    print(f"default model, one image, {args.steps} steps, best of {args.repeat}; {os.cpu_count()} cores, "
          f"{args.busy} busy beside it")
    print(f"{'threads':<10}{'idle s':>9}{'busy s':>9}{'busy/idle':>11}  threads used idle/busy")
    for mode in MODES:
        idle = measure(mode, args.steps, args.repeat)
        spinners = [spin() for _ in range(args.busy)]
        try:
            time.sleep(0.5)
            busy = measure(mode, args.steps, args.repeat)
        finally:
            for s in spinners:
                s.kill()
        print(f"{mode:<10}{idle['seconds']:>9.3f}{busy['seconds']:>9.3f}{busy['seconds'] / idle['seconds']:>10.2f}x"
              f"  {idle['threads']}/{busy['threads']}")


if __name__ == "__main__":
    main()
