"""The ``mlx-img2img`` command line: parse, call the API, report.

Every workflow of ``run`` (one image, variations, progressive passes, a strength sweep, a series over
files or a folder) is the same thing: a list of jobs over one loaded pipeline. A job takes one input
image through one or more generations, each saved atomically with its settings. With ``--refiner``
each generation is two calls: the model stops at ``--refiner-start`` and hands its latents, undecoded, to
the refiner, which finishes the schedule.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import secrets
import shlex
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource
from PIL import Image
from tqdm import tqdm

from . import images
from .errors import ImageInputError, Img2ImgError
from .schedulers import SCHEDULERS

DEFAULT_MODEL = "sd15"
DEFAULT_OUTPUT_FOLDER = Path("outputs")
DTYPES = ("float16", "bfloat16", "float32")
QUANTIZE_BITS = ("8", "4", "0")  # 0: full-precision weights (overrides a stored setting with --from)
DEFAULT_REFINER_START = 0.8
MAX_MEMORY_LIMIT_GB = 1_000_000  # --memory-limit: beyond any machine; MLX takes the limit in bytes as a C integer
# --max-side when not given: SD 1.x/2.x (trained at 512/768) tolerate up to 768 in img2img; SDXL its 1024.
MAX_SIDE_SD = 768
MAX_SIDE_SDXL = 1024
# settings a re-run (--from IMAGE) takes from the image, unless given on the command line
RERUN_KEYS = (
    "prompt",
    "negative_prompt",
    "model",
    "strength",
    "steps",
    "guidance",
    "seed",
    "scheduler",
    "width",
    "height",
    "resize",
    "max_side",
    "dtype",
    "sweep",
    "refiner",
    "refiner_start",
    "quantize",
    "vae_tile",
)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("mlx-img2img")
    except Exception:  # noqa: BLE001 - not installed: run from a checkout
        return "0.1.0"


# ------------------------------------------------------------------------------------- reporting


def _default_dtype() -> str:
    from .weights import default_dtype  # imports MLX: only when a command needs it

    return default_dtype()


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename and e.strerror:
        text = f"{e.filename}: {e.strerror}"
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


# Bytes that make a terminal do something (ANSI/OSC escape sequences start with ESC or a C1 control) or
# hide what text follows (bidirectional overrides), in text read from a file: shown as escapes instead.
_CONTROLS = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _printable(text: str, as_json: bool = False) -> str:
    """Untrusted text safe for the terminal: control characters (all but newline) as escapes, ``\\x1b`` or
    ``\\u202e``; in JSON text as ``\\u001b``, which reads back as the same string."""
    if as_json:
        return _CONTROLS.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    return _CONTROLS.sub(lambda m: repr(m.group())[1:-1], text)  # repr escapes every one of them


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is: the same clean-up as Ctrl-C runs (half-written files removed)."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated()


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _reported(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Errors a user can act on become one line and exit 1; Ctrl-C exits 130 and SIGTERM 143, both after the
    same clean-up; a closed pipe (``| head``) ends quietly with 141; --debug shows tracebacks."""

    @functools.wraps(fn)
    def wrapper(*args: Any, debug: bool = False, **kwargs: Any) -> Any:
        debug = debug or bool(os.environ.get("MLX_IMG2IMG_DEBUG"))
        try:
            with _sigterm_as_interrupt():
                return fn(*args, **kwargs)
        except KeyboardInterrupt as e:
            if debug:
                raise
            what = "Terminated" if isinstance(e, _Terminated) else "Interrupted"
            click.echo(f"{what}; every file written so far is complete, none is half-written.", err=True)
            sys.exit(143 if isinstance(e, _Terminated) else 130)
        except BrokenPipeError:
            # The reader went away (`mlx-img2img models | head -1`): stop without a word, as `cat` does, and
            # point stdout at nothing so that the exit's flush does not fail again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(141)
        except (Img2ImgError, ValueError, OSError) as e:
            if debug:
                raise
            raise click.ClickException(_one_line(e)) from e

    return wrapper


