"""The ``mlx-img2img`` command line: options -> a request -> a plan -> jobs; reporting.

``run``'s options are made from the request's field table (request.py); the planner (generation.py) checks
every setting against the models' configs before any weight loads and runs each image (with a refiner,
the handoff); the jobs (jobs.py) keep files, names, series and resume. This module parses and reports.
"""

from __future__ import annotations

import functools
import json
import os
import re
import secrets
import shlex
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource
from tqdm import tqdm

from . import __version__, distributed, images
from . import jobs as jobs_
from . import library as lib
from .errors import ImageInputError, Img2ImgError
from .generation import ModelInfo, Planner
from .request import BY_NAME, DEFAULT_MODEL, DTYPES, FIELDS, Field, Request, RequestError

DEFAULT_OUTPUT_FOLDER = Path("outputs")


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


# ------------------------------------------------------------------------------------------- click

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="mlx-img2img")
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
    ctx = click.get_current_context()
    if ctx.invoked_subcommand in ("run", "serve"):  # Linux CPU: OpenBLAS, not reference BLAS
        from . import blas

        blas.reexec_with_openblas(quiet=bool({"-q", "--quiet"} & set(sys.argv[1:])))  # before options are parsed


def _show_warning(message: Warning | str, *_: Any, **__: Any) -> None:
    """The library's warnings (a prompt truncated, the VAE moved to float32) as one plain line."""
    click.echo(f"warning: {message}", err=True)


def _source(name: str) -> ParameterSource | None:
    return click.get_current_context().get_parameter_source(name)


def _given() -> set[str]:
    """The request fields the user set: on the command line, or through an environment variable."""
    chosen = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    return {f.name for f in FIELDS if _source(f.name) in chosen}


def _request(params: dict[str, Any], pass_prompts: tuple[str, ...], from_image: Path | None, stored_model: bool,
             ui: UI) -> Request:
    """The request: the command line's values; with --from, the image's stored settings where a flag was not
    given, each checked as its flag would be. A model or refiner stored in the image is used only with
    --stored-model: an image someone else made must not choose what is loaded."""
    given = _given()
    request = Request.from_values({**params, "pass_prompts": list(pass_prompts)})
    if from_image is None:
        return request
    text, stored = images.read_metadata(from_image)
    if stored is None and text is None:
        raise ImageInputError(f"{from_image}: no generation settings stored in it")
    fields: dict[str, str] = {}  # another tool's parameters fields beyond the settings
    if stored is None:  # an image from another tool: its A1111 parameters (prompt, steps, sampler...)
        stored = {k: v for k, v in images.parse_parameters(text or "").items() if k not in ("width", "height")}
        fields = stored.pop("fields", None) or {}
        try:  # its refiner is a checkpoint title of that tool, not a model here; its switch point applies
            stored["refiner_start"] = float(fields["Refiner switch at"])
        except (KeyError, ValueError):
            pass
        if fields.get("Refiner") and "refiner" not in given:
            ui.say(f"{from_image} was refined with {_printable(fields['Refiner'])}; give --refiner to refine too")
        for key, name in (("Lora hashes", "lora_hashes"), ("TI hashes", "embedding_hashes")):
            if lib.parse_hash_list(fields.get(key)):  # its <lora:...> tags stay in its prompt
                stored[name] = lib.parse_hash_list(fields[key])
    request, ignored = request.merged(stored, given, str(from_image))
    if request.mask is not None and "mask" not in given:  # the image's mask file: the one it was made with
        jobs_.check_stored_mask(stored, str(from_image))
    inpainted = stored.get("mask_blur") is not None or "Mask blur" in fields  # both stored with a mask only
    if inpainted and request.mask is None and not request.outpaint:  # a mask sent as pixels or the input's alpha
        ui.say(f"{from_image} was inpainted with a mask it does not store (sent as pixels, or its input's "
               f"transparency): give --mask FILE to inpaint again, unless this input's transparency is the mask")
    for name, value in ignored.items():
        flag = BY_NAME[name].flag
        if stored_model:
            request = replace(request, **{name: BY_NAME[name].validate(value, str(from_image), f"stored {name}")})
        elif value and str(value).lower() != "none":
            ui.say(f"not loading the {name} {_printable(str(value))!r} named in {from_image}: give {flag} (or "
                   f"--stored-model) to use it; using {getattr(request, name) or 'none'}")
    ui.say(f"Re-using the settings of {from_image} (seed {request.seed})")
    return request


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


