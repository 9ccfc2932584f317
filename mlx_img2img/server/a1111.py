"""AUTOMATIC1111's API JSON <-> the request type, and its answers (info, progress, lists).

Its img2img body maps onto the request fields (each value checked by its field, messages naming A1111's
key); unknown keys are ignored, as AUTOMATIC1111 does. Samplers come from the one sampler table.
"""

from __future__ import annotations

import json
import time
from typing import Any

from PIL import Image, ImageOps

from .. import __version__, checks, images
from ..control import CANNY_HIGH, CANNY_LOW
from ..request import BY_NAME, MAX_SIDE, Request, RequestError
from ..schedulers import SAMPLERS
from .engine import ControlUnit, Job, png_base64
from .inputs import DEFAULT_MAX_PIXELS, decode_base64, decode_image, open_image, plan_work
from .models import Catalog, ModelEntry

# AUTOMATIC1111's defaults for what a body leaves out
DEFAULTS = {"denoising_strength": 0.75, "steps": 50, "cfg_scale": 7.0, "width": 512, "height": 512, "seed": -1,
            "batch_size": 1, "n_iter": 1, "resize_mode": 0, "prompt": "", "negative_prompt": "", "mask_blur": 4,
            "inpainting_fill": 1, "inpaint_full_res": True, "inpaint_full_res_padding": 32,
            "inpainting_mask_invert": 0}
# inpainting_fill: 0 fill, 1 original, 2 latent noise, 3 latent nothing
INPAINT_FILLS = {0: "fill", 1: "original", 2: "latent_noise", 3: "latent_nothing"}
# resize_mode: 0 just resize, 1 crop and resize, 2 resize and fill, 3 just resize (latent upscale)
RESIZE_MODES = {0: "stretch", 1: "crop", 2: "pad", 3: "stretch"}
KARRAS = " Karras"
MAX_IMAGES = 1000
# AUTOMATIC1111's settings a request's override_settings (or POST /sdapi/v1/options) may set, as request fields
RANDN_SOURCES = {"GPU": "mlx", "CPU": "torch", "NV": None}  # NV: NVIDIA's generator, not reproduced
OWN_VAE = ("automatic", "none", "")  # sd_vae values for the model's own VAE
OPTION_DEFAULTS = ("randn_source", "CLIP_stop_at_last_layers", "sd_vae")  # kept by POST /sdapi/v1/options
# the ControlNet extension's preprocessors ("module") we have, by its names
CONTROL_MODULES = {"none": "none", "canny": "canny", "invert": "invert",
                   "invert (from white bg & black line)": "invert"}
MAX_CONTROL_UNITS = 8


def _value(body: dict, key: str) -> Any:
    value = body.get(key)
    return DEFAULTS.get(key) if value is None else value


def _field(name: str, value: Any, key: str) -> Any:
    """A value checked by the request field `name`, the message naming A1111's `key`."""
    return BY_NAME[name].validate(value, name=key)


def sampler_of(label: Any, schedule: Any) -> str | None:
    """Our sampler for A1111's sampler_name (or sampler_index) and scheduler ("automatic", "karras")."""
    if label in (None, ""):
        return None
    by_label = {s.a1111_label.lower(): s.name for s in SAMPLERS.values()} | {n: n for n in SAMPLERS}
    labels = ", ".join(s.a1111_label for s in SAMPLERS.values())
    if not isinstance(label, str) or label.lower() not in by_label:
        raise RequestError(f"sampler_name: {label!r:.40} is not one of {labels}")
    name = by_label[label.lower()]
    schedule = (schedule or "automatic").lower() if isinstance(schedule, str) or schedule is None else schedule
    if schedule == "automatic":
        return name
    if schedule == "karras":
        karras = by_label.get(SAMPLERS[name].a1111_label.lower().removesuffix(KARRAS.lower()) + KARRAS.lower())
        if karras is not None:
            return karras
    raise RequestError(f"scheduler: {schedule!r:.40} is not available with {SAMPLERS[name].a1111_label} "
                       f"(GET /sdapi/v1/schedulers)")


