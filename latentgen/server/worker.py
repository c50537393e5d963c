"""The server's queue: one worker thread per device runs jobs in order, batching queued jobs that share their
settings, with progress, live previews and interrupts per job.

A job is one HTTP request's images. Every accepted job ends in exactly one of: its images (possibly partial, if it
was interrupted while sampling), or a one-line error; the worker never drops one, even when a batch fails.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from latentgen.components.schedulers import scheduler_name_of
from latentgen.errors import UserError, first_line
from latentgen.formats import lora
from latentgen.generation import options
from latentgen.generation.infotext import model_name
from latentgen.generation.models import DEFAULT_MODEL, list_models, resolve_model
from latentgen.generation.request import Request
from latentgen.io import model_hash
from latentgen.validate import random_seed

log = logging.getLogger("latentgen")

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"


class Interrupted(Exception):
    """Raised from a step callback to stop the batch being sampled."""


class TimedOut(Exception):
    """Raised from a step callback when the batch has run longer than `Limits.max_job_s`."""


@dataclass
class Limits:
    """What one request may ask for; more is a 400 with the limit in the message."""

    max_side: int | None = None  # pixels, of the final image (hires included); None: NATIVE_SIDES × the model's size
    max_steps: int = 150  # A1111's largest slider value
    max_images: int = 16  # batch_size × n_iter
    max_queue: int = 64  # jobs waiting; more: 503
    max_prompt_tokens: int = 1000  # per prompt, LoRA tags aside (A1111's chunks of 75: 13)
    max_job_s: float = 600.0  # a running job is stopped with an error after this long

    NATIVE_SIDES = 4  # a server of a 64 px model takes 256 px; of a 512 px one (SD 1.x), 2048

    def side(self, native: int | None) -> int:
        """The largest side a request may ask for of a model whose own size is `native` (None: not known yet)."""
        if self.max_side is not None:
            return self.max_side
        return self.NATIVE_SIDES * native if native else 1024

    def check(self, request: Request, native: int | None = None) -> None:
        """What needs no model (and the size where the model's own size, `native`, is known)."""
        steps = request.sampling_steps
        if steps > self.max_steps:
            raise UserError(f"{steps} sampling steps asked; this server allows at most {self.max_steps}")
        if request.total > self.max_images:
            raise UserError(f"{request.total} images asked (batch_size × n_iter); this server allows at most "
                            f"{self.max_images} per request")
        for text in dict.fromkeys(request.prompt + request.negative_prompt):  # a cheap bound before tokenizing
            if len(text) > self.PROMPT_CHARS_PER_TOKEN * self.max_prompt_tokens:
                raise UserError(f"a prompt of {len(text)} characters is over this server's limit of "
                                f"{self.max_prompt_tokens} tokens")
        limit = self.side(native)
        scale = request.hires.scale if request.hires else request.upscale.scale if request.upscale else 1.0
        for name in ("width", "height"):
            side = getattr(request, name)
            if side is None and native is not None:
                side = native
            if side is not None and side * scale > limit:
                raise UserError(f"{name} {side}{f' × {scale:g}' if scale != 1 else ''} is over this server's "
                                f"limit of {limit} pixels")

    PROMPT_CHARS_PER_TOKEN = 16

    def check_model(self, request: Request, pipe) -> None:
        """What needs the model: the image size against its own size, the prompts in its tokens."""

        self.check(request, pipe.default_size)
        for text in dict.fromkeys(request.prompt + request.negative_prompt):
            tokens = len(pipe.tokenizer(lora.strip_tags(text), truncation=False).input_ids) - 2  # BOS/EOS aside
            if tokens > self.max_prompt_tokens:
                raise UserError(f"a prompt of {tokens} tokens is over this server's limit of "
                                f"{self.max_prompt_tokens}")


@dataclass
class Result:
    """A finished job: its images as (PIL image, metadata) pairs and what it noticed."""

    images: list[tuple[Any, dict]]
    interrupted: bool = False
    model: str = ""


@dataclass(eq=False)
class Job:
    request: Request  # checked, seeds filled in
    model: str  # a name of `Models`
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    created: float = field(default_factory=time.time)
    state: str = QUEUED
    step: int = 0  # sampling steps done (both passes of a hires request)
    started: float | None = None
    error: str | None = None
    future: Future = field(default_factory=Future)
    interrupt: threading.Event = field(default_factory=threading.Event)
    latents: torch.Tensor | None = None  # the latest latents of this job's rows, for previews
    latents_step: int = -1
    notes: list[str] = field(default_factory=list)  # what the request asked that was ignored
    body: Any = None  # the request as the client sent it (its parameters are echoed in the answer)
    answer: dict | None = None  # the HTTP answer, once made

    @property
    def steps(self) -> int:
        return self.request.sampling_steps

    @property
    def progress(self) -> float:
        return 1.0 if self.state == DONE else min(self.step / max(1, self.steps), 1.0)

    def eta(self) -> float | None:
        """Seconds left, from the pace so far (None before the first step)."""
        if self.state != RUNNING or not self.step or self.started is None:
            return None
        return (time.time() - self.started) / self.step * (self.steps - self.step)

    def batch_key(self) -> tuple | None:
        """Jobs with equal keys can run as one batch: same model and settings, only prompts and seeds differ.
        Image-to-image and ControlNet jobs run alone."""
        r = self.request
        if r.image is not None or r.mask_image is not None or r.generator is not None or r.control:
            return None

        fields = {f.name for f, _ in options.table(type(r))} - set(options.per_image_fields(type(r))) - {
            "num_images_per_prompt"}
        values = tuple((name, _hashable(getattr(r, name))) for name in sorted(fields))
        return (self.model, tuple(lora.tags(r.prompt[0])), values)


def _hashable(value):
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


class Models:
    """The models a server offers, by name, and the one loaded (one at a time: a switch frees the last)."""

    def __init__(self, load: Callable[[Path], Any], default: Path, models_dir: Path | None):

        self._load, self.models_dir = load, models_dir
        self.default = model_name(str(default))
        self.paths = {self.default: Path(default)}
        if Path(default).resolve() != DEFAULT_MODEL:
            self.paths.setdefault(model_name(str(DEFAULT_MODEL)), DEFAULT_MODEL)
        self.refresh()
        self.current = self.default
        self.pipe = None
        self.loaded: str | None = None
        self.hashes: dict[str, str] = {}
        self.native: dict[str, int] = {}  # each model's own image size, once it has loaded

    def refresh(self) -> None:

        if self.models_dir is not None:
            for name in list_models(self.models_dir):
                self.paths.setdefault(name, resolve_model(name, self.models_dir))

    def find(self, name: str | None) -> str:
        """A model's name from a name or an A1111 title ('name [hash]', or a file name); a 400 naming the models
        otherwise."""
        if name is None or name == "":
            return self.current
        for candidate in (name, name.split(" [")[0], Path(name.split(" [")[0]).stem):
            if candidate in self.paths:
                return candidate
        raise UserError(f"model {name!r} is not one of this server's: {', '.join(self.paths)}")

    def hash(self, name: str) -> str:

        if name not in self.hashes:
            self.hashes[name] = model_hash(self.paths[name])
        return self.hashes[name]

    def get(self, name: str):
        """The pipeline of model `name`, loading it (and freeing the one before) if it is not the loaded one."""
        if self.pipe is None or self.loaded != name:
            self.pipe = None
            pipe = self._load(self.paths[name])
            self.pipe, self.loaded = pipe, name
            self.native[name] = pipe.default_size
        return self.pipe


class Worker:
    """One thread that runs the queue on one device."""

    def __init__(self, models: Models, limits: Limits | None = None, max_batch: int = 8,
                 about: Callable[[Any, str, Any], dict] | None = None):
        self.models, self.limits, self.max_batch = models, limits or Limits(), max_batch
        self._about = about
        self.options: dict[str, Any] = {}  # A1111 options set through the API (CLIP_stop_at_last_layers)
        self.queue: deque[Job] = deque()
        self.jobs: dict[str, Job] = {}  # every job not yet collected (finished ones are kept for a while)
        self.running: list[Job] = []
        self.batches: list[int] = []  # jobs per batch run, in order (for the load test and the tests)
        self._cond = threading.Condition()
        self._stop = False
        self.thread: threading.Thread | None = None

    def start(self) -> "Worker":
        """Run the queue in a thread of its own (tests, embedding); `python -m latentgen.serve` runs it on the main
        thread instead (`run`), where torch samples faster on a small CPU: `bench/serve_load.py --clients 1` took
        0.51 s per image with the worker in a thread and 0.41 s on the main thread (the default model, 2 cores);
        `python bench/probes.py thread` measures the same without a server."""
        self.thread = threading.Thread(target=self.run, name="latentgen-worker", daemon=True)
        self.thread.start()
        return self

    # ----------------------------------------------------------------------------------------------------------
    # What request handlers call

    def submit(self, request: Request, model: str | None = None) -> Job:
        """Queue a request (checked here, without the model: a UserError is the client's 400)."""
        if request.seed is None and request.generator is None:

            request = dataclasses.replace(request, seed=random_seed())
        request = request.check("api")
        name = self.models.find(model)
        self.limits.check(request, self.models.native.get(name))
        job = Job(request, name)
        with self._cond:
            if len(self.queue) >= self.limits.max_queue:
                raise QueueFull(f"the queue is full ({self.limits.max_queue} jobs waiting); try again later")
            self.queue.append(job)
            self.jobs[job.id] = job
            self._forget_old()
            self._cond.notify()
        return job

    def max_side(self) -> int:
        """The largest side a request for the current model may ask for."""
        return self.limits.side(self.models.native.get(self.models.current))

    def max_pixels(self) -> int:
        """The most pixels of an image a request may send (init images, masks, extras): decoded only within it."""
        return (2 * self.max_side()) ** 2

    def interrupt(self, job_id: str | None = None) -> bool:
        """Stop a job (default: the running ones): a queued job ends with no images, a running one with the images
        as far as they got. Returns whether there was such a job."""
        with self._cond:
            if job_id is None:
                jobs = list(self.running)
            else:
                jobs = [self.jobs[job_id]] if job_id in self.jobs else []
            for job in jobs:
                job.interrupt.set()
                if job in self.queue:
                    self.queue.remove(job)
                    self._finish(job, Result([], interrupted=True, model=job.model))
            return bool(jobs)

    def position(self, job: Job) -> int:
        """How many jobs run or wait before this one (0: it is running)."""
        with self._cond:
            if job.state != QUEUED:
                return 0
            return list(self.queue).index(job) + (1 if self.running else 0) if job in self.queue else 0

    def close(self) -> None:
        """Stop after the running batch; jobs still queued end with an error."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=30)

    # ----------------------------------------------------------------------------------------------------------
    # The worker thread

    def run(self) -> None:
        """Run jobs as they come, in this thread, until `close`."""
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                while not self.queue and not self._stop:
                    self._cond.wait()
                if self._stop:
                    for job in self.queue:
                        self._fail(job, "the server is shutting down")
                    return
                batch = self._take_batch()
                self.running = batch
                for job in batch:
                    job.state, job.started = RUNNING, time.time()
            try:
                self._run_batch(batch)
            except BaseException as err:  # never lose a job: whatever went wrong, each gets an answer
                if not isinstance(err, UserError):  # a server fault: its traceback; a user's mistake: one line
                    log.exception("batch failed")
                message = str(err) if isinstance(err, UserError) else f"generation failed: {first_line(err)}"
                for job in batch:
                    if not job.future.done():
                        self._fail(job, message)
            finally:
                with self._cond:
                    self.running = []

    def _take_batch(self) -> list[Job]:
        """The first queued job and the queued jobs that can share its batch, up to `max_batch` images."""
        first = self.queue.popleft()
        key = first.batch_key()
        batch, images = [first], first.request.total
        if key is not None:
            for job in list(self.queue):
                if job.batch_key() == key and images + job.request.total <= self.max_batch:
                    self.queue.remove(job)
                    batch.append(job)
                    images += job.request.total
        return batch

    def _run_batch(self, batch: list[Job]) -> None:
        name = batch[0].model
        try:
            pipe = self.models.get(name)
        except UserError as err:
            for job in batch:
                self._fail(job, f"cannot load model {name}: {err}")
            return
        plans = []
        for job in batch:  # each job fitted alone first: one job's mistake fails that job only
            try:
                self.limits.check_model(job.request, pipe)
                plans.append((job, job.request.fit(pipe)))
            except UserError as err:
                self._fail(job, str(err))
        if not plans:
            return
        jobs = [job for job, _ in plans]
        self.batches.append(len(jobs))
        plan = plans[0][1] if len(plans) == 1 else _merge([job.request for job in jobs]).fit(pipe)
        rows = list(itertools.accumulate([job.request.total for job in jobs], initial=0))

        def on_step(i):
            for job in jobs:
                job.step += 1
            if any(job.interrupt.is_set() for job in jobs):
                raise Interrupted
            if time.time() - jobs[0].started > self.limits.max_job_s:  # the batch's jobs started together
                raise TimedOut

        def on_latents(i, latents):
            for k, job in enumerate(jobs):
                job.latents, job.latents_step = latents[rows[k]:rows[k + 1]], job.step

        try:
            out = pipe.generate(plan, on_step=on_step, on_latents=on_latents)
        except Interrupted:
            self._interrupted(pipe, jobs, plan, rows, name)
            return
        except TimedOut:
            for job in jobs:
                self._fail(job, f"stopped after {time.time() - job.started:.0f} s: this server's limit is "
                                f"{self.limits.max_job_s:g} s per job (ask for fewer steps, images or pixels)")
            return
        for k, job in enumerate(jobs):
            about = self._about(pipe, name, plan.take(range(rows[k], rows[k + 1]))) if self._about else {}
            images = [(image, meta | about | out.recorded_info())
                      for image, meta in zip(out.images[rows[k]:rows[k + 1]], out.metadata[rows[k]:rows[k + 1]])]
            self._finish(job, Result(images, model=name))

    def _interrupted(self, pipe, jobs: list[Job], plan, rows: list[int], name: str) -> None:
        """The interrupted jobs get their images as far as sampling got, with their settings (as A1111 does); their
        batch mates go back to the head of the queue and start again."""

        with self._cond:
            for job in reversed(jobs):
                if not job.interrupt.is_set():
                    job.state, job.step, job.latents, job.latents_step = QUEUED, 0, None, -1
                    self.queue.appendleft(job)
            self._cond.notify()
        scheduler = plan.request.scheduler or scheduler_name_of(pipe.scheduler)
        for k, job in enumerate(jobs):
            if job.interrupt.is_set():
                images = [] if job.latents is None else pipe.image_processor.postprocess(pipe.decode(job.latents))
                mine = plan.take(range(rows[k], rows[k + 1]))
                about = self._about(pipe, name, mine) if self._about else {}
                self._finish(job, Result([(image, mine.record(i, scheduler) | about) for i, image in enumerate(images)],
                                         interrupted=True, model=job.model))

    # The answer is set before the state turns final: the status route reads the state, then the answer, from
    # another thread, so a job that reads "done" or "failed" has its images or its error.

    def _finish(self, job: Job, result: Result) -> None:
        job.latents = None
        if not job.future.done():
            job.future.set_result(result)
        job.state = DONE

    def _fail(self, job: Job, message: str) -> None:
        log.warning("job %s failed: %s", job.id, message)  # one line: the client has the same
        job.error, job.latents = message, None
        if not job.future.done():
            job.future.set_exception(UserError(message))
        job.state = FAILED

    def _forget_old(self, keep_s: float = 600.0) -> None:
        """Finished jobs stay findable (for their progress and results) for `keep_s` seconds."""
        now = time.time()
        for job_id, job in list(self.jobs.items()):
            if job.future.done() and now - job.created > keep_s:
                del self.jobs[job_id]


class QueueFull(UserError):
    """More jobs waiting than the server takes (a 503)."""


def _merge(requests: list[Request]) -> Request:
    """One request for the images of several checked requests that differ only in prompts and seeds (their
    variation seeds, where they have them, included)."""
    values = [r.per_image_values() for r in requests]
    merged = {name: sum((v[name] or [] for v in values), []) or None for name in values[0]}
    return dataclasses.replace(requests[0], **merged, num_images_per_prompt=1, checked=False)
