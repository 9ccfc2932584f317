"""The server, over real HTTP: a uvicorn server on 127.0.0.1 (a free port) driven by the PyPI `webuiapi`
client (AUTOMATIC1111's API as its users call it) and by httpx for the native jobs API and bad input."""

from __future__ import annotations

import base64
import gc
import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

webuiapi = pytest.importorskip("webuiapi")

from mlx_img2img.server import Limits, ServerOptions, build, create_app  # noqa: E402

MAX_PIXELS = 256 * 256
MAX_BODY = 1 << 20
QUEUE = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(app: object) -> tuple[uvicorn.Server, threading.Thread, int]:
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    return server, thread, port


def _stop(server: uvicorn.Server, thread: threading.Thread) -> None:
    server.should_exit = True
    thread.join(20)
    assert not thread.is_alive()


def _other_vae(model: Path, file: Path) -> Path:
    """The model's VAE with its decoder's last layer scaled, as one .safetensors file (the diffusers layout)."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(model / "vae" / "diffusion_pytorch_model.safetensors"))
    tensors["decoder.conv_out.weight"] = tensors["decoder.conv_out.weight"] * 1.3
    file.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(file))
    return file


@pytest.fixture(scope="module")
def srv(tiny_sd15: Path, tmp_path_factory: pytest.TempPathFactory):
    from tests.test_controlnet import make_controlnet

    models = tmp_path_factory.mktemp("models")
    (models / "other-tiny").symlink_to(tiny_sd15, target_is_directory=True)
    vae = _other_vae(tiny_sd15, models / "VAE" / "tiny-vae.safetensors")
    net = make_controlnet(tiny_sd15, tmp_path_factory.mktemp("nets") / "cn-tiny", 71)
    (models / "ControlNet").mkdir()
    (models / "ControlNet" / "cn-in-folder").symlink_to(net, target_is_directory=True)  # listed after --controlnet's
    options = ServerOptions(model=str(tiny_sd15), models_dir=models, queue_size=QUEUE, controlnets=(str(net),),
                            limits=Limits(max_body=MAX_BODY, max_pixels=MAX_PIXELS))
    engine, app = build(options)
    server, thread, port = _start(app)
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, timeout=60) as client:
        yield SimpleNamespace(engine=engine, port=port, url=url, http=client, model=tiny_sd15, vae=vae, net=net)
    _stop(server, thread)
    engine.shutdown()


def _image(seed: int = 0, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _b64(image: Image.Image, data_url: bool = False) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    text = base64.b64encode(buffer.getvalue()).decode()
    return "data:image/png;base64," + text if data_url else text


def _until(condition: Callable[[], bool], what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _idle(http: httpx.Client) -> None:
    """The server answers /progress, idle: exactly progress 0 and job_count 0."""
    deadline = time.monotonic() + 30
    while True:
        p = http.get("/sdapi/v1/progress").json()
        if p["progress"] == 0 and p["state"]["job_count"] == 0:
            return
        assert time.monotonic() < deadline, p
        time.sleep(0.05)


def _background(call: Callable[[], object]) -> tuple[threading.Thread, dict]:
    """Run a blocking client call in a thread; its result lands in the dict under "result"."""
    out: dict = {}
    thread = threading.Thread(target=lambda: out.setdefault("result", call()))
    thread.start()
    return thread, out


def _api(srv: SimpleNamespace) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(host="127.0.0.1", port=srv.port, sampler="Euler", steps=2)


def test_webuiapi_img2img_matches_the_python_api(srv):
    """A1111's img2img through webuiapi: one image per generated image, seeds seed, seed+1, the parameters
    chunk in each PNG, A1111's info keys; the same settings give the same pixels as the Python API."""
    from mlx_img2img.pipeline import Img2ImgPipeline

    api = _api(srv)
    source = _image(1)
    result = api.img2img(images=[source], prompt="a red fox", negative_prompt="blur", denoising_strength=0.5,
                         steps=4, cfg_scale=5, seed=1234, width=64, height=64, batch_size=2, sampler_name="Euler")
    assert [im.size for im in result.images] == [(64, 64), (64, 64)]
    info = result.info
    assert info["all_seeds"] == [1234, 1235] and info["seed"] == 1234
    assert info["sampler_name"] == "Euler" and info["steps"] == 4 and info["cfg_scale"] == 5
    assert info["denoising_strength"] == 0.5 and info["all_prompts"] == ["a red fox"] * 2
    assert "Seed: 1235" in info["infotexts"][1] and result.images[1].info["parameters"] == info["infotexts"][1]

    def direct() -> list[Image.Image]:  # on the worker thread: MLX's CPU streams belong to the thread using them
        pipe = Img2ImgPipeline.from_pretrained(srv.model)
        return [pipe("a red fox", source, strength=0.5, num_inference_steps=4, guidance_scale=5,
                     negative_prompt="blur", seed=seed, scheduler="euler").images[0] for seed in (1234, 1235)]

    for image, expected in zip(result.images, srv.engine.call(direct), strict=True):
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(expected))

    # -1 is a random seed, reported; png-info reads the parameters back
    again = api.img2img(images=[source], prompt="a red fox", denoising_strength=0.5, steps=2, seed=-1, width=64,
                        height=64)
    assert 0 <= again.info["seed"] < 2**32
    info = api.png_info(again.image)
    assert info.info == again.image.info["parameters"]
    parameters = info.json["parameters"]
    assert parameters["Seed"] == str(again.info["seed"]) and parameters["Prompt"] == "a red fox"
    _idle(srv.http)


