"""TorchGenerator against torch.randn itself, on this machine's torch build and on its portable kernel."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from mlx_img2img.torch_rng import TorchGenerator

torch = pytest.importorskip("torch")

SEEDS = [0, 1234, 2**32 - 1, 2**63 + 12345, -7]  # a 64-bit seed and a negative one: torch keeps the low 32 bits
# Small (element-wise, cached) and large (blocks of 16) paths, multiples of 16 and not.
SIZES = [1, 2, 3, 5, 15, 16, 17, 31, 32, 33, 100, 255, 1000, 4096, 16384, 65537, 100000]
# torch's AVX2 normal kernel is the one x86-64 builds dispatch to (AVX-512 machines too: normal has no AVX-512 one).
TORCH_KERNEL = "avx2" if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else "libm"


def ulps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance in units in the last place between float32 arrays of the same sign pattern."""
    return np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64))


def within_rounding(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to the last few bits (or, for values near zero, whose signs may differ, up to 1e-6)."""
    return bool(np.all((ulps(a, b) <= 4) | (np.abs(a - b) < 1e-6)))


def torch_draws(seed: int, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    generator = torch.Generator("cpu").manual_seed(seed)
    return [torch.randn(shape, generator=generator).numpy() for shape in shapes]


@pytest.mark.parametrize("seed", SEEDS)
def test_successive_draws_equal_torch(seed: int) -> None:
    """Every size, drawn one after another from one generator (the small draws' cached half carries over)."""
    shapes = [(n,) for n in SIZES] + [(3,), (1,), (2, 4, 8, 8), (7,), (1, 4, 64, 64)]
    expected = torch_draws(seed, shapes)
    generator = TorchGenerator(seed, TORCH_KERNEL)
    for shape, want in zip(shapes, expected, strict=True):
        got = generator.randn(shape)
        assert got.shape == want.shape and got.dtype == np.float32
        if TORCH_KERNEL == "avx2":
            np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=f"shape {shape}")
        else:  # this platform's libm against correctly rounded functions: see the portable-kernel test
            assert within_rounding(got, want), f"shape {shape}"


def test_fresh_generator_per_size_equals_torch() -> None:
    """Each size from a fresh seed: the start of the stream, not only its continuation."""
    for n in (1, 15, 16, 17, 48, 50, 777):
        want = torch_draws(99, [(n,)])[0]
        got = TorchGenerator(99, TORCH_KERNEL).randn((n,))
        assert np.array_equal(got, want) if TORCH_KERNEL == "avx2" else within_rounding(got, want), n


def test_portable_kernel_against_torch_default_capability() -> None:
    """The "libm" transform is torch's non-AVX2 kernel (Apple Silicon's). Run torch with that kernel forced
    (ATEN_CPU_CAPABILITY=default, where it calls glibc's logf/cosf/sinf) and compare within a few ulps: the
    transform computes correctly rounded functions; a C library's float functions are within an ulp of them."""
    sizes = [16, 17, 100, 4096, 65536]
    script = (
        "import json, sys, torch\n"
        "g = torch.Generator('cpu').manual_seed(1234)\n"
        "out = [torch.randn(n, generator=g).numpy().view('uint32').tolist() for n in json.loads(sys.argv[1])]\n"
        "print(json.dumps([torch.backends.cpu.get_cpu_capability(), out]))\n"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    run = subprocess.run([sys.executable, "-c", script, json.dumps(sizes)], env=env, capture_output=True,
                         text=True, check=True)
    capability, draws = json.loads(run.stdout)
    assert capability == "DEFAULT"
    generator = TorchGenerator(1234, "libm")
    differing = total = 0
    for n, want in zip(sizes, draws, strict=True):
        want = np.array(want, dtype=np.uint32).view(np.float32)
        got = generator.randn((n,))
        distance = ulps(got, want)
        assert within_rounding(got, want) and np.abs(got - want).max() < 2e-6, n
        differing, total = differing + int((distance > 0).sum()), total + n
    assert differing < 0.05 * total  # measured: about 1.5% differ, by 1 to 3 ulps


def test_kernels_differ_only_in_rounding() -> None:
    """torch's two kernels (x86 AVX2 polynomials, libm elsewhere) give the same noise to float precision."""
    a = TorchGenerator(5, "avx2").randn((4, 4096))
    b = TorchGenerator(5, "libm").randn((4, 4096))
    assert np.abs(a - b).max() < 2e-6
    assert not np.array_equal(a, b)


def test_noise_source_protocol() -> None:
    noise = TorchGenerator(0).normal((2, 4, 8, 8))
    assert isinstance(noise, mx.array) and noise.dtype == mx.float32 and noise.shape == (2, 4, 8, 8)
    assert TorchGenerator(0).randn((0, 4)).shape == (0, 4)


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 1.5, "1", True])
def test_rejects_seeds_torch_rejects(seed: object) -> None:
    with pytest.raises(ValueError, match="seed"):
        TorchGenerator(seed)  # type: ignore[arg-type]


