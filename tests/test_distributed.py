"""A series shared by the processes of ``mlx.launch -n 2`` (ring backend, loopback only) on the tiny model: the
oracle is the same command without a launcher, which must still behave as it always has. The share's own
rules (claims, the fixed split, an error stopping one process) are checked in-process without MLX's layer."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from mlx_img2img import blas, distributed
from mlx_img2img.distributed import CLAIMS_PREFIX, Group, Share

from .test_cli import noise_image

REPO = Path(__file__).resolve().parents[1]
LAUNCH = shutil.which("mlx.launch", path=str(Path(sys.executable).parent)) or shutil.which("mlx.launch")
INPUTS = ["a.png", "b.png", "c.png", "d.png"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in distributed.LAUNCHER_VARIABLES}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    lib = blas.find_openblas()  # preloaded from the start: the tool does not start itself a second time
    return blas.openblas_environment(env, lib) if lib and blas.applicable() else env


def _ring_works() -> str | None:
    """Why the launched tests cannot run here, or None."""
    if LAUNCH is None:
        return "mlx.launch is not installed with this MLX"
    try:
        import mlx.core as mx

        if not mx.distributed.is_available():
            return "this MLX build has no distributed backend"
    except ImportError:
        return "MLX is not installed"
    return None


needs_ring = pytest.mark.skipif(_ring_works() is not None, reason=str(_ring_works()))
def _free_ports() -> int:
    """The first of two consecutive loopback ports that are free now (the ring backend's two processes)."""
    for _ in range(100):
        first = random.randrange(20000, 60000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", first))
                b.bind(("127.0.0.1", first + 1))
            return first
        except OSError:
            continue
    raise RuntimeError("no two free loopback ports")


def launch(cwd: Path, *command: object, timeout: float = 120) -> subprocess.CompletedProcess:
    """``mlx.launch -n 2`` on 127.0.0.1 (the ring backend) running ``command`` in ``cwd``."""
    args = [LAUNCH, "-n", "2", "--backend", "ring", "-p", str(_free_ports()), "--", *map(str, command)]
    return subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def tool(model: Path, *args: object) -> list[str]:
    return [sys.executable, "-m", "mlx_img2img", "run", "in", "-m", str(model), "-p", "winter", "--steps", "4",
            "--dtype", "float32", "--seed", "1", "-o", "out", *map(str, args)]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def plain(tiny_sd15: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The series without a launcher: today's run, the oracle of the launched ones."""
    here = tmp_path_factory.mktemp("plain")
    (here / "in").mkdir()
    for i, name in enumerate(INPUTS):
        noise_image(here / "in" / name, seed=i)
    done = subprocess.run(tool(tiny_sd15), cwd=here, env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines()[-1] == "Done: 4 written, 0 input(s) failed."  # as before this module
    assert sorted(os.listdir(here / "out")) == INPUTS  # no claims folder, nothing else
    return here


def _folder_like(plain: Path, here: Path) -> Path:
    here.mkdir(exist_ok=True)
    shutil.copytree(plain / "in", here / "in")
    return here


def _same_as_plain(plain: Path, out: Path) -> None:
    assert sorted(os.listdir(out)) == INPUTS  # each output once; no temporary file, no claims left
    for name in INPUTS:
        assert np.array_equal(pixels(out / name), pixels(plain / "out" / name)), name


# ------------------------------------------------------------------------------------ launched runs


@needs_ring
def test_two_processes_share_a_series_in_one_folder(plain: Path, tiny_sd15: Path, tmp_path: Path) -> None:
    here = _folder_like(plain, tmp_path)
    done = launch(here, *tool(tiny_sd15))
    assert "Traceback" not in done.stderr, done.stderr
    summaries = [line for line in done.stderr.splitlines() if line.startswith(("Done:", "Stopped:"))]
    assert len(summaries) == 1 and summaries[0].startswith("Done: 4 written, 0 input(s) failed (2 processes wrote ")
    assert done.stderr.count("Loading ") == 2  # each process loads the model once
    assert "4 input(s) shared by 2 processes: one output folder, each takes the next input" in done.stderr
    _same_as_plain(plain, here / "out")


@needs_ring
def test_each_process_with_its_own_folder_takes_every_other_input(plain: Path, tiny_sd15: Path,
                                                                 tmp_path: Path) -> None:
    """Two Macs, each writing its local folder: no claim can be seen by the other, so input i goes to
    process i % 2. The processes run in different working folders to stand for the two Macs."""
    for rank in (0, 1):
        _folder_like(plain, tmp_path / f"mac{rank}")
    script = "import os, sys; os.chdir(f'mac{os.environ[\"MLX_RANK\"]}'); os.execv(sys.executable, sys.argv[1:])"
    done = launch(tmp_path, sys.executable, "-c", script, *tool(tiny_sd15))
    assert "Done: 4 written, 0 input(s) failed (2 processes wrote 2 + 2)." in done.stderr, done.stderr
    assert "each has its own output folder, so input i goes to process i mod 2" in done.stderr
    assert sorted(os.listdir(tmp_path / "mac0" / "out")) == ["a.png", "c.png"]
    assert sorted(os.listdir(tmp_path / "mac1" / "out")) == ["b.png", "d.png"]
    for rank, names in ((0, ["a.png", "c.png"]), (1, ["b.png", "d.png"])):
        for name in names:
            assert np.array_equal(pixels(tmp_path / f"mac{rank}" / "out" / name), pixels(plain / "out" / name))


@needs_ring
def test_a_killed_process_stops_the_launch_and_the_next_launch_resumes(plain: Path, tiny_sd15: Path,
                                                                      tmp_path: Path) -> None:
    here = _folder_like(plain, tmp_path)
    # The second process runs the tool as a child and kills it (SIGKILL) once the first output is there.
    killer = textwrap.dedent("""
        import os, signal, subprocess, sys, time
        if os.environ["MLX_RANK"] == "0":
            os.execv(sys.executable, sys.argv[1:])
        child = subprocess.Popen(sys.argv[1:])
        while child.poll() is None and not any(n.endswith(".png") for n in os.listdir("out")):
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
        sys.exit(137)
    """)
    (here / "out").mkdir()
    first = launch(here, sys.executable, "-c", killer, *tool(tiny_sd15))
    written = [n for n in os.listdir(here / "out") if n.endswith(".png")]
    assert 1 <= len(written) < 4, first.stderr
    assert not any(line.startswith("Done:") for line in first.stderr.splitlines())

    again = launch(here, *tool(tiny_sd15))
    assert f"Done: {4 - len(written)} written, {len(written)} already there (skipped)" in again.stderr, again.stderr
    _same_as_plain(plain, here / "out")


@needs_ring
def test_a_process_that_fails_reports_it_and_the_other_finishes(plain: Path, tiny_sd15: Path,
                                                               tmp_path: Path) -> None:
    """The second process's model cannot load (its UNet weights are cut short): it takes no input, the first
    makes them all, and the one summary says which process stopped and why."""
    here = _folder_like(plain, tmp_path)
    broken = shutil.copytree(tiny_sd15, tmp_path / "broken")
    weights = next((broken / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    swap = ("import os, sys; a = sys.argv[1:]; i = len(a) - a[::-1].index('-m')\n"
            f"a[i] = a[i] if os.environ['MLX_RANK'] == '0' else {str(broken)!r}\n"
            "os.execv(sys.executable, a)")
    done = launch(here, sys.executable, "-c", swap, *tool(tiny_sd15))
    lines = done.stderr.splitlines()
    assert "Done: 4 written, 0 input(s) failed (2 processes wrote 4 + 0)." in lines, done.stderr
    assert any(line.startswith("process 2 of 2 (") and "stopped: " in line for line in lines), done.stderr
    assert "Traceback" not in done.stderr
    _same_as_plain(plain, here / "out")


# ------------------------------------------------------------------------------- the share's rules


class OneOfTwo(Group):
    """Process `rank` of 2 without MLX: the other process's totals are given."""

    def __init__(self, rank: int, others: bytes = b"{}"):
        super().__init__(rank, 2, None)
        self.others = others

    def all_gather(self, data: bytes) -> list[bytes]:
        return [data, self.others] if self.rank == 0 else [self.others, data]


def test_a_plain_run_never_starts_mlx_distributed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import mlx.core as mx

    for name in distributed.LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(mx.distributed, "init", lambda *a, **k: pytest.fail("init called without a launcher"))
    assert distributed.join() is None
    inputs = [Path(n) for n in INPUTS]
    share = Share.start(None, tmp_path, inputs)
    assert list(share.take()) == inputs and not list(tmp_path.iterdir())
    with pytest.raises(ValueError), share.errors_stop_this_process(None, str):  # type: ignore[arg-type]
        raise ValueError("raised as ever")
    # `mlx.launch -n 1` gives a ring of one (an empty host file): nothing to share, a plain run too.
    (tmp_path / "hosts").write_text("\n")
    monkeypatch.setenv("MLX_RANK", "0")
    monkeypatch.setenv("MLX_HOSTFILE", str(tmp_path / "hosts"))
    assert distributed.join() is None


def test_claims_give_each_input_to_one_process_and_a_fixed_split_every_other(tmp_path: Path) -> None:
    inputs = [Path(n) for n in INPUTS]
    claims = tmp_path / f"{CLAIMS_PREFIX}1"
    claims.mkdir()
    fast, slow = Share(OneOfTwo(0), inputs, claims).take(), Share(OneOfTwo(1), inputs, claims).take()
    # the slow process asks once while the fast one makes three
    got = [("fast", next(fast)), ("slow", next(slow)), ("fast", next(fast)), ("fast", next(fast))]
    assert got == [("fast", inputs[0]), ("slow", inputs[1]), ("fast", inputs[2]), ("fast", inputs[3])]
    assert list(fast) == [] and list(slow) == []
    assert [list(Share(OneOfTwo(r), inputs).take()) for r in (0, 1)] == [inputs[0::2], inputs[1::2]]


def test_an_error_stops_one_process_and_its_input_is_reported_failed() -> None:
    from mlx_img2img.cli import _one_line
    from mlx_img2img.jobs import Totals

    runner = SimpleNamespace(failed=[])
    runner.totals = lambda: Totals(written=1, failed=[(str(p), why) for p, why in runner.failed])
    inputs = [Path(n) for n in INPUTS]
    other = b'{"written": 1, "skipped": 0, "failed": [["b.png", "unreadable"]], "taken": 2, "stopped": []}'
    share = Share(OneOfTwo(0, other), inputs)
    with share.errors_stop_this_process(runner, _one_line):  # type: ignore[arg-type]
        for source in share.take():
            if source.name == "c.png":
                raise OSError(28, "No space left on device", "out/c.png")
    assert runner.failed == [(Path("c.png"), "out/c.png: No space left on device")]
    totals = share.totals(runner)  # type: ignore[arg-type]
    assert (totals.written, totals.not_started, totals.by_process) == (2, 0, [1, 1])
    assert totals.failed == [("b.png", "unreadable"), ("c.png", "out/c.png: No space left on device")]
    assert totals.stopped == [share.stopped] and share.stopped.startswith("process 1 of 2 (")
