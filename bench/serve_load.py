"""Load test of `python -m latentgen.serve`: N concurrent clients on loopback for a bounded time, against the same
images made one at a time by the pipeline in-process (the reference, measured first in the same run).

    python bench/serve_load.py [--clients 8] [--seconds 60] [--steps 20] [--max-batch 8] [--busy 0]

Each client sends A1111 txt2img requests (one image, its own prompt and seed, the default model at its default
size) back to back until the time is up; requests still in flight then are waited for. Prints throughput, p50/p95
latency, the batches the server formed, and whether every request got its image. `--busy N` runs N processes that
spin on a core each beside the server and the reference (a laptop with a browser open).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time

from common import ROOT

PROMPTS = ["a red circle on a blue background", "a green square on a white background",
           "a yellow triangle on a black background", "a blue circle on a red background",
           "a white square on a green background", "a black triangle on a yellow background"]


def reference(steps: int, count: int) -> float:
    """Images per second of the pipeline itself, one image per call, as many calls as `count`."""
    from latentgen.cli import quiet_libraries
    from latentgen.generation.models import DEFAULT_MODEL, open_pipeline

    quiet_libraries()
    pipe = open_pipeline(DEFAULT_MODEL)
    pipe(PROMPTS[0], num_inference_steps=steps, seed=0)  # warm-up
    start = time.perf_counter()
    for k in range(count):
        pipe(PROMPTS[k % len(PROMPTS)], num_inference_steps=steps, seed=k)
    return count / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--port", type=int, default=7870)
    p.add_argument("--busy", type=int, default=0, help="processes spinning on a core each beside the server")
    args = p.parse_args()
    import requests

    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        run(args, requests)
    finally:
        for s in spinners:
            s.kill()


def run(args, requests) -> None:
    direct = reference(args.steps, 12)
    server = subprocess.Popen([sys.executable, "-m", "latentgen.serve", "--port", str(args.port), "--max-batch",
                               str(args.max_batch), "--max-queue", str(4 * args.clients)], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{args.port}"
    try:
        for _ in range(600):
            try:
                requests.get(f"{url}/sdapi/v1/sd-models", timeout=1)
                break
            except requests.ConnectionError:
                time.sleep(0.1)
        requests.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "warm up", "steps": args.steps}, timeout=600)
        results: list[tuple[float, int, int]] = []  # (latency s, status, images)
        lock = threading.Lock()
        end = time.perf_counter() + args.seconds

        def client(k: int) -> None:
            n = 0
            while time.perf_counter() < end:
                body = {"prompt": PROMPTS[(k + n) % len(PROMPTS)], "seed": 1000 * k + n, "steps": args.steps}
                start = time.perf_counter()
                try:
                    r = requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=600)
                    outcome = (time.perf_counter() - start, r.status_code,
                               len(r.json().get("images", [])) if r.status_code == 200 else 0)
                except requests.RequestException:
                    outcome = (time.perf_counter() - start, 0, 0)
                with lock:
                    results.append(outcome)
                n += 1

        started = time.perf_counter()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - started
        stats = requests.get(f"{url}/latentgen/v1/stats", timeout=30).json()
    finally:
        server.terminate()
        server.wait(timeout=30)

    latencies = sorted(r[0] for r in results)
    answered = sum(1 for _, status, images in results if status == 200 and images == 1)
    quantile = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
    served = answered / wall
    print(f"{args.clients} clients, {args.seconds:g} s, {args.steps} steps, default model, max batch {args.max_batch}, "
          f"{args.busy} busy processes beside")
    print(f"requests: {len(results)}, answered with their image: {answered}, lost or failed: {len(results) - answered}")
    print(f"throughput: {served:.2f} images/s served vs {direct:.2f} images/s in-process one at a time "
          f"(ratio {served / direct:.2f})")
    print(f"batches formed by the server: {stats['batches']}, {stats['mean_batch']:.2f} requests per batch on average")
    print(f"latency: p50 {statistics.median(latencies):.2f} s, p95 {quantile[18]:.2f} s, max {latencies[-1]:.2f} s")
    if answered != len(results):
        sys.exit(1)


if __name__ == "__main__":
    main()