def test_webuiapi_inpainting_keeps_the_unmasked_pixels(srv):
    """A1111's inpainting fields through webuiapi: the pixels away from the blurred mask are the input's."""
    api = _api(srv)
    source = _image(6)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 24, 64))  # repaint the left columns
    result = api.img2img(images=[source], mask_image=mask, mask_blur=2, inpainting_fill=1, inpaint_full_res=False,
                         prompt="a wall", denoising_strength=0.9, steps=3, seed=3, width=64, height=64)
    out, original = np.asarray(result.image.convert("RGB")), np.asarray(source)
    assert np.array_equal(out[:, 30:], original[:, 30:])  # beyond 2.5 x the blur: kept exactly
    assert np.abs(out[:, :20].astype(int) - original[:, :20]).mean() > 5  # repainted
    assert "Mask blur: 2" in result.info["infotexts"][0]
    r = srv.http.post("/sdapi/v1/img2img", json={"init_images": [_b64(source)], "prompt": "x", "steps": 2,
                                                 "mask": _b64(Image.new("RGB", (64, 64)))})
    assert r.status_code == 400 and "all black" in r.json()["detail"]


def test_progress_preview_interrupt_and_skip(srv):
    """/progress answers during a run with a preview of the current step; interrupt makes the running request
    answer 200 with what it has; afterwards the server is idle and serves again."""
    api = _api(srv)
    thread, out = _background(partial(api.img2img, images=[_image(2)], prompt="a boat", denoising_strength=1.0,
                                      steps=400, seed=5, width=64, height=64, batch_size=2))
    p: dict = {}

    def previewing() -> bool:
        p.update(api.get_progress())
        return p["state"]["sampling_step"] >= 2 and bool(p["current_image"])

    _until(previewing, "a preview")
    assert 0 < p["progress"] < 1 and p["state"]["job_count"] == 2 and p["state"]["sampling_steps"] == 400
    preview = Image.open(io.BytesIO(base64.b64decode(p["current_image"])))
    assert preview.size == (8, 8)  # the latent's size: the cheap preview
    # job_count counts the queued images too (A1111's meaning); job_no is the running one among them
    queued = srv.http.post("/v1/jobs", json={"image": _b64(_image()), "prompt": "x", "steps": 2,
                                             "num_images": 3}).json()
    state = api.get_progress()["state"]
    assert state["job_count"] == 2 + 3 and state["job_no"] == 0
    srv.http.delete(f"/v1/jobs/{queued['id']}")
    assert api.get_progress()["state"]["job_count"] == 2
    assert srv.http.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()["current_image"] is None
    assert api.skip() == {}  # ends the first image as far as it got; the second one starts
    _until(lambda: api.get_progress()["state"]["job_no"] == 1, "the second image")
    assert api.interrupt() == {}
    thread.join(30)
    result = out["result"]
    assert len(result.images) == 2 and result.info["all_seeds"] == [5, 6]  # both partial, decoded from x0
    _idle(srv.http)


