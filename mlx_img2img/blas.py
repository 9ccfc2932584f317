"""An optimised BLAS for MLX's CPU backend on Linux, found and sized without environment variables.

MLX's Linux CPU wheel carries the reference (netlib) BLAS, which multiplies matrices one to two orders of
magnitude slower than OpenBLAS. A system OpenBLAS (Debian/Ubuntu: libopenblas0-pthread) can stand in for
it: its cblas/Fortran symbols win when it is in the process's global symbol scope before MLX binds them,
that is when it is in LD_PRELOAD at start-up, or loaded with RTLD_GLOBAL before `mlx.core` is imported.

- Otherwise the command line re-executes itself once with OpenBLAS in LD_PRELOAD (`reexec_with_openblas`);
  the new process carries `MARKER` in its environment, so it never re-executes again.
- Importing the package runs `load_before_mlx`: in-process, where `mlx.core` is not imported yet (the
  command line, and a program that imports mlx_img2img before mlx), so neither needs anything else.
- The command line re-executes itself where that was too late; the Python API cannot re-execute its
  caller: `advise` warns once, at the first batch, how to preload it.
- `set_threads` sizes OpenBLAS's thread pool at run time (its own `openblas_set_num_threads`), so that
  parallel CPU streams (see parallel.py) do not each start a pool as large as the machine.

All of this is for the CPU backend on Linux only; on macOS MLX uses Accelerate and Metal.
Setting `MARKER` to anything (for example `MLX_IMG2IMG_BLAS=off`) turns the automatic part off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import warnings
from pathlib import Path

MARKER = "MLX_IMG2IMG_BLAS"  # set in the re-executed process; a user may set it to opt out
INSTALL_HINT = "install OpenBLAS (Debian/Ubuntu: apt-get install libopenblas0-pthread; Fedora: dnf install openblas)"
_DEBIAN_PATHS = ("/usr/lib/x86_64-linux-gnu/libopenblas.so.0", "/usr/lib/aarch64-linux-gnu/libopenblas.so.0")
_advised = False
_handle: ctypes.CDLL | None = None


def applicable() -> bool:
    """Linux, and not turned off (or already handled) through `MARKER`."""
    return sys.platform == "linux" and MARKER not in os.environ


def find_openblas() -> str | None:
    """The installed OpenBLAS to load (a soname the dynamic loader finds, or a known Debian path)."""
    if sys.platform != "linux":
        return None
    name = ctypes.util.find_library("openblas")
    if name:
        return name
    return next((p for p in _DEBIAN_PATHS if Path(p).exists()), None)


def _mapped_libraries() -> list[str]:
    """Paths of the shared libraries mapped into this process (Linux)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    return sorted({line.split(None, 5)[5] for line in lines if len(line.split(None, 5)) == 6 and ".so" in line})


def loaded_openblas() -> str | None:
    """The OpenBLAS mapped into this process, if any."""
    return next((p for p in _mapped_libraries() if "libopenblas" in Path(p).name), None)


def mlx_uses_reference_blas() -> bool:
    """Whether MLX's wheel brought its own reference BLAS (auditwheel vendors it as libblas-<hash>.so
    beside MLX) and no OpenBLAS is loaded to stand in for it. Imports mlx.core to see what it maps."""
    import mlx.core  # noqa: F401  (its libraries are what /proc/self/maps is read for)

    vendored = any(Path(p).name.startswith("libblas") and "mlx" in p for p in _mapped_libraries())
    return vendored and loaded_openblas() is None


def openblas_environment(env: dict[str, str], lib: str) -> dict[str, str]:
    """`env` with `lib` first in LD_PRELOAD and the marker set. On AVX-512 CPUs OPENBLAS_CORETYPE is set
    to SkylakeX unless given: OpenBLAS picks a slower core type on some virtual machines' CPUID."""
    env = dict(env)
    env["LD_PRELOAD"] = " ".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
    if _has_avx512():
        env.setdefault("OPENBLAS_CORETYPE", "SkylakeX")
    env[MARKER] = "preloaded"
    return env