def img2img_work(body: Any, catalog: Catalog, current: ModelEntry, max_pixels: int = DEFAULT_MAX_PIXELS,
                 controlnets: list[ModelEntry] | None = None, defaults: dict | None = None):
    """The work of an A1111 img2img body; `defaults`: the settings POST /sdapi/v1/options set (overridden by
    the body's override_settings), `controlnets`: the listed ones."""
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    overrides = body.get("override_settings") or {}
    if not isinstance(overrides, dict):
        raise RequestError("override_settings must be an object")
    init = body.get("init_images")
    if not isinstance(init, list) or not init:
        raise RequestError("init_images: give at least one image (base64)")
    count = checks.whole("batch_size", _value(body, "batch_size"), 1, MAX_IMAGES) * checks.whole(
        "n_iter", _value(body, "n_iter"), 1, MAX_IMAGES)
    if count > MAX_IMAGES:
        raise RequestError(f"batch_size x n_iter is {count}; at most {MAX_IMAGES} images per request")
    resize = _value(body, "resize_mode")
    if resize not in RESIZE_MODES or isinstance(resize, bool):
        raise RequestError(f"resize_mode: {resize!r:.20} is not one of 0, 1, 2, 3")
    prompt = _field("prompt", _value(body, "prompt"), "prompt")
    if not prompt.strip():
        raise RequestError("prompt: give a prompt (an empty one is not supported)")
    model = catalog.find(overrides["sd_model_checkpoint"], "sd_model_checkpoint") if overrides.get(
        "sd_model_checkpoint") else current
    refiner = catalog.find(body["refiner_checkpoint"], "refiner_checkpoint") if body.get(
        "refiner_checkpoint") not in (None, "", "None") else None
    width, height = _field("width", _value(body, "width"), "width"), _field("height", _value(body, "height"), "height")
    values: dict[str, Any] = {
        "prompt": prompt, "negative_prompt": _field("negative_prompt", _value(body, "negative_prompt"),
                                                    "negative_prompt") or None,
        "model": model.title, "strength": _field("strength", _value(body, "denoising_strength"), "denoising_strength"),
        "steps": _field("steps", _value(body, "steps"), "steps"),
        "guidance": _field("guidance", _value(body, "cfg_scale"), "cfg_scale"),
        "seed": _field("seed", _value(body, "seed"), "seed"),
        "scheduler": sampler_of(body.get("sampler_name") or body.get("sampler_index"), body.get("scheduler")),
        "width": width, "height": height, "resize": RESIZE_MODES[resize],
        # A1111 works at the size asked for: the model's own working-size limit is not applied
        "max_side": min(MAX_SIDE, max(64, width, height)), "num_images": count,
    }
    if refiner is not None:
        values["refiner"] = refiner.title
        if body.get("refiner_switch_at") is not None:
            values["refiner_start"] = _field("refiner_start", body["refiner_switch_at"], "refiner_switch_at")
    values.update(option_values({**(defaults or {}), **overrides}))
    vae = vae_of(overrides.get("sd_vae", (defaults or {}).get("sd_vae")), catalog)
    inputs = [decode_image(v, f"init_images[{i}]", max_pixels) for i, v in enumerate(init[:count])]
    controls = _controls(body, values, controlnets or [], max_pixels)
    mask = None
    if body.get("mask"):
        mask = _mask(body, inputs[0].size, max_pixels)
        fill = _value(body, "inpainting_fill")
        if fill not in INPAINT_FILLS or isinstance(fill, bool):
            raise RequestError(f"inpainting_fill: {fill!r:.20} is not one of 0, 1, 2, 3")
        values.update(mask_blur=_field("mask_blur", _value(body, "mask_blur"), "mask_blur"),
                      inpaint_fill=INPAINT_FILLS[fill],
                      only_masked=bool(_field("only_masked", bool(_value(body, "inpaint_full_res")),
                                              "inpaint_full_res")),
                      padding=_field("padding", _value(body, "inpaint_full_res_padding"), "inpaint_full_res_padding"))
    work = plan_work(Request.from_values(values), catalog, model, refiner, inputs, mask)
    work.vae, work.controls = vae, controls
    return work


