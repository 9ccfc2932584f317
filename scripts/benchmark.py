#!/usr/bin/env python
"""Benchmark mlx_img2img against other Stable Diffusion img2img implementations on the same weights.

No download is needed: the script builds a full-size SD 1.5, SD 2.1-base or SDXL architecture with
random weights (diffusers/transformers construct the modules from the real hub configs, written out
below), saves it in the diffusers layout under ./bench/models/, and runs every peer on that folder.
A real model folder can be given with --model instead.

Peers, each in its own subprocess so that peak memory is per peer and a crash stays contained:

  ours          mlx_img2img.Img2ImgPipeline, stage by stage
  mlx-examples  Apple's own example (github.com/ml-explore/mlx-examples, stable_diffusion/), unmodified:
                its folder is copied out of the clone given with --mlx-examples (a work tree or a
                bare git directory) under ./bench/ and imported from there; it is timed through its
                own img2img call (generate_latents_from_image, then decode), whole and per stage.
                It loads only the SD 2.1-base and SDXL-Turbo repo ids, from the same local HF cache
  diffuse-mlx   the PyPI port of Apple's MLX Stable Diffusion example; it reads a Hugging Face
                cache, which is laid out locally (symlinks into the model folder) and read offline
  diffusers     StableDiffusion(XL)Img2ImgPipeline on PyTorch, always float32 on a CPU

On Linux, MLX's CPU wheel links a reference BLAS (a few GFLOP/s). By default the MLX peers run with
the system OpenBLAS in LD_PRELOAD (as the mlx-img2img command does by itself; --no-preload-openblas
turns it off), torch keeps its own BLAS (the preload slowed its UNet 2.7x here). The output says
whether the preload was active and each MLX peer's matmul throughput. On macOS this does nothing
(MLX uses Accelerate and Metal there). --busy N runs N CPU-bound processes beside every peer, for a
comparison on a busy machine that does not depend on what else happens to run.

Reported per peer: load time (weights materialised), prompt encoding, VAE encode, seconds per UNet
step (median over the steps after the first), VAE decode, total (prompt to image, load excluded),
UNet evaluations (counted by wrapping the UNet), MLX peak memory and the process's max RSS; then
ours / peer ratios, which survive a noisy machine better than the absolute figures.

Examples:
  python scripts/benchmark.py                                  # SD 1.5 arch, 256x256, 4 steps x 0.5
  python scripts/benchmark.py --dtype float16 --size 512 --steps 20 --strength 0.75 --json out.json
  python scripts/benchmark.py --model ~/models/sd15 --peers ours,diffuse-mlx
  python scripts/benchmark.py --arch sd21-base --size 128 --steps 8 --mlx-examples ~/src/mlx-examples
  python scripts/benchmark.py --busy 1 --repeat 3                # each peer beside a CPU-bound process
  python scripts/benchmark.py --probe-blas                     # MLX matmul GFLOP/s with/without it
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PEERS = ("ours", "mlx-examples", "diffuse-mlx", "diffusers")
MLX_PEERS = ("ours", "mlx-examples", "diffuse-mlx")  # run with OpenBLAS preloaded on Linux
OPENBLAS_FLAG = "MLX_IMG2IMG_BENCH_OPENBLAS"  # set in the re-executed process's environment
DEFAULT_PROMPT = "a watercolor painting of a lighthouse on a rocky coast at sunset, soft light, detailed"

# ------------------------------------------------------------------------------------------ architectures
# The config.json contents of the real hub models (weights are random). Keys diffusers would fill
# with defaults are left out.

_CLIP_L = {  # openai/clip-vit-large-patch14 text tower: SD 1.x and SDXL's first encoder
    "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
    "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "vocab_size": 49408,
}
_CLIP_H = {  # OpenCLIP ViT-H/14 text tower, penultimate layer: SD 2.x
    **_CLIP_L, "hidden_act": "gelu", "hidden_size": 1024, "intermediate_size": 4096,
    "num_attention_heads": 16, "num_hidden_layers": 23, "projection_dim": 512,
}
_CLIP_BIGG = {  # OpenCLIP ViT-bigG/14 text tower with projection: SDXL's second encoder
    **_CLIP_L, "architectures": ["CLIPTextModelWithProjection"], "hidden_act": "gelu", "hidden_size": 1280,
    "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32, "projection_dim": 1280,
}
_UNET_SD = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}
_UNET_SD21_BASE = {
    **_UNET_SD, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
    "dual_cross_attention": False, "num_class_embeds": None, "only_cross_attention": False,
    "use_linear_projection": True,
}
_UNET_SDXL = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280], "center_input_sample": False, "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
_VAE_SD = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
    "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
_VAE_SDXL = {**_VAE_SD, "force_upcast": True, "sample_size": 1024, "scaling_factor": 0.13025}
_PNDM = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1, "trained_betas": None,
}
_EULER_SDXL = {
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}

ARCHS: dict[str, dict] = {
    "sd15": {
        "hub": "stable-diffusion-v1-5/stable-diffusion-v1-5", "xl": False,
        "text_encoders": {"text_encoder": _CLIP_L}, "tokenizers": {"tokenizer": "<|endoftext|>"},
        "unet": _UNET_SD, "vae": _VAE_SD, "scheduler": {**_PNDM},
        # diffuse-mlx only loads repo ids it knows; this one has the SD 1.5 architecture and file names.
        "diffuse_mlx_repo": "snwy/SD1.5-DALLE-2",
    },
    "sd21-base": {
        "hub": "stabilityai/stable-diffusion-2-1-base", "xl": False,
        "text_encoders": {"text_encoder": _CLIP_H}, "tokenizers": {"tokenizer": "!"},
        "unet": _UNET_SD21_BASE, "vae": {**_VAE_SD, "sample_size": 768},
        "scheduler": {**_PNDM, "prediction_type": "epsilon"},
        "diffuse_mlx_repo": "stabilityai/stable-diffusion-2-1-base",
    },
    "sdxl": {
        "hub": "stabilityai/stable-diffusion-xl-base-1.0", "xl": True,
        "text_encoders": {"text_encoder": _CLIP_L, "text_encoder_2": _CLIP_BIGG},
        "tokenizers": {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"},
        "unet": _UNET_SDXL, "vae": _VAE_SDXL, "scheduler": _EULER_SDXL,
        "diffuse_mlx_repo": "stabilityai/sdxl-turbo",  # the SDXL architecture under a repo id it accepts
    },
}

# Our sampler names -> the diffusers scheduler class (built from the model's scheduler config) and overrides.
DIFFUSERS_SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}), "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}), "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "pndm": ("PNDMScheduler", {}),
}

# ------------------------------------------------------------------------------------------ small helpers


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def now() -> float:
    return time.perf_counter()


def max_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


def median_step(steps: list[float]) -> float | None:
    """Median over the steps after the first (which carries warm-up); the only step if there is one."""
    if not steps:
        return None
    return statistics.median(steps[1:] if len(steps) > 1 else steps)


def parse_size(text: str) -> tuple[int, int]:
    """'512' -> (512, 512); '768x512' -> width 768, height 512."""
    parts = text.lower().split("x")
    try:
        w, h = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"size must be N or WxH, not {text!r}") from None
    if w < 64 or h < 64 or w % 8 or h % 8:
        raise argparse.ArgumentTypeError(f"size must be at least 64 and a multiple of 8, not {text!r}")
    return w, h


def input_image(width: int, height: int, seed: int):
    """A deterministic test picture: smooth colour fields, a few discs and a little texture."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([x / width, y / height, 0.5 + 0.5 * np.sin((x + y) / 37.0)], axis=-1)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.05, 0.2) * min(width, height)
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 1, 3)
    img = np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1)
    return Image.fromarray((img * 255).round().astype(np.uint8), "RGB")


