"""Serve a model over HTTP: AUTOMATIC1111's API (for `webuiapi` and the tools built on it) and a web page.

    python -m latentgen.serve                                   # the shipped model, http://127.0.0.1:7860/
    python -m latentgen.serve --model models/sd15.safetensors --listen --api-auth me:secret
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from latentgen.cli import ArgumentParser, quiet_libraries, run_cli
from latentgen.errors import UserError


def parse_args(argv):
    p = ArgumentParser(prog="python -m latentgen.serve", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="the model loaded first: a pipeline folder, a checkpoint file, or a name in "
                                   "--models-dir (default: the shipped model)")
    p.add_argument("--models-dir", default="models", help="models offered by name (default: models)")
    p.add_argument("--loras-dir", default="loras", help="LoRAs for <lora:NAME:SCALE> (default: loras)")
    p.add_argument("--controlnets-dir", default="controlnets",
                   help="ControlNets a request may name (A1111's ControlNet API; default: controlnets)")
    p.add_argument("--embeddings-dir", default="embeddings", help="textual-inversion embeddings (default: embeddings)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--listen", action="store_true", help="listen on every interface (default: 127.0.0.1 only)")
    p.add_argument("--api-auth", metavar="USER:PASS[,USER:PASS...]",
                   help="require HTTP basic credentials on every route (as A1111's --api-auth)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--compile", action="store_true",
                   help="compile each model's U-Net as it loads (infer.py --compile: on the CPU once per model and "
                   "shape, cached on disk, so a request of a new size or batch waits for its compile once)")
    p.add_argument("--components", metavar="FOLDER",
                   help="for SD3/SD3.5 and Flux single files among the models: a diffusers folder of that family "
                        "giving what a file lacks (infer.py's)")
    p.add_argument("--vae-tiling", action="store_true", help="decode large images tile by tile (infer.py's)")
    p.add_argument("--attention-slicing", action="store_true", help="attention a head at a time (infer.py's)")
    p.add_argument("--offload", choices=["model", "sequential"],
                   help="models in main memory, moved to the GPU whole (model) or layer by layer (sequential) to "
                        "run (infer.py's)")
    p.add_argument("--max-batch", type=int, default=8, help="images of queued requests sampled together")
    p.add_argument("--max-side", type=int, help="largest image side a request may ask for (default: 4× the model's "
                                                "own size: 256 for the shipped 64 px model, 2048 for SD 1.x)")
    p.add_argument("--max-steps", type=int, default=150, help="most sampling steps a request may ask for")
    p.add_argument("--max-images", type=int, default=16, help="most images per request (batch_size × n_iter)")
    p.add_argument("--max-queue", type=int, default=64, help="most requests waiting (more: 503 with Retry-After)")
    p.add_argument("--max-prompt-tokens", type=int, default=1000, help="longest prompt, in the model's tokens")
    p.add_argument("--max-job-seconds", type=int, default=600, help="a running job is stopped with an error after "
                                                                   "this long")
    p.add_argument("--allowed-hosts", metavar="HOST[,HOST...]",
                   help="Host header names the server answers to (default: localhost, 127.0.0.1 and [::1] when "
                        "bound to loopback, which stops DNS rebinding; any with --listen); '*' for any")
    p.add_argument("--cors-allow-origins", metavar="ORIGIN[,ORIGIN...]",
                   help="web origins whose pages may call the API from a browser (default: none)")
    args = p.parse_args(argv)
    for name in ("max_batch", "max_side", "max_steps", "max_images", "max_queue", "max_prompt_tokens",
                 "max_job_seconds"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(args, name)}")
    if not 0 < args.port < 65536:
        p.error(f"--port must be in [1, 65535], got {args.port}")
    if args.compile and args.offload:
        p.error("--compile and --offload do not go together; choose one")
    return args


def parse_auth(value: str | None) -> list[tuple[str, str]]:
    """A1111's --api-auth: 'user:pass', several separated by commas."""
    if not value:
        return []
    pairs = []
    for item in value.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise UserError(f"--api-auth takes USER:PASS (several separated by commas), got {item.strip()!r}")
        pairs.append((user, password))
    return pairs


LOOPBACK_NAMES = ["localhost", "127.0.0.1", "[::1]"]


def allowed_hosts(args) -> list[str]:
    """The Host names answered: those given, else a loopback server's own names, else any (`--listen`)."""
    if args.allowed_hosts:
        return _names(args.allowed_hosts)
    return ["*"] if args.listen else LOOPBACK_NAMES


def _names(value: str | None) -> list[str]:
    return [name.strip() for name in (value or "").split(",") if name.strip()]


def build(args):
    """The app and its worker for parsed arguments (tests build servers with this too)."""
    from latentgen.formats import flow_file
    from latentgen.generation.models import open_pipeline, resolve_model
    from latentgen.generation.outputs import run_about
    from latentgen.runtime.device import resolve_device
    from latentgen.server.app import Settings, create_app
    from latentgen.server.worker import Limits, Models, Worker

    device = resolve_device(args.device)
    model = resolve_model(args.model, args.models_dir)

    def load(path: Path):
        pipe = open_pipeline(path, dtype=args.dtype, device=device, loras_dir=args.loras_dir,
                             embeddings_dir=args.embeddings_dir, confined=True,
                             controlnets_dir=args.controlnets_dir, vae_tiling=args.vae_tiling,
                             attention_slicing=args.attention_slicing, offload=args.offload,
                             components=args.components if flow_file.kind_of_file(path) else None)
        if args.compile:  # the worker samples on one thread, as CUDA graphs (the default on CUDA) want
            pipe.compile_unet(report=lambda message: print(f"latentgen: {message}", file=sys.stderr))
        return pipe

    models = Models(load, model, Path(args.models_dir))
    models.get(models.default)  # load the first model before serving: its mistakes stop the server at once

    def about(pipe, name, plan):
        return run_about(pipe, models.paths[name], plan, hash=models.hash(name))

    limits = Limits(max_side=args.max_side, max_steps=args.max_steps, max_images=args.max_images,
                    max_queue=args.max_queue, max_prompt_tokens=args.max_prompt_tokens,
                    max_job_s=args.max_job_seconds)
    worker = Worker(models, limits, max_batch=args.max_batch, about=about)
    settings = Settings(auth=parse_auth(args.api_auth), loras_dir=Path(args.loras_dir),
                        controlnets_dir=Path(args.controlnets_dir),
                        allowed_hosts=allowed_hosts(args), cors_origins=_names(args.cors_allow_origins))
    return create_app(worker, settings), worker


def main(argv=None):
    import uvicorn

    args = parse_args(argv)
    parse_auth(args.api_auth)  # before loading anything
    quiet_libraries()
    app, worker = build(args)
    host = "0.0.0.0" if args.listen else "127.0.0.1"
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=args.port, log_level="warning"))
    http = threading.Thread(target=server.run, name="http", daemon=True)
    http.start()  # HTTP in a thread, the worker on the main thread (see Worker.start)
    while not server.started and http.is_alive():
        time.sleep(0.05)
    if not http.is_alive():
        raise UserError(f"cannot listen on {host}:{args.port} (in use, or not allowed)")
    print(f"latentgen: serving {worker.models.default} on http://{host}:{args.port}/", file=sys.stderr)
    threading.Thread(target=_stop_with, args=(http, worker), daemon=True).start()
    try:
        worker.run()
    finally:
        server.should_exit = True
        http.join(timeout=10)


def _stop_with(http: threading.Thread, worker) -> None:
    """The worker stops when the HTTP server does."""
    http.join()
    worker.close()


if __name__ == "__main__":
    sys.exit(run_cli(main))