def _common(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--debug", is_flag=True, help="Show the full traceback on errors.")(fn)
    return click.option("-q", "--quiet", is_flag=True, help="No progress bars or messages; errors only.")(fn)


class UI:
    """Messages, saved-file lines and progress bars (bars only on a terminal, nothing with --quiet)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bars = None if not quiet else True  # tqdm's disable: None = only on a terminal
        self.depth = 0  # the line of the step bars: 1 below the series bar

    def say(self, msg: str) -> None:  # chatter, on stderr
        if not self.quiet:
            tqdm.write(msg, file=sys.stderr)

    def result(self, msg: str) -> None:  # what was written, on stdout
        if not self.quiet:
            tqdm.write(msg, file=sys.stdout)

    def bar(self, total: int | None, desc: str, leave: bool = True, position: int = 0) -> tqdm:
        return tqdm(
            total=total,
            desc=desc,
            leave=leave,
            position=position,
            disable=self.bars,
            file=sys.stderr,
            unit="img" if leave else "step",
            dynamic_ncols=True,
        )


# ------------------------------------------------------------------------------------ option types


class FiniteFloatRange(click.FloatRange):
    """A FloatRange that also refuses nan (inside any range, as it compares false) and inf."""

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


class StrengthList(click.ParamType):
    """A comma-separated list of strengths in [0, 1], e.g. ``0.75,0.35``."""

    name = "S1,S2,..."

    def convert(self, value: Any, param: Any, ctx: Any) -> list[float]:
        if isinstance(value, list):
            return value
        try:
            values = [float(v) for v in str(value).split(",") if v.strip()]
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of numbers, e.g. 0.75,0.35", param, ctx)
        if not values:
            self.fail("give at least one strength, e.g. 0.75,0.35", param, ctx)
        bad = [v for v in values if not 0.0 <= v <= 1.0]
        if bad:
            self.fail(f"strengths must be between 0 and 1, not {bad[0]:g}", param, ctx)
        return values


# ------------------------------------------------------------------------------------------- jobs


@dataclass
class Step:
    """One generation: a call of the pipeline, saved to ``out``."""

    prompt: str
    strength: float
    out: Path
    label: str


@dataclass
class Job:
    """One input through its steps: chained (passes: each takes the previous output) or not (a sweep,
    each from the input, then a contact sheet of them all)."""

    source: Path
    seed: int
    steps: list[Step]
    chained: bool = False
    sheet: Path | None = None

    def outputs(self) -> list[Path]:
        return [s.out for s in self.steps] + ([self.sheet] if self.sheet else [])


@dataclass
class Settings:
    prompt: str
    negative_prompt: str | None
    model: str
    strength: float
    steps: int
    guidance: float
    seed: int | None
    scheduler: str | None
    width: int | None
    height: int | None
    resize: str
    max_side: int | None  # None: the model's own (MAX_SIDE_SD or MAX_SIDE_SDXL), settled once it is loaded
    dtype: str
    num_images: int = 1
    passes: list[float] | None = None
    pass_prompts: list[str] = field(default_factory=list)
    sweep: list[float] | None = None
    refiner: str | None = None  # a second model that finishes each image from refiner_start on
    refiner_start: float = DEFAULT_REFINER_START
    quantize: int | None = None  # 8 or 4 bits for the UNet's and text encoders' linear layers
    low_memory: bool = False
    vae_tile: int | None = None  # VAE tile side in pixels; 0 never tiles; None: automatic
    memory_limit: float | None = None  # GB


def _steps_for(s: Settings, folder: Path, stem: str) -> tuple[list[Step], Path | None]:
    """The steps (and the sheet, for a sweep) of one job writing ``folder/stem*.png``."""
    final = folder / f"{stem}.png"
    if s.passes:
        steps, prompt = [], s.prompt
        for i, strength in enumerate(s.passes, start=1):
            if i > 1 and i - 2 < len(s.pass_prompts) and s.pass_prompts[i - 2].strip():
                prompt = f"{prompt}, {s.pass_prompts[i - 2].strip()}" if prompt else s.pass_prompts[i - 2]
            out = final if i == len(s.passes) else folder / f"{stem}-pass{i}.png"
            steps.append(Step(prompt, strength, out, f"pass {i}/{len(s.passes)} strength {strength:g}"))
        return steps, None
    if s.sweep:
        steps = [Step(s.prompt, v, folder / f"{stem}-s{v:.2f}.png", f"strength {v:g}") for v in s.sweep]
        return steps, final
    return [Step(s.prompt, s.strength, final, f"strength {s.strength:g}")], None


def plan_jobs(s: Settings, sources: list[Path], folder: Path, stems: list[str], seed: int) -> list[Job]:
    jobs = []
    for source, stem in zip(sources, stems, strict=True):
        for k in range(s.num_images):
            name = f"{stem}-{k + 1}" if s.num_images > 1 else stem
            steps, sheet = _steps_for(s, folder, name)
            jobs.append(Job(source, (seed + k) % 2**32, steps, chained=bool(s.passes), sheet=sheet))
    return jobs


def _stems(sources: list[Path]) -> list[str]:
    """Output names after the inputs, told apart where they clash: ``a.png``, ``a.jpg`` -> ``a-png``,
    ``a-jpg``; the same name from two folders -> ``a``, ``a-2``."""
    counts: dict[str, int] = {}
    for p in sources:
        counts[p.stem] = counts.get(p.stem, 0) + 1
    stems, seen = [], set()
    for p in sources:
        stem = f"{p.stem}-{p.suffix.lstrip('.').lower()}" if counts[p.stem] > 1 else p.stem
        candidate, n = stem, 1
        while candidate.lower() in seen:
            n += 1
            candidate = f"{stem}-{n}"
        seen.add(candidate.lower())
        stems.append(candidate)
    return stems


def _fresh_stem(folder: Path, stem: str, s: Settings) -> str:
    """``stem`` or ``stem-2``, ``stem-3``, ...: the first whose outputs are all free."""
    for n in range(1, 100_000):
        candidate = stem if n == 1 else f"{stem}-{n}"
        jobs = plan_jobs(s, [Path(candidate)], folder, [candidate], 0)
        if not any(p.exists() for job in jobs for p in job.outputs()):
            return candidate
    raise click.ClickException(f"no free output name for {stem} in {folder}")


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except (FileExistsError, NotADirectoryError) as e:
        raise click.ClickException(f"cannot create the output folder {folder}: a file is in the way") from e
    except OSError as e:
        raise click.ClickException(f"cannot write to the output folder {folder}: {e.strerror or e}") from e


# --------------------------------------------------------------------------------------- running


class Runner:
    """Runs jobs over one loaded pipeline, saving every image atomically with its settings."""

    def __init__(
        self,
        pipe: Any,
        s: Settings,
        ui: UI,
        metadata: bool,
        overwrite: bool,
        resume: bool,
        refiner: Any = None,
    ):
        self.pipe, self.s, self.ui, self.refiner = pipe, s, ui, refiner
        self.metadata, self.overwrite, self.resume = metadata, overwrite, resume
        self.scheduler = s.scheduler or pipe.default_scheduler  # the refiner continues with the same sampler
        self.written: list[Path] = []
        self.skipped: list[Path] = []
        self.failed: list[tuple[Path, str]] = []

    def settings_for(self, step: Step, seed: int, source: str, size: tuple, work: tuple) -> dict:
        s = self.s
        settings = {
            "prompt": step.prompt,
            "negative_prompt": s.negative_prompt,
            "model": s.model,
            "model_name": self.pipe.model_name,
            "strength": step.strength,
            "steps": s.steps,
            "guidance": s.guidance,
            "seed": seed,
            "scheduler": self.scheduler,
            "width": s.width,
            "height": s.height,
            "resize": s.resize,
            "max_side": s.max_side,
            "dtype": s.dtype,
            "size": list(size),
            "model_size": list(work),
            "input": source,
            "version": f"mlx-img2img {_version()}",
        }
        extra: dict[str, str] = {}
        if self.refiner is not None:
            settings.update(refiner=s.refiner, refiner_name=self.refiner.model_name, refiner_start=s.refiner_start)
            extra.update({"Refiner": self.refiner.model_name, "Refiner switch at": f"{s.refiner_start:g}"})
        if s.quantize:
            settings["quantize"] = s.quantize
            extra["Quantization"] = f"{s.quantize} bit"
        tile = self.vae_tile(work)
        if tile is not None:
            settings["vae_tile"] = tile
        if extra:
            settings["extra_fields"] = extra
        return settings

    def vae_tile(self, work: tuple[int, int]) -> int | None:
        """What to store of the VAE's tiling, which moves pixels slightly: --vae-tile as given, else the
        tile size where the VAE did run in tiles (a large image, or --low-memory); None when it did not."""
        if self.s.vae_tile is not None:
            return self.s.vae_tile
        tile = self.pipe.vae_tile_for(work[0] * work[1])
        return tile if max(work) > tile else None

    def generate(self, image: Image.Image, step: Step, seed: int, work: tuple[int, int]) -> Image.Image:
        s, refiner = self.s, self.refiner
        offset, later = 0, 0  # with a refiner, one bar over both models' steps
        if refiner is not None:
            later = self.refiner_schedule(step.strength).steps
        with self.ui.bar(None, step.out.name, leave=False, position=self.ui.depth) as bar:

            def progress(done: int, total: int) -> None:
                bar.total = offset + total + later
                bar.update(offset + done - bar.n)

            common = dict(
                prompt=step.prompt,
                num_inference_steps=s.steps,
                guidance_scale=s.guidance,
                negative_prompt=s.negative_prompt,
                seed=seed,
                progress=progress,
            )
            image_in = images.resize_to(image, work)
            if refiner is None:
                result = self.pipe(**common, image=image_in, strength=step.strength, scheduler=s.scheduler)
            else:
                handed = self.pipe(
                    **common,
                    image=image_in,
                    strength=step.strength,
                    scheduler=s.scheduler,
                    denoising_end=s.refiner_start,
                    decode=False,
                )
                offset, later = self.base_schedule(step.strength).steps, 0
                result = refiner(
                    **common, image=handed.latents, scheduler=self.scheduler, denoising_start=s.refiner_start
                )
        return images.resize_to(result.images[0], image.size)

    def base_schedule(self, strength: float) -> Any:
        end = self.s.refiner_start if self.refiner is not None else None
        return self.pipe.schedule(self.s.steps, strength, self.s.scheduler, denoising_end=end)

    def refiner_schedule(self, strength: float) -> Any:
        return self.refiner.schedule(self.s.steps, strength, self.scheduler, denoising_start=self.s.refiner_start)

    def save(self, img: Image.Image, path: Path, settings: dict | None) -> None:
        images.save_png(img, path, settings if self.metadata else None, overwrite=self.overwrite)
        self.written.append(path)

    def run_input(self, source: Path, jobs: list[Job], outer: tqdm) -> None:
        """Every job of one input; an unreadable input is reported and skipped."""
        if self.resume and all(p.exists() for job in jobs for p in job.outputs()):
            self.skipped.extend(p for job in jobs for p in job.outputs())
            outer.update(sum(len(job.steps) for job in jobs))
            return
        try:
            original = images.load_image(source)
        except ImageInputError as e:
            self.failed.append((source, _one_line(e)))
            self.ui.say(f"skipped: {_one_line(e)}")
            outer.update(sum(len(job.steps) for job in jobs))
            return
        fitted = images.fit_image(original, self.s.width, self.s.height, self.s.resize)
        work = images.model_size(fitted.size, self.s.max_side)
        for job in jobs:
            self.run_job(job, fitted, work, outer)

    def run_job(self, job: Job, fitted: Image.Image, work: tuple[int, int], outer: tqdm) -> None:
        image, source, made = fitted, str(job.source), []
        for step in job.steps:
            if self.resume and step.out.exists():
                self.skipped.append(step.out)
                out = images.load_image(step.out) if job.chained or job.sheet else None
            else:
                out = self.generate(image, step, job.seed, work)
                settings = self.settings_for(step, job.seed, source, fitted.size, work)
                self.save(out, step.out, settings)
                self.ui.result(f"wrote {step.out}  ({step.label}, seed {job.seed})")
            outer.update(1)
            made.append(out)
            if job.chained:
                image, source = out, str(step.out)
        if job.sheet and not (self.resume and job.sheet.exists()):
            labels = ["input"] + [step.label for step in job.steps]
            sheet = images.contact_sheet([fitted, *made], labels)
            settings = self.settings_for(job.steps[0], job.seed, str(job.source), fitted.size, work)
            sweep = [step.strength for step in job.steps]
            settings.update(strength=None, sweep=sweep)
            extra = settings.setdefault("extra_fields", {})
            extra["Sweep"] = "denoising strength " + "/".join(f"{v:g}" for v in sweep)
            self.save(sheet, job.sheet, settings)
            self.ui.result(f"wrote {job.sheet}  (contact sheet)")


def _load_pipeline(s: Settings, offline: bool, ui: UI, model: str | None = None) -> Any:
    """Load ``model`` (default: the main model, ``s.model``) with the run's precision and memory options."""
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    from .pipeline import Img2ImgPipeline

    model = model or s.model
    how = ", ".join([s.dtype] + ([f"{s.quantize}-bit"] if s.quantize else []) + (["low memory"] * s.low_memory))
    ui.say(f"Loading {model} ({how}) ...")
    start = time.perf_counter()
    pipe = Img2ImgPipeline.from_pretrained(
        model, dtype=s.dtype, offline=True if offline else None, quantize=s.quantize, low_memory=s.low_memory
    )
    if s.vae_tile is not None:
        pipe.vae_tile_size = s.vae_tile
    ui.say(f"Loaded {pipe.model_name} in {time.perf_counter() - start:.1f} s")
    return pipe


@contextmanager
def _memory_limit(gigabytes: float | None, ui: UI) -> Iterator[None]:
    """MLX's memory limit, for the run (restored after it). MLX 0.32 has ``mx.set_memory_limit`` on every
    backend; older ones only ``mx.metal.set_memory_limit``; without either, the option is ignored with a word."""
    if gigabytes is None:
        yield
        return
    import mlx.core as mx

    setter = getattr(mx, "set_memory_limit", None) or getattr(getattr(mx, "metal", None), "set_memory_limit", None)
    previous = None
    if setter is None:
        ui.say("--memory-limit: this MLX has no memory limit setting; going on without one")
    else:
        try:
            previous = setter(int(gigabytes * 2**30))
        except (RuntimeError, ValueError, TypeError, OverflowError, AttributeError) as e:
            ui.say(f"--memory-limit: MLX refused it ({_one_line(e)}); going on without one")
        else:
            ui.say(f"Memory limit {gigabytes:g} GB")
    try:
        yield
    finally:
        if previous is not None:
            setter(previous)


def _check_handoff(pipe: Any, refiner: Any) -> None:
    """The refiner takes the model's latents as they are: both must share one latent space (one VAE)."""
    a, b = pipe.vae.config, refiner.vae.config
    if (a.latent_channels, a.scaling_factor) != (b.latent_channels, b.scaling_factor):
        family = {True: "an SDXL model", False: "an SD 1.x/2.x model"}
        raise click.ClickException(
            f"the refiner {refiner.model_name} ({family[refiner.is_sdxl]}) cannot continue from "
            f"{pipe.model_name} ({family[pipe.is_sdxl]}): their latents differ; use a refiner of the same family"
        )


# ------------------------------------------------------------------------------------------- click

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(context_settings=CONTEXT)
@click.version_option(_version(), prog_name="mlx-img2img")
def main() -> None:
    """Stable Diffusion image-to-image with MLX: start from an image, not from noise.

    \b
    Examples:
      mlx-img2img run sketch.png -p "fantasy castle on a cliff, matte painting" -s 0.7 -o castle.png
      mlx-img2img info castle.png
      mlx-img2img models
      mlx-img2img download sd15
    """
    warnings.showwarning = _show_warning
    if click.get_current_context().invoked_subcommand == "run":  # Linux CPU: OpenBLAS instead of the reference BLAS
        from . import blas

        blas.reexec_with_openblas()


def _show_warning(message: Warning | str, *_: Any, **__: Any) -> None:
    """The library's warnings (a prompt truncated, the VAE moved to float32) as one plain line."""
    click.echo(f"warning: {message}", err=True)


def _source(name: str) -> ParameterSource | None:
    return click.get_current_context().get_parameter_source(name)


def _merge_settings(params: dict[str, Any], from_image: Path | None, ui: UI) -> dict[str, Any]:
    """The command line's values; with --from, the image's stored settings where a flag was not given."""
    if from_image is None:
        return params
    text, stored = images.read_metadata(from_image)
    if stored is None and text is None:
        raise ImageInputError(f"{from_image}: no generation settings stored in it")
    if stored is None:  # an image from another tool: its A1111 parameters (prompt, steps, sampler...)
        stored = {k: v for k, v in images.parse_parameters(text or "").items() if k not in ("width", "height")}
        fields = stored.get("fields") or {}
        try:  # its refiner is a checkpoint title of that tool, not a model here; its switch point applies
            stored["refiner_start"] = float(fields["Refiner switch at"])
        except (KeyError, ValueError):
            pass
        if fields.get("Refiner") and _source("refiner") != ParameterSource.COMMANDLINE:
            ui.say(f"{from_image} was refined with {fields['Refiner']}; give --refiner to refine too")
    merged = dict(params)
    given = {k for k in params if _source(k) == ParameterSource.COMMANDLINE}
    for key in RERUN_KEYS:
        if key == "sweep" and given & {"strength", "passes"}:
            continue  # a single strength or passes asked for instead of the stored sweep
        if stored.get(key) is not None and key not in given:
            merged[key] = stored[key]
    if merged.get("scheduler") not in (None, *SCHEDULERS):
        ui.say(f"ignoring the stored sampler {merged['scheduler']!r}")
        merged["scheduler"] = None
    ui.say(f"Re-using the settings of {from_image} (seed {merged.get('seed')})")
    return merged


def _inputs(paths: tuple[Path, ...]) -> tuple[list[Path], bool]:
    """The input files (folders expanded) and whether this is a series."""
    files: list[Path] = []
    series = len(paths) > 1
    for p in paths:
        if p.is_dir():
            series = True
            found = images.list_images(p)
            if not found:
                raise ImageInputError(f"{p}: no images in this folder ({', '.join(images.IMAGE_SUFFIXES)})")
            files.extend(found)
        elif not p.exists():
            raise ImageInputError(f"{p}: no such file")
        else:
            files.append(p)
    unique: dict[Path, Path] = {}
    for f in files:  # each file once, in order
        unique.setdefault(f.resolve(), f)
    return list(unique.values()), series


RUN_HELP_EXAMPLES = """
\b
Examples:
  mlx-img2img run sketch.png -p "detailed fantasy castle on a cliff" -s 0.7 -o castle.png
  mlx-img2img run sketch.png -p "castle" --passes 0.75,0.35 --pass-prompt "moss, fog" -o castle.png
  mlx-img2img run sketch.png -p "castle" --sweep 0.3,0.5,0.7,0.9 -o sweep.png
  mlx-img2img run photos/ -p "oil painting, impressionist" -s 0.6 -o paintings/
  mlx-img2img run sketch.png --from castle.png --seed 7 -o castle-7.png
"""


@main.command(epilog=RUN_HELP_EXAMPLES)
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="INPUT...")
@click.option("-p", "--prompt", help="What the image should become.")
@click.option("-n", "--negative-prompt", help="What to steer away from.")
@click.option(
    "-o",
    "--output",
    type=click.Path(),
    help="PNG file to write, or a folder (always, for a series). Default: a fresh name in ./outputs/",
)
@click.option(
    "-m",
    "--model",
    default=DEFAULT_MODEL,
    show_default=True,
    envvar="MLX_IMG2IMG_MODEL",
    help="Preset name (see `models`), hub repo id, or a local diffusers folder.",
)
@click.option(
    "-s",
    "--strength",
    type=click.FloatRange(0, 1),
    default=0.65,
    show_default=True,
    help="Denoising strength: 0.2-0.4 refines, 0.7-0.9 reimagines.",
)
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=30,
    show_default=True,
    help="Inference steps for the full schedule (about steps x strength of them run).",
)
@click.option(
    "-g",
    "--guidance",
    type=click.FloatRange(min=0),
    default=7.5,
    show_default=True,
    help="Classifier-free guidance scale (CFG); 1 or less turns guidance off.",
)
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), help="Random seed. Default: a random one, printed.")
@click.option("--scheduler", type=click.Choice(SCHEDULERS), help="Sampler. Default: the model's own.")
@click.option("--width", type=click.IntRange(8, 8192), help="Output width (default: the input's).")
@click.option("--height", type=click.IntRange(8, 8192), help="Output height (default: the input's).")
@click.option(
    "--resize",
    type=click.Choice(images.RESIZE_MODES),
    default="fit",
    show_default=True,
    help="With both --width and --height: fit inside / crop to fill / pad / stretch.",
)
@click.option(
    "--max-side",
    type=click.IntRange(min=64),
    help=f"The model works at most at this many pixels on the longer side (the output keeps its size). "
    f"Default: {MAX_SIDE_SD}, {MAX_SIDE_SDXL} for SDXL models.",
)
@click.option(
    "-N",
    "--num-images",
    type=click.IntRange(1, 1000),
    default=1,
    show_default=True,
    help="Variations per input, with seeds seed, seed+1, ...",
)
@click.option(
    "--passes", type=StrengthList(), help="Progressive passes: strengths, each pass from the previous output."
)
@click.option(
    "--pass-prompt",
    multiple=True,
    help="Added to the prompt from the 2nd pass on; once per later pass, in order (adds up).",
)
@click.option("--sweep", type=StrengthList(), help="One image per strength, plus a labelled contact sheet.")
@click.option(
    "--from",
    "from_image",
    type=click.Path(path_type=Path),
    help="Re-run with the settings stored in this image; flags given here override them.",
)
@click.option("--no-metadata", is_flag=True, help="Store no settings in the PNGs.")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs (default: never).")
@click.option("--offline", is_flag=True, help="Use only models already on disk (also: HF_HUB_OFFLINE=1).")
@click.option(
    "--dtype",
    type=click.Choice(DTYPES),
    default=lambda: _default_dtype(),
    show_default="float16 on a GPU, float32 on the CPU",
    help="Weights precision; float32 is slower on a GPU and matches references exactly.",
)
@click.option(
    "--refiner",
    metavar="NAME|PATH",
    help="A refiner (e.g. sdxl-refiner) that finishes each image from --refiner-start on, taking the "
    "model's latents as they are; 'none' drops a stored one with --from.",
)
@click.option(
    "--refiner-start",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=DEFAULT_REFINER_START,
    show_default=True,
    help="Where the refiner takes over, as a fraction of the whole schedule (0 < x < 1).",
)
@click.option(
    "--quantize",
    type=click.Choice(QUANTIZE_BITS),
    help="Store the UNet's and text encoders' linear layers in 8 or 4 bits: less memory, slightly "
    "different pixels; 0: full precision.",
)
@click.option("--low-memory", is_flag=True, help="Free the text encoders between prompts; run the VAE in tiles.")
@click.option(
    "--vae-tile",
    type=click.IntRange(min=0),
    metavar="PIXELS",
    help="Run the VAE in tiles of this many pixels (a multiple of 8, at least 64); 0: never. "
    "Default: tiles of 512 above 1536x1536 pixels; with --low-memory, tiles of 256 always.",
)
@click.option(
    "--memory-limit",
    type=FiniteFloatRange(min=0, max=MAX_MEMORY_LIMIT_GB, min_open=True),
    metavar="GB",
    help="Ask MLX to keep its memory use under this many GB (a guideline: above it MLX frees its cache "
    "and finishes the work in flight before it schedules more).",
)
@_common
@_reported
def run(
    inputs: tuple[Path, ...],
    output: str | None,
    from_image: Path | None,
    no_metadata: bool,
    overwrite: bool,
    offline: bool,
    quiet: bool,
    pass_prompt: tuple[str, ...],
    **params: Any,
) -> None:
    """Transform images with a prompt: one file, several, or a folder (a series)."""
    ui = UI(quiet)
    params = _merge_settings(params, from_image, ui)
    if not params.get("prompt"):
        raise click.UsageError("give a prompt: -p/--prompt TEXT (or --from an image that has one)")
    if params.get("passes") and params.get("sweep"):
        raise click.UsageError("--passes and --sweep do not go together")
    for name in ("passes", "sweep"):
        if params.get(name) and _source("strength") == ParameterSource.COMMANDLINE:
            raise click.UsageError(f"--strength and --{name} do not go together: --{name} gives the strengths")
    if pass_prompt and not params.get("passes"):
        raise click.UsageError("--pass-prompt needs --passes")
    if params.get("passes") and len(pass_prompt) > len(params["passes"]) - 1:
        raise click.UsageError("one --pass-prompt per pass after the first, at most")
    if params.get("sweep"):
        params["sweep"] = list(dict.fromkeys(params["sweep"]))
    _check_memory_options(params)
    s = Settings(pass_prompts=list(pass_prompt), **params)

    sources, series = _inputs(inputs)
    out = Path(output) if output is not None else None
    # a folder: several inputs, no -o, an existing folder, a trailing slash, or a name without suffix
    to_folder = out is None or series or out.is_dir() or output.endswith(("/", os.sep)) or not out.suffix
    if out is not None and series and (out.suffix.lower() in images.IMAGE_SUFFIXES or out.is_file()):
        raise click.UsageError(f"-o {output}: with a folder or several inputs, -o must be a folder")
    if out is not None and out.exists() and not out.is_dir() and to_folder:
        raise click.UsageError(f"-o {output}: is a file, not a folder")
    if out is not None and not to_folder and out.suffix.lower() != ".png":
        raise click.UsageError(f"-o {output}: outputs are PNG files (they carry the settings): use a .png name")
    folder = (out or DEFAULT_OUTPUT_FOLDER) if to_folder else out.parent  # type: ignore[union-attr]
    stems = _stems(sources) if to_folder else [out.stem]  # type: ignore[union-attr]
    if output is None and not overwrite and not series:
        fresh = _fresh_stem(folder, stems[0], s)
        if fresh != stems[0]:
            ui.say(f"{folder / stems[0]}.png exists: writing {folder / fresh}.png instead")
        stems = [fresh]

    seed = s.seed if s.seed is not None else secrets.randbelow(2**32)
    jobs = plan_jobs(s, sources, folder, stems, seed)
    outputs = [p for job in jobs for p in job.outputs()]
    inputs_resolved = {p.resolve() for p in sources}
    clash = next((p for p in outputs if p.resolve() in inputs_resolved), None)
    if clash is not None:
        raise click.ClickException(f"{clash} is an input; choose another -o, inputs are never overwritten")
    existing = [p for p in outputs if p.exists()]
    resume = bool(existing) and not overwrite and series
    if existing and not overwrite and not series:
        raise click.ClickException(f"{existing[0]} exists; use --overwrite to replace it, or another -o")
    if not series:
        images.load_image(sources[0])  # fail on a bad input before the model loads
    _check_writable(folder)

    with _memory_limit(s.memory_limit, ui):
        pipe = _load_pipeline(s, offline, ui)
        if s.max_side is None:  # the model's own resolution family, before any size is planned
            s.max_side = MAX_SIDE_SDXL if pipe.is_sdxl else MAX_SIDE_SD
        strengths = sorted({step.strength for job in jobs for step in job.steps})
        for strength in strengths:
            pipe.schedule(s.steps, strength, s.scheduler)  # a strength too small for the steps: fail now
        refiner = None
        if s.refiner:
            for strength in strengths:
                _check_base_steps(pipe, s, strength)
            refiner = _load_pipeline(s, offline, ui, s.refiner)
            _check_handoff(pipe, refiner)
        runner = Runner(pipe, s, ui, metadata=not no_metadata, overwrite=overwrite, resume=resume, refiner=refiner)
        if refiner is not None:
            for strength in strengths:
                runner.refiner_schedule(strength)  # the refiner has steps left to run: fail now if not
        if s.seed is None:
            ui.say(f"Seed {seed} (random; --seed {seed} repeats it)")
        by_source: dict[Path, list[Job]] = {}
        for job in jobs:
            by_source.setdefault(job.source, []).append(job)
        total = sum(len(job.steps) for job in jobs)
        ui.depth = 1 if series else 0
        with ui.bar(total, "images") if series else tqdm(disable=True) as outer:
            try:
                for source, its_jobs in by_source.items():
                    outer.set_postfix_str(source.name)
                    runner.run_input(source, its_jobs, outer)
            except OSError:  # a full disk: the series stops, saying what it did write
                if series:
                    _summary(runner, ui, stopped=True)
                raise
    if series or runner.failed:
        _summary(runner, ui)
    if runner.failed:
        sys.exit(1)


