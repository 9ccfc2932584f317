"""Peak memory of a full-size img2img call without the full-size weights in memory.

Two parts, for any family whose configs ship in mlx_img2img/loading/configs (default SDXL at 1024x1024):

1. Weights, counted exactly: the full-size UNet, text encoders and VAE are built from the shipped configs
   (MLX arrays are lazy: nothing is allocated until evaluated) and their parameter bytes summed per dtype,
   and for `--quantize N` after quantizing them as the loader does (loading.quantize_linear_layers on the
   UNet and text encoders, the VAE in its own dtype). The SDXL VAE runs in float32 whatever the dtype
   (force_upcast), as the loader keeps it.
2. Activations, measured: the same modules with tied weights (every parameter of one shape is one
   evaluated array, small random values; 1-D ones as built), so the weights cost a few hundred MB while
   every activation has its real shape. A real Img2ImgPipeline is assembled from them (loading.Components)
   and run once (2 steps x strength 0.5: one guided UNet step), and MLX's peak memory is read at the end
   of each stage. A stage's activations are its peak minus the tied weights resident in it.

The peak of a real run is then: the real weights resident in a stage + its activations (see README,
Performance). `--model FOLDER` runs the same call on real weights instead (the cross-check).

    python scripts/sdxl_memory.py --size 1024                   # float32 activations, SDXL
    python scripts/sdxl_memory.py --size 1024 --low-memory
    python scripts/sdxl_memory.py --size 1024 --vae-only        # the VAE stages alone
    python scripts/sdxl_memory.py --weights-only --quantize 4   # the counts alone, instantly
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# isort: off
import mlx_img2img  # noqa: E402,F401  (before mlx: it loads OpenBLAS into the process on Linux)
# isort: on
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402
from PIL import Image  # noqa: E402

from mlx_img2img.loading import TEXT_ENCODERS, Components, quantize_linear_layers  # noqa: E402
from mlx_img2img.loading.single_file import CONFIGS, shipped_tokenizer_folder  # noqa: E402
from mlx_img2img.models.clip import CLIPTextConfig, CLIPTextModel  # noqa: E402
from mlx_img2img.models.unet import UNet2DConditionModel, UNetConfig  # noqa: E402
from mlx_img2img.models.vae import AutoencoderKL, VAEConfig  # noqa: E402
from mlx_img2img.pipeline import Img2ImgPipeline  # noqa: E402
from mlx_img2img.tokenizer import CLIPTokenizer  # noqa: E402
from mlx_img2img.weights import parse_dtype  # noqa: E402

GiB = 2**30
# A float16 UNet step's activations on MLX's CPU backend over the float32 step's, measured with this script
# on SD 2.1-base (README, Performance: SDXL memory at 1024x1024).
CPU_HALF_FACTOR = 2.45


def family_config(family: str) -> dict:
    return json.loads((CONFIGS / f"{family}.json").read_text())


def build(config: dict, component: str) -> nn.Module:
    """A full-size module from its config; lazy: its parameters are not allocated."""
    if component == "unet":
        return UNet2DConditionModel(UNetConfig.from_dict(config["unet"]))
    if component == "vae":
        return AutoencoderKL(VAEConfig.from_dict(config["vae"]))
    return CLIPTextModel(CLIPTextConfig.from_dict(config[component]))


def components_of(config: dict) -> list[str]:
    return ["unet", "vae", *(n for n in TEXT_ENCODERS if n in config)]


def vae_dtype(config: dict, dtype: mx.Dtype) -> mx.Dtype:
    """As load_components: the SDXL VAE in float32 (force_upcast), others in the model's dtype."""
    sdxl = config["unet"].get("addition_embed_type") == "text_time"
    return mx.float32 if sdxl and config["vae"].get("force_upcast", True) else dtype


