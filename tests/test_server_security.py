"""The server tried as an attacker would, on loopback: names that reach outside their folders, routes without
credentials, bodies that crash handlers, requests that hold the server, and a browser page of another site."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import threading
import time

import pytest
import requests
from PIL import Image
from test_server import finished, save_lora, worker_held

from conftest import Server


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_folder):
    """A served tiny model whose LoRA folder has one LoRA, beside a folder of files a client must never reach:
    a LoRA of the same model, a file that is not a LoRA, and a symlink in the LoRA folder that points there."""
    root = tmp_path_factory.mktemp("attack")
    loras, outside = root / "loras", root / "outside"
    loras.mkdir()
    outside.mkdir()
    save_lora(tiny_folder, loras / "inside.safetensors")
    save_lora(tiny_folder, outside / "secret.safetensors")
    (outside / "notes.txt").write_text("not a LoRA")
    (loras / "link.safetensors").symlink_to(outside / "secret.safetensors")
    server = Server(["--model", str(tiny_folder), "--loras-dir", str(loras), "--models-dir", str(root / "models"),
                     "--dtype", "fp32"])
    server.root = root
    yield server
    server.close()


def small_body(**fields) -> dict:
    return {"prompt": "x", "steps": 2, "width": 32, "height": 32, **fields}


def test_lora_names_resolve_only_inside_the_lora_folder(served):
    """Every spelling of a file outside --loras-dir (absolute, `..`, a symlink out, a file that is not a LoRA, one
    that does not exist) gets the same one-line answer from the API and the page's route, and nothing is applied."""
    outside = served.root / "outside"
    names = [str(outside / "secret.safetensors"), str(outside / "secret"), "../outside/secret",
             "../outside/secret.safetensors", "link", str(outside / "notes.txt"), "/etc/passwd", "/etc/doesnotexist",
             "../../../../etc/passwd", "missing"]
    answers = set()
    for name in names:
        r = served.post("/sdapi/v1/txt2img", small_body(prompt=f"x <lora:{name}:1>"))
        assert r.status_code == 400, (name, r.text)
        answers.add(r.json()["detail"].replace(repr(name), "NAME"))
        job = served.post("/latentgen/v1/jobs", small_body(prompt=f"x <lora:{name}:1>")).json()
        status = finished(served, job)
        assert status["state"] == "failed" and status["error"].replace(repr(name), "NAME") in answers, status
    assert answers == {"LoRA NAME is not one of this server's LoRAs (it has: inside)"}
    ok = served.post("/sdapi/v1/txt2img", small_body(prompt="x <lora:inside:1>"))
    assert ok.status_code == 200 and "Lora hashes: \"inside: " in json.loads(ok.json()["info"])["infotexts"][0]


def test_model_names_resolve_only_among_the_servers_models(served, tiny_folder):
    """A model is one of the server's by name (an A1111 title or file name matches by its stem, never by reading the
    path): another folder of models is not reachable."""
    for name in (str(tiny_folder.parent), "../" + tiny_folder.parent.name, "/etc/passwd"):
        r = served.post("/sdapi/v1/txt2img", small_body(override_settings={"sd_model_checkpoint": name}))
        assert r.status_code == 400 and r.json()["detail"].startswith(f"model {name!r} is not one of this server's")
        r = served.post("/sdapi/v1/options", {"sd_model_checkpoint": name})
        assert r.status_code == 400


def test_a_cli_lora_path_still_works(tiny_folder, tmp_path):
    """On the user's own machine (infer.py, the Python API) a LoRA may be any path."""
    from latentgen import LatentPipeline

    save_lora(tiny_folder, tmp_path / "mine.safetensors")
    pipe = LatentPipeline.from_pretrained(tiny_folder, torch_dtype="fp32")
    plan = pipe.check_request(f"x <lora:{tmp_path / 'mine.safetensors'}:0.5>", num_inference_steps=2)
    assert plan.loras == [(tmp_path / "mine.safetensors", 0.5)]


