"""Full-size single-file checkpoints with random weights: family detection, loading with the shipped
configs (no config folder), and load time against the same weights as a diffusers folder.

    python scripts/bench_single_file.py --family sd1 --work /tmp/sf-bench [--dtype float16] [--json out.json]

Builds the model with diffusers from the shipped configs (random weights), saves it as a diffusers folder
and as one original-layout .safetensors file (tests/test_single_file.py's converter), then times
Img2ImgPipeline.from_pretrained(folder) and .from_single_file(file), each run `--repeat` times, interleaved;
for SD 2.x also AUTOMATIC1111's prediction-type test on the loaded UNet. LoRA merging: scripts/bench_lora.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx_img2img  # noqa: E402,F401  (before torch/mlx: picks the BLAS)
from mlx_img2img import Img2ImgPipeline  # noqa: E402
from mlx_img2img.loading.single_file import CONFIGS  # noqa: E402

VARIANTS = {"sd1": "sd15", "sd2": "sd2v", "sdxl": "sdxl", "sdxl-refiner": "sdxl_refiner"}


def build(family: str, work: Path, dtype: str) -> tuple[Path, Path]:
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from tests.test_single_file import write_single_file

    folder, file = work / f"{family}-folder", work / f"{family}.safetensors"
    if file.exists():
        return folder, file
    spec = json.loads((CONFIGS / f"{family}.json").read_text())
    torch_dtype = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    torch.manual_seed(0)
    torch.set_default_dtype(torch_dtype)  # built in the file's precision: an SDXL UNet in float32 is 10 GB
    makers = {"unet": lambda: diffusers.UNet2DConditionModel.from_config(spec["unet"]),
              "vae": lambda: diffusers.AutoencoderKL.from_config(spec["vae"])}
    for name in ("text_encoder", "text_encoder_2"):
        if name in spec:
            cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
            makers[name] = lambda cls=cls, name=name: cls(CLIPTextConfig(**spec[name]))
    for name, make in makers.items():  # one at a time, to bound memory
        (folder / name).mkdir(parents=True, exist_ok=True)
        make().save_pretrained(folder / name, safe_serialization=True)
    torch.set_default_dtype(torch.float32)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(spec["scheduler"]))
    from tests.clip_vocab import write_clip_tokenizer_files

    for name in ("tokenizer", "tokenizer_2"):
        if name in spec:
            write_clip_tokenizer_files(folder / name, pad_token=spec[name]["pad_token"])
    (folder / "model_index.json").write_text(json.dumps(spec["pipeline"]))
    write_single_file(folder, VARIANTS[family], file, dtype=torch_dtype)
    return folder, file


def timed(load) -> float:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    start = time.perf_counter()
    pipe = load()
    mx.eval([v for m in (pipe.unet, pipe.vae, *pipe.text_encoders) for _, v in tree_flatten(m.parameters())])
    return time.perf_counter() - start


def probe_cost(file: Path, dtype: str, repeat: int) -> dict:
    """An SD 2.x file's prediction type as its UNet answers AUTOMATIC1111's test (random weights: either
    answer), and what the test costs on the loaded UNet (best of `repeat`)."""
    from mlx_img2img.loading.single_file import detect_prediction_type, unet_probe

    pipe = Img2ImgPipeline.from_single_file(file, dtype=dtype)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        value = unet_probe(pipe.unet)
        times.append(time.perf_counter() - start)
    return dict(prediction_type=detect_prediction_type(pipe.unet), probe_value=value, probe_s=min(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=list(VARIANTS), default="sd1")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    folder, file = build(args.family, args.work, args.dtype)
    from mlx_img2img.loading.single_file import SingleFileSource

    detected = SingleFileSource(file).family
    times: dict[str, list[float]] = {"folder": [], "single_file": []}
    for _ in range(args.repeat):
        times["folder"].append(timed(lambda: Img2ImgPipeline.from_pretrained(folder, dtype=args.dtype)))
        times["single_file"].append(timed(lambda: Img2ImgPipeline.from_single_file(file, dtype=args.dtype)))
    best = {k: min(v) for k, v in times.items()}
    result = dict(family=args.family, detected=detected, dtype=args.dtype, file_bytes=file.stat().st_size,
                  folder_s=best["folder"], single_file_s=best["single_file"],
                  ratio=best["single_file"] / best["folder"], runs=times)
    if args.family == "sd2":  # its load above includes the test (no prediction type given)
        result.update(probe_cost(file, args.dtype, args.repeat))
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