def option_values(options: dict) -> dict[str, Any]:
    """The request fields of A1111's settings: randn_source ("CPU": PyTorch's CPU generator, rng torch; "GPU":
    ours) and CLIP_stop_at_last_layers (clip skip)."""
    values: dict[str, Any] = {}
    source = options.get("randn_source")
    if source is not None:
        if source not in RANDN_SOURCES or RANDN_SOURCES[source] is None:
            raise RequestError(f"randn_source: {source!r:.20} is not one of CPU, GPU")
        values["rng"] = RANDN_SOURCES[source]
    if options.get("CLIP_stop_at_last_layers") is not None:
        values["clip_skip"] = _field("clip_skip", options["CLIP_stop_at_last_layers"], "CLIP_stop_at_last_layers")
    return values


def kept_options(body: dict, catalog: Catalog) -> dict[str, Any]:
    """What POST /sdapi/v1/options keeps as the defaults of later requests (OPTION_DEFAULTS), checked, with
    sd_vae named as AUTOMATIC1111 names its VAE in options, info and PNGs: by the file's name, extension
    included (a listed VAE may be asked for without it), or Automatic / None for the model's own."""
    kept = {k: body[k] for k in OPTION_DEFAULTS if body.get(k) is not None}
    option_values(kept)
    if "sd_vae" in kept:
        entry = vae_of(kept["sd_vae"], catalog)
        own = "None" if str(kept["sd_vae"]).strip().lower() == "none" else "Automatic"
        kept["sd_vae"] = entry.title if entry is not None else own
    return kept


def vae_of(name: Any, catalog: Catalog) -> ModelEntry | None:
    """The listed VAE sd_vae names (GET /sdapi/v1/sd-vae), or None for the model's own ("Automatic", "None")."""
    if name is None or (isinstance(name, str) and name.strip().lower() in OWN_VAE):
        return None
    listed = vae_entries(catalog)
    if not isinstance(name, str):
        raise RequestError("sd_vae: give the name of a listed VAE (GET /sdapi/v1/sd-vae), Automatic or None")
    wanted = name.strip().lower().removesuffix(".safetensors")
    for e in listed:
        if wanted == e.model_name.lower():
            return e
    names = ", ".join(e.title for e in listed[:10]) or "none"
    raise RequestError(f"sd_vae: {name!r:.80} is not a listed VAE; the listed ones: {names}")


def vae_entries(catalog: Catalog) -> list[ModelEntry]:
    """The models folder's usable VAEs, titled by their file names as AUTOMATIC1111 lists them."""
    folder = getattr(catalog, "folder", None)
    if folder is None:
        return []
    return [ModelEntry(i.path.name, str(i.path), str(i.path)) for i in folder.items("vae") if not i.problem]