def test_every_route_needs_the_credentials_documentation_included(tiny_folder):
    server = Server(["--model", str(tiny_folder), "--api-auth", "alice:s3cret", "--dtype", "fp32"])
    try:
        for route in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect", "/", "/sdapi/v1/options",
                      "/no/such/route"):
            r = server.get(route)
            assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Basic", route
            assert r.json()["detail"] == "missing or wrong credentials (HTTP basic auth)"
        for auth in (("alice", "wrong"), ("alice", ""), ("", "s3cret")):
            assert server.get("/openapi.json", auth=auth).status_code == 401
        r = server.get("/sdapi/v1/options", headers={"Authorization": "Basic !!notbase64"})
        assert r.status_code == 401
        for route in ("/docs", "/redoc", "/openapi.json"):
            assert server.get(route, auth=("alice", "s3cret")).status_code == 200, route
    finally:
        server.close()


def test_bodies_that_are_not_json_get_a_one_line_422(served):
    for kwargs in ({"data": {"prompt": "x"}}, {"data": "prompt=x", "headers": {"Content-Type": "text/plain"}},
                   {"data": b"\xff\xfe\x00", "headers": {"Content-Type": "application/json"}}, {"data": b""}):
        r = requests.post(f"{served.url}/sdapi/v1/txt2img", timeout=30, **kwargs)
        assert r.status_code in (400, 422), (kwargs, r.text)  # 400: FastAPI's own "error parsing the body"
        assert "\n" not in json.dumps(r.json()), r.json()


