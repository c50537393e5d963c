"""The HTTP app: AUTOMATIC1111's `/sdapi/v1/*` routes, latentgen's job routes for the web page, the page itself.

Handlers only translate: every image is made by the `Worker` (one thread per device), so concurrent requests queue
there and share batches. Errors a client can fix are one line: 400 for values (with the limit or the allowed
values), 422 for a body that does not parse (naming the field), 401 without the credentials of `--api-auth`,
503 when the queue is full.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import secrets
import threading
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.middleware.base import BaseHTTPMiddleware

from latentgen._version import __version__
from latentgen.components import control_images
from latentgen.components.schedulers import SCHEDULERS
from latentgen.errors import UserError
from latentgen.formats import controlnet as controlnet_files
from latentgen.formats import lora
from latentgen.formats import upscaler as upscaler_folder
from latentgen.generation import cascade
from latentgen.generation.infotext import parse_a1111_parameters
from latentgen.server import a1111
from latentgen.server.worker import QueueFull, Worker

RETRY_AFTER_S = 5  # what a 503 for a full queue tells the client to wait


@dataclass
class Settings:
    """What `python -m latentgen.serve` was started with."""

    auth: list[tuple[str, str]] = field(default_factory=list)  # (user, password) pairs; empty: no auth
    allowed_hosts: list[str] = field(default_factory=list)  # Host header names answered; empty or "*": any
    cors_origins: list[str] = field(default_factory=list)  # origins a browser may call from; empty: none (no CORS)
    loras_dir: Path = Path("loras")
    controlnets_dir: Path = Path("controlnets")
    clip_skip: int = 1  # A1111's CLIP_stop_at_last_layers option (1: the last layer)


def create_app(worker: Worker, settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(title="latentgen", version=__version__)
    app.state.worker = worker
    previews = _Previews()
    _guard(app, settings)

    @app.exception_handler(UserError)
    async def user_error(request: Request, err: UserError):
        full = isinstance(err, QueueFull)
        return JSONResponse({"detail": str(err), "error": type(err).__name__}, status_code=503 if full else 400,
                            headers={"Retry-After": str(RETRY_AFTER_S)} if full else None)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, err: RequestValidationError):
        errors = _jsonable(err.errors())
        first = errors[0] if errors else {}
        where = ".".join(str(part) for part in first.get("loc", ())[1:]) or "body"
        return JSONResponse({"detail": errors, "error": f"{where}: {first.get('msg', 'invalid')}"}, status_code=422)

    # ------------------------------------------------------------------------------------------------------------
    # Generation

    def submit(body: a1111.Txt2Img) -> tuple[Any, list[str]]:
        request, model, notes = a1111.to_request(body, worker.options.get("CLIP_stop_at_last_layers"),
                                                 worker.max_pixels())
        return worker.submit(request, model), notes

    async def run(body: a1111.Txt2Img) -> dict:
        job, notes = submit(body)
        result = await asyncio.wrap_future(job.future)
        return _answer(worker, body, job, result, notes)

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(body: a1111.Txt2Img):
        return await run(body)

    @app.post("/sdapi/v1/img2img")
    async def img2img(body: a1111.Img2Img):
        return await run(body)

    @app.post("/sdapi/v1/extra-single-image")
    def extra_single_image(body: a1111.ExtraSingleImage):
        image, notes = a1111.extras_upscale(body, worker.max_side(), worker.max_pixels())
        return {"html_info": "".join(f"<p>{note}</p>" for note in notes), "image": a1111.encode_png(image, None)}

    @app.post("/sdapi/v1/png-info")
    def png_info(body: dict[str, str]):

        image = a1111.decode_image(body.get("image", ""), "image", worker.max_pixels())
        text = image.info.get("parameters")
        items = {k: v for k, v in image.info.items() if isinstance(v, str) and k != "parameters"}
        if not text:
            return {"info": "", "items": items, "parameters": {}}
        prompt, negative, fields = parse_a1111_parameters(text)
        return {"info": text, "items": items, "parameters": {"Prompt": prompt, "Negative prompt": negative, **fields}}

    @app.get("/sdapi/v1/progress")
    def progress(skip_current_image: bool = False):
        running = list(worker.running)
        job = running[0] if running else None
        queued = len(worker.queue)
        state = {"skipped": False, "interrupted": bool(job and job.interrupt.is_set()), "stopping_generation": False,
                 "job": f"job {job.id}" if job else "", "job_count": queued + len(running),
                 "job_timestamp": "0", "job_no": 0, "sampling_step": job.step if job else 0,
                 "sampling_steps": job.steps if job else 0}
        image = None if skip_current_image or job is None else previews.get(worker, job)
        return {"progress": job.progress if job else 0.0, "eta_relative": (job.eta() or 0.0) if job else 0.0,
                "state": state, "current_image": image, "textinfo": None, "current_task": job.id if job else None}

    @app.post("/sdapi/v1/interrupt")
    def interrupt():
        worker.interrupt()
        return {}

    @app.post("/sdapi/v1/skip")
    def skip():
        worker.interrupt()
        return {}

    # ------------------------------------------------------------------------------------------------------------
    # Models, samplers, LoRAs, options

    @app.get("/sdapi/v1/options")
    def get_options():
        models = worker.models
        return {"sd_model_checkpoint": _title(models, models.current), "sd_checkpoint_hash": None,
                "CLIP_stop_at_last_layers": worker.options.get("CLIP_stop_at_last_layers", settings.clip_skip),
                "samples_format": "png"}

    @app.post("/sdapi/v1/options")
    def set_options(body: dict[str, Any]):
        notes = []
        for key, value in body.items():
            if key == "sd_model_checkpoint":
                worker.models.current = worker.models.find(str(value))
            elif key == "CLIP_stop_at_last_layers":
                if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 12:
                    raise UserError(f"CLIP_stop_at_last_layers must be an integer in [1, 12], got {value!r}")
                worker.options[key] = value
            else:
                notes.append(f"option {key} is not supported by latentgen and was ignored")
        return {"notes": notes} if notes else None

    @app.get("/sdapi/v1/sd-models")
    def sd_models():
        models = worker.models
        models.refresh()
        return [{"title": _title(models, name), "model_name": name, "hash": models.hashes.get(name),
                 "sha256": None, "filename": str(path), "config": None} for name, path in models.paths.items()]

    @app.post("/sdapi/v1/refresh-checkpoints")
    def refresh_checkpoints():
        worker.models.refresh()
        return {}

    @app.get("/sdapi/v1/samplers")
    def samplers():

        return [{"name": s.a1111, "aliases": [name], "options": {}} for name, s in SCHEDULERS.items()]

    @app.get("/sdapi/v1/schedulers")
    def schedulers():
        return [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1, "need_inner_model":
                 False}, {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0,
                          "need_inner_model": False}]

    @app.get("/sdapi/v1/upscalers")
    def upscalers():
        # the hires fix's image upscaler, and the current model's trained upscaler where it has one; A1111's
        # clients put this list and the latent modes below in their hires menus
        listed = [{"name": "Lanczos", "model_name": None, "model_path": None, "model_url": None, "scale": 4.0}]
        folder = upscaler_folder.folder_of(worker.models.pipe) if worker.models.pipe is not None else None
        if folder is not None:
            listed.append({"name": cascade.A1111_NAME, "model_name": "upscaler", "model_path": str(folder.resolve()),
                           "model_url": None, "scale": float(upscaler_folder.read_config(folder).scale)})
        return listed

    @app.get("/sdapi/v1/latent-upscale-modes")
    def latent_upscale_modes():
        return [{"name": "Latent"}]

    @app.get("/sdapi/v1/loras")
    def loras():

        files = lora.available(settings.loras_dir)
        return [{"name": f.stem, "alias": f.stem, "path": str(f.resolve()), "metadata": _lora_metadata(f)}
                for f in files]

    @app.post("/sdapi/v1/refresh-loras")
    def refresh_loras():
        return {}

    # AUTOMATIC1111's ControlNet extension's routes (what webuiapi's ControlNetInterface calls)

    @app.get("/controlnet/version")
    def controlnet_version():
        return {"version": 2}

    @app.get("/controlnet/model_list")
    def controlnet_models(update: bool = True):
        pipe = worker.models.pipe
        return {"model_list": controlnet_files.names(settings.controlnets_dir,
                                                     controlnet_files.shipped(pipe) if pipe is not None else None)}

    @app.get("/controlnet/module_list")
    def controlnet_modules(alias_names: bool = False):
        return {"module_list": list(control_images.PREPROCESSORS), "module_detail": {
            name: {"model_free": True, "sliders": [
                {"name": t[0], "value": t[1]} for t in (p.threshold_a, p.threshold_b) if t]}
            for name, p in control_images.PREPROCESSORS.items()}}

    @app.post("/controlnet/detect")
    def controlnet_detect(body: a1111.Detect):
        return {"images": a1111.detect(body, worker.max_pixels()), "info": "Success"}

    @app.get("/sdapi/v1/scripts")
    def scripts():
        return {"txt2img": ["controlnet"], "img2img": ["controlnet"]}

    @app.get("/sdapi/v1/embeddings")
    def embeddings():
        pipe = worker.models.pipe
        files = pipe.__dict__.get("embedding_files", {}) if pipe is not None else {}
        return {"loaded": {name: {"sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None, "vectors": None,
                                  "step": None} for name in files}, "skipped": {}}

    # ------------------------------------------------------------------------------------------------------------
    # latentgen's job routes: the page submits, then polls its own job's progress, preview and result

    @app.post("/latentgen/v1/jobs")
    def create_job(body: a1111.Txt2Img):
        job, notes = submit(body)
        job.notes, job.body = notes, body
        return {"id": job.id, "position": worker.position(job)}

    @app.get("/latentgen/v1/jobs/{job_id}")
    def job_status(job_id: str, preview: bool = True):
        job = _job(worker, job_id)
        out = {"id": job.id, "state": job.state, "progress": job.progress, "step": job.step, "steps": job.steps,
               "position": worker.position(job), "eta": job.eta()}
        if job.future.done():
            err = job.future.exception()
            if err is not None:
                out["error"] = str(err)
            else:
                out["result"] = _answer(worker, job.body, job, job.future.result(), job.notes)
        elif preview:
            image = previews.get(worker, job)
            out["preview"] = image and "data:image/png;base64," + image
        return out

    @app.post("/latentgen/v1/jobs/{job_id}/interrupt")
    def interrupt_job(job_id: str):
        _job(worker, job_id)
        worker.interrupt(job_id)
        return {}

    @app.get("/latentgen/v1/stats")
    def stats():
        batches = list(worker.batches)
        return {"batches": len(batches), "jobs": sum(batches), "queued": len(worker.queue),
                "mean_batch": sum(batches) / len(batches) if batches else 0.0}

    @app.get("/", response_class=HTMLResponse)
    def page():
        return resources.files("latentgen.server").joinpath("page.html").read_text(encoding="utf-8")

    return app


def _guard(app: FastAPI, settings: Settings) -> None:
    """What every route is behind, documentation and 404s included, from the outside in: the Host allow-list (a
    loopback server answers only to its own names, so a web page that rebinds its DNS name to 127.0.0.1 cannot
    reach it), CORS only for the origins given, and HTTP basic auth (as A1111's --api-auth)."""

    async def authorized(request: Request, call_next):
        if settings.auth and not _credentials_ok(request.headers.get("authorization", ""), settings.auth):
            return JSONResponse({"detail": "missing or wrong credentials (HTTP basic auth)", "error": "Unauthorized"},
                                status_code=401, headers={"WWW-Authenticate": "Basic"})
        return await call_next(request)

    app.add_middleware(BaseHTTPMiddleware, dispatch=authorized)  # the innermost: a CORS preflight has no credentials
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=True)
    if settings.allowed_hosts and "*" not in settings.allowed_hosts:
        app.add_middleware(_HostAllowList, hosts=settings.allowed_hosts)