def test_vae_controlnet_clip_skip_and_cpu_noise_per_request(srv):
    """AUTOMATIC1111's per-request settings through webuiapi: override_settings.sd_vae (a VAE the models
    folder lists), a ControlNet extension unit (a listed model, its image through the "invert" module, its
    weight), CLIP_stop_at_last_layers and randn_source "CPU": the same pixels as the Python API given the VAE
    file, the ControlNet, clip_skip=2 and rng="torch" (each checked against diffusers in its own tests)."""
    from mlx_img2img import control, images
    from mlx_img2img.pipeline import Img2ImgPipeline

    api = _api(srv)
    assert [v["model_name"] for v in api.get_sd_vae()] == ["tiny-vae.safetensors"]
    assert api.controlnet_model_list() == ["cn-tiny", "cn-in-folder"] and "invert" in api.controlnet_module_list()
    source = _image(8)
    sketch = Image.new("RGB", (64, 64), "white")
    sketch.paste((0, 0, 0), (10, 20, 54, 26))  # a dark stroke on white: "invert" makes it a light one on black
    unit = webuiapi.ControlNetUnit(image=sketch, module="invert", model="cn-in-folder", weight=1.2)  # srv.net
    overrides = {"sd_vae": "tiny-vae.safetensors", "CLIP_stop_at_last_layers": 2, "randn_source": "CPU"}
    result = api.img2img(images=[source], prompt="a house", denoising_strength=0.6, steps=4, seed=11, width=64,
                         height=64, override_settings=overrides, controlnet_units=[unit])
    # the VAE by its file's name, extension included, in info, the PNG and the options, as AUTOMATIC1111 names it
    assert result.info["sd_vae_name"] == "tiny-vae.safetensors" and result.info["clip_skip"] == 2
    assert "ControlNet 0: " in result.info["infotexts"][0]
    assert images.parse_parameters(result.info["infotexts"][0])["fields"]["VAE"] == "tiny-vae.safetensors"
    stored = result.image.info["parameters"]  # the PNG itself: what --from needs to make the image again
    assert "Clip skip: 2" in stored and "RNG: CPU" in stored
    settings = json.loads(result.image.info["mlx-img2img"])
    assert settings["controlnet"] == ["cn-in-folder"] and settings["control_preprocess"] == "invert"
    assert images.parse_parameters(stored)["fields"]["VAE"] == result.info["sd_vae_name"]

    def direct() -> list[Image.Image]:
        pipe = Img2ImgPipeline.from_pretrained(srv.model, vae=srv.vae, controlnet=srv.net)
        common = dict(strength=0.6, num_inference_steps=4, guidance_scale=7.0, seed=11, scheduler="euler",
                      rng="torch", clip_skip=2)
        with_control = pipe("a house", source, control_image=control.invert(sketch),
                            controlnet_conditioning_scale=1.2, **common).images[0]
        pipe.load_controlnet(None)
        return [with_control, pipe("a house", source, **common).images[0]]

    expected, without = srv.engine.call(direct)
    assert np.array_equal(np.asarray(result.image.convert("RGB")), np.asarray(expected))
    assert np.abs(np.asarray(expected, dtype=int) - np.asarray(without)).max() > 10  # the ControlNet mattered

    # the options endpoint sets the defaults of later requests; names only, never paths
    api.set_options({"randn_source": "CPU", "CLIP_stop_at_last_layers": 2})
    options = api.get_options()
    assert options["randn_source"] == "CPU" and options["CLIP_stop_at_last_layers"] == 2
    again = api.img2img(images=[source], prompt="a house", denoising_strength=0.6, steps=4, seed=11, width=64,
                        height=64, override_settings={"sd_vae": "tiny-vae"}, controlnet_units=[],
                        alwayson_scripts={})  # webuiapi keeps the units in its default dict otherwise
    assert np.array_equal(np.asarray(again.image.convert("RGB")), np.asarray(without))
    assert again.info["sd_vae_name"] == "tiny-vae.safetensors"  # asked for without the extension
    for asked, named in (("tiny-vae", "tiny-vae.safetensors"), ("TINY-VAE.safetensors", "tiny-vae.safetensors"),
                         ("none", "None"), ("automatic", "Automatic")):
        api.set_options({"sd_vae": asked})
        assert api.get_options()["sd_vae"] == named, asked
    api.set_options({"randn_source": "GPU", "CLIP_stop_at_last_layers": 1})
    good = {"init_images": [_b64(source)], "prompt": "x", "steps": 2, "width": 64, "height": 64}
    cn = {"image": "", "module": "invert", "model": "cn-tiny"}
    for body, words in (({"override_settings": {"sd_vae": str(srv.vae)}}, "not a listed VAE"),
                        ({"override_settings": {"randn_source": "NV"}}, "randn_source"),
                        ({"alwayson_scripts": {"controlnet": {"args": [{**cn, "model": str(srv.net)}]}}},
                         "not a listed ControlNet"),
                        ({"alwayson_scripts": {"controlnet": {"args": [{**cn, "module": "depth_midas"}]}}},
                         "module"),
                        ({"alwayson_scripts": {"controlnet": {"args": [cn, {**cn, "guidance_end": 0.5}]}}},
                         "same guidance")):
        r = srv.http.post("/sdapi/v1/img2img", json={**good, **body})
        assert r.status_code == 400 and words in r.json()["detail"], r.text
    assert srv.http.post("/sdapi/v1/options", json={"sd_vae": "/etc/passwd"}).status_code == 400
    r = srv.http.post("/sdapi/v1/img2img", json=good)
    timing = dict(part.split(";dur=") for part in r.headers["server-timing"].split(", "))
    assert set(timing) == {"read", "decode", "queue", "generation", "encode", "decode-cpu", "encode-cpu"}
    _idle(srv.http)