def test_rejects_unknown_transform() -> None:
    with pytest.raises(ValueError, match="transform"):
        TorchGenerator(0, "sleef")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ images

# Every scheduler with every seed (the pipelines are loaded once per scheduler, so a case costs two runs).
IMAGE_SEEDS = [0, 1234, 2**32 - 1]
_lcm_pipelines: dict = {}


@pytest.mark.parametrize("seed", IMAGE_SEEDS)
@pytest.mark.parametrize("scheduler", ["ddim", "euler", "euler_a", "dpmpp_2m", "lcm"])
def test_rng_torch_images_match_diffusers_with_a_cpu_generator(scheduler: str, seed: int,
                                                               request: pytest.FixtureRequest) -> None:
    """pipe(seed=s, rng="torch") against diffusers given torch.Generator("cpu").manual_seed(s), a batch of two:
    the VAE posterior sample, the start noise and every ancestral step drawn from the one generator."""
    from tests.test_pipeline import TorchNoise, assert_same_images, pipelines, sketch_image

    if scheduler == "lcm":  # LCM's own pipeline: guidance embedded in the UNet
        import diffusers

        from mlx_img2img import Img2ImgPipeline

        folder = request.getfixturevalue("tiny_lcm")
        if folder not in _lcm_pipelines:
            ref = diffusers.LatentConsistencyModelImg2ImgPipeline.from_pretrained(
                folder, safety_checker=None, requires_safety_checker=False)
            ref.set_progress_bar_config(disable=True)
            _lcm_pipelines[folder] = Img2ImgPipeline.from_pretrained(folder), ref
        ours, ref = _lcm_pipelines[folder]
    else:
        ours, ref = pipelines(request.getfixturevalue("tiny_sd15"), scheduler)
    kwargs = dict(prompt="a lighthouse on a cliff", image=sketch_image(64, 64), strength=0.5, num_inference_steps=4,
                  guidance_scale=5.0, num_images_per_prompt=2)
    expected = ref(**kwargs, generator=torch.Generator("cpu").manual_seed(seed)).images
    got = ours(**kwargs, scheduler=scheduler, seed=seed, rng="torch").images
    assert_same_images(f"rng=torch seed {seed}", scheduler, 0.5, got, expected)
    if scheduler == "euler_a" and seed == 0 and TORCH_KERNEL == "avx2":  # torch's very draws: the same pixels
        same = ours(**kwargs, scheduler=scheduler, noise_source=TorchNoise(seed)).images
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(got, same, strict=True))
        other = ours(**kwargs, scheduler=scheduler, seed=seed, rng="mlx").images
        assert not np.array_equal(np.asarray(other[0]), np.asarray(got[0]))


def test_one_seed_per_image_matches_diffusers_list_of_generators(tiny_sd15) -> None:
    """seed=[s0, s1] against diffusers given one CPU generator per image (Euler a: every step draws too), and
    each image of the batch is the image its seed gives alone (AUTOMATIC1111's seed, seed+1 batches)."""
    from tests.test_pipeline import assert_same_images, pipelines, sketch_image

    ours, ref = pipelines(tiny_sd15, "euler_a")
    kwargs = dict(prompt="a lighthouse on a cliff", image=sketch_image(64, 64), strength=0.5, num_inference_steps=4,
                  guidance_scale=5.0)
    seeds = [7, 8]
    expected = ref(**kwargs, num_images_per_prompt=2,
                   generator=[torch.Generator("cpu").manual_seed(s) for s in seeds]).images
    result = ours(**kwargs, num_images_per_prompt=2, scheduler="euler_a", seed=seeds, rng="torch")
    assert_same_images("seed list", "euler_a", 0.5, result.images, expected)
    assert result.seeds == seeds and result.seed == 7
    batch = ours(**kwargs, num_images_per_prompt=2, scheduler="euler_a", seed=seeds).images
    for seed, image in zip(seeds, batch, strict=True):
        alone = ours(**kwargs, scheduler="euler_a", seed=seed).images[0]
        assert np.abs(np.asarray(alone, np.int16) - np.asarray(image, np.int16)).max() <= 1
    assert not np.array_equal(np.asarray(result.images[0]), np.asarray(result.images[1]))
    with pytest.raises(ValueError, match="3 seeds for 2 images"):
        ours(**kwargs, num_images_per_prompt=2, seed=[1, 2, 3])
