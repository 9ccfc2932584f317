"""mlx_img2img.blas: the command line's one re-execution with OpenBLAS preloaded, and where it is skipped.

The decision is tested with the process facts patched (no exec happens in the test process); one real
re-execution runs in a subprocess where this machine has an OpenBLAS to preload.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from mlx_img2img import blas


class Exec(Exception):
    """Raised instead of replacing the test process."""


@pytest.fixture
def cli_process(monkeypatch):
    """A process that looks like `mlx-img2img run` on Linux's CPU backend with MLX's reference BLAS and an
    installed OpenBLAS; os.execve records its arguments and raises instead of replacing pytest."""
    monkeypatch.delenv(blas.MARKER, raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(blas, "launched_as_cli", lambda: True)
    monkeypatch.setattr(blas, "_on_cpu", lambda: True)
    monkeypatch.setattr(blas, "mlx_uses_reference_blas", lambda: True)
    monkeypatch.setattr(blas, "find_openblas", lambda: "libopenblas.so.0")
    calls = []

    def execve(path, argv, env):
        calls.append((path, argv, env))
        raise Exec

    monkeypatch.setattr(os, "execve", execve)
    return calls


def test_reexecutes_once_with_openblas_preloaded(cli_process, capsys, monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "libother.so")
    with pytest.raises(Exec):
        blas.reexec_with_openblas()
    (path, argv, env), = cli_process
    assert path == sys.executable and argv == list(sys.orig_argv)
    assert env["LD_PRELOAD"] == "libopenblas.so.0 libother.so"  # first, keeping what was there
    assert env[blas.MARKER] == "preloaded"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "OpenBLAS" in err

    # The re-executed process carries the marker: it never re-executes again, even if the preload failed.
    monkeypatch.setenv(blas.MARKER, env[blas.MARKER])
    blas.reexec_with_openblas()
    assert len(cli_process) == 1 and capsys.readouterr().err == ""


@pytest.mark.parametrize("case", ["macos", "already-preloaded", "gpu", "not-the-cli", "opted-out"])
def test_skipped_where_not_applicable(cli_process, capsys, monkeypatch, case):
    if case == "macos":
        monkeypatch.setattr(sys, "platform", "darwin")
    elif case == "already-preloaded":
        monkeypatch.setattr(blas, "mlx_uses_reference_blas", lambda: False)
    elif case == "gpu":
        monkeypatch.setattr(blas, "_on_cpu", lambda: False)
    elif case == "not-the-cli":
        monkeypatch.setattr(blas, "launched_as_cli", lambda: False)
    else:
        monkeypatch.setenv(blas.MARKER, "off")
    blas.reexec_with_openblas()
    assert cli_process == [] and capsys.readouterr().err == ""


def test_without_openblas_one_line_on_how_to_get_it(cli_process, capsys, monkeypatch):
    monkeypatch.setattr(blas, "find_openblas", lambda: None)
    blas.reexec_with_openblas()
    err = capsys.readouterr().err
    assert cli_process == [] and err.count("\n") == 1 and "apt-get install libopenblas0-pthread" in err


def test_only_the_command_counts_as_the_cli(monkeypatch):
    assert not blas.launched_as_cli()  # pytest: a CliRunner test must never replace the test process
    monkeypatch.setattr(sys, "argv", ["/venv/bin/mlx-img2img", "run"])
    assert blas.launched_as_cli()


@pytest.mark.skipif(sys.platform != "linux" or blas.find_openblas() is None, reason="needs Linux and an OpenBLAS")
def test_real_reexecution_preloads_and_sizes_openblas(tmp_path):
    """A real exec: the child has OpenBLAS mapped, the marker set, and takes a thread count at run time."""
    script = tmp_path / "mlx-img2img"  # the command's name, so launched_as_cli() holds
    script.write_text(textwrap.dedent("""
        import os, sys
        import mlx.core  # imported before the package: too late to load OpenBLAS in-process, so it re-executes
        from mlx_img2img import blas
        print("start", os.environ.get(blas.MARKER), flush=True)
        blas.reexec_with_openblas()
        print("mapped", blas.loaded_openblas() is not None, "reference", blas.mlx_uses_reference_blas())
        print("threads", blas.set_threads(1), blas.threads())
    """))
    env = {k: v for k, v in os.environ.items() if k not in (blas.MARKER, "LD_PRELOAD")}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    if lines == ["start None", "mapped False reference False", "threads False None"]:
        pytest.skip("this MLX build does not carry the reference BLAS")
    assert lines == ["start None", "start preloaded", "mapped True reference False", "threads True 1"]
    assert out.stderr.count("restarting with OpenBLAS") == 1


@pytest.mark.skipif(sys.platform != "linux" or blas.find_openblas() is None, reason="needs Linux and an OpenBLAS")
def test_load_before_mlx_stands_in_for_the_reference_blas():
    """In-process, before mlx.core is imported (blas.py loaded on its own, without the package)."""
    code = textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("b", {blas.__file__!r})
        b = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(b)
        assert "mlx.core" not in sys.modules
        print(b.load_before_mlx() is not None, b.mlx_uses_reference_blas(), b.load_before_mlx())
    """)
    env = {k: v for k, v in os.environ.items() if k not in (blas.MARKER, "LD_PRELOAD")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False", "None"]  # loaded, MLX bound to it, a second call does nothing


@pytest.mark.skipif(sys.platform != "linux" or blas.find_openblas() is None, reason="needs Linux and an OpenBLAS")
def test_importing_the_package_first_binds_mlx_to_openblas():
    """`import mlx_img2img` before mlx: OpenBLAS in-process, no re-execution, no warning at the first batch."""
    code = textwrap.dedent("""
        import sys, warnings
        import mlx_img2img
        from mlx_img2img import blas, parallel
        import mlx.core as mx
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            parallel.map_batch(lambda a: a + 1, 1, mx.zeros((1,)))
        print(blas.loaded_openblas() is not None, blas.mlx_uses_reference_blas())
    """)
    env = {k: v for k, v in os.environ.items() if k not in (blas.MARKER, "LD_PRELOAD")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False"] and out.stderr == ""