def _check_memory_options(params: dict[str, Any]) -> None:
    """Normalise and check the refiner and memory options (after --from merged its stored values)."""
    if params.get("quantize") is not None:
        params["quantize"] = int(params["quantize"]) or None
    if str(params.get("refiner") or "").strip().lower() in ("", "none"):
        params["refiner"] = None
    if params.get("refiner_start") is None:
        params["refiner_start"] = DEFAULT_REFINER_START
    if _source("refiner_start") == ParameterSource.COMMANDLINE and not params["refiner"]:
        raise click.UsageError("--refiner-start needs --refiner")
    if params["refiner"] and not 0.0 < params["refiner_start"] < 1.0:
        raise click.UsageError(f"--refiner-start must be between 0 and 1 (exclusive), not {params['refiner_start']:g}")
    tile = params.get("vae_tile")
    if tile is not None and tile != 0 and (tile < 64 or tile % 8):
        raise click.UsageError(f"--vae-tile must be 0 (never tile) or a multiple of 8 of at least 64, not {tile}")


def _check_base_steps(pipe: Any, s: Settings, strength: float) -> None:
    """The model must run at least one step of its own before the refiner takes over."""
    try:
        pipe.schedule(s.steps, strength, s.scheduler, denoising_end=s.refiner_start)
    except ValueError as e:
        raise click.ClickException(
            f"strength {strength:g} starts the schedule where the refiner already takes over "
            f"(--refiner-start {s.refiner_start:g}), so {pipe.model_name} would run no step: "
            "raise the strength or lower --refiner-start"
        ) from e


