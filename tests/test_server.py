"""The server (`python -m latentgen.serve`): AUTOMATIC1111's API driven by the real `webuiapi` client, the queue
(batching, progress, interrupts, limits), auth, and the web page in a real headless Chromium."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import requests
from PIL import Image

from conftest import ROOT, Server, chromium
from latentgen import LatentPipeline


def hold_until(event: threading.Event):
    """A forward pre-hook that blocks until `event` is set; its `reached` is set once a call has begun waiting.
    It must return None: whatever else a pre-hook returns replaces the module's arguments (`Event.wait`'s True
    would become the U-Net's only argument)."""
    reached = threading.Event()

    def hook(*_):
        reached.set()
        event.wait(30)

    hook.reached = reached
    return hook


def poll(fetch, done, what: str, timeout: float = 120.0):
    """fetch() until done(its value) holds, which it returns; after `timeout` seconds an assertion naming `what`
    and the last value (a job that failed must fail the test, not hang the suite)."""
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if done(value):
            return value
        assert time.monotonic() < deadline, f"{what} not seen within {timeout:g} s; last: {value}"
        time.sleep(0.05)


@contextlib.contextmanager
def worker_held(server):
    """The worker busy with one txt2img request, held in its U-Net until the block ends (so what is submitted
    meanwhile queues); yields the list that gets that request's response."""
    hold = threading.Event()
    hook = hold_until(hold)
    release = server.worker.models.pipe.unet.register_forward_pre_hook(hook)
    held = []
    busy = threading.Thread(target=lambda: held.append(server.post("/sdapi/v1/txt2img", {
        "prompt": "busy", "steps": 2, "width": 32, "height": 32})))
    try:
        busy.start()
        assert hook.reached.wait(60)
        yield held
    finally:
        hold.set()
        release.remove()
        busy.join(timeout=60)


def finished(server, job: dict) -> dict:
    """The status of the job `job` (as its submission answered) once it is done or failed."""
    return poll(lambda: requests.get(f"{server.url}/latentgen/v1/jobs/{job['id']}", timeout=30).json(),
                lambda status: status["state"] in ("done", "failed"), f"job {job['id']} finished")


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_folder):
    """A models folder with two tiny models (the second with other weights) and a LoRA folder."""
    import components as C

    root = tmp_path_factory.mktemp("served")
    (root / "models").mkdir()
    (root / "loras").mkdir()
    other = C.components()
    other["unet"] = C.unet(seed=1)
    LatentPipeline(**other).save_pretrained(root / "models" / "other")
    save_lora(tiny_folder, root / "loras" / "circles.safetensors")
    return root