def parameter_bytes(module: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def weight_bytes(config: dict, dtype: mx.Dtype, quantize: int | None) -> dict[str, int]:
    """Bytes of each component's weights as the loader leaves them: in `dtype` (the SDXL VAE in float32),
    the UNet's and text encoders' linear layers quantized with `quantize` bits (packed weights, and a scale
    and a bias per group, in `dtype`). Counted on lazy modules: nothing is computed."""
    sizes = {}
    for name in components_of(config):
        module = build(config, name)
        module.set_dtype(vae_dtype(config, dtype) if name == "vae" else dtype)
        if quantize and name != "vae":
            quantize_linear_layers(module, quantize)
        sizes[name] = parameter_bytes(module)
    return sizes


def parameter_counts(config: dict) -> dict[str, int]:
    return {name: sum(v.size for _, v in tree_flatten(build(config, name).parameters()))
            for name in components_of(config)}


def tie(module: nn.Module, dtype: mx.Dtype, seed: int) -> int:
    """Give every parameter of two or more dimensions of one shape a single shared array (normal x 0.02,
    so nothing overflows), 1-D ones (norm scales and shifts, biases) their built values; evaluate them.
    Returns the bytes this module's parameters really hold."""
    pool: dict[tuple[int, ...], mx.array] = {}
    key = mx.random.key(seed)
    tied = []
    for name, value in tree_flatten(module.parameters()):
        if value.ndim >= 2:
            if value.shape not in pool:
                key, sub = mx.random.split(key)
                pool[value.shape] = (mx.random.normal(value.shape, key=sub) * 0.02).astype(dtype)
            value = pool[value.shape]
        else:
            value = value.astype(dtype)
        tied.append((name, value))
    module.update(tree_unflatten(tied))
    module.eval()
    mx.eval(module.parameters())
    unique = {id(v): v for _, v in tied}
    return sum(v.nbytes for v in unique.values())


def tied_components(config: dict, family: str, dtype: mx.Dtype, low_memory: bool) -> tuple[Components, dict]:
    """Components of a pipeline with tied weights, and the bytes each component really holds."""
    held: dict[str, int] = {}
    unet = build(config, "unet")
    held["unet"] = tie(unet, dtype, 1)
    vae = build(config, "vae")
    held["vae"] = tie(vae, vae_dtype(config, dtype), 2)
    encoder_names = [n for n in TEXT_ENCODERS if n in config]

    def load_text_encoders() -> list[nn.Module]:  # each its own pool: releasing them frees it
        encoders = []
        for i, name in enumerate(encoder_names):
            encoder = build(config, name)
            held[name] = tie(encoder, dtype, 3 + i)
            encoders.append(encoder)
        return encoders

    tokenizers = [CLIPTokenizer.from_folder(shipped_tokenizer_folder(config[n.replace("text_encoder", "tokenizer")]
                                                                     ["pad_token"])) for n in encoder_names]
    encoders = [] if low_memory else load_text_encoders()
    if low_memory:  # what they will hold once reloaded, for the accounting
        for i, name in enumerate(encoder_names):
            held[name] = tie(build(config, name), dtype, 3 + i)
    components = Components(name=f"{family} (tied weights)", tokenizers=tokenizers, text_encoders=encoders,
                            load_text_encoders=load_text_encoders, unet=unet, vae=vae,
                            scheduler_config=config["scheduler"], pipeline_config=config["pipeline"], dtype=dtype)
    return components, held


def input_image(size: int) -> Image.Image:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([x, y, 1 - x * y], axis=-1) * 200 + rng.normal(0, 20, (size, size, 3))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def run_call(pipe: Img2ImgPipeline, size: int, resident: dict[str, int], encoder_names: list[str],
             vae: bool = True, vae_only: bool = False) -> dict:
    """One img2img call (one guided UNet step); per stage: seconds, MLX peak, and the peak less the weights
    resident during the stage (`resident`: bytes per component; text encoders released in low-memory mode
    are resident in the prompt stage only). Without `vae` the call starts from latents and returns latents
    (the prompt and UNet stages only: a half-precision VAE is slow on a CPU). `vae_only` runs the call's
    two VAE stages alone (the pipeline's encode_image and decode, tiles as in a call), the encoded latents
    decoded as they are: a UNet step at 1024x1024 takes longer than both on a CPU."""
    f = pipe.scale_factor
    image = input_image(size) if vae else mx.random.normal((1, size // f, size // f, 4), key=mx.random.key(0))
    mx.eval(pipe.unet.parameters(), pipe.vae.parameters())
    mx.clear_cache()
    stages: dict[str, dict] = {}
    clock = {"t": time.perf_counter()}
    before = mx.get_active_memory()

    def on_stage(name: str) -> None:
        if name == "decode" and not vae:
            return
        peak = mx.get_peak_memory()
        t = time.perf_counter()
        weights = resident["unet"] + resident["vae"]
        if name == "encode_prompt" or not pipe.low_memory:
            weights += sum(resident[n] for n in encoder_names)
        stages[name] = {"seconds": round(t - clock["t"], 2), "peak_bytes": peak, "weights_bytes": weights,
                        "activation_bytes": max(0, peak - weights)}
        print(f"  {name}: {t - clock['t']:.1f} s, peak {peak / GiB:.3f} GiB, less weights "
              f"{(peak - weights) / GiB:.3f} GiB", flush=True)
        mx.reset_peak_memory()
        clock["t"] = time.perf_counter()

    mx.reset_peak_memory()
    if vae_only:
        latents = pipe.encode_image(pipe.prepare_image(image), posterior="mean")
        mx.eval(latents)
        on_stage("encode_image")
        pipe.decode(latents)
        on_stage("decode")
    else:
        latents = pipe("a photograph of a house by a lake", image, strength=0.5, num_inference_steps=2,
                       guidance_scale=7.5, seed=0, on_stage=on_stage, decode=vae).latents
    finite = bool(mx.all(mx.isfinite(latents)).item())
    return {"stages": stages, "active_before_bytes": before, "latents_finite": finite}


def report_weights(config: dict, quantize: int | None) -> dict:
    counts = parameter_counts(config)
    table = {"parameters": counts}
    for label, dtype, bits in (("float32", mx.float32, None), ("float16", mx.float16, None),
                               (f"float16, quantize {quantize}", mx.float16, quantize)):
        table[label] = weight_bytes(config, dtype, bits)
    print("weights (GiB):")
    for label, sizes in table.items():
        if label == "parameters":
            print("  parameters: " + ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in sizes.items()))
        else:
            print(f"  {label}: " + ", ".join(f"{k} {v / GiB:.3f}" for k, v in sizes.items())
                  + f"; total {sum(sizes.values()) / GiB:.3f}")
    return table


def derive(out: dict, config: dict, quantize: int) -> dict:
    """The peak of each stage of a real half-precision run from a float32 one: the real weights resident in
    the stage (all of them; in low-memory mode the text encoders in the prompt stage only) plus the measured
    activations, scaled where a float16 run keeps them in float16 (all but the float32 SDXL VAE's): halved
    where half precision is native (a GPU: the lower figure), times CPU_HALF_FACTOR on MLX's CPU backend,
    whose half-precision kernels work on float32 copies (the upper figure)."""
    encoders = [n for n in TEXT_ENCODERS if n in config]
    half_vae = vae_dtype(config, mx.float16) == mx.float16
    derived = {}
    for label, bits in (("float16", None), (f"float16, quantize {quantize}", quantize)):
        real = weight_bytes(config, mx.float16, bits)
        stages = {}
        for stage, measured in out["run"]["stages"].items():
            weights = real["unet"] + real["vae"]
            if stage == "encode_prompt" or not out["low_memory"]:
                weights += sum(real[n] for n in encoders)
            act = measured["activation_bytes"]
            half = out["dtype"] == "float32" and (stage not in ("encode_image", "decode") or half_vae)
            stages[stage] = {"weights": weights, "lower": weights + (act // 2 if half else act),
                             "upper": weights + (int(act * CPU_HALF_FACTOR) if half else act)}
        derived[label] = stages
        top = max(stages.values(), key=lambda s: s["upper"])
        print(f"derived peak, {label}{', low memory' if out['low_memory'] else ''}: "
              f"{max(s['lower'] for s in stages.values()) / GiB:.2f}-{top['upper'] / GiB:.2f} GiB; per stage (GiB): "
              + ", ".join(f"{k} {v['lower'] / GiB:.2f}-{v['upper'] / GiB:.2f}" for k, v in stages.items()))
    return derived


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=("sdxl", "sd1", "sd2"), default="sdxl",
                   help="the shipped config (mlx_img2img/loading/configs) to build (default sdxl)")
    p.add_argument("--size", type=int, default=1024, help="image side in pixels (default 1024)")
    p.add_argument("--dtype", default="float32", help="dtype of the measured run (default float32)")
    p.add_argument("--low-memory", action="store_true", help="the pipeline's low_memory mode")
    p.add_argument("--quantize", type=int, choices=(4, 8), default=4, help="bits for the quantized weight count")
    p.add_argument("--weights-only", action="store_true", help="count the weights only (no run)")
    p.add_argument("--no-vae", action="store_true", help="start from latents and stop at latents (no VAE stages)")
    p.add_argument("--vae-only", action="store_true", help="the VAE encode and decode stages alone (no UNet step)")
    p.add_argument("--model", type=Path, help="run on this diffusers folder's real weights instead of tied ones")
    p.add_argument("--quantized", action="store_true", help="with --model: load it with --quantize bits")
    p.add_argument("--json", type=Path, help="write the figures here as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = family_config(args.family)
    dtype = parse_dtype(args.dtype)
    out: dict = {"family": args.family, "size": args.size, "dtype": args.dtype, "low_memory": args.low_memory,
                 "mlx": mx.__version__, "weights": report_weights(config, args.quantize)}
    if not args.weights_only:
        encoder_names = [n for n in TEXT_ENCODERS if n in config]
        t = time.perf_counter()
        if args.quantized and args.model is None:
            raise SystemExit("--quantized needs --model (a tied run keeps its weights dense: quantized matmuls "
                             "are slow on a CPU, and their outputs have the dense ones' shapes)")
        mx.reset_peak_memory()
        if args.model is not None:
            pipe = Img2ImgPipeline.from_pretrained(args.model, dtype=args.dtype, low_memory=args.low_memory,
                                                   quantize=args.quantize if args.quantized else None)
            held = {n: parameter_bytes(m) for n, m in (("unet", pipe.unet), ("vae", pipe.vae),
                                                        *zip(encoder_names, pipe.text_encoders, strict=False))}
            if args.low_memory:  # released: count what they will hold from the config
                held.update((n, s) for n, s in weight_bytes(config, dtype, None).items() if n in encoder_names)
            encoder_names = [n for n in encoder_names if n in held]
        else:
            components, held = tied_components(config, args.family, dtype, args.low_memory)
            pipe = Img2ImgPipeline(components, low_memory=args.low_memory)
        mx.eval([m.parameters() for m in (pipe.unet, pipe.vae, *pipe.text_encoders)])
        out["load_peak_bytes"] = mx.get_peak_memory()
        print(f"built in {time.perf_counter() - t:.1f} s, peak {out['load_peak_bytes'] / GiB:.3f} GiB; weights "
              "held (GiB): " + ", ".join(f"{k} {v / GiB:.3f}" for k, v in held.items()), flush=True)
        out["held_bytes"] = held
        if args.vae_only and args.no_vae:
            raise SystemExit("--vae-only and --no-vae exclude each other")
        out["run"] = run_call(pipe, args.size, held, encoder_names, vae=not args.no_vae, vae_only=args.vae_only)
        if args.model is None:
            out["derived"] = derive(out, config, args.quantize)
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