def openblas_env(env: dict[str, str], threads: int | None = None) -> dict[str, str] | None:
    """`env` with the system OpenBLAS preloaded, as the mlx-img2img command runs itself; None without one."""
    from mlx_img2img import blas

    lib = blas.find_openblas()
    if lib is None:
        return None
    env = blas.openblas_environment(env, lib)
    if threads:
        env["OPENBLAS_NUM_THREADS"] = str(threads)
    env[OPENBLAS_FLAG] = "1"
    return env


def without_openblas(env: dict[str, str]) -> dict[str, str]:
    """The environment minus our preload: torch brings its own BLAS and is left alone."""
    env = dict(env)
    if env.pop(OPENBLAS_FLAG, None):
        env.pop("MLX_IMG2IMG_BLAS", None)  # mlx_img2img.blas.MARKER
        env.pop("OPENBLAS_NUM_THREADS", None)
        kept = [p for p in env.get("LD_PRELOAD", "").split() if "openblas" not in p]
        if kept:
            env["LD_PRELOAD"] = " ".join(kept)
        else:
            env.pop("LD_PRELOAD", None)
    return env


def openblas_active() -> bool:
    return os.environ.get(OPENBLAS_FLAG) == "1"


def mlx_peak_memory() -> int:
    import mlx.core as mx

    fn = getattr(mx, "get_peak_memory", None) or mx.metal.get_peak_memory
    return int(fn())


def mlx_reset_peak() -> None:
    import mlx.core as mx

    fn = getattr(mx, "reset_peak_memory", None) or mx.metal.reset_peak_memory
    fn()


class StagePeaks:
    """MLX peak memory per stage: the peak counter is read and reset at the end of each stage."""

    def __init__(self):
        self.peaks: dict[str, int] = {}
        mlx_reset_peak()

    def mark(self, stage: str) -> None:
        self.peaks[stage] = mlx_peak_memory()
        mlx_reset_peak()


def mlx_active_memory() -> int:
    import mlx.core as mx

    fn = getattr(mx, "get_active_memory", None) or mx.metal.get_active_memory
    return int(fn())


def mlx_matmul_gflops(dtype: str = "float32", n: int = 1024) -> float:
    """Throughput of an n x n matmul on MLX's default device: tells which BLAS MLX is running on."""
    import mlx.core as mx

    dt = getattr(mx, dtype)
    a = mx.random.normal((n, n)).astype(dt)
    b = mx.random.normal((n, n)).astype(dt)
    mx.eval(a, b, a @ b)
    reps, t0 = 0, now()
    while reps < 2 or now() - t0 < 0.5:
        mx.eval(a @ b)
        reps += 1
    return 2 * n**3 * reps / (now() - t0) / 1e9


def mlx_modules(obj) -> list:
    """The MLX modules an object holds, directly or in lists (a pipeline's text encoders)."""
    import mlx.nn as nn

    found = []
    for value in vars(obj).values():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, nn.Module):
                found.append(v)
    return found


def count_calls(module, record: list[int]) -> None:
    """Make every call of `module` append its batch size to `record`.

    The class of the instance is swapped for a subclass so that `self.unet(...)` inside the pipeline
    goes through the counter (Python looks __call__ up on the type). Inside an mx.compile'd function
    this runs only while tracing; see count_compiled_calls.
    """
    cls = type(module)

    def __call__(self, x, *args, **kwargs):
        record.append(int(x.shape[0]))
        return cls.__call__(self, x, *args, **kwargs)

    module.__class__ = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})


def count_compiled_calls(obj, name: str, unet_calls: list[int], record: list[list[int]]) -> bool:
    """Wrap obj.name, a (possibly compiled) function that calls the UNet, so that each call appends the
    batch sizes of the UNet calls it makes to `record`. A compiled call that replays its graph runs no
    Python, so it is credited with the UNet calls of the previous call that did run them."""
    fn = getattr(obj, name, None)
    if not callable(fn):
        return False

    def counted(*args, **kwargs):
        before = len(unet_calls)
        out = fn(*args, **kwargs)
        ran = unet_calls[before:]
        record.append(list(ran) if ran else list(record[-1] if record else []))
        return out

    setattr(obj, name, counted)
    return True


def image_std(pixels) -> float:
    import numpy as np

    return float(np.asarray(pixels, dtype=np.float32).std())


def timed_steps(latents_per_step, peer: str):
    """Run a peer's denoising generator, timing each step from the request for its latents to their
    evaluation (the graph a generator builds counts too, for every peer alike). Returns the step times
    and the last latents."""
    import mlx.core as mx

    steps: list[float] = []
    latents = None
    generator = iter(latents_per_step)
    while True:
        t = now()
        x = next(generator, None)
        if x is None:
            return steps, latents
        mx.eval(x)
        steps.append(now() - t)
        log(f"[{peer}] step {len(steps)}: {steps[-1]:.2f} s")
        latents = x


def finish(result: dict, steps: list[float], t_start: float) -> dict:
    result["step_s"] = steps
    result["first_step_s"] = steps[0] if steps else None
    result["step_median_s"] = median_step(steps)
    result["denoise_s"] = sum(steps)
    result["total_s"] = now() - t_start
    result["max_rss_bytes"] = max_rss_bytes()
    return result


# ------------------------------------------------------------------------------------------ peers (workers)


def record_mlx_load(res: dict, peer: str, seconds: float) -> None:
    """Load time and the memory an MLX peer holds once its weights are materialised."""
    res["load_s"] = seconds
    res["mlx_active_after_load_bytes"] = mlx_active_memory()
    res["mlx_peak_load_bytes"] = mlx_peak_memory()
    res["rss_after_load_bytes"] = max_rss_bytes()
    log(f"[{peer}] loaded in {seconds:.2f} s")


