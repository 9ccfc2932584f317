"""The command line's jobs: which images a run writes, under which names, and writing them.

Every workflow of ``run`` (one image, variations, progressive passes, a strength sweep, a series over
files or a folder) is a list of jobs. A job takes one input image through one or more generations, each
saved atomically with its settings. Generating an image is the planner's (generation.py), and so is what
its PNG stores (generation.image_settings); this module keeps files, names, series and resume, and gives
those settings the input's file and how its mask was made.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from . import images, inpaint
from .errors import ImageInputError, Img2ImgError
from .events import StepEvent
from .generation import TEXT_AND_NOISE_DEFAULTS, Planner, image_settings, mask_settings, not_default_settings
from .request import Request

# The settings whose equality makes an existing output the one this run would write (resume).
SAME_OUTPUT_KEYS = ("prompt", "negative_prompt", "model_name", "strength", "steps", "guidance", "seed", "scheduler",
                    "refiner_name", "refiner_start", "quantize", "sweep", "rng", "prompt_syntax", "clip_skip", "lora",
                    "lora_hashes")
# ... and, when inpainting, these: the mask by its content (not its path: a moved mask folder still resumes)
# and how it was made and used, as generation.image_settings stores them.
MASK_KEYS = ("mask_sha256", "invert_mask", "outpaint", "mask_blur", "inpaint_fill", "only_masked", "padding")


class OutputError(Img2ImgError):
    """An output cannot be written where it was asked for."""


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


def _steps_for(r: Request, folder: Path, stem: str) -> tuple[list[Step], Path | None]:
    """The steps (and the sheet, for a sweep) of one job writing ``folder/stem*.png``."""
    final = folder / f"{stem}.png"
    if r.passes:
        steps, prompt = [], r.prompt or ""
        for i, strength in enumerate(r.passes, start=1):
            if i > 1 and i - 2 < len(r.pass_prompts) and r.pass_prompts[i - 2].strip():
                prompt = f"{prompt}, {r.pass_prompts[i - 2].strip()}" if prompt else r.pass_prompts[i - 2]
            out = final if i == len(r.passes) else folder / f"{stem}-pass{i}.png"
            steps.append(Step(prompt, strength, out, f"pass {i}/{len(r.passes)} strength {strength:g}"))
        return steps, None
    if r.sweep:
        steps = [Step(r.prompt or "", v, folder / f"{stem}-s{v:.2f}.png", f"strength {v:g}") for v in r.sweep]
        return steps, final
    return [Step(r.prompt or "", r.strength, final, f"strength {r.strength:g}")], None


def plan_jobs(r: Request, sources: list[Path], folder: Path, stems: list[str], seed: int) -> list[Job]:
    jobs = []
    for source, stem in zip(sources, stems, strict=True):
        for k in range(r.num_images):
            name = f"{stem}-{k + 1}" if r.num_images > 1 else stem
            steps, sheet = _steps_for(r, folder, name)
            jobs.append(Job(source, (seed + k) % 2**32, steps, chained=bool(r.passes), sheet=sheet))
    return jobs


def stems_for(sources: list[Path]) -> list[str]:
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


def fresh_stem(folder: Path, stem: str, r: Request) -> str:
    """``stem`` or ``stem-2``, ``stem-3``, ...: the first whose outputs are all free."""
    for n in range(1, 100_000):
        candidate = stem if n == 1 else f"{stem}-{n}"
        jobs = plan_jobs(r, [Path(candidate)], folder, [candidate], 0)
        if not any(p.exists() for job in jobs for p in job.outputs()):
            return candidate
    raise OutputError(f"no free output name for {stem} in {folder}")


def mask_in_folder(folder: Path, source: Path) -> Path:
    """The mask of an input in a mask folder: the file of the input's name, else one of its stem."""
    if (folder / source.name).is_file():
        return folder / source.name
    same = [p for p in images.list_images(folder) if p.stem == source.stem]
    if not same:
        raise inpaint.MaskError(f"{source.name}: no mask of that name in {folder} (masks are matched by file name)")
    return same[0]


