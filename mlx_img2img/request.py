"""A generation request: every setting of a run, declared once.

Each setting is one `Field`: its name (also its key in the PNG's JSON settings), how a value is read
from text (a command-line flag, an AUTOMATIC1111 text field) and checked, its default, its flag and help
text, and whether a re-run (`--from IMAGE`) takes it from the image. The command line's options are made
from this table, a stored value goes through the same check as the flag it stands for, and the server
builds its requests from JSON the same way: adding a knob is one field here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from . import checks
from .control import PREPROCESSORS
from .images import RESIZE_MODES
from .inpaint import INPAINT_FILLS, parse_margins
from .library import ENV_VAR as MODELS_DIR_ENV_VAR
from .library import is_path_like
from .loading.single_file import PREDICTION_TYPES
from .noise import RNGS
from .prompts import PROMPT_SYNTAXES
from .schedulers import SCHEDULERS

DEFAULT_MODEL = "sd15"
DTYPES = ("float16", "bfloat16", "float32")
QUANTIZE_BITS = (8, 4, 0)  # 0: full-precision weights (overrides a stored setting with --from)
QUANTIZE_CHOICES = tuple(map(str, QUANTIZE_BITS))
DEFAULT_REFINER_START = 0.8
MAX_SIDE = 4096  # the largest working size accepted (the model works at this size: memory and time grow fast)
MAX_OUTPUT_SIDE = 8192
MAX_MEMORY_LIMIT_GB = 1_000_000  # beyond any machine; MLX takes the limit in bytes as a C integer
# --max-side when not given: SD 1.x/2.x (trained at 512/768) tolerate up to 768 in img2img; SDXL its 1024.
MAX_SIDE_SD = 768
MAX_SIDE_SDXL = 1024
MAX_CONTROLNETS = 8
MAX_CONTROL_SCALE = 10.0
MAX_LORAS = 16
MAX_LORA_SCALE = 20.0  # AUTOMATIC1111 takes any weight; beyond this a LoRA only breaks the image
MAX_EMBEDDINGS = 64


class RequestError(ValueError):
    """A setting that cannot be used; the message names it (as a flag where it came from one)."""


# ------------------------------------------------------------------------------------------ value kinds


def _int(low: int | None = None, high: int | None = None) -> Callable[[str, Any], int]:
    return lambda name, v: checks.whole(name, v, low, high)


def _float(low: float | None = None, high: float | None = None, open_low: bool = False,
           open_high: bool = False) -> Callable[[str, Any], float]:
    return lambda name, v: checks.number(name, v, low, high, open_low, open_high)


def _choice(options: tuple) -> Callable[[str, Any], Any]:
    def check(name: str, v: Any) -> Any:
        if v not in options:
            shown = ", ".join(repr(o) for o in options)
            raise ValueError(f"{name}: {v!r:.40} is not one of {shown}.")
        return v

    return check


def _text(name: str, v: Any) -> str:
    return checks.text(name, v)


def _strengths(name: str, v: Any) -> list[float]:
    if not isinstance(v, list | tuple) or not v:
        raise TypeError(f"{name}: give at least one strength, e.g. 0.75,0.35")
    values = [checks.number(name, x) for x in v]
    bad = [x for x in values if not 0.0 <= x <= 1.0]
    if bad:
        raise ValueError(f"{name}: strengths must be between 0 and 1, not {bad[0]:g}")
    return values


def _texts(name: str, v: Any) -> list[str]:
    if not isinstance(v, list | tuple):
        raise TypeError(f"{name} must be a list of texts")
    return [checks.text(name, x) for x in v]


def _seed(name: str, v: Any) -> int | None:
    if not isinstance(v, bool) and isinstance(v, int) and v == -1:
        return None  # AUTOMATIC1111's "random"
    return checks.whole(name, v, 0, checks.MAX_SEED)


def _flag(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be true or false, not {v!r:.40}")
    return v


def _model(name: str, v: Any) -> str:
    value = checks.text(name, v, limit=4096).strip()
    if not value:
        raise ValueError(f"{name} must name a model")
    return value


def _refiner(name: str, v: Any) -> str | None:
    value = checks.text(name, v, limit=4096).strip()
    return None if value.lower() in ("", "none") else value


def _margins(name: str, v: Any) -> str:
    value = checks.text(name, v, limit=100).strip()
    parse_margins(value)  # refused here, with the flag's name, rather than after the model loads
    return value


def _controlnets(name: str, v: Any) -> str | list[str]:
    """One ControlNet (a flag's text) or the list of them (--controlnet given several times, a stored list)."""
    if isinstance(v, list | tuple):
        if len(v) > MAX_CONTROLNETS:
            raise ValueError(f"{name}: at most {MAX_CONTROLNETS} ControlNets")
        return [_model(name, x) for x in v]
    return _model(name, v)


def _path(name: str, v: Any) -> str:
    value = checks.text(name, v, limit=4096).strip()
    if not value:
        raise ValueError(f"{name} must name a folder")
    return value


def parse_lora(text: str) -> tuple[str, float]:
    """``FILE[:SCALE]`` or ``NAME[:SCALE]`` (scale 1 when left out) as (file or name, scale)."""
    ref, _, tail = text.rpartition(":")
    try:
        scale = float(tail) if ref else 1.0
    except ValueError:
        ref, scale = "", 1.0
    return (ref or text).strip(), scale


def _lora(name: str, v: Any) -> str:
    text = checks.text(name, v, limit=4096).strip()
    ref, scale = parse_lora(text)
    if not ref:
        raise ValueError(f"{name}: give a LoRA file or name, e.g. watercolor.safetensors:0.8")
    checks.number(name, scale, -MAX_LORA_SCALE, MAX_LORA_SCALE)
    return text


def _several(one: Callable[[str, Any], str], most: int, what: str) -> Callable[[str, Any], str | list[str]]:
    """One flag's text, or the list of them (the flag given several times, a stored list), each checked."""
    def check(name: str, v: Any) -> str | list[str]:
        if not isinstance(v, list | tuple):
            return one(name, v)
        if len(v) > most:
            raise ValueError(f"{name}: at most {most} {what}")
        return [one(name, x) for x in v]

    return check


def _hashes(name: str, v: Any) -> dict[str, str]:
    """{name: hex hash} as an image stores it (full or AUTOMATIC1111's 12 digits)."""
    if not isinstance(v, dict) or len(v) > 256:
        raise ValueError(f"{name} must be an object of names and hashes")
    out = {}
    for key, value in v.items():
        text = checks.text(name, value, limit=64).strip().lower()
        if not (isinstance(key, str) and 0 < len(key) <= 256 and len(text) >= 8
                and all(c in "0123456789abcdef" for c in text)):
            raise ValueError(f"{name}: {key!r:.40}: {value!r:.70} is not a hash")
        out[key] = text
    return out


def _scales(name: str, v: Any) -> list[float]:
    values = v if isinstance(v, list | tuple) else [v]
    if not values or len(values) > MAX_CONTROLNETS:
        raise ValueError(f"{name}: give one scale, or one per ControlNet")
    return [checks.number(name, x, 0.0, MAX_CONTROL_SCALE) for x in values]


def _quantize(name: str, v: Any) -> int | None:
    if isinstance(v, str) and v in QUANTIZE_CHOICES:  # the flag's text
        v = int(v)
    return _choice(QUANTIZE_BITS)(name, checks.whole(name, v)) or None


def _vae_tile(name: str, v: Any) -> int | None:
    return checks.vae_tile(v, name)


# From text (a flag's argument, an A1111 field) to the value a check takes.
def _parse_int(text: str) -> int:
    return int(text.strip())


def _parse_float(text: str) -> float:
    return float(text.strip())


def _parse_list(text: str) -> list[float]:
    values = [v for v in text.split(",") if v.strip()]
    return [float(v) for v in values]


# ------------------------------------------------------------------------------------------ the table


@dataclass(frozen=True)
class Field:
    """One setting. `check(name, value)` normalises a typed value or raises naming it; `parse` reads text."""

    name: str
    check: Callable[[str, Any], Any]
    default: Any = None
    flags: tuple[str, ...] = ()
    help: str = ""
    parse: Callable[[str], Any] | None = None  # None: the text itself
    stored: bool = True  # a re-run (--from IMAGE) takes it from the image unless the flag is given
    metavar: str | None = None
    choices: tuple | None = None  # shown in help
    show_default: bool | str = True
    is_flag: bool = False
    envvar: str | None = None
    multiple: bool = False  # the flag can be given several times (a list of values)

    @property
    def flag(self) -> str:
        """The long flag, for messages (the field's name where it has none)."""
        return next((f for f in self.flags if f.startswith("--")), self.name)

    def from_text(self, text: str) -> Any:
        """A flag's text, read and checked; messages name the flag."""
        try:
            value = self.parse(text) if self.parse else text
        except ValueError:
            raise RequestError(f"{self.flag}: {text!r:.40} is not {self._kind()}") from None
        return self.validate(value, name=self.flag)

    def validate(self, value: Any, where: str | None = None, name: str | None = None) -> Any:
        """A typed value (a default, a stored JSON value, a server's JSON), checked. Messages name it as
        `name` (default: the field's name), after `where` ("X.png: stored") when that is given."""
        if value is None:
            return None
        try:
            return self.check(name or self.name, value)
        except (TypeError, ValueError) as e:
            raise RequestError(f"{where}: {e}" if where else str(e)) from None

    def _kind(self) -> str:
        return {_parse_int: "a whole number", _parse_float: "a number",
                _parse_list: "a comma-separated list of numbers, e.g. 0.75,0.35"}.get(self.parse, "valid")


FIELDS: tuple[Field, ...] = (
    Field("prompt", _text, None, ("-p", "--prompt"), "What the image should become (required).",
          show_default=False),
    Field("negative_prompt", _text, None, ("-n", "--negative-prompt"), "What to steer away from.",
          show_default=False),
    Field("model", _model, DEFAULT_MODEL, ("-m", "--model"),
          "Preset name (see `models`), hub repo id, a local diffusers folder, a single-file .safetensors "
          "checkpoint (AUTOMATIC1111/ComfyUI/CivitAI; read offline), or a checkpoint's name in the models folder "
          "(--models-dir). A model stored in an image "
          "is used by --from only with --stored-model.", envvar="MLX_IMG2IMG_MODEL", metavar="NAME|PATH"),
    Field("vae", _refiner, None, ("--vae",),
          "A VAE in place of the model's own: a .safetensors file (e.g. vae-ft-mse-840000-ema-pruned), a "
          "diffusers VAE folder, or a VAE's name in the models folder. One stored in an image is used by --from "
          "only with --stored-model.", metavar="PATH|NAME", show_default=False),
    Field("prediction_type", _choice(PREDICTION_TYPES), None, ("--prediction-type",),
          "What an SD 2.x single-file checkpoint predicts: epsilon (the 512-pixel models) or v_prediction (the "
          "768-pixel ones). Default: its UNet's answer to AUTOMATIC1111's test. Single files only (a diffusers "
          "model's scheduler config says it).", choices=PREDICTION_TYPES, show_default=False),
    Field("models_dir", _path, None, ("--models-dir",),
          "The models folder: -m NAME, --vae NAME, --lora NAME and <lora:NAME> find files there by name, in "
          "AUTOMATIC1111's (Stable-diffusion, VAE, Lora, embeddings) or ComfyUI's (checkpoints, vae, loras, "
          "embeddings) subfolders; also MLX_IMG2IMG_MODELS. See `mlx-img2img models`.", stored=False,
          envvar=MODELS_DIR_ENV_VAR, metavar="DIR",
          show_default="~/Library/Application Support/mlx-img2img/models on macOS, "
          "~/.local/share/mlx-img2img/models elsewhere"),
    Field("lora", _several(_lora, MAX_LORAS, "LoRAs"), None, ("--lora",),
          "A LoRA with its weight (default 1), merged into the model: a .safetensors file, or a name in the LoRA "
          "folder; give it again for several. <lora:NAME:WEIGHT> in the prompt does the same, as in "
          "AUTOMATIC1111.", metavar="FILE|NAME[:SCALE]", show_default=False, multiple=True),
    Field("lora_dir", _path, None, ("--lora-dir",), "Where <lora:NAME> and --lora NAME look.", stored=False,
          metavar="DIR", show_default="the models folder's Lora/ or loras/"),
    Field("embedding", _several(_path, MAX_EMBEDDINGS, "embeddings"), None, ("--embedding",),
          "A textual-inversion embedding (a .safetensors file, or a name in the embeddings folder), used where its "
          "name is in the prompt; give it again for several. Those in the embeddings folder are used without it "
          "when their name is in a prompt.", stored=False, metavar="FILE|NAME", show_default=False, multiple=True),
    Field("strength", _float(0, 1), 0.65, ("-s", "--strength"),
          "Denoising strength in [0, 1]: 0.2-0.4 refines, 0.7-0.9 reimagines.", _parse_float, metavar="S"),
    Field("steps", _int(1), 30, ("--steps",),
          "Inference steps for the full schedule (about steps x strength of them run).", _parse_int, metavar="N"),
    Field("guidance", _float(0), 7.5, ("-g", "--guidance"),
          "Classifier-free guidance scale (CFG); 1 or less turns guidance off.", _parse_float, metavar="G"),
    Field("seed", _seed, None, ("--seed",),
          f"Random seed, 0 to {checks.MAX_SEED} (-1: random). Default: a random one, printed.", _parse_int,
          metavar="N", show_default=False),
    Field("scheduler", _choice(SCHEDULERS), None, ("--scheduler",), "Sampler. Default: the model's own.",
          choices=SCHEDULERS, show_default=False),
    Field("rng", _choice(RNGS), "mlx", ("--rng",),
          "Noise generator: mlx, or torch (PyTorch's CPU generator, the one of diffusers scripts, AUTOMATIC1111 and "
          "ComfyUI: a seed gives the image diffusers makes with a CPU torch.Generator).", choices=RNGS),
    Field("prompt_syntax", _choice(PROMPT_SYNTAXES), "a1111", ("--prompt-syntax",),
          "a1111: AUTOMATIC1111's (word:1.2), (word), [word], BREAK and prompts of any length; plain: the text as "
          "it is, cut at 75 tokens (diffusers).", choices=PROMPT_SYNTAXES),
    Field("clip_skip", _int(1, 99), None, ("--clip-skip",),
          "AUTOMATIC1111's Clip skip: 1 the text encoder's last layer, 2 the one before it (diffusers' clip_skip=1). "
          "SDXL ignores it, as AUTOMATIC1111 does.", _parse_int, metavar="N", show_default="1"),
    Field("width", _int(8, MAX_OUTPUT_SIDE), None, ("--width",), "Output width (default: the input's).",
          _parse_int, metavar="W", show_default=False),
    Field("height", _int(8, MAX_OUTPUT_SIDE), None, ("--height",), "Output height (default: the input's).",
          _parse_int, metavar="H", show_default=False),
    Field("resize", _choice(RESIZE_MODES), "fit", ("--resize",),
          "With both --width and --height: fit inside / crop to fill / pad / stretch.", choices=RESIZE_MODES),
    Field("max_side", _int(64, MAX_SIDE), None, ("--max-side",),
          f"The model works at most at this many pixels on the longer side (the output keeps its size). "
          f"Default: {MAX_SIDE_SD}, {MAX_SIDE_SDXL} for SDXL models.", _parse_int, metavar="N", show_default=False),
    Field("dtype", _choice(DTYPES), None, ("--dtype",),
          "Weights precision; float32 is slower on a GPU and matches references exactly.", choices=DTYPES,
          show_default="float16 on a GPU, float32 on the CPU"),
    Field("num_images", _int(1, 1000), 1, ("-N", "--num-images"), "Variations per input, with seeds seed, seed+1, ...",
          _parse_int, stored=False, metavar="N"),
    Field("passes", _strengths, None, ("--passes",), "Progressive passes: strengths, each pass from the previous "
          "output.", _parse_list, stored=False, metavar="S1,S2,...", show_default=False),
    Field("sweep", _strengths, None, ("--sweep",), "One image per strength, plus a labelled contact sheet.",
          _parse_list, metavar="S1,S2,...", show_default=False),
    # inpainting and outpainting
    Field("mask", _refiner, None, ("--mask",),
          "Inpaint: repaint only where this mask is white (black: kept; grey: binarised at half). A folder: "
          "one mask per input, matched by file name. Default: the input's own transparency, if it has any.",
          metavar="FILE|FOLDER", show_default=False),
    Field("mask_blur", _float(0, 256), 4.0, ("--mask-blur",),
          "Blur the mask's edge by a Gaussian of this many pixels (pixels farther than 2.5x from the mask are "
          "kept exactly); with --outpaint, the width of the seam.", _parse_float, metavar="PX"),
    Field("inpaint_fill", _choice(INPAINT_FILLS), "original", ("--inpaint-fill",),
          "What the masked area starts from: the input (original), its surroundings' colours (fill), noise "
          "(latent_noise) or nothing (latent_nothing).", choices=INPAINT_FILLS),
    Field("invert_mask", _flag, False, ("--invert-mask",), "Repaint where the mask is black instead.",
          is_flag=True, show_default=False),
    Field("only_masked", _flag, False, ("--only-masked",),
          "Work on the mask's box (plus --padding) only, scaled up to the working size, and paste it back: "
          "more detail in small areas.", is_flag=True, show_default=False),
    Field("padding", _int(0, MAX_OUTPUT_SIDE), 32, ("--padding",), "With --only-masked: pixels around the mask's box.",
          _parse_int, metavar="PX"),
    Field("outpaint", _margins, None, ("--outpaint",),
          "Extend the canvas by these margins (CSS order TOP,RIGHT,BOTTOM,LEFT; pixels or percent: 64, 0,25%) "
          "and paint the new area; the input's pixels are kept exactly.", metavar="T,R,B,L", show_default=False),
    Field("refiner", _refiner, None, ("--refiner",),
          "A refiner (e.g. sdxl-refiner) that finishes each image from --refiner-start on, taking the model's "
          "latents as they are; 'none' drops a stored one with --from.", metavar="NAME|PATH", show_default=False),
    Field("refiner_start", _float(0, 1, open_low=True, open_high=True), DEFAULT_REFINER_START,
          ("--refiner-start",), "Where the refiner takes over, as a fraction of the whole schedule (0 < x < 1).",
          _parse_float, metavar="F"),
    Field("controlnet", _controlnets, None, ("--controlnet",),
          "A ControlNet that keeps the input's lines or shapes: a preset (scribble, lineart, canny, depth, "
          "sdxl-canny), hub repo id, diffusers ControlNet folder, .safetensors file or a ControlNet of the models "
          "folder by name; give it again for several. One stored in an "
          "image is used by --from only when named or with --stored-model.", metavar="NAME|PATH",
          show_default=False, multiple=True),
    Field("control_image", _refiner, None, ("--control-image",),
          "The control image (e.g. a depth map), for every input. Default: each input, through "
          "--control-preprocess.", metavar="FILE", show_default=False),
    Field("control_preprocess", _choice(PREPROCESSORS), None, ("--control-preprocess",),
          "How the control image is made from the input: invert (a dark-on-light sketch to light lines on "
          "black), canny (edges, thresholds 100/200), none (as it is).", choices=PREPROCESSORS,
          show_default="canny for canny ControlNets, invert for scribble/lineart, else none"),
    Field("control_scale", _scales, [1.0], ("--control-scale",),
          "ControlNet weight, one or one per ControlNet (comma-separated); 1 is AUTOMATIC1111's default, "
          "diffusers' pipelines use 0.8.",
          _parse_list, metavar="W[,W...]", show_default="1"),
    Field("control_start", _float(0, 1), 0.0, ("--control-start",),
          "Where the ControlNets start, as a fraction of the steps run.", _parse_float, metavar="F"),
    Field("control_end", _float(0, 1), 1.0, ("--control-end",),
          "Where the ControlNets stop, as a fraction of the steps run.", _parse_float, metavar="F"),
    Field("quantize", _quantize, None, ("--quantize",),
          "Store the UNet's and text encoders' linear layers in 8 or 4 bits: less memory, slightly different "
          "pixels; 0: full precision.", choices=QUANTIZE_CHOICES, show_default="0 (off)"),
    Field("low_memory", _flag, False, ("--low-memory",), "Free the text encoders between prompts; run the VAE "
          "in tiles.", stored=False, is_flag=True, show_default=False),
    Field("vae_tile", _vae_tile, None, ("--vae-tile",),
          "Run the VAE in tiles of this many pixels (a multiple of 8, at least 64); 0: never. Default: tiles of "
          "512 above 1536x1536 pixels; with --low-memory, tiles of 256 always.", _parse_int, metavar="PIXELS",
          show_default=False),
    Field("memory_limit", _float(0, MAX_MEMORY_LIMIT_GB, open_low=True), None, ("--memory-limit",),
          "Ask MLX to keep its memory use under this many GB (a guideline: above it MLX frees its cache and "
          "finishes the work in flight before it schedules more).", _parse_float, stored=False, metavar="GB",
          show_default=False),
)
BY_NAME = {f.name: f for f in FIELDS}
# never taken from an image unless the user asks (they load files)
MODEL_FIELDS = ("model", "refiner", "controlnet", "control_image", "vae")
# taken from an image by name only: found again in the user's own folder and checked against the stored hashes
NAME_FIELDS = ("lora",)


@dataclass
class Request:
    """Every setting of one run, checked. `pass_prompts` are the additions of --pass-prompt, in order."""

    prompt: str | None = None
    negative_prompt: str | None = None
    model: str = DEFAULT_MODEL
    vae: str | None = None
    prediction_type: str | None = None  # None: the model's own (detected for an SD 2.x single file)
    models_dir: str | None = None  # None: $MLX_IMG2IMG_MODELS, else the default (library.models_dir)
    lora: list[str] | None = None
    lora_dir: str | None = None
    embedding: list[str] | None = None
    strength: float = 0.65
    steps: int = 30
    guidance: float = 7.5
    seed: int | None = None
    scheduler: str | None = None
    rng: str = "mlx"
    prompt_syntax: str = "a1111"
    clip_skip: int | None = None
    width: int | None = None
    height: int | None = None
    resize: str = "fit"
    max_side: int | None = None  # None: the model's own (MAX_SIDE_SD or MAX_SIDE_SDXL), settled from its config
    dtype: str | None = None  # None: the machine's default
    num_images: int = 1
    passes: list[float] | None = None
    sweep: list[float] | None = None
    mask: str | None = None
    mask_blur: float = 4.0
    inpaint_fill: str = "original"
    invert_mask: bool = False
    only_masked: bool = False
    padding: int = 32
    outpaint: str | None = None
    refiner: str | None = None
    refiner_start: float = DEFAULT_REFINER_START
    controlnet: list[str] | None = None
    control_image: str | None = None
    control_preprocess: str | None = None  # None: by the ControlNet's name (control.default_preprocess)
    control_scale: list[float] = field(default_factory=lambda: [1.0])
    control_start: float = 0.0
    control_end: float = 1.0
    quantize: int | None = None
    low_memory: bool = False
    vae_tile: int | None = None
    memory_limit: float | None = None
    pass_prompts: list[str] = field(default_factory=list)
    # what an image (--from) says its LoRAs and embeddings were, by name: a file found again by that name must
    # have this hash (the full SHA-256 or its first digits)
    lora_hashes: dict[str, str] = field(default_factory=dict)
    embedding_hashes: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_values(cls, values: Mapping[str, Any], where: str | None = None) -> Request:
        """A request from typed values (JSON, or the flags' parsed values), each through its field's check."""
        unknown = set(values) - set(BY_NAME) - {"pass_prompts"}
        if unknown:
            raise RequestError(f"unknown settings: {', '.join(sorted(unknown))}")
        checked = {k: BY_NAME[k].validate(v, where) for k, v in values.items() if k in BY_NAME}
        if "pass_prompts" in values:
            checked["pass_prompts"] = _texts("pass_prompts", values["pass_prompts"])
        defaults = {f.name: f.default for f in FIELDS if f.default is not None and checked.get(f.name) is None}
        return cls(**{**defaults, **{k: v for k, v in checked.items() if v is not None}})

    def merged(self, stored: Mapping[str, Any], given: set[str], where: str) -> tuple[Request, dict[str, Any]]:
        """This request with the re-usable settings `stored` in an image where no flag in `given` set them.
        Each stored value is checked as its flag would be. The model and refiner are left out (returned as
        the second value, for the caller to mention): an image must not choose what is loaded."""
        taken: dict[str, Any] = {}
        ignored: dict[str, Any] = {}
        for f in FIELDS:
            if not f.stored or f.name in given or stored.get(f.name) is None:
                continue
            if f.name == "sweep" and given & {"strength", "passes"}:
                continue  # a single strength or passes asked for instead of the stored sweep
            if f.name in MODEL_FIELDS:
                ignored[f.name] = stored[f.name]
                continue
            if f.name == "scheduler" and stored[f.name] not in SCHEDULERS:
                continue  # a sampler of another tool: the model's own is used
            taken[f.name] = f.validate(stored[f.name], where=where, name=f"stored {f.name}")
            if f.name in NAME_FIELDS:
                values = [taken[f.name]] if isinstance(taken[f.name], str) else taken[f.name]
                path = next((v for v in values if is_path_like(parse_lora(v)[0])), None)
                if path is not None:
                    raise RequestError(f"{where}: stored {f.name}: {path!r:.80} is a path; an image names its LoRAs "
                                       "by name only, to be found in your own LoRA folder")
        for name in ("lora_hashes", "embedding_hashes"):
            if stored.get(name) is not None:
                try:
                    taken[name] = _hashes(f"stored {name}", stored[name])
                except ValueError as e:
                    raise RequestError(f"{where}: {e}") from None
        return replace(self, **taken), ignored

    def validate(self) -> Request:
        """Checks between settings (each field was checked alone when it was set)."""
        if not self.prompt:
            raise RequestError("give a prompt: -p/--prompt TEXT (or --from an image that has one)")
        if self.passes and self.sweep:
            raise RequestError("--passes and --sweep do not go together")
        if self.pass_prompts and not self.passes:
            raise RequestError("--pass-prompt needs --passes")
        if self.passes and len(self.pass_prompts) > len(self.passes) - 1:
            raise RequestError("one --pass-prompt per pass after the first, at most")
        if self.sweep:
            self.sweep = list(dict.fromkeys(self.sweep))
        if isinstance(self.controlnet, str):
            self.controlnet = [self.controlnet]
        self.lora = [self.lora] if isinstance(self.lora, str) else self.lora
        self.embedding = [self.embedding] if isinstance(self.embedding, str) else self.embedding
        self.controlnet = [c for c in self.controlnet or [] if c.lower() != "none"] or None
        if self.controlnet and len(self.control_scale) not in (1, len(self.controlnet)):
            raise RequestError(f"--control-scale: {len(self.control_scale)} weights for {len(self.controlnet)} "
                               "ControlNets: give one, or one per ControlNet")
        if self.controlnet and not self.control_start < self.control_end:
            raise RequestError(f"--control-start ({self.control_start:g}) must be below --control-end "
                               f"({self.control_end:g})")
        if self.outpaint and self.mask:
            raise RequestError("--outpaint makes its own mask: drop --mask")
        if self.refiner and (self.only_masked or (self.inpaint_fill != "original" and (self.mask or self.outpaint))):
            raise RequestError("--only-masked and --inpaint-fill do not go with --refiner (it takes the latents)")
        if self.refiner and not 0.0 < self.refiner_start < 1.0:
            raise RequestError(f"--refiner-start must be between 0 and 1 (exclusive), not {self.refiner_start:g}")
        return self

    def strengths(self) -> list[float]:
        """Every strength this request runs at."""
        return sorted(set(self.passes or self.sweep or [self.strength]))

    def values(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
