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


def test_maps_stay_one_part_sequences_split():
    """A batch of maps is one part at any size; sequences split over the cores (never by the load)."""
    cores = os.cpu_count() or 1
    assert parallel.cpu_parts(2, maps=True) == 1
    assert parallel.cpu_parts(2) == min(2, cores)
    seen = []
    parallel.map_batch(lambda a: seen.append(a.shape[0]) or a, 2, mx.zeros((2, 64, 64, 4)))
    assert seen == [2]  # one call with the whole batch
    parallel.map_batch(lambda a: seen.append(a.shape[0]) or a, 2, mx.zeros((2, 77), dtype=mx.int32))
    assert seen == [2] + [1] * min(2, cores)


def test_parts_evaluated_together_on_their_own_streams_then_blas_set_back(monkeypatch):
    threads = []
    monkeypatch.setattr(parallel.blas, "threads", lambda: 7)
    monkeypatch.setattr(parallel.blas, "set_threads", lambda n: threads.append(n) or True)
    streams = []

    def part(i: int):
        def make() -> mx.array:
            streams.append(mx.default_stream(mx.cpu))
            return mx.full((3,), float(i))
        return make

    done = parallel.evaluate_in_parts([part(0), part(1)])
    assert [d.tolist() for d in done] == [[0.0] * 3, [1.0] * 3]
    assert len(set(streams)) == 2
    assert threads == [max(1, (os.cpu_count() or 1) // 2), 7]  # shared out for the parts, then as it was