def mask_file_settings(path: Path) -> dict[str, str]:
    """What an output stores of its mask file: its name and the SHA-256 of its content."""
    return {"mask": str(path), "mask_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def check_stored_mask(stored: dict[str, Any], where: str) -> None:
    """--from re-using an image's mask file: it must be the one the image was made with (the stored SHA-256).
    A mask given with --mask is used as it is, without this check."""
    path, expected = stored.get("mask"), stored.get("mask_sha256")
    if not isinstance(path, str) or expected is None:
        return
    expected = expected.lower() if isinstance(expected, str) else ""
    if not (len(expected) == 64 and all(c in "0123456789abcdef" for c in expected)):
        raise inpaint.MaskError(f"{where}: stored mask_sha256: {stored['mask_sha256']!r:.70} is not a SHA-256")
    shown = f"{path!r:.200}"  # a stored text, shown as such
    if not Path(path).is_file():
        raise inpaint.MaskError(f"{where} was made with the mask {shown}, which is not there: give --mask FILE")
    sha = mask_file_settings(Path(path))["mask_sha256"]
    if sha != expected:
        raise inpaint.MaskError(
            f"{where}: the mask {shown} has the hash {sha[:12]}, the image was made with a mask of that name hashed "
            f"{expected[:12]}: its content differs; put that one back, or give --mask FILE to use this one")


def check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except (FileExistsError, NotADirectoryError) as e:
        raise OutputError(f"cannot create the output folder {folder}: a file is in the way") from e
    except OSError as e:
        raise OutputError(f"cannot write to the output folder {folder}: {e.strerror or e}") from e


@dataclass
class Totals:
    """What a series did, for its summary; a launched run's (distributed.py) adds up every process's."""

    written: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (input, why)
    not_started: int = 0  # inputs no process took (each one that took inputs stopped early)
    stopped: list[str] = field(default_factory=list)  # processes that stopped early, and why
    by_process: list[int] = field(default_factory=list)  # images written by each process of a launched run


def _differs(expected: dict, mask: dict, stored: dict) -> str | None:
    """The first setting in which `stored` is not what this run would store, named for a message: "mask" for
    another mask file's content, or a mask where there was none or none where there was one."""
    differs = next((k for k, v in expected.items() if stored.get(k) != v), None)
    if differs is not None or not mask:
        return differs
    if (mask["mask_blur"] is None) != (stored.get("mask_blur") is None):  # image_settings always stores it
        return "mask"
    # --padding is only used with --only-masked: a run that changes it alone makes the same image
    differs = next((k for k, v in mask.items() if stored.get(k) != v and (k != "padding" or mask["only_masked"])),
                   None)
    return "mask" if differs == "mask_sha256" else differs


class Runner:
    """Runs jobs over loaded pipelines, saving every image atomically with the settings it was made with."""

    def __init__(self, planner: Planner, ui: Any, metadata: bool, overwrite: bool, resume: bool, version: str,
                 model_name: str, refiner_name: str | None = None):
        self.planner, self.r, self.ui = planner, planner.request, ui
        self.metadata, self.overwrite, self.resume, self.version = metadata, overwrite, resume, version
        self.model_name, self.refiner_name = model_name, refiner_name
        self.pipe: Any = None
        self.refiner: Any = None
        self.written: list[Path] = []
        self.skipped: list[Path] = []
        self.failed: list[tuple[Path, str]] = []
        self.mask: Image.Image | None = None  # the current input's mask (inpainting), at the output's size
        self.mask_blur: float | None = None  # None: the request's (--outpaint builds its seam into the mask)
        self.mask_file: dict[str, str] = {}  # stored in the outputs: the mask's file and its hash
        self.control: list[Image.Image] | None = None  # the current input's control images (ControlNets)
        self.on_step: Any = None  # called with (the output's name, StepEvent) at each step (--preview-every)

    def settings_for(self, step: Step, seed: int, source: str, size: tuple, work: tuple) -> dict:
        """The settings stored in an output (generation.image_settings): the request's as this image used them,
        with its input's file and how its mask was made."""
        r = self.r
        mask = None if self.mask is None else {"invert_mask": r.invert_mask, "outpaint": r.outpaint, **self.mask_file}
        return image_settings(r, self.planner, step.prompt, step.strength, seed, size, work, self.model_name,
                              self.version, refiner_name=self.refiner_name, source=source, mask=mask)

    def _mask_path(self, source: Path) -> Path | None:
        """--mask's file for this input (a folder's file of its name); None without --mask."""
        if not self.r.mask:
            return None
        path = Path(self.r.mask)
        return mask_in_folder(path, source) if path.is_dir() else path

    def _expected_mask(self, source: Path) -> dict | None:
        """The mask settings (MASK_KEYS) an output of this input stores when this run makes it: all None
        where it masks nothing; None where that cannot be told (the mask or the input is unreadable: the
        run then reports it as it reaches the input)."""
        r = self.r
        try:
            path = None if r.outpaint else self._mask_path(source)
            if not r.outpaint and path is None and images.load_transparency(source) is None:
                return dict.fromkeys(MASK_KEYS)
            sha = mask_file_settings(path)["mask_sha256"] if path is not None else None
        except (ImageInputError, OSError):
            return None
        stored = mask_settings(r, {"invert_mask": r.invert_mask, "outpaint": r.outpaint, "mask_sha256": sha})
        return {k: stored[k] for k in MASK_KEYS}

    def _expected(self, step: Step, seed: int, sweep: list[float] | None = None) -> dict:
        expected = {"prompt": step.prompt, "negative_prompt": self.r.negative_prompt, "model_name": self.model_name,
                    "strength": None if sweep else step.strength, "steps": self.r.steps, "guidance": self.r.guidance,
                    "seed": seed, "scheduler": self.planner.scheduler, "sweep": sweep,
                    "refiner_name": self.refiner_name, "refiner_start": self.r.refiner_start if self.refiner_name
                    else None, "quantize": self.r.quantize, **dict.fromkeys(TEXT_AND_NOISE_DEFAULTS),
                    "lora": None, "lora_hashes": None, **not_default_settings(self.r),
                    **self.planner.extras(step.prompt).settings()[0]}
        return {k: expected[k] for k in SAME_OUTPUT_KEYS}

    def stale(self, jobs: list[Job]) -> list[tuple[Path, str]]:
        """Existing outputs (when resuming) that another run made: (path, the first setting that differs).
        An output without stored settings cannot be told apart and is taken as this run's."""
        found = []
        masks: dict[Path, dict | None] = {}  # by input, read once (and only where an output is there)
        for job in jobs:
            sweep = [s.strength for s in job.steps] if job.sheet else None
            pairs = [(s.out, self._expected(s, job.seed)) for s in job.steps]
            if job.sheet:
                pairs.append((job.sheet, self._expected(job.steps[0], job.seed, sweep)))
            for path, expected in pairs:
                if not path.exists():
                    continue
                try:
                    _, stored = images.read_metadata(path)
                except ImageInputError as e:
                    found.append((path, str(e)))
                    continue
                if stored is None:
                    continue
                if job.source not in masks:
                    masks[job.source] = self._expected_mask(job.source)
                differs = _differs(expected, masks[job.source] or {}, stored)
                if differs is not None:
                    found.append((path, f"its {differs} differs"))
        return found

    def totals(self) -> Totals:
        return Totals(len(self.written), len(self.skipped), [(str(p), why) for p, why in self.failed])

    def pending(self, jobs: list[Job]) -> int:
        """Images still to generate."""
        return sum(1 for job in jobs for s in job.steps if not (self.resume and s.out.exists()))

    def save(self, img: Image.Image, path: Path, settings: dict | None) -> None:
        images.save_png(img, path, settings if self.metadata else None, overwrite=self.overwrite)
        self.written.append(path)

    def run_input(self, source: Path, jobs: list[Job], outer: Any) -> None:
        """Every job of one input; an unreadable input is reported and skipped."""
        if self.resume and all(p.exists() for job in jobs for p in job.outputs()):
            self.skipped.extend(p for job in jobs for p in job.outputs())
            outer.update(sum(len(job.steps) for job in jobs))
            return
        try:
            original = images.load_image(source)
            fitted = self.with_mask(source, original, images.fit_image(original, self.r.width, self.r.height,
                                                                       self.r.resize))
        except ImageInputError as e:
            why = " ".join(str(e).split())
            self.failed.append((source, why))
            self.ui.say(f"skipped: {why}")
            outer.update(sum(len(job.steps) for job in jobs))
            return
        work = images.model_size(fitted.size, self.planner.max_side)
        # one control per input, made from the input (not from a pass's output), at the working size
        self.control = self.planner.control_images(images.resize_to(fitted, work))
        for job in jobs:
            self.run_job(job, fitted, work, outer)

    def with_mask(self, source: Path, original: Image.Image, fitted: Image.Image) -> Image.Image:
        """Set the input's mask (None: img2img) at the output's size: --mask (a file, resized to the input
        with a warning; or a folder's file of the input's name, which must have its size), else the input's
        transparency; with --outpaint, the canvas and its mask. Returns the input (extended by --outpaint)."""
        r = self.r
        self.mask, self.mask_blur, self.mask_file = None, None, {}
        if r.outpaint:
            margins = inpaint.margins_in_pixels(inpaint.parse_margins(r.outpaint), *fitted.size)
            fitted, self.mask = inpaint.outpaint_canvas(fitted, margins, seam=r.mask_blur)
            self.mask_blur = 0.0
            return fitted
        path = self._mask_path(source)
        if path is not None:
            mask = images.load_mask(path)
            self.mask_file = mask_file_settings(path)
            if mask.size != original.size:
                size = f"{mask.width}x{mask.height}, the input {source.name} {original.width}x{original.height}"
                if path != Path(r.mask):
                    raise inpaint.MaskError(f"{path}: the mask is {size}: a mask folder's masks must have "
                                            "their input's size")
                self.ui.say(f"warning: {path.name} is {size}: the mask is resized to the input")
                mask = mask.resize(original.size, Image.Resampling.LANCZOS)
        else:
            mask = images.load_transparency(source)
            if mask is None:
                return fitted
        if r.invert_mask:
            mask = ImageOps.invert(mask)
        if max(mask.getextrema()) < 128:
            raise inpaint.MaskError(f"{self.mask_file.get('mask', source)}: the mask is all black (nothing to "
                                    "repaint): white marks what changes")
        self.mask = images.fit_image(mask, r.width, r.height, r.resize, fill=0)
        return fitted

    def generate(self, image: Image.Image, step: Step, seed: int, work: tuple[int, int]) -> Image.Image:
        """One image at the working size, resized back to the output's; a cancelled run is a Ctrl-C."""
        with self.ui.bar(None, step.out.name, leave=False, position=self.ui.depth) as bar:

            def progress(event: StepEvent) -> None:
                bar.total = event.total
                bar.update(event.index - bar.n)
                if self.on_step is not None:
                    self.on_step(step.out.stem, event)

            outcome = self.planner.run(self.pipe, self.refiner, images.resize_to(image, work), step.prompt,
                                       step.strength, seed, on_step=progress,
                                       mask=None if self.mask is None else images.resize_to(self.mask, work),
                                       mask_blur=self.mask_blur, control=self.control)
        if outcome.cancelled or outcome.image is None:
            raise KeyboardInterrupt
        out = images.resize_to(outcome.image, image.size)
        if self.mask is not None:  # at the output's size too: the resize back must not move a kept pixel
            blur = self.r.mask_blur if self.mask_blur is None else self.mask_blur
            out = inpaint.keep_unmasked(image, out, self.mask, blur)
        return out

    def run_job(self, job: Job, fitted: Image.Image, work: tuple[int, int], outer: Any) -> None:
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