def _controls(body: dict, values: dict, listed: list[ModelEntry], max_pixels: int) -> list[ControlUnit]:
    """The ControlNet extension's units (alwayson_scripts.controlnet.args) onto the ControlNet fields: the
    weights, the one guidance window (the same for every unit), a listed model and a module per unit."""
    scripts = body.get("alwayson_scripts") or {}
    if not isinstance(scripts, dict):
        raise RequestError("alwayson_scripts must be an object")
    script = next((v for k, v in scripts.items() if isinstance(k, str) and k.lower() == "controlnet"), {})
    args = script.get("args", []) if isinstance(script, dict) else None
    if not isinstance(args, list):
        raise RequestError("alwayson_scripts.controlnet: give {\"args\": [units]}")
    units = [u for u in args if isinstance(u, dict) and u.get("enabled", True) is not False and u.get("model")
             not in (None, "", "None")]
    if len(units) > MAX_CONTROL_UNITS:
        raise RequestError(f"alwayson_scripts.controlnet: at most {MAX_CONTROL_UNITS} units")
    controls, weights, windows = [], [], set()
    for k, u in enumerate(units):
        what = f"controlnet.args[{k}]"
        module = u.get("module", "none")
        if not isinstance(module, str) or module.lower() not in CONTROL_MODULES:
            raise RequestError(f"{what}.module: {module!r:.40} is not one of {', '.join(CONTROL_MODULES)}")
        image = u.get("image", u.get("input_image"))
        if isinstance(image, dict):  # the extension's {"image": ..., "mask": ...} form
            image = image.get("image")
        picture = decode_image(image, f"{what}.image", max_pixels) if image else None
        weights.append(_field("control_scale", u.get("weight", 1.0), f"{what}.weight")[0])
        windows.add((_field("control_start", u.get("guidance_start", 0.0), f"{what}.guidance_start"),
                     _field("control_end", u.get("guidance_end", 1.0), f"{what}.guidance_end")))
        controls.append(ControlUnit(_listed(listed, u["model"], f"{what}.model"), picture,
                                    CONTROL_MODULES[module.lower()], _thresholds(u, what)))
    if len(windows) > 1:
        raise RequestError("controlnet: every unit needs the same guidance_start and guidance_end here")
    if controls:
        start, end = windows.pop()
        values.update(controlnet=[c.entry.title for c in controls], control_scale=weights, control_start=start,
                      control_end=end)
    return controls


def _thresholds(unit: dict, what: str) -> tuple[float, float]:
    """Canny's low and high thresholds: the unit's threshold_a and threshold_b, where given (-1: the default)."""
    low, high = (unit.get(k, -1) for k in ("threshold_a", "threshold_b"))
    low = CANNY_LOW if low in (None, -1) else checks.number(f"{what}.threshold_a", low, 0, 255)
    high = CANNY_HIGH if high in (None, -1) else checks.number(f"{what}.threshold_b", high, 0, 255)
    return low, high


def _listed(entries: list[ModelEntry], name: Any, what: str) -> ModelEntry:
    """A listed ControlNet by its title or model name, with or without the " [hash]" A1111 appends."""
    if isinstance(name, str):
        wanted = name.strip()
        if wanted.endswith("]") and " [" in wanted:
            wanted = wanted[: wanted.rindex(" [")]
        for e in entries:
            if wanted.lower() in (e.title.lower(), e.model_name.lower()):
                return e
    titles = ", ".join(e.title for e in entries[:10]) or "none (serve --controlnet NAME|PATH lists one)"
    raise RequestError(f"{what}: {name!r:.80} is not a listed ControlNet; the listed ones: {titles}")


def _mask(body: dict, size: tuple[int, int], max_pixels: int) -> Image.Image:
    """The inpainting mask (white: repaint), inverted with inpainting_mask_invert 1, at the image's size."""
    mask = decode_image(body["mask"], "mask", max_pixels).convert("L")
    if _value(body, "inpainting_mask_invert") == 1:
        mask = ImageOps.invert(mask)
    if max(mask.getextrema()) < 128:
        raise RequestError("mask: it is all black (nothing to repaint)")
    return mask if mask.size == size else mask.resize(size, Image.Resampling.LANCZOS)


# ------------------------------------------------------------------------------------------ answers


def info_of(job: Job, body: dict) -> dict:
    """AUTOMATIC1111's `info` of a finished img2img request."""
    w, r = job.work, job.work.request
    n = max(1, len(job.images))
    seeds = w.seeds[:n]
    label = SAMPLERS[w.planner.scheduler].a1111_label
    return {
        "prompt": r.prompt, "all_prompts": [r.prompt] * n, "negative_prompt": r.negative_prompt or "",
        "all_negative_prompts": [r.negative_prompt or ""] * n, "seed": seeds[0], "all_seeds": seeds,
        "subseed": -1, "all_subseeds": [-1] * n, "subseed_strength": 0, "width": r.width, "height": r.height,
        "sampler_name": label, "cfg_scale": r.guidance, "steps": r.steps, "batch_size": _value(body, "batch_size"),
        "restore_faces": False, "face_restoration_model": None, "sd_model_name": w.model.model_name,
        "sd_model_hash": None, "sd_vae_name": w.vae.title if w.vae else None, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": r.strength,
        "extra_generation_params": {},
        "index_of_first_image": 0, "infotexts": [images.format_parameters(s) for s in job.settings], "styles": [],
        "job_timestamp": _timestamp(job.created), "clip_skip": getattr(r, "clip_skip", None) or 1,
        "is_using_inpainting_conditioning": False, "version": __version__,
    }