def test_models_list_and_switch(srv):
    api = _api(srv)
    titles = api.util_get_model_names()
    assert srv.model.name in titles and "other-tiny" in titles
    assert api.get_options()["sd_model_checkpoint"] == srv.model.name
    api.util_set_model("other-tiny")
    assert api.util_get_current_model() == "other-tiny"
    result = api.img2img(images=[_image(3)], prompt="x", steps=2, denoising_strength=0.5, width=64, height=64)
    assert result.info["sd_model_name"] == "other-tiny"
    assert srv.http.get("/v1/models").json()["current"] == "other-tiny"
    api.util_set_model(srv.model.name, find_closest=False)
    # a model named in a request is a listed one, never a path
    for name in (str(srv.model), "stabilityai/sd-turbo", "nope"):
        r = srv.http.post("/sdapi/v1/img2img", json={"init_images": [_b64(_image())], "prompt": "x", "steps": 2,
                                                     "override_settings": {"sd_model_checkpoint": name}})
        assert r.status_code == 400 and "not a listed model" in r.json()["detail"]
    r = srv.http.post("/sdapi/v1/options", json={"sd_model_checkpoint": str(srv.model)})
    assert r.status_code == 400
    assert {s["name"] for s in api.get_samplers()} >= {"Euler", "Euler a", "DPM++ 2M Karras", "DDIM"}
    assert [s["name"] for s in api.get_schedulers()] == ["automatic", "karras"]
    assert api.get_scripts() == {"txt2img": [], "img2img": []}
    assert api.get_loras() == []
    assert srv.http.post("/sdapi/v1/refresh-checkpoints").status_code == 200


def _events(http: httpx.Client, job_id: str) -> list[dict]:
    events = []
    with http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    return events