def run_ours(spec: dict) -> dict:
    import mlx.core as mx

    from mlx_img2img import Img2ImgPipeline

    res: dict = {"peer": "ours", "compute_dtype": spec["dtype"], "notes": []}
    kwargs = {}
    if spec.get("quantize"):
        kwargs["quantize"] = int(spec["quantize"])
    if spec.get("low_memory"):
        kwargs["low_memory"] = True
    t = now()
    pipe = Img2ImgPipeline.from_pretrained(spec["folder"], dtype=spec["dtype"], **kwargs)
    res["construct_s"] = now() - t
    # Lazy loading would otherwise hide in the first stage that uses a module: the text encoders (held by
    # the pipeline's conditioner, not as attributes) in the prompt encoding, the UNet in step 1.
    mx.eval([m.parameters() for m in mlx_modules(pipe) + list(pipe.text_encoders)])
    record_mlx_load(res, "ours", now() - t)

    unet_calls: list[int] = []
    count_calls(pipe.unet, unet_calls)
    predict_calls: list[list[int]] = []
    compiled = count_compiled_calls(pipe, "_predict", unet_calls, predict_calls)
    peaks = StagePeaks()
    w, h = spec["size"]
    pil = input_image(w, h, spec["seed"])
    negative = spec["negative_prompt"] or None  # None: SDXL's zeroed negative, as diffusers does

    # Measured through the call users run: the pipeline reports each stage as its result is computed,
    # and each denoising step as an event after its latents are evaluated.
    stage_keys = {"encode_prompt": "encode_prompt", "encode_image": "vae_encode", "add_noise": "add_noise",
                  "decode": "vae_decode"}
    steps: list[float] = []
    clock = {"t": now()}

    def on_stage(name: str) -> None:
        t = now()
        if name in stage_keys:
            res[f"{stage_keys[name]}_s"] = t - clock["t"]
            peaks.mark(stage_keys[name])
        elif name == "denoise":
            peaks.mark("denoise")
        clock["t"] = t

    def on_step(event) -> None:
        t = now()
        steps.append(t - clock["t"])
        log(f"[ours] step {len(steps)}: {steps[-1]:.2f} s")
        clock["t"] = t

    t_start = clock["t"] = now()
    result = pipe(prompt=spec["prompt"], image=pil, strength=spec["strength"], num_inference_steps=spec["steps"],
                  guidance_scale=spec["guidance"], negative_prompt=negative, num_images_per_prompt=spec["batch"],
                  seed=spec["seed"], scheduler=spec.get("scheduler"), on_stage=on_stage, on_step=on_step)
    images, latents = result.images, result.latents
    res["scheduler"] = spec.get("scheduler") or pipe.default_scheduler
    cond = pipe.encode_prompt(spec["prompt"], negative, num_images_per_prompt=spec["batch"],
                              guidance_scale=spec["guidance"])  # remembered from the call: costs nothing
    res["context_tokens"] = int(cond.context.shape[1])
    finish(res, steps, t_start)
    # One evaluation per prediction; on a CPU its batch may run as parts on parallel streams.
    batches = [sum(call) for call in predict_calls] if compiled else unet_calls
    res["unet_evals"], res["unet_call_batches"], res["steps_yielded"] = len(batches), batches, len(steps)
    parts = max((len(call) for call in predict_calls), default=1) if compiled else 1
    if parts > 1:
        res["notes"].append(f"each UNet evaluation ran as {parts} batch parts on parallel CPU streams")
    res["unet_counted_at"] = "Img2ImgPipeline._predict (compiled; UNet calls seen while tracing)" if compiled \
        else "UNet __call__"
    res["unet_traces"] = len(unet_calls) if compiled else None
    res["mlx_peak_by_stage_bytes"] = {"load": res["mlx_peak_load_bytes"], **peaks.peaks}
    res["mlx_peak_generate_bytes"] = max(peaks.peaks.values())
    res["mlx_peak_denoise_bytes"] = peaks.peaks["denoise"]
    res["mlx_peak_vae_decode_bytes"] = peaks.peaks["vae_decode"]
    res["mlx_peak_bytes"] = max(res["mlx_peak_load_bytes"], res["mlx_peak_generate_bytes"])
    res["latents_finite"] = bool(mx.all(mx.isfinite(latents.astype(mx.float32))).item())
    res["image_std"] = image_std(images[0])
    res["latent_dtype"] = str(latents.dtype).removeprefix("mlx.core.")
    if res["unet_evals"] != len(steps):
        res["notes"].append(f"{res['unet_evals']} UNet evaluations counted for {len(steps)} steps")
    res["mlx_matmul_gflops"] = mlx_matmul_gflops()
    if spec.get("quantize"):
        del pipe, cond, latents
        res["quantized_psnr_db"] = psnr(images, float_images(spec, pil))
    return res


def float_images(spec: dict, pil) -> list:
    """The same generation (same seed, so the same noise draws) with float weights, for PSNR."""
    from mlx_img2img import Img2ImgPipeline, SeededNoise

    pipe = Img2ImgPipeline.from_pretrained(spec["folder"], dtype=spec["dtype"],
                                           low_memory=bool(spec.get("low_memory")))
    return pipe(spec["prompt"], pil, strength=spec["strength"], num_inference_steps=spec["steps"],
                guidance_scale=spec["guidance"], negative_prompt=spec["negative_prompt"] or None,
                num_images_per_prompt=spec["batch"], scheduler=spec.get("scheduler"),
                noise_source=SeededNoise(spec["seed"])).images


def psnr(images: list, references: list) -> float:
    """Peak signal-to-noise ratio in dB of 8-bit images against references (inf when identical)."""
    import numpy as np

    a = np.stack([np.asarray(i, np.float64) for i in images])
    b = np.stack([np.asarray(i, np.float64) for i in references])
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def hf_cache_layout(folder: Path, repo: str, cache: Path) -> Path:
    """Lay `folder` out as the Hugging Face cache entry of `repo` (symlinks; refs/main -> a fake commit).

    diffuse-mlx fetches fixed file names through hf_hub_download; an fp16-only variant is linked under
    the plain name, and tokenizer.json-only tokenizers get vocab.json + merges.txt written beside.
    """
    folder = folder.resolve()
    commit = hashlib.sha1(str(folder).encode()).hexdigest()
    entry = cache / ("models--" + repo.replace("/", "--"))
    if entry.exists():
        shutil.rmtree(entry)
    snap = entry / "snapshots" / commit
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            link = snap / path.relative_to(folder)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path)
    for comp in ("unet", "vae"):
        _link_plain(snap / comp, "diffusion_pytorch_model")
    unet_config = snap / "unet" / "config.json"
    config = json.loads(unet_config.read_text())
    if isinstance(config.get("transformer_layers_per_block"), int):
        # diffusers now saves one int for every block; the hub files have a list or no key, and mlx-examples
        # indexes it per block: written out as the list it means.
        config["transformer_layers_per_block"] = [config["transformer_layers_per_block"]] * len(
            config["down_block_types"])
        unet_config.unlink()
        unet_config.write_text(json.dumps(config, indent=2))
    for comp in ("text_encoder", "text_encoder_2"):
        _link_plain(snap / comp, "model")
    for tok in ("tokenizer", "tokenizer_2"):
        tj = snap / tok / "tokenizer.json"
        if tj.exists() and not (snap / tok / "vocab.json").exists():
            model = json.loads(tj.read_text(encoding="utf-8"))["model"]
            merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
            vocab_text = json.dumps(model["vocab"], ensure_ascii=False)
            (snap / tok / "vocab.json").write_text(vocab_text, encoding="utf-8")
            merges_text = "#version: 0.2\n" + "\n".join(merges) + "\n"
            (snap / tok / "merges.txt").write_text(merges_text, encoding="utf-8")
    (entry / "refs").mkdir(parents=True, exist_ok=True)
    (entry / "refs" / "main").write_text(commit)
    return cache


def _link_plain(comp_dir: Path, stem: str) -> None:
    plain = comp_dir / f"{stem}.safetensors"
    if not comp_dir.is_dir() or plain.exists():
        return
    variants = sorted(comp_dir.glob(f"{stem}.*.safetensors"))
    if variants:
        plain.symlink_to(variants[0].resolve())