def bomb(width: int = 30000, height: int = 30000) -> str:
    """A small PNG that claims width × height pixels (one row of data, the rest never decoded)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    data = zlib.compress(b"\0" * (width + 1) * 64)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    return base64.b64encode(png).decode()


def png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("side", [30000, 10000, 300])  # over PIL's own bomb limit, under it, just over ours
def test_images_are_decoded_within_a_pixel_budget(served, side):
    """A decompression bomb (30000×30000 claimed by a small file) is a 400 before decoding, on every route that
    takes an image; the budget follows the largest side the server allows (4× the model's 32 px, twice over)."""
    data = bomb(side, side)
    assert len(data) < 200_000
    cases = [("/sdapi/v1/img2img", small_body(init_images=[data]), "init_images[0]"),
             ("/sdapi/v1/img2img", small_body(init_images=[png(Image.new("RGB", (32, 32)))], mask=data), "mask"),
             ("/sdapi/v1/extra-single-image", {"image": data}, "image"),
             ("/sdapi/v1/png-info", {"image": data}, "image")]
    for route, body, what in cases:
        r = served.post(route, body)
        size = f"{side}×{side}" if side < 20000 else "over 178956970"  # PIL refuses to open that one at all
        assert r.status_code == 400 and r.json()["detail"] == f"{what} is {size} pixels; this server decodes " \
                                                               f"images of at most {256 ** 2} pixels", (route, r.text)
    r = served.post("/sdapi/v1/png-info", {"image": png(Image.new("RGB", (256, 256)))})
    assert r.status_code == 200


def test_image_errors_say_what_is_wrong_in_words(served):
    not_image = base64.b64encode(b"hello, this is text").decode()
    truncated = png(Image.new("RGB", (64, 64), "red"))[:201]
    noise = Image.effect_noise((64, 64), 50).convert("RGB")
    for data, message in ((not_image, "init_images[0] is not an image in a format PIL reads (PNG, JPEG, WebP, ...)"),
                          (truncated, "init_images[0] is not base64"),
                          (base64.b64encode(base64.b64decode(png(noise))[:300]).decode(),
                           "init_images[0] is a damaged image")):
        r = served.post("/sdapi/v1/img2img", small_body(init_images=[data]))
        assert r.status_code == 400 and r.json()["detail"].startswith(message), r.text
        assert "0x" not in r.json()["detail"]


def test_limits_follow_the_model(served):
    """--max-side defaults to 4× the model's own size (32 px here); prompts have a length limit in tokens, with a
    cheap bound in characters before the tokenizer sees megabytes."""
    r = served.post("/sdapi/v1/txt2img", small_body(width=256))
    assert r.status_code == 400 and r.json()["detail"] == "width 256 is over this server's limit of 128 pixels"
    r = served.post("/sdapi/v1/txt2img", small_body(width=64, enable_hr=True, hr_scale=4))
    assert r.status_code == 400 and r.json()["detail"] == "width 64 × 4 is over this server's limit of 128 pixels"
    started = time.monotonic()
    r = served.post("/sdapi/v1/txt2img", small_body(prompt="a" * 1_000_000))
    assert r.status_code == 400 and "a prompt of 1000000 characters is over this server's limit of 1000 tokens" \
        in r.json()["detail"]
    assert time.monotonic() - started < 5
    r = served.post("/sdapi/v1/txt2img", small_body(prompt="red " * 1200))
    assert r.status_code == 400 and r.json()["detail"] == "a prompt of 1200 tokens is over this server's limit of 1000"
    r = served.post("/sdapi/v1/txt2img", small_body(negative_prompt="red " * 1200))
    assert r.status_code == 400


def test_a_full_queue_answers_503_with_retry_after(tiny_folder):
    server = Server(["--model", str(tiny_folder), "--dtype", "fp32", "--max-queue", "1"])
    try:
        with worker_held(server):
            assert server.post("/latentgen/v1/jobs", small_body()).status_code == 200
            r = server.post("/sdapi/v1/txt2img", small_body())
            assert r.status_code == 503 and r.headers["Retry-After"] == "5"
            assert r.json()["detail"] == "the queue is full (1 jobs waiting); try again later"
    finally:
        server.close()


def test_a_job_over_the_time_limit_is_stopped_with_an_error(tiny_folder):
    server = Server(["--model", str(tiny_folder), "--dtype", "fp32", "--max-job-seconds", "1"])
    slow = server.worker.models.pipe.unet.register_forward_pre_hook(lambda *_: time.sleep(0.2))
    try:
        r = server.post("/sdapi/v1/txt2img", small_body(steps=30))
        assert r.status_code == 400 and "this server's limit is 1 s per job" in r.json()["detail"], r.text
        slow.remove()
        assert server.post("/sdapi/v1/txt2img", small_body()).status_code == 200  # the worker goes on
    finally:
        slow.remove()
        server.close()


class Records(logging.Handler):
    """What the latentgen logger says meanwhile (it may not propagate to pytest's caplog: see cli.quiet_libraries)."""

    def __enter__(self):
        self.records = []
        logging.getLogger("latentgen").addHandler(self)
        return self.records

    def __exit__(self, *_):
        logging.getLogger("latentgen").removeHandler(self)

    def emit(self, record):
        self.records.append(record)


def test_user_errors_log_one_line_and_server_faults_a_traceback(served, monkeypatch):
    with Records() as records:
        served.post("/sdapi/v1/txt2img", small_body(prompt="x <lora:missing:1>"))
    assert len(records) == 1 and records[0].exc_info is None and "\n" not in records[0].getMessage()
    assert "is not one of this server's LoRAs" in records[0].getMessage()
    pipe = served.worker.models.pipe
    monkeypatch.setattr(type(pipe), "generate", lambda *a, **k: 1 / 0)
    with Records() as records:
        r = served.post("/sdapi/v1/txt2img", small_body())
    assert r.status_code == 400 and r.json()["detail"] == "generation failed: ZeroDivisionError: division by zero"
    assert any(record.exc_info for record in records)


@pytest.mark.parametrize("seed", ["seed", "subseed"])
def test_negative_seeds_other_than_minus_one_are_refused(served, seed):
    r = served.post("/sdapi/v1/txt2img", small_body(**{seed: -2, "subseed_strength": 0.5}))
    assert r.status_code == 400 and r.json()["detail"] == f"{seed} must be -1 (a random seed) or an integer ≥ 0, got -2"


def test_a_loopback_server_answers_only_to_its_own_names(served):
    """DNS rebinding: a page of evil.example whose name now points at 127.0.0.1 sends Host: evil.example."""
    for host in ("evil.example", "evil.example:7860", "127.0.0.1.evil.example"):
        r = requests.get(f"{served.url}/sdapi/v1/options", headers={"Host": host}, timeout=30)
        assert r.status_code == 400 and "is not one this server answers to" in r.json()["detail"], host
    for host in (f"127.0.0.1:{served.port}", f"localhost:{served.port}", "localhost", f"[::1]:{served.port}"):
        assert requests.get(f"{served.url}/sdapi/v1/options", headers={"Host": host}, timeout=30).ok, host


def test_cors_only_for_the_origins_given(served, tiny_folder):
    headers = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
    r = requests.options(f"{served.url}/sdapi/v1/txt2img", headers=headers, timeout=30)
    assert "access-control-allow-origin" not in r.headers
    server = Server(["--model", str(tiny_folder), "--dtype", "fp32", "--api-auth", "a:b",
                     "--cors-allow-origins", "http://tools.example", "--allowed-hosts", "*"])
    try:
        r = requests.options(f"{server.url}/sdapi/v1/txt2img", timeout=30, headers={
            "Origin": "http://tools.example", "Access-Control-Request-Method": "POST"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://tools.example"
        r = requests.options(f"{server.url}/sdapi/v1/txt2img", headers=headers, timeout=30)
        assert r.headers.get("access-control-allow-origin") != "http://evil.example"
        assert requests.get(f"{server.url}/sdapi/v1/options", headers={"Host": "any.example"}, auth=("a", "b"),
                            timeout=30).ok
    finally:
        server.close()


def test_an_interrupted_jobs_images_carry_their_infotexts(served):
    pipe = served.worker.models.pipe
    slow = pipe.unet.register_forward_pre_hook(lambda *_: time.sleep(0.05))
    try:
        answer = {}
        t = threading.Thread(target=lambda: answer.update(r=served.post("/sdapi/v1/txt2img", small_body(
            prompt="slow", steps=50, seed=3))))
        t.start()
        deadline = time.monotonic() + 60
        while served.get("/sdapi/v1/progress").json()["state"]["sampling_step"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        served.post("/sdapi/v1/interrupt", {})
        t.join(timeout=60)
    finally:
        slow.remove()
    info = json.loads(answer["r"].json()["info"])
    assert len(info["infotexts"]) == 1 and info["infotexts"][0].startswith("slow\nSteps: 50")
    assert "Seed: 3" in info["infotexts"][0]


def test_infer_refuses_an_output_it_cannot_write_before_any_work(tmp_path):
    from conftest import infer

    blocker = tmp_path / "file"
    blocker.write_text("")
    for out, message in (("/sys/x.png", "cannot write to /sys"), (str(blocker / "sub"), "is a file, not a folder")):
        started = time.monotonic()
        r = infer("--prompt", "x", "--model", "/nowhere/at/all", "--out", out)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert time.monotonic() - started < 5
    assert os.listdir(tmp_path) == ["file"]


# ----------------------------------------------------------------------------------------------------------------
# A fuzzer over the server's own OpenAPI schema: whatever a client sends that the schema allows (and what it does
# not: schemathesis also sends bodies of the wrong types), no 5xx but the full queue's 503, and no traceback.

import schemathesis  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402


@pytest.fixture(scope="module")
def fuzzed(tiny_folder, tmp_path_factory):
    loras = tmp_path_factory.mktemp("fuzz-loras")
    save_lora(tiny_folder, loras / "inside.safetensors")
    server = Server(["--model", str(tiny_folder), "--dtype", "fp32", "--loras-dir", str(loras), "--max-steps", "3",
                     "--max-images", "2", "--max-side", "64", "--max-prompt-tokens", "60", "--max-job-seconds", "20"])
    yield server
    server.close()


def _schema():
    """The served schema, as the app describes itself (no model is needed for that)."""
    from latentgen.server.app import create_app

    schema = schemathesis.openapi.from_dict(create_app(None).openapi())
    schema.config.generation.update(modes=["positive", "negative"], deterministic=True)  # and bodies it forbids
    return schema


@_schema().parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzzed_requests_never_get_a_server_error(case, fuzzed):
    response = case.call(base_url=fuzzed.url, timeout=120)
    body = response.text
    assert response.status_code < 500 or (response.status_code == 503 and "Retry-After" in response.headers), (
        case.method, case.path, response.status_code, body[:500])
    assert "Traceback" not in body and 'File "' not in body, body[:500]


def test_infer_warns_of_metadata_over_a_size(tiny_folder, tmp_path):
    from conftest import infer

    r = infer("--prompt", "red " * 20000, "--model", tiny_folder, "--steps", "1", "--height", "32", "--width", "32",
              "--out", tmp_path / "long.png", "--dtype", "fp32")
    assert r.returncode == 0, r.stderr
    assert "warning: long.png carries 157 KB of metadata" in r.stderr
    r = infer("--prompt", "red", "--model", tiny_folder, "--steps", "1", "--height", "32", "--width", "32",
              "--out", tmp_path / "short.png", "--dtype", "fp32")
    assert r.returncode == 0 and "metadata" not in r.stderr