def _summary(r: Runner, ui: UI, stopped: bool = False) -> None:
    """What a series did; `stopped`: it ended early, on an error reported next."""
    parts = [f"{len(r.written)} written"]
    if r.skipped:
        parts.append(f"{len(r.skipped)} already there (skipped)")
    parts.append(f"{len(r.failed)} input(s) failed")
    ui.say(("Stopped: " if stopped else "Done: ") + ", ".join(parts) + ".")
    for path, why in r.failed:
        click.echo(f"failed: {why}" if why.startswith(str(path)) else f"failed: {path}: {why}", err=True)


@main.command(epilog="\b\nExamples:\n  mlx-img2img info castle.png\n  mlx-img2img info --json castle.png")
@click.argument("image_paths", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="IMAGE...")
@click.option("--json", "as_json", is_flag=True, help="Print the settings as JSON.")
@_common
@_reported
def info(image_paths: tuple[Path, ...], as_json: bool, quiet: bool) -> None:
    """Print the generation parameters stored in images (also AUTOMATIC1111's)."""
    missing = 0
    for path in image_paths:  # everything printed from a file goes through _printable: it may be hostile
        text, stored = images.read_metadata(path)
        if text is None and stored is None:
            click.echo(_printable(f"Error: {path}: no generation parameters stored in it"), err=True)
            missing += 1
            continue
        if len(image_paths) > 1 and not as_json:
            click.echo(_printable(f"== {path}"))
        if as_json:
            data = stored if stored is not None else images.parse_parameters(text or "")
            dumped = json.dumps({"file": str(path), **data}, ensure_ascii=False, indent=2, sort_keys=True)
            click.echo(_printable(dumped, as_json=True))
            continue
        click.echo(_printable(text if text is not None else images.format_parameters(stored or {})))
        if stored and stored.get("input"):
            rerun = ["mlx-img2img", "run", str(stored["input"]), "--from", str(path), "-o", "NEW.png"]
            click.echo(_printable("Re-run: " + shlex.join(rerun)))
    if missing:
        sys.exit(1)


