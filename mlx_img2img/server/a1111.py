"""AUTOMATIC1111's API JSON <-> the request type, and its answers (info, progress, lists).

Its img2img body maps onto the request fields (each value checked by its field, messages naming A1111's
key); unknown keys are ignored, as AUTOMATIC1111 does. Samplers come from the one sampler table.
"""

from __future__ import annotations

import base64
import io
import json
import time
from typing import Any

from PIL import Image, ImageOps

from .. import __version__, checks, images
from ..request import BY_NAME, MAX_SIDE, Request, RequestError
from ..schedulers import SAMPLERS
from .engine import Job
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


def img2img_work(body: Any, catalog: Catalog, current: ModelEntry, max_pixels: int = DEFAULT_MAX_PIXELS):
    """The work of an A1111 img2img body."""
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
    if "rng" in BY_NAME and overrides.get("randn_source") == "CPU":  # A1111's torch-compatible CPU noise
        values["rng"] = "torch"
    if "clip_skip" in BY_NAME and overrides.get("CLIP_stop_at_last_layers") is not None:
        values["clip_skip"] = _field("clip_skip", overrides["CLIP_stop_at_last_layers"], "CLIP_stop_at_last_layers")
    inputs = [decode_image(v, f"init_images[{i}]", max_pixels) for i, v in enumerate(init[:count])]
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
    return plan_work(Request.from_values(values), catalog, model, refiner, inputs, mask)


def _mask(body: dict, size: tuple[int, int], max_pixels: int) -> Image.Image:
    """The inpainting mask (white: repaint), inverted with inpainting_mask_invert 1, at the image's size."""
    mask = decode_image(body["mask"], "mask", max_pixels).convert("L")
    if _value(body, "inpainting_mask_invert") == 1:
        mask = ImageOps.invert(mask)
    if max(mask.getextrema()) < 128:
        raise RequestError("mask: it is all black (nothing to repaint)")
    return mask if mask.size == size else mask.resize(size, Image.Resampling.LANCZOS)


# ------------------------------------------------------------------------------------------ answers


def png_base64(image: Image.Image, settings: dict | None = None) -> str:
    """A PNG as base64 text, with the parameters chunk (and our settings) when `settings` are given."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=images.png_info(settings) if settings else None, compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


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
        "sd_model_hash": None, "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1,
        "seed_resize_from_h": -1, "denoising_strength": r.strength, "extra_generation_params": {},
        "index_of_first_image": 0, "infotexts": [images.format_parameters(s) for s in job.settings], "styles": [],
        "job_timestamp": _timestamp(job.created), "clip_skip": getattr(r, "clip_skip", None) or 1,
        "is_using_inpainting_conditioning": False, "version": __version__,
    }


def img2img_answer(job: Job, body: dict) -> dict:
    parameters = {k: v for k, v in body.items() if k not in ("init_images", "mask")}
    return {"images": [png_base64(im, s) for im, s in zip(job.images, job.settings, strict=True)],
            "parameters": {**parameters, "init_images": None, "mask": None},
            "info": json.dumps(info_of(job, body))}


def _timestamp(t: float) -> str:
    return time.strftime("%Y%m%d%H%M%S", time.localtime(t))


def progress_of(job: Job | None, skip_current_image: bool = False) -> dict:
    """AUTOMATIC1111's progress answer: exactly progress 0 and job_count 0 when idle."""
    state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
             "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
    if job is None or job.status != "running":
        return {"progress": 0, "eta_relative": 0, "state": state, "current_image": None, "textinfo": None,
                "current_task": None}
    with job._lock:
        progress, preview = job.progress(), job.preview
        state.update(skipped=job.skipped, interrupted=job.interrupted, job=f"Batch {job.image_no + 1} out of "
                     f"{len(job.work.seeds)}", job_count=len(job.work.seeds), job_timestamp=_timestamp(job.created),
                     job_no=job.image_no, sampling_step=job.step, sampling_steps=job.total)
        started = job.started or time.time()
    elapsed = time.time() - started
    eta = elapsed / progress - elapsed if progress > 0 else 0
    current = None if skip_current_image or preview is None else png_base64(preview)
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
