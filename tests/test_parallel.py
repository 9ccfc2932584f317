"""mlx_img2img.parallel's CPU decisions: no compilation on the CPU, BLAS threads from the idle cores."""

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


def test_blas_threads_share_out_the_idle_cores(monkeypatch):
    threads = []
    monkeypatch.setattr(parallel.blas, "set_threads", lambda n: threads.append(n) or True)
    cores = os.cpu_count() or 1
    monkeypatch.setattr(parallel, "_running_elsewhere", lambda: 0)
    parallel.fit_blas_threads(1)
    parallel.fit_blas_threads(cores)
    monkeypatch.setattr(parallel, "_running_elsewhere", lambda: cores + 3)  # a busy machine
    parallel.fit_blas_threads(1)
    assert threads == [cores, 1, 1]


def test_running_elsewhere_reads_this_machine():
    others = parallel._running_elsewhere()
    assert isinstance(others, int) and others >= 0
    assert 1 <= parallel.idle_cores() <= (os.cpu_count() or 1)