class FieldType(click.ParamType):
    """A request field's value from its flag's text, through the field's own check (the one a stored
    value goes through too)."""

    def __init__(self, f: Field):
        self.field = f
        self.name = f.metavar or f.name.upper()

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return self.field.from_text(value)
        except RequestError as e:  # click names the option itself
            self.fail(str(e).removeprefix(f"{self.field.flag}: "), param, ctx)


def _field_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The run command's options for every request field, in the table's order."""
    for f in reversed(FIELDS):
        kind: Any = click.Choice(f.choices) if f.choices and f.parse is None else FieldType(f)
        if f.is_flag:
            fn = click.option(*f.flags, f.name, is_flag=True, help=f.help)(fn)
            continue
        help_text = f.help + (f" Choices: {', '.join(map(str, f.choices))}." if f.choices and f.parse else "")
        default = (lambda: _default_dtype()) if f.name == "dtype" else f.default
        fn = click.option(*f.flags, f.name, type=kind, default=default, show_default=f.show_default,
                          metavar=f.metavar, envvar=f.envvar, multiple=f.multiple, help=help_text)(fn)
    return fn


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
@click.option(
    "-o",
    "--output",
    type=click.Path(),
    help="PNG file to write, or a folder (always, for a series). Default: a fresh name in ./outputs/",
)
@_field_options
@click.option(
    "--pass-prompt",
    multiple=True,
    help="Added to the prompt from the 2nd pass on; once per later pass, in order (adds up).",
)
@click.option(
    "--from",
    "from_image",
    type=click.Path(path_type=Path),
    help="Re-run with the settings stored in this image; flags given here override them. The model and "
    "refiner stored in it are not loaded unless you name them, or give --stored-model.",
)
@click.option("--stored-model", is_flag=True, help="With --from: also load the model and refiner stored in the image.")
@click.option("--no-metadata", is_flag=True, help="Store no settings in the PNGs.")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs (default: never).")
@click.option("--preview-every", nargs=2, type=(click.IntRange(1), click.Path(path_type=Path, file_okay=False)),
              metavar="N DIR", help="Write the preview of every N-th step to DIR (NAME.stepK.png; existing files are "
              "kept unless --overwrite).")
@click.option("--preview", type=click.Choice(["cheap", "taesd"]), default="cheap", show_default=True,
              help="With --preview-every: cheap (a linear latent-to-RGB map, an eighth of the size) or taesd (the "
              "tiny autoencoder at full size, from the Hugging Face cache: madebyollin/taesd, taesdxl).")
@click.option("--offline", is_flag=True, help="Use only models already on disk (also: HF_HUB_OFFLINE=1).")
@_common
@_reported
def run(
    inputs: tuple[Path, ...],
    output: str | None,
    from_image: Path | None,
    stored_model: bool,
    no_metadata: bool,
    overwrite: bool,
    preview_every: tuple[int, Path] | None,
    preview: str,
    offline: bool,
    quiet: bool,
    pass_prompt: tuple[str, ...],
    **params: Any,
) -> None:
    """Transform images with a prompt: one file, several, or a folder (a series)."""
    ui = UI(quiet)
    for name in ("passes", "sweep"):
        if params.get(name) and _source("strength") == ParameterSource.COMMANDLINE:
            raise click.UsageError(f"--strength and --{name} do not go together: --{name} gives the strengths")
    if stored_model and from_image is None:
        raise click.UsageError("--stored-model goes with --from IMAGE")
    try:
        r = _request(params, pass_prompt, from_image, stored_model, ui).validate()
    except RequestError as e:
        raise click.UsageError(str(e)) from None
    if _source("refiner_start") == ParameterSource.COMMANDLINE and not r.refiner:
        raise click.UsageError("--refiner-start needs --refiner")
    r.dtype = r.dtype or _default_dtype()

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
    stems = jobs_.stems_for(sources) if to_folder else [out.stem]  # type: ignore[union-attr]
    if output is None and not overwrite and not series:
        fresh = jobs_.fresh_stem(folder, stems[0], r)
        if fresh != stems[0]:
            ui.say(f"{folder / stems[0]}.png exists: writing {folder / fresh}.png instead")
        stems = [fresh]

    seed = r.seed if r.seed is not None else secrets.randbelow(2**32)
    group = distributed.join()  # None without a launcher (mlx.launch): a plain run, as ever
    if group is not None:
        seed = group.first(seed)  # one series, one seed: the first process's
    jobs = jobs_.plan_jobs(r, sources, folder, stems, seed)
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
    if r.controlnet and r.control_image:
        images.load_image(Path(r.control_image))
    jobs_.check_writable(folder)

    # Plan from the models' configs (no weights yet): every setting error is raised before loading.
    library = lib.ModelsFolder(r.models_dir, r.lora_dir)  # names: -m, --vae, --refiner, --controlnet, LoRAs...
    vae = library.resolve_name("vae", r.vae, "--vae") if r.vae else None
    controlnets = [library.resolve_controlnet(name) for name in r.controlnet or ()]
    model_source = _open(library.resolve_checkpoint(r.model), r.dtype, offline, vae=vae,
                         prediction_type=r.prediction_type)
    refiner_source = _open(library.resolve_checkpoint(r.refiner, "--refiner"), r.dtype, offline) if r.refiner else None
    planner = Planner(r, ModelInfo.of_source(model_source),
                      ModelInfo.of_source(refiner_source) if refiner_source else None, library)
    prompts = list(dict.fromkeys(step.prompt for job in jobs for step in job.steps))
    for prompt in prompts:
        planner.extras(prompt)  # every LoRA and embedding found and checked before anything loads
    runner = jobs_.Runner(planner, ui, metadata=not no_metadata, overwrite=overwrite, resume=resume,
                          version=f"mlx-img2img {__version__}", model_name=model_source.name,
                          refiner_name=refiner_source.name if refiner_source else None)
    if resume:
        stale = runner.stale(jobs)
        if stale:
            path, why = stale[0]
            more = f" (and {len(stale) - 1} more)" if len(stale) > 1 else ""
            raise click.ClickException(f"{path} exists but another run made it ({why}){more}; use --overwrite to "
                                       "replace such outputs, or another -o")
    by_source: dict[Path, list[jobs_.Job]] = {}
    for job in jobs:
        by_source.setdefault(job.source, []).append(job)
    nothing_left = runner.pending(jobs) == 0
    # The inputs this process takes (a plain run: all). A launched run's processes meet here, after every
    # process's checks and before any of them writes.
    share = distributed.Share.start(group, folder, list(by_source))
    if group is not None and share.rank == 0:
        ui.say(share.how())
    if nothing_left:
        for source in share.take():
            runner.skipped.extend(p for job in by_source[source] for p in job.outputs() if p.exists())
        _report(runner, share, ui, series)
        return
    if r.seed is None and share.rank == 0:
        ui.say(f"Seed {seed} (random; --seed {seed} repeats it)")

    with _memory_limit(r.memory_limit, ui), share.errors_stop_this_process(runner, _one_line):
        runner.pipe = _load_pipeline(model_source, r.model, r, ui, planner.load_patches(prompts))
        if r.controlnet:
            ui.say(f"Loading ControlNet {', '.join(r.controlnet)} ...")
            runner.pipe.load_controlnet(controlnets, offline=True if offline else None, quantize=r.quantize)
        if refiner_source is not None:
            runner.refiner = _load_pipeline(refiner_source, r.refiner, r, ui)
        if preview_every:
            runner.on_step = _preview_writer(runner.pipe, preview, *preview_every, overwrite)
        total = sum(len(job.steps) for job in jobs)
        ui.depth = 1 if series else 0
        with ui.bar(total, "images") if series else tqdm(disable=True) as outer:
            try:
                for source in share.take():
                    outer.set_postfix_str(source.name)
                    runner.run_input(source, by_source[source], outer)
            except OSError:  # a full disk: the series stops, saying what it did write
                if series and group is None:  # a launched run's process stops alone, reported with the totals
                    _summary(runner.totals(), ui, stopped=True)
                raise
    _report(runner, share, ui, series)
    if runner.on_step is not None and runner.on_step.kept:
        ui.say(f"{len(runner.on_step.kept)} previews existed and were kept (--overwrite replaces them)")


def _preview_writer(pipe: Any, mode: str, every: int, folder: Path, overwrite: bool) -> Any:
    from .preview import PreviewWriter, load_taesd, make_previewer

    taesd = load_taesd(pipe.is_sdxl) if mode == "taesd" else None
    previewer = make_previewer(mode, pipe.is_sdxl, pipe.vae.config.latent_channels, taesd)
    if previewer is None:
        raise click.UsageError("--preview-every: this model's latents have no preview")
    return PreviewWriter(previewer, every, folder, overwrite)


def _report(runner: jobs_.Runner, share: distributed.Share, ui: UI, series: bool) -> None:
    """The summary of a series (a launched run: of every process's part, printed once, by the first process)
    and the exit status."""
    totals = share.totals(runner)
    ok = not (totals.failed or totals.not_started or totals.stopped)
    if share.rank == 0 and (series or not ok):
        _summary(totals, ui)
    share.done()
    if not ok and share.rank == 0:
        sys.exit(1)


def _open(model: str, dtype: str, offline: bool, vae: str | os.PathLike | None = None,
          prediction_type: str | None = None) -> Any:
    """A model's component source (configs readable, no weights loaded); `offline` never touches the network;
    `vae` replaces the model's VAE; `prediction_type` is a single file's (--prediction-type)."""
    from .loading import open_source

    return open_source(model, dtype=dtype, offline=True if offline else None, vae=vae,
                       prediction_type=prediction_type)


def _load_pipeline(source: Any, name: str | None, r: Request, ui: UI, patches: list[Any] | None = None) -> Any:
    """Load the model `name` from its `source` with the run's precision and memory options (and `patches`,
    merged into the weights as they load)."""
    from .pipeline import Img2ImgPipeline

    how = ", ".join([r.dtype or ""] + ([f"{r.quantize}-bit"] if r.quantize else []) + (["low memory"] * r.low_memory))
    ui.say(f"Loading {name} ({how}) ...")
    start = time.perf_counter()
    pipe = Img2ImgPipeline.from_source(source, dtype=r.dtype or "float32", quantize=r.quantize,
                                       low_memory=r.low_memory, vae_tile=r.vae_tile, patches=patches or ())
    ui.say(f"Loaded {pipe.model_name} in {time.perf_counter() - start:.1f} s")
    return pipe


def _summary(t: jobs_.Totals, ui: UI, stopped: bool = False) -> None:
    """What a series did; `stopped`: it ended early, on an error reported next."""
    parts = [f"{t.written} written"]
    if t.skipped:
        parts.append(f"{t.skipped} already there (skipped)")
    parts.append(f"{len(t.failed)} input(s) failed")
    if t.not_started:
        parts.append(f"{t.not_started} not started")
    by = f" ({len(t.by_process)} processes wrote {' + '.join(map(str, t.by_process))})" if t.by_process else ""
    ui.say(("Stopped: " if stopped or t.not_started else "Done: ") + ", ".join(parts) + by + ".")
    for path, why in t.failed:
        click.echo(f"failed: {why}" if why.startswith(path) else f"failed: {path}: {why}", err=True)
    for line in t.stopped:
        click.echo(line, err=True)


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


@main.command(epilog="\b\nExamples:\n  mlx-img2img models\n  mlx-img2img models --models-dir "
               "~/stable-diffusion-webui")
@click.option("--models-dir", metavar="DIR", envvar=lib.ENV_VAR, help=BY_NAME["models_dir"].help,
              show_default=BY_NAME["models_dir"].show_default)
@_common
@_reported
def models(models_dir: str | None, quiet: bool) -> None:
    """List the model presets, the models already downloaded, and what the models folder holds: checkpoints,
    VAEs, LoRAs, embeddings and ControlNets, with the model family each is for (read from the files' headers),
    and the ControlNet presets."""
    from . import weights
    from .loading.controlnet import cached_controlnets

    cached = {repo: path for repo, path in weights.cached_models()}
    chosen = os.environ.get("MLX_IMG2IMG_MODEL") or DEFAULT_MODEL  # as `run --model` takes it
    mark = "  (default, from MLX_IMG2IMG_MODEL)" if chosen != DEFAULT_MODEL else "  (default)"
    click.echo("Presets (--model NAME; a hub repo id or a local diffusers folder works too):")
    width = max(len(n) for n in (*weights.PRESETS, *weights.CONTROLNET_PRESETS))
    for name, repo in weights.PRESETS.items():
        where = f"cached  {cached[repo]}" if repo in cached else "not downloaded"
        click.echo(f"  {name:<{width}}  {repo:<45}  {where}{mark if chosen in (name, repo) else ''}")
    nets = cached_controlnets()
    click.echo("ControlNet presets (--controlnet NAME; a hub repo id, folder or .safetensors file works too):")
    for name, repo in weights.CONTROLNET_PRESETS.items():
        click.echo(f"  {name:<{width}}  {repo:<45}  {f'cached  {nets[repo]}' if repo in nets else 'not downloaded'}")
    others = [(repo, path) for repo, path in cached.items() if repo not in weights.PRESETS.values()]
    if others:
        click.echo("Other cached models:")
        for repo, path in others:
            click.echo(f"  {repo}  {path}{mark if chosen == repo else ''}")
    if chosen not in weights.PRESETS and chosen not in cached and chosen not in weights.PRESETS.values():
        click.echo(f"Default model (MLX_IMG2IMG_MODEL): {_printable(chosen)}")
    _list_folder(lib.ModelsFolder(models_dir))


FOLDER_USES = {"checkpoint": "-m NAME", "vae": "--vae NAME", "lora": "--lora NAME, <lora:NAME:WEIGHT>",
               "embedding": "NAME in a prompt", "controlnet": "--controlnet NAME"}


def _list_folder(folder: lib.ModelsFolder) -> None:
    """The models folder's files by kind, each with its family and what is wrong with it, if anything."""
    how = "--models-dir" if _source("models_dir") == ParameterSource.COMMANDLINE else (
        lib.ENV_VAR if os.environ.get(lib.ENV_VAR) else "the default")
    if not folder.root.is_dir():
        click.echo(_printable(f"Models folder ({how}): {folder.root} does not exist; put your files in its "
                              "Stable-diffusion, VAE, Lora, embeddings and ControlNet subfolders (or point "
                              "--models-dir at an AUTOMATIC1111 or ComfyUI folder)"))
        return
    click.echo(_printable(f"Models folder ({how}): {folder.root}"))
    for kind in lib.KINDS:
        items = folder.items(kind)
        title = lib.KIND_NAMES[kind][0].upper() + lib.KIND_NAMES[kind][1:]
        click.echo(f"{title} ({FOLDER_USES[kind]}): {len(items) or 'none'}")
        width = max((len(i.name) for i in items), default=0)
        for item in items:
            where = os.path.relpath(item.path, folder.root)
            about = f"problem: {item.problem}" if item.problem else ", ".join(
                x for x in (item.family_name, item.detail) if x)
            click.echo(_printable(f"  {item.name:<{width}}  {about}  ({where})"))


@main.command(epilog="\b\nExamples:\n  mlx-img2img download sd15\n  mlx-img2img download stabilityai/sd-turbo\n"
              "  mlx-img2img download scribble\n"
              "  mlx-img2img download --controlnet lllyasviel/control_v11p_sd15_softedge")
@click.argument("name")
@click.option("--controlnet", "controlnet", is_flag=True,
              help="NAME is a ControlNet's hub repo (implied for the ControlNet presets: see `mlx-img2img models`).")
@click.option(
    "--dtype",
    type=click.Choice(DTYPES),
    default=lambda: _default_dtype(),
    show_default="float16 on a GPU, float32 on the CPU: what `run` uses",
    help="Which weights to fetch: float16 takes the fp16 files where the repo has them.",
)
@_common
@_reported
def download(name: str, controlnet: bool, dtype: str, quiet: bool) -> None:
    """Fetch a model or ControlNet (preset name or hub repo id) now, or update it, for offline use later."""
    from . import weights
    from .loading.controlnet import is_controlnet_preset

    ui = UI(quiet)
    controlnet = controlnet or is_controlnet_preset(name)
    # a path or a typo: one line now, not a hub error later
    weights.hub_repo_id(name, weights.CONTROLNET_PRESETS if controlnet else weights.PRESETS)
    ui.say(f"Downloading {name} ({dtype}) ...")
    path = weights.download(name, dtype=dtype, update=True, single_component=controlnet)
    ui.result(f"{name}: {path}")


SERVE_HELP_EXAMPLES = """
\b
Examples:
  mlx-img2img serve -m sd15
  mlx-img2img serve -m sd15 --models-dir ~/models --keep-models 2 --idle-unload 30
  mlx-img2img serve --listen --api-auth ann:s3cret
"""


@main.command(epilog=SERVE_HELP_EXAMPLES)
@click.option("-m", "--model", default=BY_NAME["model"].default, envvar="MLX_IMG2IMG_MODEL", show_default=True,
              metavar="NAME|PATH", help="The model loaded at start: a preset, hub repo id, diffusers folder or "
              ".safetensors file. Requests name models by title (the folder or file name, see /sdapi/v1/sd-models).")
@click.option("--models-dir", type=click.Path(path_type=Path, file_okay=False, exists=True), envvar=lib.ENV_VAR,
              show_default=BY_NAME["models_dir"].show_default,
              help="The models folder (as `run --models-dir`): its checkpoints are listed for requests (by title), "
              "its LoRAs serve <lora:NAME:WEIGHT> in prompts and its embeddings their names in prompts.")
@click.option("--host", help="The address to bind. Default: 127.0.0.1 (0.0.0.0 with --listen); any other than "
              "loopback needs --listen.")
@click.option("--port", type=click.IntRange(1, 65535), default=7860, show_default=True, help="The port.")
@click.option("--listen", is_flag=True, help="Serve other machines too (give --api-auth with it).")
@click.option("--api-auth", metavar="USER:PASS[,...]", help="Require these HTTP Basic credentials (401 without).")
@click.option("--keep-models", type=click.IntRange(1, 16), default=1, show_default=True,
              help="How many models stay loaded at once (the least recently used goes first).")
@click.option("--idle-unload", type=click.FloatRange(0, min_open=True), metavar="MINUTES",
              help="Unload a model after this many minutes unused. Default: never.")
@click.option("--queue-size", type=click.IntRange(1, 10_000), default=16, show_default=True,
              help="Jobs waiting at most; more are answered 429.")
@click.option("--preview", type=click.Choice(["cheap", "taesd", "none"]), default="cheap", show_default=True,
              help="Live previews for /progress and job events: cheap (a linear latent-to-RGB map), taesd (the "
              "tiny autoencoder, from the Hugging Face cache: madebyollin/taesd, taesdxl) or none.")
@click.option("--preview-every", type=click.IntRange(1), metavar="N",
              help="A preview every N steps. Default: as often as previews take at most 5% of the time (cheap: "
              "every step).")
@click.option("--controlnet", "controlnets", multiple=True, metavar="NAME|PATH",
              help="A ControlNet that requests may name (by its folder or file name, or this name); repeatable.")
@click.option("--dtype", type=click.Choice(DTYPES), default=lambda: _default_dtype(),
              show_default="float16 on a GPU, float32 on the CPU", help=BY_NAME["dtype"].help)
@click.option("--quantize", type=FieldType(BY_NAME["quantize"]), metavar="[8|4|0]", show_default="0 (off)",
              help=BY_NAME["quantize"].help)
@click.option("--low-memory", is_flag=True, help=BY_NAME["low_memory"].help)
@click.option("--vae-tile", type=FieldType(BY_NAME["vae_tile"]), help=BY_NAME["vae_tile"].help)
@click.option("--memory-limit", type=FieldType(BY_NAME["memory_limit"]), help=BY_NAME["memory_limit"].help)
@click.option("--offline", is_flag=True, help="Use only models already on disk (also: HF_HUB_OFFLINE=1).")
@_common
@_reported
def serve(model: str, models_dir: Path | None, host: str | None, port: int, listen: bool, api_auth: str | None,
          keep_models: int, idle_unload: float | None, queue_size: int, preview: str, preview_every: int | None,
          controlnets: tuple[str, ...], dtype: str, quantize: int | None, low_memory: bool, vae_tile: int | None,
          memory_limit: float | None, offline: bool, quiet: bool) -> None:
    """Serve AUTOMATIC1111's HTTP API and a native jobs API, keeping models loaded. Ctrl-C stops it."""
    from . import server

    ui = UI(quiet)
    load = server.LoadSettings(dtype=dtype, quantize=quantize, low_memory=low_memory, vae_tile=vae_tile,
                               offline=True if offline else None)
    options = server.ServerOptions(model=model, host=host, port=port, listen=listen, api_auth=api_auth,
                                   models_dir=models_dir, keep_models=keep_models, idle_unload_minutes=idle_unload,
                                   queue_size=queue_size, preview=preview, preview_every=preview_every, load=load,
                                   memory_limit_gb=memory_limit, controlnets=controlnets)
    ui.say(f"Loading {model} ({dtype}) ...")
    server.serve(options, ui.say, log_level="warning" if quiet else "info")


if __name__ == "__main__":
    main(prog_name="mlx-img2img")