def run_diffuse_mlx(spec: dict) -> dict:
    os.environ["HF_HUB_CACHE"] = spec["hf_cache"]
    os.environ["HF_HUB_OFFLINE"] = "1"
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np

    try:
        from diffuse_mlx.stable_diffusion import StableDiffusion, StableDiffusionXL
    except ImportError:
        raise RuntimeError("diffuse-mlx is not installed (pip install diffuse-mlx)") from None

    res: dict = {"peer": "diffuse-mlx", "compute_dtype": spec["dtype"], "notes": []}
    xl = spec["xl"]
    cls = StableDiffusionXL if xl else StableDiffusion
    t = now()
    sd = cls(spec["diffuse_mlx_repo"], float16=spec["dtype"] == "float16")
    if spec.get("quantize"):  # as its CLI does, with the requested bit width
        bits = int(spec["quantize"])
        for name in ("text_encoder", "text_encoder_1", "text_encoder_2"):
            if getattr(sd, name, None) is not None:
                nn.quantize(getattr(sd, name), bits=bits,
                            class_predicate=lambda _, m: isinstance(m, nn.Linear))
        nn.quantize(sd.unet, group_size=32, bits=bits)
    res["construct_s"] = now() - t
    sd.ensure_models_are_loaded()
    record_mlx_load(res, "diffuse-mlx", now() - t)

    calls: list[int] = []
    count_calls(sd.unet, calls)
    peaks = StagePeaks()
    mx.random.seed(spec["seed"])
    w, h = spec["size"]
    pixels = np.asarray(input_image(w, h, spec["seed"]), dtype=np.float32) / 127.5 - 1.0
    batch, cfg = spec["batch"], spec["guidance"]

    t_start = t = now()
    cond = sd._get_text_conditioning(spec["prompt"], batch, cfg, spec["negative_prompt"])
    mx.eval(cond)
    res["encode_prompt_s"] = now() - t
    peaks.mark("encode_prompt")
    context = cond[0] if xl else cond
    res["context_tokens"] = int(context.shape[1])
    text_time = None
    if xl:
        cond, pooled = cond
        text_time = (pooled, mx.array([[h, w, 0, 0, h, w]] * len(pooled), dtype=mx.float32))

    t = now()
    x0, _ = sd.autoencoder.encode(mx.array(pixels)[None])
    mx.eval(x0)
    res["vae_encode_s"] = now() - t
    peaks.mark("vae_encode")

    t = now()
    start_time = sd.sampler.max_time * spec["strength"]
    n_steps = int(spec["steps"] * spec["strength"])
    x0 = mx.broadcast_to(x0, (batch, *x0.shape[1:]))
    # Its img2img path leaves float32 VAE latents in the loop, which silently promotes a float16 UNet to
    # float32; its text-to-image path casts the start latents to the model dtype, as done here.
    x_t = sd.sampler.add_noise(x0, mx.array(start_time)).astype(sd.dtype)
    mx.eval(x_t)
    res["add_noise_s"] = now() - t
    peaks.mark("add_noise")
    res["notes"].append("start latents cast to the model dtype (its txt2img behaviour)")

    steps, x_t = timed_steps(sd._denoising_loop(x_t, start_time, cond, n_steps, cfg, text_time=text_time),
                             "diffuse-mlx")

    peaks.mark("denoise")
    t = now()
    decoded = sd.decode(x_t)
    image = np.array((decoded * 255).astype(mx.uint8))
    res["vae_decode_s"] = now() - t
    peaks.mark("vae_decode")
    finish(res, steps, t_start)
    return record_apple_peer(res, sd, calls, steps, peaks, x_t, image)


def record_apple_peer(res: dict, sd, calls: list[int], steps: list[float], peaks: StagePeaks, latents,
                      image) -> dict:
    """The figures diffuse-mlx and mlx-examples report alike (same StableDiffusion class shape)."""
    import mlx.core as mx

    res["unet_evals"], res["unet_call_batches"], res["steps_yielded"] = len(calls), calls, len(steps)
    res["mlx_peak_by_stage_bytes"] = {"load": res["mlx_peak_load_bytes"], **peaks.peaks}
    res["mlx_peak_generate_bytes"] = max(peaks.peaks.values())
    res["mlx_peak_denoise_bytes"] = peaks.peaks.get("denoise")
    res["mlx_peak_vae_decode_bytes"] = peaks.peaks.get("vae_decode")
    res["mlx_peak_bytes"] = max(res["mlx_peak_load_bytes"], res["mlx_peak_generate_bytes"])
    res["latents_finite"] = bool(mx.all(mx.isfinite(latents.astype(mx.float32))).item())
    res["image_std"] = image_std(image[0])
    res["latent_dtype"] = str(latents.dtype).removeprefix("mlx.core.")
    res["scheduler"] = type(sd.sampler).__name__
    res["mlx_matmul_gflops"] = mlx_matmul_gflops()
    return res


def stage_mlx_examples(clone: Path, bench: Path) -> tuple[str, str]:
    """Copy the stable_diffusion/ folder of an mlx-examples clone (a work tree, the folder itself, or a bare
    git directory) to bench/mlx-examples/<commit>/, outside the project, unmodified. Returns that folder
    (to import its `stable_diffusion` package from) and the commit (or "work tree")."""
    import io
    import tarfile

    clone = clone.expanduser().resolve()
    tree = next((d for d in (clone / "stable_diffusion", clone) if (d / "stable_diffusion" / "__init__.py").is_file()),
                None)
    git = ["git", "-C", str(clone)]
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    if tree is not None:
        status = subprocess.run([*git, "status", "--porcelain", "--", str(tree)], capture_output=True, text=True)
        commit = (commit + ("+dirty" if status.stdout.strip() else "")) if commit else "work tree"
    elif not commit:
        raise SystemExit(f"--mlx-examples {clone}: not an mlx-examples clone (no stable_diffusion/ folder)")
    dest = bench / "mlx-examples" / hashlib.sha1(f"{clone}:{commit}".encode()).hexdigest()[:12]
    if dest.exists():
        shutil.rmtree(dest)
    if tree is not None:
        shutil.copytree(tree, dest, ignore=shutil.ignore_patterns("*.png", "__pycache__"))
    else:
        archive = subprocess.run([*git, "archive", "--format=tar", "HEAD", "stable_diffusion"], capture_output=True)
        if archive.returncode:
            raise SystemExit(f"--mlx-examples {clone}: {archive.stderr.decode().strip()}")
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(dest.parent / (dest.name + ".tmp"), filter="data")
        (dest.parent / (dest.name + ".tmp") / "stable_diffusion").rename(dest)
        shutil.rmtree(dest.parent / (dest.name + ".tmp"))
    return str(dest), commit


def mlx_examples_repo(folder: Path) -> str | None:
    """The repo id mlx-examples would load a model of this layout under: it knows two, SD 2.1-base and
    SDXL-Turbo, and builds linear attention projections only (so no SD 1.x layout)."""
    unet = json.loads((folder / "unet" / "config.json").read_text())
    if unet.get("addition_embed_type") == "text_time":
        return "stabilityai/sdxl-turbo"
    return "stabilityai/stable-diffusion-2-1-base" if unet.get("use_linear_projection") else None