@main.command(epilog="\b\nExample:\n  mlx-img2img models")
@_common
@_reported
def models(quiet: bool) -> None:
    """List the model presets and the models already downloaded."""
    from . import weights

    cached = {repo: path for repo, path in weights.cached_models()}
    chosen = os.environ.get("MLX_IMG2IMG_MODEL") or DEFAULT_MODEL  # as `run --model` takes it
    mark = "  (default, from MLX_IMG2IMG_MODEL)" if chosen != DEFAULT_MODEL else "  (default)"
    click.echo("Presets (--model NAME; a hub repo id or a local diffusers folder works too):")
    width = max(len(n) for n in weights.PRESETS)
    for name, repo in weights.PRESETS.items():
        where = f"cached  {cached[repo]}" if repo in cached else "not downloaded"
        click.echo(f"  {name:<{width}}  {repo:<45}  {where}{mark if chosen in (name, repo) else ''}")
    others = [(repo, path) for repo, path in cached.items() if repo not in weights.PRESETS.values()]
    if others:
        click.echo("Other cached models:")
        for repo, path in others:
            click.echo(f"  {repo}  {path}{mark if chosen == repo else ''}")
    if chosen not in weights.PRESETS and chosen not in cached and chosen not in weights.PRESETS.values():
        click.echo(f"Default model (MLX_IMG2IMG_MODEL): {_printable(chosen)}")


@main.command(epilog="\b\nExamples:\n  mlx-img2img download sd15\n  mlx-img2img download stabilityai/sd-turbo")
@click.argument("name")
@click.option(
    "--dtype",
    type=click.Choice(DTYPES),
    default=lambda: _default_dtype(),
    show_default="float16 on a GPU, float32 on the CPU: what `run` uses",
    help="Which weights to fetch: float16 takes the fp16 files where the repo has them.",
)
@_common
@_reported
def download(name: str, dtype: str, quiet: bool) -> None:
    """Fetch a model (preset name or hub repo id) now, or update it, for offline use later."""
    from . import weights

    ui = UI(quiet)
    weights.hub_repo_id(name)  # a path or a typo: one line now, not a hub error later
    ui.say(f"Downloading {name} ({dtype}) ...")
    path = weights.download(name, dtype=dtype, update=True)
    ui.result(f"{name}: {path}")


if __name__ == "__main__":
    main(prog_name="mlx-img2img")