def _has_avx512() -> bool:
    try:
        return "avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def launched_as_cli() -> bool:
    """Whether this process was started as the `mlx-img2img` command (not a test runner or a host
    program that happens to call the command's function)."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path()
    return argv0.name in ("mlx-img2img", "mlx-img2img.exe") or argv0.parts[-2:] in (
        ("mlx_img2img", "__main__.py"), ("mlx_img2img", "cli.py"))  # python -m mlx_img2img / mlx_img2img.cli


def _on_cpu() -> bool:
    # parallel's device check, imported when asked: parallel imports this module, and nothing here may
    # import MLX before load_before_mlx has run
    from .parallel import on_cpu

    return on_cpu()


def reexec_with_openblas(quiet: bool = False) -> None:
    """For the command line, at start: re-execute once with OpenBLAS preloaded where MLX runs on the CPU
    with its reference BLAS and an OpenBLAS is installed (one line on stderr, none when `quiet`), or say in
    one line how to get one. Returns (without doing anything) everywhere else."""
    if not (applicable() and launched_as_cli() and _on_cpu() and mlx_uses_reference_blas()):
        return
    lib = find_openblas()
    if lib is None:
        if not quiet:
            print(f"note: MLX is using its slow reference BLAS; {INSTALL_HINT} and it is used automatically",
                  file=sys.stderr)
        global _advised
        _advised = True  # said once: the API's warning would repeat it
        return
    if not quiet:
        print(f"note: restarting with OpenBLAS preloaded ({lib}) for MLX's CPU backend", file=sys.stderr, flush=True)
    sys.stdout.flush()
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    os.execve(sys.executable, argv, openblas_environment(dict(os.environ), lib))


def load_before_mlx() -> str | None:
    """Load OpenBLAS into the global symbol scope when MLX is not imported yet, so that MLX binds its BLAS
    calls to it (the in-process equivalent of LD_PRELOAD). Returns its name, or None where it did not."""
    if not applicable() or "mlx.core" in sys.modules or loaded_openblas():
        return None
    lib = find_openblas()
    if lib is None:
        return None
    if _has_avx512():
        os.environ.setdefault("OPENBLAS_CORETYPE", "SkylakeX")  # read by OpenBLAS when it loads
    try:
        ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return None
    return lib


def advise() -> None:
    """Once per process, for the Python API: a warning where MLX runs on the CPU with the reference BLAS,
    saying how to get OpenBLAS used (the API cannot re-execute its caller)."""
    global _advised
    if _advised:
        return
    _advised = True
    if not applicable() or not _on_cpu() or not mlx_uses_reference_blas():
        return
    lib = find_openblas()
    how = f"start Python with LD_PRELOAD={lib} (the mlx-img2img command does this by itself)" if lib else INSTALL_HINT
    warnings.warn(f"MLX is using its slow reference BLAS on this CPU; {how}", stacklevel=2)


def _openblas() -> ctypes.CDLL | None:
    """The loaded OpenBLAS's handle (kept once found: a loaded library stays loaded)."""
    global _handle
    if _handle is None and sys.platform == "linux" and (lib := loaded_openblas()):
        try:
            handle = ctypes.CDLL(lib)  # the already loaded library: dlopen returns its handle
            handle.openblas_set_num_threads  # noqa: B018  (an OpenBLAS build without it is left alone)
            _handle = handle
        except (OSError, AttributeError):
            pass
    return _handle


def set_threads(n: int) -> bool:
    """Size OpenBLAS's thread pool to `n` at run time; False where no OpenBLAS is loaded."""
    handle = _openblas()
    if handle is None:
        return False
    handle.openblas_set_num_threads(ctypes.c_int(max(1, n)))
    return True


def threads() -> int | None:
    """OpenBLAS's current thread count, or None where no OpenBLAS is loaded."""
    handle = _openblas()
    return None if handle is None else int(handle.openblas_get_num_threads())