def run_mlx_examples(spec: dict) -> dict:
    """Apple's example through its own img2img call, as its image2image.py makes it: the stages are timed by
    wrappers on the instance that evaluate what each one returns; the example's code is not changed."""
    if not spec.get("mlx_examples_dir"):
        raise RuntimeError("no mlx-examples clone: give --mlx-examples PATH (git clone "
                           "https://github.com/ml-explore/mlx-examples) or set MLX_EXAMPLES")
    if not spec.get("mlx_examples_repo"):
        raise RuntimeError("mlx-examples cannot load this model's layout (it loads SD 2.1-base and SDXL-Turbo)")
    os.environ["HF_HUB_CACHE"] = spec["hf_cache"]
    os.environ["HF_HUB_OFFLINE"] = "1"
    sys.path.insert(0, spec["mlx_examples_dir"])
    import mlx.core as mx
    import numpy as np
    from stable_diffusion import StableDiffusion, StableDiffusionXL

    if spec.get("quantize") or spec["batch"] != 1:
        raise RuntimeError("the mlx-examples peer runs batch 1 without quantization")
    res: dict = {"peer": "mlx-examples", "compute_dtype": spec["dtype"], "notes": [],
                 "commit": spec.get("mlx_examples_commit")}
    t = now()
    sd = (StableDiffusionXL if spec["xl"] else StableDiffusion)(spec["mlx_examples_repo"],
                                                                 float16=spec["dtype"] == "float16")
    res["construct_s"] = now() - t
    sd.ensure_models_are_loaded()
    record_mlx_load(res, "mlx-examples", now() - t)

    calls: list[int] = []
    count_calls(sd.unet, calls)
    peaks = StagePeaks()
    stage_s: dict[str, float] = {}
    outputs: dict = {}

    def timed(obj, name: str, stage: str) -> None:
        fn = getattr(obj, name)

        def wrapper(*args, **kwargs):
            t = now()
            out = fn(*args, **kwargs)
            mx.eval(out)
            outputs[stage] = out
            stage_s[stage] = stage_s.get(stage, 0.0) + now() - t
            peaks.mark(stage)
            return out

        setattr(obj, name, wrapper)

    timed(sd, "_get_text_conditioning", "encode_prompt")
    timed(sd.autoencoder, "encode", "vae_encode")
    w, h = spec["size"]
    pixels = mx.array(np.asarray(input_image(w, h, spec["seed"]), dtype=np.float32) / 255) * 2 - 1
    cfg = spec["guidance"]

    t_start = now()
    latents = sd.generate_latents_from_image(pixels, spec["prompt"], n_images=1, strength=spec["strength"],
                                             num_steps=spec["steps"], cfg_weight=cfg,
                                             negative_text=spec["negative_prompt"], seed=spec["seed"])
    steps, x_t = timed_steps(latents, "mlx-examples")
    peaks.mark("denoise")
    # The first request for latents also ran the prompt encoding and the VAE encode (timed above).
    steps[0] -= stage_s.get("encode_prompt", 0.0) + stage_s.get("vae_encode", 0.0)
    t = now()
    image = np.array((sd.decode(x_t) * 255).astype(mx.uint8))
    res["vae_decode_s"] = now() - t
    peaks.mark("vae_decode")
    finish(res, steps, t_start)
    res["encode_prompt_s"], res["vae_encode_s"] = stage_s.get("encode_prompt"), stage_s.get("vae_encode")
    context = outputs.get("encode_prompt")
    res["context_tokens"] = int((context[0] if spec["xl"] else context).shape[1]) if context is not None else None
    res["notes"].append("pads prompts to the longer of prompt and negative prompt, not to 77 tokens")
    return record_apple_peer(res, sd, calls, steps, peaks, x_t, image)


@contextlib.contextmanager
def busy_processes(n: int):
    """n CPU-bound processes for the duration of the block (a machine kept busy on purpose)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    if procs:
        log(f"[busy] {n} CPU-bound process(es) running beside the peers: {[p.pid for p in procs]}")
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def _torch_device():
    """The device a user of diffusers would pick: CUDA, else Apple's mps, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _sync(device) -> None:
    """Wait for queued GPU work, so wall times measure it (torch on a CPU is synchronous)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def _timed(obj, name: str, bucket: list[float], device=None) -> None:
    """Replace obj.name by a wrapper adding each call's wall time (GPU work included) to bucket."""
    fn = getattr(obj, name)

    def wrapper(*args, **kwargs):
        t = now()
        try:
            return fn(*args, **kwargs)
        finally:
            if device is not None:
                _sync(device)
            bucket.append(now() - t)

    setattr(obj, name, wrapper)