def test_native_jobs_with_events(srv):
    http = srv.http
    body = {"image": _b64(_image(4), data_url=True), "prompt": "a house", "strength": 0.5, "steps": 4, "seed": 7,
            "scheduler": "ddim", "num_images": 2}
    r = http.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    job = r.json()
    events = _events(http, job["id"])
    kinds = [e["event"] for e in events]
    assert kinds[0] == "queued" and "started" in kinds and kinds[-1] == "done"
    steps = [e for e in events if e["event"] == "step"]
    assert [(e["image"], e["step"]) for e in steps] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert any("preview" in e for e in steps)
    done = events[-1]
    assert done["seeds"] == [7, 8] and len(done["images"]) == 2
    state = http.get(f"/v1/jobs/{job['id']}").json()
    assert state["status"] == "done" and state["progress"] == 1 and state["images"] == done["images"]
    stored = json.loads(Image.open(io.BytesIO(base64.b64decode(state["images"][1]))).info["mlx-img2img"])
    assert stored["seed"] == 8 and stored["scheduler"] == "ddim" and stored["prompt"] == "a house"

    # cancel: a running job at its next step, a queued one at once
    long = {**body, "steps": 400, "strength": 1.0, "num_images": 1}
    first, second = (http.post("/v1/jobs", json=long).json() for _ in range(2))
    _until(lambda: http.get(f"/v1/jobs/{first['id']}").json()["step"] >= 1, "the job to run")
    assert http.delete(f"/v1/jobs/{second['id']}").json()["status"] == "cancelled"
    http.delete(f"/v1/jobs/{first['id']}")
    assert _events(http, first["id"])[-1]["event"] == "cancelled"
    assert http.get("/v1/jobs/nope").status_code == 404
    for bad in ({**body, "dtype": "float16"}, {**body, "sweep": [0.3]}, {**body, "strenght": 0.5},
                {**body, "model": str(srv.model)}, {**body, "prediction_type": "v_prediction"}):
        r = http.post("/v1/jobs", json=bad)
        assert r.status_code == 400 and set(r.json()) == {"error", "detail"}, r.text
        if "dtype" in bad or "prediction_type" in bad:  # the load settings are the server's
            assert r.json()["detail"].endswith(": set when the server starts (mlx-img2img serve --help)"), r.text
    schema = http.get("/openapi.json").json()
    props = schema["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert {"image", "prompt", "strength", "steps", "seed", "model"} <= set(props)
    health = http.get("/v1/health").json()
    assert health["status"] == "ok" and health["queue_size"] == QUEUE
    _idle(http)


def test_a_job_leaving_the_history_is_freed_at_once(srv):
    """By reference counting alone, its images with it: a job in a reference cycle (it was its own future's
    result) waited for one of the garbage collector's rare full passes, and the server's memory crept up."""
    _api(srv).img2img(images=[_image(2)], prompt="a boat", denoising_strength=0.5, steps=2, seed=3, width=64,
                      height=64)
    gc.disable()
    try:
        with srv.engine._cond:
            job_id = next(reversed(srv.engine._jobs))
            ref = weakref.ref(srv.engine._jobs.pop(job_id))  # as the history lets its oldest job go
        assert ref() is not None and ref().status == "done" and ref().images
        _until(lambda: ref() is None, "the job to be freed", seconds=5)  # (the answer's coroutine may still end)
    finally:
        gc.enable()


def _bad_cases() -> list[tuple[str, dict | bytes, int]]:
    good = {"init_images": [_b64(_image())], "prompt": "x", "steps": 2, "width": 64, "height": 64}
    big = _image(size=300)
    buffer = io.BytesIO()
    Image.new("RGB", (2000, 2000)).save(buffer, format="PNG")  # small as a file, 4 MP as pixels
    return [
        ("invalid base64", {**good, "init_images": ["not base64!"]}, 400),
        ("not an image", {**good, "init_images": [base64.b64encode(b"hello world").decode()]}, 400),
        ("over the pixel limit", {**good, "init_images": [_b64(big)]}, 400),
        ("a bomb", {**good, "init_images": [base64.b64encode(buffer.getvalue()).decode()]}, 400),
        ("over the body limit", {**good, "prompt": "x" * (MAX_BODY + 1)}, 413),
        ("negative steps", {**good, "steps": -3}, 400),
        ("huge steps", {**good, "steps": 10**9}, 400),
        ("huge width", {**good, "width": 10**6}, 400),
        ("negative width", {**good, "width": -64}, 400),
        ("strength over 1", {**good, "denoising_strength": 1.5}, 400),
        ("strength as text", {**good, "denoising_strength": "0.5"}, 400),
        ("unknown sampler", {**good, "sampler_name": "Heun++"}, 400),
        ("a list body", [good], 400),
        ("not JSON", b"{nope", 400),
        ("an unknown model", {**good, "override_settings": {"sd_model_checkpoint": "/etc"}}, 400),
        ("no image", {**good, "init_images": []}, 400),
    ]


def test_bad_input_is_a_4xx_and_the_server_goes_on(srv):
    for name, body, status in _bad_cases():
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = srv.http.post("/sdapi/v1/img2img", content=content, headers={"content-type": "application/json"})
        assert r.status_code == status, (name, r.text)
        assert set(r.json()) == {"error", "detail"} and r.json()["detail"], name
        assert srv.http.get("/sdapi/v1/progress").status_code == 200, name
    assert srv.http.get("/sdapi/v1/nothing").status_code == 404
    _idle(srv.http)


def test_api_auth_and_bind_rules(srv):
    from mlx_img2img.server import bind_address

    server, thread, port = _start(create_app(srv.engine, [("ann", "s3cret")]))
    try:
        url = f"http://127.0.0.1:{port}/sdapi/v1/progress"
        assert httpx.get(url).status_code == 401
        assert httpx.get(url, auth=("ann", "wrong")).status_code == 401
        assert httpx.get(url, auth=("ann", "s3cret")).status_code == 200
        api = webuiapi.WebUIApi(host="127.0.0.1", port=port, username="ann", password="s3cret")
        assert api.get_progress()["progress"] == 0
    finally:
        _stop(server, thread)
    assert bind_address(None, False) == "127.0.0.1" and bind_address(None, True) == "0.0.0.0"
    assert bind_address("::1", False) == "::1"
    with pytest.raises(ValueError, match="--listen"):
        bind_address("192.168.1.5", False)


def test_load_concurrent_clients_and_interrupts(srv):
    """50 clients at once, each posting a small job: each gets its own result (seed and prompt checked) or a
    429, none lost; interrupts in a row (10 here, 20 and 200 jobs in scripts/server_overhead.py) leave the
    server healthy, its memory flat."""
    import mlx.core as mx

    def client(k: int) -> tuple[int, int, dict | None]:
        body = {"init_images": [_b64(_image(k))], "prompt": f"job {k}", "steps": 1, "denoising_strength": 1.0,
                "seed": 1000 + k, "width": 64, "height": 64}
        with httpx.Client(base_url=srv.url, timeout=120) as http:
            r = http.post("/sdapi/v1/img2img", json=body)
        return k, r.status_code, (json.loads(r.json()["info"]) if r.status_code == 200 else None)

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(client, range(50)))
    served = [(k, info) for k, status, info in results if status == 200]
    assert all(status in (200, 429) for _, status, _ in results)
    assert QUEUE + 1 <= len(served) < 50  # the queue's bound answered the others with 429
    for k, info in served:
        assert info["seed"] == 1000 + k and info["prompt"] == f"job {k}"
    _idle(srv.http)
    before = mx.get_active_memory()

    api = _api(srv)
    for k in range(10):
        thread, out = _background(partial(api.img2img, images=[_image(k)], prompt="long", steps=400,
                                          denoising_strength=1.0, seed=k, width=64, height=64))
        _until(lambda: api.get_progress()["state"]["sampling_step"] >= 1, "the job to run")
        api.interrupt()
        thread.join(30)
        assert len(out["result"].images) == 1 and out["result"].info["seed"] == k
    _idle(srv.http)
    assert srv.http.get("/v1/health").json()["status"] == "ok"
    assert mx.get_active_memory() <= before * 1.1 + (4 << 20), (before, mx.get_active_memory())


def test_serve_command_stops_at_once_on_sigterm(tiny_sd15):
    """`mlx-img2img serve` in its own process: SIGTERM during a long job stops it at its next step and the
    server exits cleanly (143, as the CLI's other commands), without waiting for the job to finish."""
    port = _free_port()
    command = [sys.executable, "-m", "mlx_img2img", "serve", "-m", str(tiny_sd15), "--port", str(port), "-q"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            _until(lambda: _answers(http), "the server to start", 60)
            job = http.post("/v1/jobs", json={"image": _b64(_image()), "prompt": "x", "steps": 900,
                                              "strength": 1.0}).json()
            _until(lambda: http.get(f"/v1/jobs/{job['id']}").json()["step"] >= 1, "the job to run")
            start = time.monotonic()
            process.send_signal(signal.SIGTERM)
            _, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, err
    assert time.monotonic() - start < 15 and "Traceback" not in err


def _answers(http: httpx.Client) -> bool:
    try:
        return http.get("/v1/health").status_code == 200
    except httpx.TransportError:
        return False