def img2img_answer(job: Job, body: dict) -> bytes:
    """The answer's JSON, around the images the worker encoded: base64 needs no JSON escaping, so megabytes
    of it are joined in, not serialised again."""
    parameters = {k: v for k, v in body.items() if k not in ("init_images", "mask", "alwayson_scripts")}
    rest = json.dumps({"parameters": {**parameters, "init_images": None, "mask": None},
                       "info": json.dumps(info_of(job, body))}, separators=(",", ":"))
    images_json = ",".join(f'"{text}"' for text in job.encoded)
    return f'{{"images":[{images_json}],{rest[1:]}'.encode()


def _timestamp(t: float) -> str:
    return time.strftime("%Y%m%d%H%M%S", time.localtime(t))


def progress_of(job: Job | None, skip_current_image: bool = False, queued: int = 0) -> dict:
    """AUTOMATIC1111's progress answer: exactly progress 0 and job_count 0 when idle. `progress` is the running
    job's; `job_count` counts its images and the `queued` ones, `job_no` the running image among them."""
    state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": queued,
             "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
    if job is None or job.status != "running":
        return {"progress": 0, "eta_relative": 0, "state": state, "current_image": None, "textinfo": None,
                "current_task": None}
    with job._lock:
        progress = job.progress()
        state.update(skipped=job.skipped, interrupted=job.interrupted, job=f"Batch {job.image_no + 1} out of "
                     f"{len(job.work.seeds)}", job_count=len(job.work.seeds) + queued,
                     job_timestamp=_timestamp(job.created), job_no=job.image_no, sampling_step=job.step,
                     sampling_steps=job.total)
        started = job.started or time.time()
    elapsed = time.time() - started
    eta = elapsed / progress - elapsed if progress > 0 else 0
    current = None if skip_current_image else job.preview_base64(png_base64)
    return {"progress": progress, "eta_relative": eta, "state": state, "current_image": current,
            "textinfo": f"Step {state['sampling_step']}/{state['sampling_steps']}", "current_task": job.id}


def png_info_of(value: Any, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """AUTOMATIC1111's png-info answer: the parameters text, the other text chunks, and its fields."""
    with open_image(decode_base64(value, "image"), "image", max_pixels, load=False) as im:
        chunks = {k: v for k, v in {**(getattr(im, "text", None) or {}), **im.info}.items() if isinstance(v, str)}
    text = chunks.pop(images.PARAMETERS_KEY, None)
    if text is not None and len(text) > images.MAX_METADATA_CHARS:
        raise RequestError(f"image: its parameters text is over {images.MAX_METADATA_CHARS:,} characters")
    parameters: dict[str, Any] = {}
    if text:
        parsed = images.parse_parameters(text)
        parameters = {"Prompt": parsed.get("prompt", ""), "Negative prompt": parsed.get("negative_prompt") or "",
                      **parsed.get("fields", {})}
    return {"info": text or "", "items": chunks, "parameters": parameters}


def sd_models(catalog: Catalog) -> list[dict]:
    return [{"title": e.title, "model_name": e.model_name, "hash": None, "sha256": None, "filename": e.filename,
             "config": None} for e in catalog.entries()]


def samplers() -> list[dict]:
    return [{"name": s.a1111_label, "aliases": [s.name], "options": {}} for s in SAMPLERS.values()]


def schedulers() -> list[dict]:
    """"automatic" (each sampler's own sigmas) and "karras" where the table has Karras variants."""
    rows = [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1,
             "need_inner_model": False}]
    if any(s.a1111_label.endswith(KARRAS) for s in SAMPLERS.values()):
        rows.append({"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0,
                     "need_inner_model": False})
    return rows