def _credentials_ok(header: str, pairs: list[tuple[str, str]]) -> bool:
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, sep, password = base64.b64decode(encoded, validate=True).decode("utf-8").partition(":")
    except (binascii.Error, ValueError):
        return False
    match = False
    for u, p in pairs:  # every pair compared in constant time, whatever matches
        match |= secrets.compare_digest(user.encode(), u.encode()) & secrets.compare_digest(password.encode(),
                                                                                           p.encode())
    return bool(sep) and match


class _HostAllowList:
    """An ASGI middleware: requests whose Host header (port aside) is not in `hosts` get a one-line 400. Starlette's
    TrustedHostMiddleware splits the port at the first colon, which cuts an IPv6 host such as `[::1]:7860`."""

    def __init__(self, app, hosts: list[str]):
        self.app, self.hosts = app, {h.lower() for h in hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1").lower()
            name = host[:host.find("]") + 1] if host.startswith("[") else host.split(":", 1)[0]  # [::1]:7860
            if name not in self.hosts:
                response = JSONResponse({"detail": f"host {host or '(none)'!r} is not one this server answers to "
                                                   "(--allowed-hosts)", "error": "BadHost"}, status_code=400)
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def _answer(worker: Worker, body, job, result, notes) -> dict:
    """The A1111 answer of a finished job, made once (the page polls a finished job until it has seen it)."""
    if job.answer is None:
        models = worker.models
        info = a1111.info(result.images, job.request, str(models.paths[job.model]), models.hash(job.model), notes,
                          result.interrupted)
        job.answer = a1111.answer(body, result.images, info)
    return job.answer


def _job(worker: Worker, job_id: str):
    job = worker.jobs.get(job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id} (finished jobs are kept for 10 minutes)")
    return job


def _title(models, name: str) -> str:
    """A1111's model title: 'name [hash]' once the hash is known."""
    known = models.hashes.get(name)
    return f"{name} [{known}]" if known else name


def _lora_metadata(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # a damaged file lists without metadata; loading it says what is wrong
        return {}


def _jsonable(errors) -> list[dict]:
    """Pydantic's errors as JSON can carry them: the exception objects some hold in `ctx` and the raw body of a
    request that is not JSON (bytes) become text."""
    return json.loads(json.dumps([{k: v for k, v in e.items() if k != "url"} for e in errors],
                                 default=lambda v: v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)))


class _Previews:
    """Live previews, decoded only when someone asks, at most once per job and step: the VAE decodes the job's
    first image as sampling has it so far (A1111's 'Full' preview)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.cache: dict[str, tuple[int, str]] = {}

    def get(self, worker: Worker, job) -> str | None:
        """The preview as base64 PNG (None before the first step)."""
        latents, step = job.latents, job.latents_step
        if latents is None:
            return None
        cached = self.cache.get(job.id)
        if cached and cached[0] == step:
            return cached[1]
        pipe = worker.models.pipe
        with self.lock:
            import torch

            torch.set_num_threads(1)  # this HTTP thread's team only: the worker's sampling keeps the cores
            with torch.no_grad():
                image = pipe.image_processor.postprocess(pipe.decode(latents[:1]))[0]
        encoded = a1111.encode_png(image, None)
        self.cache = {k: v for k, v in self.cache.items() if k in worker.jobs} | {job.id: (step, encoded)}
        return encoded
