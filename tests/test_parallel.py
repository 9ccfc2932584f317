"""mlx_img2img.parallel's CPU decisions: no compilation on the CPU, BLAS threads from the core count."""

from __future__ import annotations

import os

import mlx.core as mx

from mlx_img2img import parallel


def test_cpu_backend_runs_the_prediction_uncompiled():
    traced = []

    def fn(x: mx.array) -> mx.array:
        traced.append(x.shape)  # Python runs on every uncompiled call, only while tracing a compiled one
        return x * 2

    predict = parallel.compile_if_it_pays(fn)
    for _ in range(3):
        assert mx.array_equal(predict(mx.ones((2, 3))), mx.full((2, 3), 2.0))
    assert len(traced) == 3  # the tests run on MLX's CPU backend


def test_blas_threads_share_out_the_cores_whatever_the_load(monkeypatch):
    threads = []
    monkeypatch.setattr(parallel.blas, "set_threads", lambda n: threads.append(n) or True)
    cores = os.cpu_count() or 1
    parallel.fit_blas_threads(1)
    parallel.fit_blas_threads(cores)
    parallel.fit_blas_threads(1)  # the same again: a busy machine does not change it (nor the pixels)
    assert threads == [cores, 1, cores]


def test_small_maps_stay_one_part_large_ones_split():
    """The split depends on the maps' size only (never on the load): 16x16 latents stay one part."""
    cores = os.cpu_count() or 1
    side = int(parallel.SPLIT_MIN_PIXELS ** 0.5)
    assert parallel.cpu_parts(2, (side // 2) ** 2) == 1
    assert parallel.cpu_parts(2, side * side) == parallel.cpu_parts(2) == min(2, cores)
    seen = []
    parallel.map_batch(lambda a: seen.append(a.shape[0]) or a, 2, mx.zeros((2, side // 2, side // 2, 4)))
    assert seen == [2]  # one call with the whole batch