def save_lora(folder, path):
    """A random LoRA of the tiny model, in diffusers' format."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    import components as C

    StableDiffusionPipeline.save_lora_weights(path.parent, weight_name=path.name, unet_lora_layers=(
        convert_state_dict_to_diffusers(C.random_unet_lora(folder))))


@pytest.fixture(scope="module")
def server(models, tiny_folder):
    s = Server(["--model", str(tiny_folder), "--models-dir", str(models / "models"), "--loras-dir",
                str(models / "loras"), "--dtype", "fp32", "--max-side", "256", "--max-steps", "60"])
    yield s
    s.close()


@pytest.fixture(scope="module")
def pipe(tiny_folder):
    p = LatentPipeline.from_pretrained(tiny_folder, torch_dtype="fp32")
    p.set_progress_bar_config(disable=True)
    return p


def api(server, **kwargs):
    import webuiapi

    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port, **kwargs)


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_webuiapi_txt2img_gives_the_pipelines_images_with_infotexts(server, pipe):
    result = api(server).txt2img(prompt="a red circle", negative_prompt="blurry", seed=1234, steps=6, cfg_scale=5.0,
                                 width=32, height=48, batch_size=2, sampler_name="DPM++ 2M", scheduler="Karras")
    assert [im.size for im in result.images] == [(32, 48), (32, 48)]
    info = result.info
    assert info["all_seeds"] == [1234, 1235] and info["sampler_name"] == "DPM++ 2M Karras"
    assert info["sd_model_name"] == "pipe" and len(info["sd_model_hash"]) == 10
    assert info["infotexts"][1].startswith("a red circle\nNegative prompt: blurry\nSteps: 6, Sampler: DPM++ 2M Karras, "
                                           "CFG scale: 5.0, Seed: 1235, Size: 32x48")
    # every image carries its own infotext, as A1111 writes it, and is the pipeline's image for that seed
    for k, image in enumerate(result.images):
        assert image.info["parameters"] == info["infotexts"][k]
        direct = pipe("a red circle", negative_prompt="blurry", seed=1234 + k, num_inference_steps=6,
                      guidance_scale=5.0, width=32, height=48, scheduler="dpm++-karras").images[0]
        np.testing.assert_array_equal(pixels(image), pixels(direct))
    assert "notes" not in info  # webuiapi's defaults for fields latentgen lacks are A1111's defaults: nothing noted


def test_webuiapi_random_seed_is_drawn_once_and_reported(server, pipe):
    """seed -1 (webuiapi's default): the server draws one seed below 2**32, reports it, and the images are the
    pipeline's for it and the next."""
    result = api(server).txt2img(prompt="a red circle", seed=-1, steps=2, width=32, height=32, batch_size=2,
                                 sampler_name="Euler")
    seed = result.info["seed"]
    assert 0 <= seed < 2**32 and result.info["all_seeds"] == [seed, seed + 1]
    assert f"Seed: {seed + 1}, " in result.info["infotexts"][1]
    for k, image in enumerate(result.images):
        direct = pipe("a red circle", seed=seed + k, num_inference_steps=2, guidance_scale=7.0, width=32, height=32,
                      scheduler="euler").images[0]
        np.testing.assert_array_equal(pixels(image), pixels(direct))


def test_webuiapi_variation_seeds_give_the_pipelines_variations(server, pipe):
    result = api(server).txt2img(prompt="a red circle", seed=5, subseed=9, subseed_strength=0.4, steps=3, width=32,
                                 height=32, batch_size=2, sampler_name="Euler")
    info = result.info
    assert info["all_subseeds"] == [9, 10] and info["subseed_strength"] == 0.4 and "notes" not in info
    assert "Seed: 6, Size: 32x32, " in info["infotexts"][1]
    assert ", Variation seed: 10, Variation seed strength: 0.4, " in info["infotexts"][1]
    for k, image in enumerate(result.images):
        direct = pipe("a red circle", seed=5 + k, variation_seed=9 + k, variation_strength=0.4, num_inference_steps=3,
                      guidance_scale=7.0, width=32, height=32, scheduler="euler").images[0]
        np.testing.assert_array_equal(pixels(image), pixels(direct))
    plain = api(server).txt2img(prompt="a red circle", seed=5, subseed=9, steps=3, width=32, height=32,
                                sampler_name="Euler")  # strength 0: the subseed is unused, as in A1111
    assert plain.info["subseed"] == -1 and "Variation" not in plain.info["infotexts"][0]
    assert not np.array_equal(pixels(plain.image), pixels(result.images[0]))
    assert plain.info["seed_resize_from_w"] == plain.info["seed_resize_from_h"] == -1  # webuiapi sends 0: off


def test_webuiapi_seed_resize_gives_the_pipelines_image(server, pipe):
    result = api(server).txt2img(prompt="a red circle", seed=5, seed_resize_from_w=16, seed_resize_from_h=48, steps=3,
                                 width=32, height=32, sampler_name="Euler")
    info = result.info
    assert (info["seed_resize_from_w"], info["seed_resize_from_h"]) == (16, 48) and "notes" not in info
    assert ", Seed resize from: 16x48, " in info["infotexts"][0]
    direct = pipe("a red circle", seed=5, seed_resize_from=(16, 48), num_inference_steps=3, guidance_scale=7.0,
                  width=32, height=32, scheduler="euler").images[0]
    np.testing.assert_array_equal(pixels(result.image), pixels(direct))


def test_webuiapi_tiling_gives_the_pipelines_tiled_image(server, pipe):
    result = api(server).txt2img(prompt="a red circle", seed=3, steps=3, width=32, height=32, sampler_name="Euler",
                                 tiling=True)
    assert ", Tiling: True, " in result.info["infotexts"][0] and "notes" not in result.info
    direct = pipe("a red circle", seed=3, num_inference_steps=3, guidance_scale=7.0, width=32, height=32,
                  scheduler="euler", tiling=True).images[0]
    np.testing.assert_array_equal(pixels(result.image), pixels(direct))


def test_returned_png_reads_in_sd_parsers_and_replays_with_infer(server, tmp_path):
    from sd_parsers import ParserManager

    result = api(server).txt2img(prompt="a blue square", seed=77, steps=4, width=32, height=32,
                                 sampler_name="Euler a")
    raw = base64.b64decode(result.json["images"][0])
    parsed = ParserManager().parse(Image.open(io.BytesIO(raw)))
    assert parsed is not None and parsed.full_prompt == "a blue square"
    path = tmp_path / "served.png"
    path.write_bytes(raw)
    r = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--replay", str(path)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "identical, bit for bit" in r.stdout, r.stdout + r.stderr


def test_webuiapi_img2img_and_inpainting(server, pipe):
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    client = api(server)
    out = client.img2img(images=[init], prompt="a green triangle", seed=5, steps=8, denoising_strength=0.5,
                         width=32, height=32, sampler_name="DDIM", eta=0.0)
    direct = pipe("a green triangle", image=init, strength=0.5, seed=5, num_inference_steps=8, scheduler="ddim",
                  guidance_scale=7.0).images[0]
    np.testing.assert_array_equal(pixels(out.image), pixels(direct))
    assert "Denoising strength: 0.5" in out.info["infotexts"][0]
    assert "notes" not in out.info  # webuiapi's img2img defaults (mask blur 4, ...) are A1111's

    painted = client.img2img(images=[init], mask_image=mask, prompt="a green triangle", seed=5, steps=8,
                             denoising_strength=1.0, width=32, height=32, sampler_name="DDIM", eta=0.0)
    direct = pipe("a green triangle", image=init, mask_image=mask, strength=1.0, seed=5, num_inference_steps=8,
                  scheduler="ddim", guidance_scale=7.0).images[0]
    np.testing.assert_array_equal(pixels(painted.image), pixels(direct))
    # inpainting_mask_invert repaints the other region: the image changes
    inverted = client.img2img(images=[init], mask_image=mask, inpainting_mask_invert=1, prompt="a green triangle",
                              seed=5, steps=8, denoising_strength=1.0, width=32, height=32, sampler_name="DDIM")
    assert not np.array_equal(pixels(inverted.image), pixels(painted.image))


def test_png_info_reads_a1111_parameters(server):
    client = api(server)
    made = client.txt2img(prompt="two shapes", negative_prompt="noise", seed=9, steps=3, width=32, height=32)
    info = client.png_info(made.image)
    assert info.info == made.info["infotexts"][0]
    assert info.json["parameters"]["Prompt"] == "two shapes" and info.json["parameters"]["Seed"] == "9"
    assert info.json["parameters"]["Negative prompt"] == "noise"


def test_models_samplers_options_and_switching(server):
    client = api(server)
    names = client.util_get_model_names()
    assert {"pipe", "other"} <= {n.split(" [")[0] for n in names}
    assert "Euler a" in client.util_get_sampler_names() and "DPM++ 2M Karras" in client.util_get_sampler_names()
    assert [lora["name"] for lora in client.get_loras()] == ["circles"]
    # the hires upscalers a client offers: each one the hires fix does as itself (no note in its info)
    hires = [u["name"] for u in client.get_upscalers()] + [m["name"] for m in client.get_latent_upscale_modes()]
    assert hires == ["Lanczos", "Latent"]
    for name in hires:
        info = client.txt2img(prompt="x", seed=3, steps=2, width=32, height=32, enable_hr=True, hr_scale=1.5,
                              hr_upscaler=name, denoising_strength=0.5).info
        assert f"Hires upscaler: {name}" in info["infotexts"][0] and not info.get("notes"), info
    body = dict(prompt="x", seed=3, steps=3, width=32, height=32, sampler_name="Euler")
    first = client.txt2img(**body)
    client.set_options({"sd_model_checkpoint": "other"})
    try:
        assert client.get_options()["sd_model_checkpoint"].startswith("other")
        switched = client.txt2img(**body)
        assert switched.info["sd_model_name"] == "other"
        assert not np.array_equal(pixels(first.image), pixels(switched.image))
        # a request may name its model in override_settings, as A1111's do
        back = client.txt2img(**body, override_settings={"sd_model_checkpoint": "pipe"})
        np.testing.assert_array_equal(pixels(back.image), pixels(first.image))
    finally:
        client.set_options({"sd_model_checkpoint": "pipe"})
    r = server.post("/sdapi/v1/options", {"sd_model_checkpoint": "nope"})
    assert r.status_code == 400 and "not one of this server's: pipe" in r.json()["detail"]


def test_lora_tags_switch_loras_per_request(server, pipe, models):
    client = api(server)
    body = dict(seed=4, steps=3, width=32, height=32, sampler_name="Euler")
    plain = client.txt2img(prompt="a red circle", **body)
    tagged = client.txt2img(prompt="a red circle <lora:circles:0.7>", **body)
    direct = pipe("a red circle", loras=[(str(models / "loras" / "circles.safetensors"), 0.7)], seed=4,
                  num_inference_steps=3, width=32, height=32, scheduler="euler", guidance_scale=7.0).images[0]
    np.testing.assert_array_equal(pixels(tagged.image), pixels(direct))
    assert not np.array_equal(pixels(tagged.image), pixels(plain.image))
    assert "Lora hashes: \"circles: " in tagged.info["infotexts"][0]
    again = client.txt2img(prompt="a red circle", **body)  # the next request without the tag: the base model
    np.testing.assert_array_equal(pixels(again.image), pixels(plain.image))


def test_bad_requests_get_a_clear_4xx(server):
    r = server.post("/sdapi/v1/txt2img", {"prompt": "x", "steps": "many"})
    assert r.status_code == 422 and r.json()["error"].startswith("steps: Input should be a valid integer")
    r = requests.post(f"{server.url}/sdapi/v1/txt2img", data="{not json", timeout=30,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.json()["error"]
    for body, message in [({"steps": 500}, "500 sampling steps asked; this server allows at most 60"),
                          ({"width": 512}, "width 512 is over this server's limit of 256 pixels"),
                          ({"batch_size": 10, "n_iter": 2}, "20 images asked"),
                          ({"sampler_name": "Restart"}, "sampler 'Restart' is not available; available: DDIM"),
                          ({"cfg_scale": -1}, "cfg_scale must be a finite number ≥ 0"),
                          ({"width": 33}, "width must be a positive multiple of 2"),
                          ({"subseed_strength": 2}, "subseed_strength must be in [0, 1], got 2")]:
        r = server.post("/sdapi/v1/txt2img", {"prompt": "x", "steps": 3, **body})
        assert r.status_code == 400, (body, r.text)
        assert message in r.json()["detail"], (body, r.json())
    r = server.post("/sdapi/v1/img2img", {"prompt": "x", "init_images": ["not an image"]})
    assert r.status_code == 400 and r.json()["detail"] == "init_images[0] is not base64"
    # fields A1111 accepts but latentgen lacks are accepted, and said to be ignored when set
    r = server.post("/sdapi/v1/txt2img", {"prompt": "x", "steps": 2, "width": 32, "height": 32, "s_churn": 0.5,
                                          "restore_faces": True, "my_field": 1})
    notes = json.loads(r.json()["info"])["notes"]
    assert r.status_code == 200 and notes == ["s_churn is not supported by latentgen and was ignored",
                                              "restore_faces is not supported by latentgen and was ignored",
                                              "my_field is not an AUTOMATIC1111 field and was ignored"]


def test_concurrent_requests_are_batched_and_each_gets_its_own_images(server, pipe):
    worker = server.worker
    before = len(worker.batches)
    with worker_held(server) as held:
        answers = [None] * 4

        def ask(k):
            answers[k] = server.post("/sdapi/v1/txt2img", {"prompt": f"shape {k}", "seed": 100 + k, "steps": 3,
                                                           "width": 32, "height": 32, "sampler_name": "Euler"})

        threads = [threading.Thread(target=ask, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        poll(lambda: len(worker.queue), lambda n: n >= 4, "4 queued requests", timeout=60)
    for t in threads:
        t.join(timeout=120)
    assert worker.batches[before:] == [1, 4]  # the four queued requests ran as one batch
    assert held[0].status_code == 200  # the hold only delayed the first
    for k, r in enumerate(answers):
        assert r.status_code == 200
        image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
        direct = pipe(f"shape {k}", seed=100 + k, num_inference_steps=3, width=32, height=32,
                      scheduler="euler", guidance_scale=7.0).images[0]
        np.testing.assert_array_equal(pixels(image), pixels(direct))


def test_progress_preview_and_interrupt(server):
    worker = server.worker
    slow = worker.models.pipe.unet.register_forward_pre_hook(lambda *_: time.sleep(0.05))
    try:
        answer = {}
        t = threading.Thread(target=lambda: answer.update(r=server.post(
            "/sdapi/v1/txt2img", {"prompt": "slow", "steps": 50, "width": 32, "height": 32, "seed": 1})))
        t.start()
        queued = None
        progress = poll(lambda: requests.get(f"{server.url}/sdapi/v1/progress", timeout=30).json(),
                        lambda p: p["state"]["sampling_step"] >= 3 and p["current_image"], "step 3 with a preview")
        # a second job waits in the queue; interrupting it ends it with no images
        queued = server.post("/latentgen/v1/jobs", {"prompt": "waiting", "steps": 3, "width": 32, "height": 32}).json()
        assert queued["position"] == 1
        assert server.post(f"/latentgen/v1/jobs/{queued['id']}/interrupt", {}).status_code == 200
        preview = Image.open(io.BytesIO(base64.b64decode(progress["current_image"])))
        assert preview.size == (32, 32) and 0 < progress["progress"] < 1 and progress["eta_relative"] > 0
        assert server.post("/sdapi/v1/interrupt", {}).status_code == 200
        t.join(timeout=120)
    finally:
        slow.remove()
    r = answer["r"]
    info = json.loads(r.json()["info"])
    assert r.status_code == 200 and len(r.json()["images"]) == 1  # the image as far as it got, as in A1111
    assert info["notes"] == ["interrupted: the images are as far as sampling got"]
    done = requests.get(f"{server.url}/latentgen/v1/jobs/{queued['id']}", timeout=30).json()
    assert done["state"] == "done" and done["result"]["images"] == []
    assert requests.get(f"{server.url}/latentgen/v1/jobs/nope", timeout=30).status_code == 404


def test_a_failing_job_fails_alone(server):
    """A request that passes the checks without the model but not with it (here: a LoRA that does not exist)
    gets its error; the job batched with it still gets its image."""
    with worker_held(server) as held:
        bad = server.post("/latentgen/v1/jobs", {"prompt": "x <lora:missing:1>", "steps": 2, "width": 32,
                                                 "height": 32}).json()
        good = server.post("/latentgen/v1/jobs", {"prompt": "y", "steps": 2, "width": 32, "height": 32}).json()
    assert finished(server, bad)["error"] == "LoRA 'missing' is not one of this server's LoRAs (it has: circles)"
    status = finished(server, good)
    assert len(status.get("result", {}).get("images", [])) == 1, status  # the status says why, if it failed
    assert held[0].status_code == 200 and len(held[0].json()["images"]) == 1  # the hold only delayed it


def test_a_job_that_reads_done_has_its_images(server):
    """The status route runs in another thread than the worker: while the worker is setting a job's answer (made
    slow here) the job must not yet read "done", or a client polling then gets a finished job with no result."""
    with worker_held(server):
        job = server.post("/latentgen/v1/jobs", {"prompt": "y", "steps": 2, "width": 32, "height": 32}).json()
        future = server.worker.jobs[job["id"]].future
        set_result = future.set_result
        future.set_result = lambda result: (time.sleep(1.0), set_result(result))
    status = finished(server, job)
    assert status["state"] == "done" and len(status["result"]["images"]) == 1, status


def test_auth_rejects_missing_and_wrong_credentials(tiny_folder):
    s = Server(["--model", str(tiny_folder), "--api-auth", "alice:s3cret,bob:hunter2", "--dtype", "fp32"])
    try:
        for auth in (None, ("alice", "wrong"), ("mallory", "s3cret"), ("alice", "hunter2")):
            r = requests.get(f"{s.url}/sdapi/v1/sd-models", auth=auth, timeout=30)
            assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Basic", auth
        assert requests.get(f"{s.url}/", timeout=30).status_code == 401
        assert requests.get(f"{s.url}/sdapi/v1/sd-models", auth=("bob", "hunter2"), timeout=30).status_code == 200
        result = api(s, username="alice", password="s3cret").txt2img(prompt="x", steps=2, width=32, height=32)
        assert result.image.size == (32, 32)
    finally:
        s.close()


def test_serve_command_line_mistakes_are_one_line():
    for argv, message in [(["--api-auth", "nopassword"], "--api-auth takes USER:PASS"),
                          (["--port", "0"], "--port must be in [1, 65535]"),
                          (["--model", "/nowhere/model"], "model folder /nowhere/model does not exist")]:
        r = subprocess.run([sys.executable, "-m", "latentgen.serve", *argv], capture_output=True, text=True,
                           timeout=120, cwd=ROOT)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (argv, r.stderr)


def test_web_page_in_headless_chromium(server):
    """Type a prompt, press Generate, see the image and its parameters; reuse them; in a real browser."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chromium()
    try:
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#sampler_name option")) > 1)
        models = [o.text for o in driver.find_elements(By.CSS_SELECTOR, "#model option")]
        assert "pipe" in models and "other" in models
        driver.find_element(By.ID, "prompt").send_keys("a red circle on a blue background")
        for field, value in (("width", "32"), ("height", "32"), ("steps", "4"), ("seed", "42"), ("subseed", "7"),
                             ("subseed_strength", "0.25"), ("seed_resize_from_w", "16"), ("seed_resize_from_h", "24")):
            driver.find_element(By.ID, field).clear()
            driver.find_element(By.ID, field).send_keys(value)
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery .item img"))
        image = driver.find_element(By.CSS_SELECTOR, "#gallery .item img")
        wait.until(lambda d: d.execute_script("return arguments[0].naturalWidth", image) == 32)
        text = driver.find_element(By.CSS_SELECTOR, "#gallery .item pre").text
        assert text.startswith("a red circle on a blue background\nSteps: 4") and "Seed: 42" in text
        assert "Variation seed: 7, Variation seed strength: 0.25, Seed resize from: 16x24" in text
        link = driver.find_element(By.CSS_SELECTOR, "#gallery .item a")
        assert link.get_attribute("download") == "latentgen-42.png"
        assert link.get_attribute("href").startswith("data:image/png;base64,")
        # Reuse puts the image's parameters back into the form
        driver.find_element(By.ID, "prompt").clear()
        extras = ("seed", "subseed", "subseed_strength", "seed_resize_from_w", "seed_resize_from_h")
        for field in extras:
            driver.find_element(By.ID, field).clear()
        driver.find_element(By.CSS_SELECTOR, "#gallery .item .reuse").click()
        assert driver.find_element(By.ID, "prompt").get_attribute("value") == "a red circle on a blue background"
        assert [driver.find_element(By.ID, f).get_attribute("value") for f in extras] == ["42", "7", "0.25", "16", "24"]
        # the hires fix, from the upscalers the server lists: twice the size
        from selenium.webdriver.support.ui import Select

        upscalers = Select(driver.find_element(By.ID, "hr_upscaler"))
        assert [o.text for o in upscalers.options] == ["(none)", "Latent", "Lanczos"]
        upscalers.select_by_visible_text("Lanczos")
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery .item")) == 2)
        image = driver.find_element(By.CSS_SELECTOR, "#gallery .item img")  # the newest comes first
        wait.until(lambda d: d.execute_script("return arguments[0].naturalWidth", image) == 64)
        assert "Hires upscaler: Lanczos" in driver.find_element(By.CSS_SELECTOR, "#gallery .item pre").text
        upscalers.select_by_visible_text("(none)")
        # a mistake shows as one line on the page
        driver.find_element(By.ID, "steps").clear()
        driver.find_element(By.ID, "steps").send_keys("500")
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: "this server allows at most 60" in d.find_element(By.ID, "status").text)
        # opened with credentials in its URL (as http://user:pass@host/ for a server with --api-auth), the page
        # still reaches the API: fetch refuses URLs that carry credentials, so the page calls its origin's
        driver.get(f"http://user:pass@127.0.0.1:{server.port}/")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#sampler_name option")) > 1)
        assert driver.find_element(By.ID, "status").get_attribute("class") != "error"
    finally:
        driver.quit()


def test_compile_compiles_each_model_as_it_loads(models, tiny_folder, monkeypatch, capsys):
    """--compile: the first model and each model a request switches to get `compile_unet` (tests/test_compiled.py
    tests the compiled U-Net itself), its reports on stderr; without the flag none does."""
    from latentgen.serve import build, parse_args

    compiled = []

    def compile_unet(self, mode=None, report=None):
        compiled.append(self)
        report("compiled the U-Net")

    monkeypatch.setattr(LatentPipeline, "compile_unet", compile_unet)
    argv = ["--model", str(tiny_folder), "--models-dir", str(models / "models"), "--dtype", "fp32"]
    _, worker = build(parse_args([*argv, "--compile"]))
    assert compiled == [worker.models.pipe]
    other = worker.models.get("other")
    assert len(compiled) == 2 and compiled[1] is other
    assert capsys.readouterr().err.count("latentgen: compiled the U-Net\n") == 2
    build(parse_args(argv))
    assert len(compiled) == 2


def test_extras_upscale_an_image_as_a1111s_model_free_upscalers_do(server):
    """webuiapi's extra_single_image: Lanczos by a factor (sides rounded down to multiples of 8, as A1111's
    upscaler does), to a size filled and centre-cropped, Nearest blended in by its visibility; an upscaler model
    latentgen lacks, or a size over the server's limit, is a 400 naming what is allowed."""
    import webuiapi

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    client = api(server)
    by = client.extra_single_image(image=image, upscaler_1="Lanczos", upscaling_resize=2.5)
    expected = image.resize((75, 50), Image.Resampling.LANCZOS).resize((72, 48), Image.Resampling.LANCZOS)
    np.testing.assert_array_equal(pixels(by.image), pixels(expected))
    to = client.extra_single_image(image=image, resize_mode=1, upscaling_resize_w=64, upscaling_resize_h=32,
                                   upscaler_1="Lanczos", upscaler_2="Nearest", extras_upscaler_2_visibility=0.5)
    assert to.image.size == (64, 32)
    filled = Image.blend(image.resize((64, 42), Image.Resampling.LANCZOS).resize((64, 40), Image.Resampling.LANCZOS),
                         image.resize((64, 42), Image.Resampling.NEAREST).resize((64, 40), Image.Resampling.LANCZOS),
                         0.5)
    np.testing.assert_array_equal(pixels(to.image), pixels(filled.crop((0, 4, 64, 36))))
    plain = client.extra_single_image(image=image, upscaler_1="None", upscaling_resize=2.5)  # Lanczos at once
    np.testing.assert_array_equal(pixels(plain.image), pixels(image.resize((72, 48), Image.Resampling.LANCZOS)))
    body = {"image": webuiapi.b64_img(image), "upscaler_1": "R-ESRGAN 4x+"}
    r = server.post("/sdapi/v1/extra-single-image", body)
    assert r.status_code == 400 and "available: None, Lanczos, Nearest" in r.json()["detail"]
    r = server.post("/sdapi/v1/extra-single-image", body | {"upscaler_1": "Lanczos", "upscaling_resize": 20})
    assert r.status_code == 400 and "600×400" in r.json()["detail"] and "limit of 256" in r.json()["detail"]
    r = server.post("/sdapi/v1/extra-single-image", body | {"upscaler_1": "Lanczos", "gfpgan_visibility": 1})
    assert r.status_code == 200 and "gfpgan_visibility is face restoration" in r.json()["html_info"]