def run_diffusers(spec: dict) -> dict:
    import numpy as np
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline
    from diffusers import schedulers as dschedulers
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    dlogging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch_dtype, kept for older diffusers
    device = _torch_device()
    # Half precision where torch has it (CUDA, mps); on a CPU it is unsupported or very slow.
    dtype_name = spec["dtype"] if device.type != "cpu" else "float32"
    torch_dtype = getattr(torch, dtype_name)
    res: dict = {"peer": "diffusers", "compute_dtype": dtype_name, "notes": [], "torch_device": device.type,
                 "torch_threads": torch.get_num_threads()}
    if dtype_name != spec["dtype"]:
        res["notes"].append(f"runs float32: {spec['dtype']} on a CPU is unsupported or very slow in PyTorch")
    if spec.get("quantize"):
        res["notes"].append("not quantized")
    xl = spec["xl"]
    t = now()
    if xl:
        pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(spec["folder"], torch_dtype=torch_dtype)
    else:
        pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
            spec["folder"], torch_dtype=torch_dtype, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    pipe = pipe.to(device)
    _sync(device)
    pipe.set_progress_bar_config(disable=True)
    if spec.get("scheduler"):
        cls_name, overrides = DIFFUSERS_SCHEDULERS[spec["scheduler"]]
        pipe.scheduler = getattr(dschedulers, cls_name).from_config(pipe.scheduler.config, **overrides)
    res["load_s"] = res["construct_s"] = now() - t
    res["rss_after_load_bytes"] = max_rss_bytes()
    log(f"[diffusers] loaded in {res['load_s']:.2f} s")

    text_t: list[float] = []
    enc_t: list[float] = []
    dec_t: list[float] = []
    steps: list[float] = []
    calls: list[int] = []
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            _timed(getattr(pipe, name), "forward", text_t, device)
    _timed(pipe.vae, "encode", enc_t, device)
    _timed(pipe.vae, "decode", dec_t, device)
    forward = pipe.unet.forward

    def unet_forward(sample, *args, **kwargs):
        calls.append(int(sample.shape[0]))
        t = now()
        try:
            return forward(sample, *args, **kwargs)
        finally:
            _sync(device)
            steps.append(now() - t)
            log(f"[diffusers] step {len(steps)}: {steps[-1]:.2f} s")

    pipe.unet.forward = unet_forward
    w, h = spec["size"]
    pil = input_image(w, h, spec["seed"])
    t_start = now()
    with torch.inference_mode():
        out = pipe(prompt=spec["prompt"], negative_prompt=spec["negative_prompt"] or None, image=pil,
                   strength=spec["strength"], num_inference_steps=spec["steps"],
                   guidance_scale=spec["guidance"], num_images_per_prompt=spec["batch"],
                   generator=torch.Generator().manual_seed(spec["seed"]), output_type="np")
    total = now() - t_start
    if device.type == "cuda":
        res["torch_cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    res["encode_prompt_s"], res["vae_encode_s"], res["vae_decode_s"] = sum(text_t), sum(enc_t), sum(dec_t)
    finish(res, steps, t_start)
    res["total_s"] = total
    res["unet_evals"], res["unet_call_batches"], res["steps_yielded"] = len(calls), calls, len(steps)
    res["context_tokens"] = 77
    res["scheduler"] = type(pipe.scheduler).__name__
    images = out.images
    res["latents_finite"] = bool(np.isfinite(images).all())
    res["image_std"] = image_std(images[0] * 255)
    return res


# ------------------------------------------------------------------------------------------ building models


def _without_class(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "_class_name"}


def build_model(spec: dict) -> dict:
    """Construct the architecture with the libraries' default initialisation, check that a UNet call is
    finite, cast to the save dtype and save_pretrained it in the diffusers layout with the real CLIP
    tokenizer files."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers import schedulers as dschedulers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    sys.path.insert(0, str(REPO_ROOT))
    from tests.clip_vocab import write_clip_tokenizer_files

    arch = ARCHS[spec["arch"]]
    folder = Path(spec["folder"])
    save_dtype = getattr(torch, spec["save_dtype"])
    torch.manual_seed(spec["seed"])
    info: dict = {"arch": spec["arch"], "hub_config_of": arch["hub"], "save_dtype": spec["save_dtype"],
                  "seed": spec["seed"], "params": {}}

    parts: dict = {}
    for name, cfg in arch["text_encoders"].items():
        cls = CLIPTextModelWithProjection if "WithProjection" in cfg["architectures"][0] else CLIPTextModel
        t = now()
        parts[name] = cls(CLIPTextConfig(**cfg)).eval()
        log(f"[build] {name}: {time.perf_counter() - t:.1f} s")

    t = now()
    unet = UNet2DConditionModel.from_config(_without_class(arch["unet"])).eval()
    log(f"[build] unet: {now() - t:.1f} s")
    with torch.inference_mode():  # one small float32 call: random weights must give finite output
        sample = torch.randn(1, 4, 16, 16)
        context = torch.randn(1, 77, arch["unet"]["cross_attention_dim"])
        extra = {}
        if arch["xl"]:
            u = arch["unet"]
            pooled_dim = u["projection_class_embeddings_input_dim"] - 6 * u["addition_time_embed_dim"]
            extra["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled_dim),
                                          "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]])}
        out = unet(sample, 500, context, **extra).sample
    info["unet_check"] = {"finite": bool(torch.isfinite(out).all()), "std": float(out.std()),
                          "max_abs": float(out.abs().max())}
    if not info["unet_check"]["finite"]:
        raise RuntimeError(f"random UNet produced non-finite output: {info['unet_check']}")
    parts["unet"] = unet.to(save_dtype)
    parts["vae"] = AutoencoderKL.from_config(_without_class(arch["vae"])).eval()
    for name in arch["text_encoders"]:
        parts[name] = parts[name].to(save_dtype)
    parts["vae"] = parts["vae"].to(save_dtype)
    for name in ("unet", "vae", *arch["text_encoders"]):
        info["params"][name] = sum(p.numel() for p in parts[name].parameters())

    sched_cfg = dict(arch["scheduler"])
    parts["scheduler"] = getattr(dschedulers, sched_cfg.pop("_class_name")).from_config(sched_cfg)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        vocab = tmp / "_vocab"
        write_clip_tokenizer_files(vocab)
        for name, pad in arch["tokenizers"].items():
            parts[name] = CLIPTokenizer(str(vocab / "vocab.json"), str(vocab / "merges.txt"), pad_token=pad,
                                        model_max_length=77)
        if arch["xl"]:
            from diffusers import StableDiffusionXLImg2ImgPipeline as Pipe
        else:
            from diffusers import StableDiffusionImg2ImgPipeline as Pipe
            parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        t = now()
        Pipe(**parts).save_pretrained(tmp, safe_serialization=True)
        log(f"[build] saved in {now() - t:.1f} s")
        shutil.rmtree(vocab)
        # The tokenizer folders of the hub models: vocab.json, merges.txt and the two small configs.
        for name, pad in arch["tokenizers"].items():
            shutil.rmtree(tmp / name)
            write_clip_tokenizer_files(tmp / name, pad_token=pad)
        (tmp / "bench_model.json").write_text(json.dumps(info, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
        folder.chmod(0o755)  # mkdtemp made it private
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return info


# ------------------------------------------------------------------------------------------ orchestration

WORKERS = {"ours": run_ours, "mlx-examples": run_mlx_examples, "diffuse-mlx": run_diffuse_mlx,
           "diffusers": run_diffusers, "build": build_model}


def worker_main(kind: str, spec_path: str, out_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    try:
        result = WORKERS[kind](spec)
        code = 0
    except Exception as e:  # reported in the JSON; the parent carries on with the other peers
        result = {"peer": kind, "error": f"{type(e).__name__}: {e}",
                  "traceback": traceback.format_exc()[-4000:], "max_rss_bytes": max_rss_bytes()}
        log(f"[{kind}] failed: {result['error']}")
        code = 1
    result["openblas_preloaded"] = openblas_active()
    Path(out_path).write_text(json.dumps(result, indent=2))
    return code


def spawn(kind: str, spec: dict, env: dict[str, str], timeout: float | None) -> dict:
    """Run one worker in a fresh interpreter and return its JSON (or what went wrong)."""
    with tempfile.TemporaryDirectory(prefix="mlx-bench-") as d:
        spec_path, out_path = Path(d) / "spec.json", Path(d) / "out.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind,
               "--worker-spec", str(spec_path), "--worker-out", str(out_path)]
        t = now()
        try:
            proc = subprocess.run(cmd, env=env, cwd=str(REPO_ROOT), timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"peer": kind, "error": f"timed out after {timeout:.0f} s"}
        if out_path.exists():
            result = json.loads(out_path.read_text())
        else:
            why = "killed, out of memory?" if proc.returncode < 0 else "no output"
            result = {"peer": kind, "error": f"worker died with exit code {proc.returncode} ({why})"}
        result["process_wall_s"] = now() - t
        return result


def detect_arch(folder: Path) -> str:
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "sd15"
    if unet.get("addition_embed_type") == "text_time":
        return "sdxl"
    return "sd21-base" if unet.get("cross_attention_dim") == 1024 else "sd15"


def environment(mlx_env: dict[str, str]) -> dict:
    """The machine and library versions; the OpenBLAS fields describe the MLX peers' environment."""
    from importlib import metadata

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        commit = head + ("+dirty" if dirty else "") if head else None
    return {
        "platform": platform.platform(), "machine": platform.machine(), "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "mlx": version("mlx"), "mlx_img2img": version("mlx-img2img"),
        "mlx_img2img_commit": commit, "diffuse_mlx": version("diffuse-mlx"), "torch": version("torch"),
        "diffusers": version("diffusers"), "transformers": version("transformers"),
        "openblas_preloaded": mlx_env.get(OPENBLAS_FLAG) == "1", "ld_preload": mlx_env.get("LD_PRELOAD"),
        "openblas_coretype": mlx_env.get("OPENBLAS_CORETYPE"),
        "openblas_threads": mlx_env.get("OPENBLAS_NUM_THREADS"),
    }


RATIO_METRICS = [  # (key, label, scale, unit)
    ("load_s", "load", 1, "s"),
    ("encode_prompt_s", "prompt encoding", 1, "s"),
    ("vae_encode_s", "VAE encode", 1, "s"),
    ("first_step_s", "first UNet step", 1, "s"),
    ("step_median_s", "UNet step (median)", 1, "s"),
    ("vae_decode_s", "VAE decode", 1, "s"),
    ("total_s", "total (no load)", 1, "s"),
    ("mlx_peak_bytes", "MLX peak memory", 2**-30, "GiB"),
    ("mlx_peak_load_bytes", "  peak: load", 2**-30, "GiB"),
    ("mlx_peak_denoise_bytes", "  peak: UNet steps", 2**-30, "GiB"),
    ("mlx_peak_vae_decode_bytes", "  peak: VAE decode", 2**-30, "GiB"),
    ("max_rss_bytes", "max RSS", 2**-30, "GiB"),
]


TIME_KEYS = ("construct_s", "load_s", "encode_prompt_s", "vae_encode_s", "add_noise_s", "first_step_s",
             "step_median_s", "denoise_s", "vae_decode_s", "total_s")


def best_of(results: list[dict]) -> dict:
    """One peer's rounds folded into one result: the fastest time of each stage (the round least disturbed
    by other work on the machine), the largest memory; every round is kept under "rounds"."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[-1]
    best = dict(ok[0])
    if len(results) > 1:
        for key in TIME_KEYS:
            values = [r[key] for r in ok if isinstance(r.get(key), (int, float))]
            if values:
                best[key] = min(values)
        for key in ("mlx_peak_bytes", "max_rss_bytes", "mlx_peak_load_bytes", "mlx_peak_generate_bytes",
                    "mlx_peak_denoise_bytes", "mlx_peak_vae_decode_bytes"):
            values = [r[key] for r in ok if isinstance(r.get(key), (int, float))]
            if values:
                best[key] = max(values)
        best["rounds"] = results
        best["failed_rounds"] = len(results) - len(ok)
    return best


def ratios(peers: dict) -> dict:
    ours = peers.get("ours", {})
    out = {}
    for name, res in peers.items():
        if name == "ours" or "error" in res or "error" in ours:
            continue
        out[name] = {key: ours[key] / res[key] for key, *_ in RATIO_METRICS
                     if isinstance(ours.get(key), (int, float)) and isinstance(res.get(key), (int, float))
                     and res[key] > 0}
    return out


def fmt(value, scale: float) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    v = value * scale
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"


def render(report: dict) -> str:
    c, env, peers = report["config"], report["environment"], report["peers"]
    names = list(peers)
    lines = [
        f"mlx_img2img benchmark: {c['arch']} architecture ({c['weights']}), {c['size'][0]}x{c['size'][1]}, "
        f"{c['steps']} steps x strength {c['strength']} -> {int(c['steps'] * c['strength'])} UNet steps, "
        f"batch {c['batch']}, guidance {c['guidance']}, scheduler {c['scheduler'] or 'model'}, "
        f"dtype {c['dtype']}"
        + (f", {c['quantize']}-bit" if c.get("quantize") else "")
        + (", low-memory mode (ours)" if c.get("low_memory") else ""),
        f"machine: {env['cpu']} ({env['cpu_count']} cpus), {env['platform']}; mlx {env['mlx']}, "
        f"torch {env['torch']}, diffusers {env['diffusers']}, diffuse-mlx {env['diffuse_mlx']}, "
        f"mlx-examples {c.get('mlx_examples_commit') or '-'}, ours {env['mlx_img2img_commit']}",
    ]
    if c.get("busy"):
        lines.append(f"busy machine: {c['busy']} CPU-bound process(es) ran beside every peer")
    if sys.platform == "linux":
        if env["openblas_preloaded"]:
            lines.append(f"OpenBLAS preload: ACTIVE for the MLX peers (LD_PRELOAD={env['ld_preload']}, "
                         f"OPENBLAS_CORETYPE={env['openblas_coretype']}, "
                         f"OPENBLAS_NUM_THREADS={env.get('openblas_threads') or 'default'}); "
                         "diffusers keeps torch's own BLAS")
        else:
            lines.append("OpenBLAS preload: off (MLX's CPU wheel uses its bundled reference BLAS)")
    gflops = {n: peers[n].get("mlx_matmul_gflops") for n in names if peers[n].get("mlx_matmul_gflops")}
    if gflops:
        lines.append("MLX 1024x1024 float32 matmul: "
                     + ", ".join(f"{n} {g:.1f} GFLOP/s" for n, g in gflops.items()))
    lines.append("")
    rat = report["ratios"]
    header = ["metric", *names, *[f"ours/{n}" for n in rat]]
    rows = []
    for key, label, scale, unit in RATIO_METRICS:
        row = [f"{label} ({unit})"]
        row += [fmt(peers[n].get(key), scale) if "error" not in peers[n] else "-" for n in names]
        row += [f"{rat[n][key]:.2f}x" if key in rat[n] else "-" for n in rat]
        rows.append(row)
    def batches(res: dict) -> str:
        return ",".join(map(str, sorted(set(res.get("unet_call_batches") or [])))) or "-"

    facts = [("UNet evaluations", lambda r: r.get("unet_evals", "-")), ("UNet call batch", batches),
             ("compute dtype", lambda r: r.get("compute_dtype", "-")),
             ("scheduler", lambda r: r.get("scheduler", "-")),
             ("text tokens", lambda r: r.get("context_tokens", "-")),
             ("output finite", lambda r: r.get("latents_finite", "-"))]
    if any("quantized_psnr_db" in peers[n] for n in names):
        facts.append(("PSNR vs float (dB)", lambda r: fmt(r.get("quantized_psnr_db"), 1)))
    for label, get in facts:
        rows.append([label, *[str(get(peers[n])) for n in names], *["" for _ in rat]])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths], *rows]:
        lines.append("  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in
                               enumerate(zip(r, widths, strict=True))))
    lines.append("")
    lines.append("ratios below 1 favour ours; load = weights read and materialised; total = prompt to image"
                 + (f"; fastest of {c['repeat']} rounds per stage" if c.get("repeat", 1) > 1 else ""))
    loads = {n: peers[n].get("load_average_before") for n in names}
    if any(v is not None for v in loads.values()):
        lines.append("1-minute load average when each peer started: "
                     + ", ".join(f"{n} {v:.1f}" for n, v in loads.items() if v is not None)
                     + f" ({env['cpu_count']} cpus; other work on the machine inflates the timings)")
    for n in names:
        res = peers[n]
        if "error" in res:
            lines.append(f"{n}: FAILED: {res['error']}")
        for note in res.get("notes", []):
            lines.append(f"{n}: {note}")
        if res.get("latents_finite") is False:
            lines.append(f"{n}: WARNING: non-finite output, its timings may be meaningless")
    return "\n".join(lines)


def probe_blas() -> int:
    """MLX matmul throughput in two fresh processes, without and with the OpenBLAS preload."""
    code = (f"import json,sys;sys.path.insert(0,{str(Path(__file__).parent)!r});import benchmark as b;"
            "print(json.dumps({d: b.mlx_matmul_gflops(d) for d in ('float32','float16')}))")
    base = without_openblas(dict(os.environ))
    variants = [("reference BLAS (MLX's wheel)", base)]
    preload = openblas_env(base)
    if preload:
        variants.append((f"OpenBLAS preloaded ({preload['LD_PRELOAD']}, "
                         f"OPENBLAS_CORETYPE={preload.get('OPENBLAS_CORETYPE')})", preload))
    else:
        print("no system OpenBLAS found (Debian/Ubuntu: apt-get install libopenblas0-pthread)")
    for label, env in variants:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        if out.returncode:
            print(f"{label}: failed: {out.stderr.strip()[-500:]}")
            continue
        g = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{label}: MLX 1024x1024 matmul float32 {g['float32']:.1f} GFLOP/s, "
              f"float16 {g['float16']:.1f} GFLOP/s")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--arch", choices=sorted(ARCHS), default="sd15",
                   help="architecture to build (default sd15)")
    p.add_argument("--model", type=Path, help="a real model folder in the diffusers layout instead of --arch")
    p.add_argument("--size", type=parse_size, default=(256, 256), help="N or WxH (default 256)")
    p.add_argument("--steps", type=int, default=4, help="num_inference_steps (default 4)")
    p.add_argument("--strength", type=float, default=0.5, help="img2img strength (default 0.5)")
    p.add_argument("--batch", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="compute dtype of the MLX peers (diffusers on CPU always runs float32)")
    p.add_argument("--scheduler", choices=(*DIFFUSERS_SCHEDULERS, "model"), default="euler",
                   help="sampler for ours and diffusers (default euler: diffuse-mlx always runs an Euler "
                        "sampler, and it takes exactly int(steps*strength) UNet steps where the SD 1.5 "
                        "checkpoint's PNDM takes one more); 'model' = the checkpoint's scheduler")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--quantize", type=int, choices=(4, 8), help="quantize UNet and text encoders (MLX peers)")
    p.add_argument("--low-memory", action="store_true",
                   help="ours: low-memory mode (text encoders released after use, VAE in tiles)")
    p.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated subset of {','.join(PEERS)}")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the full report as JSON here")
    p.add_argument("--bench-dir", type=Path, default=REPO_ROOT / "bench",
                   help="cache for built models and the fake HF cache (default ./bench)")
    p.add_argument("--save-dtype", choices=("float16", "float32"), default="float16",
                   help="dtype of the built model's saved weights (default float16)")
    p.add_argument("--rebuild", action="store_true", help="rebuild the random-weight model even if cached")
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed per peer")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds of all peers, interleaved; each stage reports its fastest round (default 1)")
    p.add_argument("--preload-openblas", action=argparse.BooleanOptionalAction, default=True,
                   help="Linux: run the MLX peers with the system OpenBLAS preloaded (default: on, as the "
                        "mlx-img2img command does)")
    p.add_argument("--blas-threads", type=int, metavar="N",
                   help="with the preload: OPENBLAS_NUM_THREADS for the MLX peers (default: OpenBLAS's, one per "
                        "core); ours sets its own count at run time to fit its CPU streams")
    p.add_argument("--mlx-examples", type=Path, default=os.environ.get("MLX_EXAMPLES"), metavar="PATH",
                   help="a clone of github.com/ml-explore/mlx-examples (work tree or bare git directory) for the "
                        "mlx-examples peer (default: $MLX_EXAMPLES)")
    p.add_argument("--busy", type=int, default=0, metavar="N",
                   help="run N CPU-bound processes beside every peer: a reproducible busy machine (default 0)")
    p.add_argument("--probe-blas", action="store_true",
                   help="only measure MLX matmul with and without OpenBLAS")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--worker-spec", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.peer_list = [s.strip() for s in args.peers.split(",") if s.strip()]
    unknown = [s for s in args.peer_list if s not in PEERS]
    if unknown or not args.peer_list:
        p.error(f"unknown peers {unknown}; choose from {', '.join(PEERS)}")
    if args.steps < 1 or not 0 < args.strength <= 1 or args.batch < 1:
        p.error("need steps >= 1, 0 < strength <= 1 and batch >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    if args.worker:
        return worker_main(args.worker, args.worker_spec, args.worker_out)
    if args.probe_blas:
        return probe_blas()

    bench = args.bench_dir.resolve()
    if args.model is not None:
        folder = args.model.expanduser().resolve()
        if not (folder / "unet").is_dir():
            log(f"{folder} is not a diffusers-layout model folder")
            return 2
        arch, weights = detect_arch(folder), str(folder)
    else:
        arch = args.arch
        folder = bench / "models" / f"{arch}-{args.save_dtype}"
        weights = f"random, {folder}"
        if args.rebuild or not (folder / "bench_model.json").exists():
            folder.parent.mkdir(parents=True, exist_ok=True)
            log(f"[build] {arch} with random weights -> {folder}")
            built = spawn("build", {"arch": arch, "folder": str(folder), "save_dtype": args.save_dtype,
                                    "seed": args.seed}, without_openblas(dict(os.environ)), None)
            if "error" in built:
                log(f"[build] failed: {built['error']}\n{built.get('traceback', '')}")
                return 1

    spec = {
        "folder": str(folder), "arch": arch, "xl": ARCHS[arch]["xl"], "size": list(args.size),
        "steps": args.steps, "strength": args.strength, "batch": args.batch, "dtype": args.dtype,
        "guidance": args.guidance, "scheduler": None if args.scheduler == "model" else args.scheduler,
        "quantize": args.quantize, "low_memory": args.low_memory, "seed": args.seed, "prompt": args.prompt,
        "negative_prompt": args.negative_prompt, "diffuse_mlx_repo": ARCHS[arch]["diffuse_mlx_repo"],
    }
    cache = bench / "hf-cache" / hashlib.sha1(str(folder).encode()).hexdigest()[:12]
    if "diffuse-mlx" in args.peer_list:
        spec["hf_cache"] = str(hf_cache_layout(folder, spec["diffuse_mlx_repo"], cache))
    if "mlx-examples" in args.peer_list:
        spec["mlx_examples_repo"] = mlx_examples_repo(folder)
        if spec["mlx_examples_repo"]:
            spec["hf_cache"] = str(hf_cache_layout(folder, spec["mlx_examples_repo"], cache))
        if args.mlx_examples:
            spec["mlx_examples_dir"], spec["mlx_examples_commit"] = stage_mlx_examples(args.mlx_examples, bench)

    env = without_openblas(dict(os.environ))
    env.pop("HF_HUB_CACHE", None)
    env.setdefault("HF_HUB_OFFLINE", "1")
    mlx_env = env
    if args.preload_openblas and sys.platform == "linux":
        mlx_env = openblas_env(env, args.blas_threads) or env
        if mlx_env is env:
            log("no system OpenBLAS found (Debian/Ubuntu: apt-get install libopenblas0-pthread): the MLX peers "
                "run on MLX's reference BLAS")
    rounds: dict[str, list[dict]] = {name: [] for name in args.peer_list}
    with busy_processes(args.busy):
        for r in range(args.repeat):  # interleaved, so that a busy spell on the machine hits every peer
            for name in args.peer_list:
                log(f"[{name}] running" + (f" (round {r + 1}/{args.repeat})" if args.repeat > 1 else ""))
                load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
                result = spawn(name, spec, mlx_env if name in MLX_PEERS else env, args.timeout)
                result["load_average_before"] = load_avg
                rounds[name].append(result)
    peers = {name: best_of(results) for name, results in rounds.items()}
    config = {k: v for k, v in spec.items() if k not in ("folder", "hf_cache", "xl", "mlx_examples_dir")}
    config["weights"] = weights
    config["repeat"] = args.repeat
    config["busy"] = args.busy
    report = {"config": config, "environment": environment(mlx_env), "peers": peers}
    report["ratios"] = ratios(peers)
    print(render(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if all("error" not in r for r in peers.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
