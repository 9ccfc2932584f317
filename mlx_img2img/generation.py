"""One generation path for every door (command line, Python scripts, the benchmark, a server).

    plan: from the request and the models' configs alone (no weights loaded): the sampler, every
          schedule and its step count, the base-to-refiner handoff checks, the working size limit;
          every error a user can act on is raised here, before anything is loaded
    run:  one image through the model and, with a refiner, the handoff to it, with
          one stream of step events over both and a clean stop when the receiver asks
    store: the settings an image's PNG keeps of its generation (image_settings), for every door alike
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image

from . import library as lib
from .events import StepCallback, StepEvent
from .inpaint import keep_unmasked
from .loading import ComponentSource
from .loading.single_file import FAMILY_BY_CONTEXT_WIDTH, FAMILY_NAMES
from .models.unet import UNetConfig
from .models.vae import VAEConfig
from .request import MAX_SIDE_SD, MAX_SIDE_SDXL, Request, parse_lora
from .schedulers import make_scheduler, sliced_schedule


@dataclass(frozen=True)
class ModelInfo:
    """What planning needs of a model, read from its configs."""

    name: str
    scheduler_config: dict
    is_sdxl: bool
    latent_space: tuple[int, float]  # latent channels and scaling factor: a handoff needs them equal
    context_width: int | None = None  # the UNet's cross-attention width: names the family (LoRAs, embeddings)

    @classmethod
    def of_source(cls, source: ComponentSource) -> ModelInfo:
        vae = VAEConfig.from_dict(source.config("vae"))
        unet = UNetConfig.from_dict(source.config("unet"))
        return cls(source.name, source.config("scheduler"), unet.is_sdxl, (vae.latent_channels, vae.scaling_factor),
                   unet.cross_attention_dim)

    @classmethod
    def of_pipeline(cls, pipe: Any) -> ModelInfo:
        vae = pipe.vae.config
        return cls(pipe.model_name, pipe.scheduler_config, pipe.is_sdxl, (vae.latent_channels, vae.scaling_factor),
                   pipe.unet.config.cross_attention_dim)

    @property
    def family(self) -> str:
        return "an SDXL model" if self.is_sdxl else "an SD 1.x/2.x model"

    @property
    def family_key(self) -> str | None:
        """"sd1", "sd2", "sdxl" or "sdxl-refiner" by the text width; None for other widths (test models)."""
        return FAMILY_BY_CONTEXT_WIDTH.get(self.context_width) if self.context_width else None

    @property
    def default_scheduler(self) -> str:
        return make_scheduler(None, self.scheduler_config).name


@dataclass(frozen=True)
class LoraUse:
    """A LoRA of a generation: `name` as the prompt or flag names it (a path: the file's stem), its file, its
    weight, and AUTOMATIC1111's hash of it (the SHA-256 of its tensor data)."""

    name: str
    path: Path
    scale: float
    sha256: str
    from_flag: bool  # --lora, not a <lora:...> tag (which the prompt keeps, so a re-run finds it there)

    @property
    def adapter(self) -> str:
        """The adapter name it is merged under: the same name of another file is another adapter."""
        return f"{self.name}@{self.sha256[: lib.SHORT_HASH]}"


@dataclass(frozen=True)
class EmbeddingUse:
    name: str  # its token in prompts: the file's stem, as AUTOMATIC1111 names embeddings
    path: Path
    sha256: str  # of the whole file, as AUTOMATIC1111's TI hashes


@dataclass(frozen=True)
class Extras:
    """What a prompt asks of the models folder: the prompt without its <lora:...> tags, the LoRAs (flags and
    tags) and the embeddings whose names it uses."""

    prompt: str
    loras: tuple[LoraUse, ...] = ()
    embeddings: tuple[EmbeddingUse, ...] = ()

    def settings(self) -> tuple[dict[str, Any], dict[str, str]]:
        """What an image stores of them: our JSON settings (the --lora flags by name, every hash) and
        AUTOMATIC1111's fields (Lora hashes, TI hashes: names with their first 12 hex digits)."""
        stored: dict[str, Any] = {}
        fields: dict[str, str] = {}
        flags = [f"{u.name}:{u.scale!r}" for u in self.loras if u.from_flag]
        if flags:
            stored["lora"] = flags
        if self.loras:
            stored["lora_hashes"] = {u.name: u.sha256 for u in self.loras}
            fields["Lora hashes"] = ", ".join(f"{_a1111_name(u.name)}: {u.sha256[: lib.SHORT_HASH]}"
                                              for u in self.loras)
        if self.embeddings:
            stored["embedding_hashes"] = {e.name: e.sha256 for e in self.embeddings}
            fields["TI hashes"] = ", ".join(f"{_a1111_name(e.name)}: {e.sha256[: lib.SHORT_HASH]}"
                                            for e in self.embeddings)
        return stored, fields


def _a1111_name(name: str) -> str:
    return name.replace(":", "").replace(",", "")  # as AUTOMATIC1111 writes a name into its hash lists


def _expected_hash(hashes: dict[str, str], name: str) -> str | None:
    return hashes.get(name) or next((h for k, h in hashes.items() if k.lower() == name.lower()), None)


def plan_extras(prompt: str, negative_prompt: str | None, request: Request, folder: lib.ModelsFolder,
                model: ModelInfo) -> Extras:
    """The LoRAs (--lora, then the prompt's <lora:NAME:WEIGHT> tags) and embeddings (--embedding, and those of
    the embeddings folder whose names the prompt or negative prompt uses) of one prompt, each file found,
    its header read and checked against the model's family and, by name, against the hashes an image
    stored (--from). No tensor is read. A tag names a file in the LoRA folder, never a path."""
    clean, tags, others = lib.lora_tags(prompt)
    if others:
        warnings.warn(f"ignored {', '.join(others)}: only <lora:...> tags are read", stacklevel=2)
    wanted = [(*parse_lora(text), True) for text in request.lora or []] + [(n, s, False) for n, s in tags]
    loras: dict[str, LoraUse] = {}
    for ref, scale, from_flag in wanted:
        what = f"--lora {ref}" if from_flag else f"<lora:{ref}>"
        if not from_flag and lib.is_path_like(ref):
            raise lib.ModelsFolderError(f"{what}: a prompt names a LoRA by name (its file name without "
                                        ".safetensors, in {folder.where('lora')}), not by a path")
        by_name = not from_flag or not (lib.is_path_like(ref) or Path(ref).expanduser().exists())
        item = folder.resolve("lora", ref, what, paths=not by_name)
        name = ref.removesuffix(lib.SUFFIX) if by_name else item.name
        _check_fit(item, model, what)
        sha = lib.file_hash(item.path, after_header=True)
        expected = _expected_hash(request.lora_hashes, name)
        if by_name and expected and not sha.startswith(expected):
            raise lib.ModelsFolderError(
                f"{what}: {item.path} has the hash {sha[: lib.SHORT_HASH]}, the image was made with a LoRA of that "
                f"name hashed {expected[: lib.SHORT_HASH]}: another file; put that one in the LoRA folder, or give "
                "--lora PATH to use this one")
        use = LoraUse(name, item.path, scale, sha, from_flag)
        if name in loras and (loras[name].path, loras[name].scale) != (use.path, use.scale):
            raise lib.ModelsFolderError(f"{what}: the LoRA {name!r} is asked for twice, with other weights or files")
        loras.setdefault(name, use)
    text = f"{clean}\n{negative_prompt or ''}"
    embeddings: dict[str, EmbeddingUse] = {}
    chosen = [(ref, True) for ref in request.embedding or []]
    chosen += [(name, False) for name in folder.names("embedding") if lib.embedding_in_text(name, text)]
    for ref, flagged in chosen:
        item = folder.resolve("embedding", ref, f"--embedding {ref}" if flagged else f"the embedding {ref!r}",
                              paths=flagged)
        if item.name.lower() in {k.lower() for k in embeddings}:
            continue  # a flag's file of the name is used in place of the folder's
        if lib.is_clip_word(item.name):
            message = (f"the embedding {item.name!r} ({item.path}) is named like a word of CLIP's vocabulary, "
                       "which cannot stand for an embedding here: rename the file to use it")
            if flagged:
                raise lib.ModelsFolderError(message)
            warnings.warn(message + "; the word is read as a word", stacklevel=2)
            continue
        _check_fit(item, model, f"the embedding {item.name!r}")
        sha = lib.file_hash(item.path, after_header=False)
        expected = _expected_hash(request.embedding_hashes, item.name)
        if expected and not sha.startswith(expected) and not (flagged and lib.is_path_like(ref)):
            raise lib.ModelsFolderError(
                f"the embedding {item.name!r}: {item.path} has the hash {sha[: lib.SHORT_HASH]}, the image was made "
                f"with one hashed {expected[: lib.SHORT_HASH]}: another file; put that one in the embeddings folder "
                "or give --embedding FILE")
        embeddings[item.name] = EmbeddingUse(item.name, item.path, sha)
    for name, expected in request.embedding_hashes.items():
        if lib.embedding_in_text(name, text) and name.lower() not in {k.lower() for k in embeddings}:
            raise lib.ModelsFolderError(
                f"the image used the embedding {name!r} (hash {expected[: lib.SHORT_HASH]}), which is not in "
                f"{folder.where('embedding')}: put it there, or give --embedding FILE")
    return Extras(clean, tuple(loras.values()), tuple(embeddings.values()))


def _check_fit(item: lib.Item, model: ModelInfo, what: str) -> None:
    """A LoRA or embedding whose header names another family than the model's is refused before loading
    (the load itself checks every layer of the ones whose family the header does not tell)."""
    if not lib.fits(item.family, model.family_key, item.kind):
        keys = f": {', '.join(item.evidence)}" if item.evidence else ""
        raise lib.ModelsFolderError(
            f"{what}: {item.path.name} is for {FAMILY_NAMES[item.family or '']} models ({item.detail}{keys}), "
            f"{model.name} is {FAMILY_NAMES[model.family_key or '']}: use a {item.kind} made for this model's family")


def apply_extras(pipe: Any, extras: Extras, loras: bool = True) -> None:
    """Make `pipe` carry exactly these LoRAs (the set it has is kept when it is the same: no reload; otherwise
    all are unloaded and these merged, in order, so the weights never depend on what ran before) and at least
    these embeddings (an embedding's token, once added, stays)."""
    if loras:
        wanted = [(u.adapter, u.scale) for u in extras.loras]
        if [(name, scale) for name, scale, _ in pipe.loras.applied] != wanted:
            if pipe.loras.applied:
                pipe.unload_lora_weights()
            for u in extras.loras:
                pipe.load_lora_weights(u.path, scale=u.scale, adapter_name=u.adapter)
    have = {e.token.lower() for e in pipe.embeddings.loaded}
    for e in extras.embeddings:
        if e.name.lower() not in have:
            pipe.load_textual_inversion(e.path, token=e.name)


@dataclass
class Outcome:
    """One image, or a cancelled run: then `image` is what the run had (decoded from the last x0 prediction),
    or None where nothing was decoded (stopped before the refiner took over)."""

    image: Image.Image | None
    cancelled: bool = False


class Planner:
    """Plans the generations of a request over a model (and refiner) known by their configs."""

    def __init__(self, request: Request, model: ModelInfo, refiner: ModelInfo | None = None,
                 folder: lib.ModelsFolder | None = None):
        """`folder`: where <lora:NAME>, --lora NAME and embeddings are found (default: the request's
        --models-dir and --lora-dir)."""
        self.request, self.model, self.refiner = request, model, refiner
        self.folder = folder or lib.ModelsFolder(request.models_dir, request.lora_dir)
        self._extras: dict[str, Extras] = {}
        self._merged_at_load: tuple[LoraUse, ...] = ()
        # the refiner continues with the same sampler
        self.scheduler = request.scheduler or model.default_scheduler
        self.max_side = request.max_side or (MAX_SIDE_SDXL if model.is_sdxl else MAX_SIDE_SD)
        if refiner is not None and refiner.latent_space != model.latent_space:
            raise ValueError(
                f"the refiner {refiner.name} ({refiner.family}) cannot continue from {model.name} ({model.family}): "
                "their latents differ; use a refiner of the same family")
        self._by_strength: dict[float, tuple[int, int | None]] = {}
        for strength in request.strengths():
            self._check(strength)
        self.extras(request.prompt or "")

    def extras(self, prompt: str) -> Extras:
        """The LoRAs and embeddings of one prompt (see plan_extras), planned once per prompt."""
        if prompt not in self._extras:
            self._extras[prompt] = plan_extras(prompt, self.request.negative_prompt, self.request, self.folder,
                                               self.model)
        return self._extras[prompt]

    def load_patches(self, prompts: list[str]) -> list[Any]:
        """The loading chain's patches for the model of a run over these prompts: with --quantize, LoRAs that
        every prompt uses alike are merged as the weights load, before they are quantized (closer to the float
        result than patching quantized layers: loading.lora.merge_at_load), and run() leaves them in place.
        Otherwise none: run() merges each prompt's LoRAs into the loaded model."""
        sets = {self.extras(p).loras for p in prompts}
        if not self.request.quantize or len(sets) != 1 or not next(iter(sets)):
            return []
        from .loading.lora import merge_at_load

        (self._merged_at_load,) = sets
        return [merge_at_load([(u.path, u.scale) for u in self._merged_at_load])]

    def _check(self, strength: float) -> None:
        """Plan the schedules at one strength once (the step counts are kept): any error is raised now."""
        r = self.request
        end = r.refiner_start if self.refiner else None
        try:
            base = sliced_schedule(self.model.scheduler_config, r.steps, strength, r.scheduler, denoising_end=end)
        except ValueError as e:
            if end is None or "no denoising step" not in str(e):
                raise
            raise ValueError(
                f"strength {strength:g} starts the schedule where the refiner already takes over "
                f"(--refiner-start {r.refiner_start:g}), so {self.model.name} would run no step: raise the strength "
                "or lower --refiner-start") from None
        refined = None
        if self.refiner is not None:
            refined = sliced_schedule(self.refiner.scheduler_config, r.steps, strength, self.scheduler,
                                      denoising_start=r.refiner_start)
        self._by_strength[strength] = (base.steps, refined.steps if refined else None)

    def steps(self, strength: float) -> int:
        """UNet steps of one image at this strength, over both models."""
        if strength not in self._by_strength:
            self._check(strength)
        base, refined = self._by_strength[strength]
        return base + (refined or 0)

    def control_images(self, image: Image.Image) -> list[Image.Image] | None:
        """The control image of each ControlNet for one input (None without ControlNets): --control-image, or
        the input through --control-preprocess (default: as each ControlNet's name asks)."""
        from .control import default_preprocess, preprocess
        from .images import load_image

        r = self.request
        if not r.controlnet:
            return None
        if r.control_image:
            return [load_image(r.control_image)] * len(r.controlnet)
        return [preprocess(image, r.control_preprocess or default_preprocess(name)) for name in r.controlnet]

    def run(self, pipe: Any, refiner: Any, image: Image.Image, prompt: str, strength: float, seed: int,
            on_step: StepCallback | None = None, mask: Image.Image | None = None,
            mask_blur: float | None = None, control: list[Image.Image] | None = None) -> Outcome:
        """One image through the model and, with a refiner, the handoff; step events count over both.
        `control`: the ControlNets' control images (see control_images), for the model (not the refiner)."""
        r = self.request
        total = self.steps(strength)
        extras = self.extras(prompt)
        apply_extras(pipe, extras, loras=extras.loras != self._merged_at_load)
        if refiner is not None:  # LoRAs are the base model's; embeddings also go to the refiner's encoder
            apply_extras(refiner, extras, loras=False)
        prompt = extras.prompt
        blur = r.mask_blur if mask_blur is None else mask_blur
        # inpainting (`mask`, white = repaint; `mask_blur` overrides the request's): the unmasked pixels are kept
        masking = {} if mask is None else dict(mask_image=mask, mask_blur=blur, inpaint_fill=r.inpaint_fill,
                                               padding_mask_crop=r.padding if r.only_masked else None)

        def forward(offset: int, model: str) -> StepCallback:
            def relay(event: StepEvent) -> bool | None:
                if on_step is None:
                    return None
                return on_step(replace(event, index=offset + event.index, total=total, model=model))

            return relay

        common = dict(prompt=prompt, num_inference_steps=r.steps, guidance_scale=r.guidance,
                      negative_prompt=r.negative_prompt, seed=seed, rng=r.rng, prompt_syntax=r.prompt_syntax,
                      clip_skip=r.clip_skip)
        base = dict(common, image=image, strength=strength, scheduler=r.scheduler)
        if control:
            one = len(control) == 1
            scales = r.control_scale * len(control) if len(r.control_scale) == 1 else r.control_scale
            base.update(control_image=control[0] if one else control,
                        controlnet_conditioning_scale=scales[0] if one else scales,
                        control_guidance_start=r.control_start, control_guidance_end=r.control_end)
        if refiner is None:
            result = pipe(**base, on_step=forward(0, "base"), keep_unmasked=True, **masking)
        else:
            handed = pipe(**base, denoising_end=r.refiner_start, decode=False, on_step=forward(0, "base"),
                          **masking)
            if handed.cancelled:
                return Outcome(None, cancelled=True)
            base_steps, _ = self._by_strength[strength]
            refine_mask = {} if mask is None else dict(mask_image=mask, mask_blur=blur)
            result = refiner(**common, image=handed.latents, scheduler=self.scheduler,
                             denoising_start=r.refiner_start, on_step=forward(base_steps, "refiner"), **refine_mask)
            if mask is not None and not result.cancelled:  # the refiner had latents only: the pixels go back now
                result.images = [keep_unmasked(image, result.images[0], mask, blur)]
        return Outcome(result.images[0] if result.images else None, cancelled=result.cancelled)


# ------------------------------------------------------------------------------------------ what an image stores

# Stored only where they differ from these defaults, so outputs made before they existed still resume.
TEXT_AND_NOISE_DEFAULTS = {"rng": "mlx", "prompt_syntax": "a1111", "clip_skip": None}


def not_default_settings(r: Request) -> dict[str, Any]:
    """The noise and prompt-reading settings of `r` that differ from their defaults (--from needs them to make
    the image again)."""
    values = {name: getattr(r, name) for name in TEXT_AND_NOISE_DEFAULTS}
    return {k: v for k, v in values.items() if v != TEXT_AND_NOISE_DEFAULTS[k]}


def vae_tile_stored(r: Request, work: tuple[int, int]) -> int | None:
    """What to store of the VAE's tiling, which moves pixels slightly: --vae-tile as given, else the
    tile size where the VAE did run in tiles (a large image, or --low-memory); None when it did not."""
    from .pipeline import vae_tile_side

    if r.vae_tile is not None:
        return r.vae_tile
    tile = vae_tile_side(work[0] * work[1], None, r.low_memory)
    return tile if max(work) > tile else None


def mask_settings(r: Request, mask: dict[str, Any]) -> dict[str, Any]:
    """How an image's mask was made and used, as its PNG stores them (image_settings) and resume compares them:
    the request's inpainting settings with `mask`, the caller's part (the command line's invert_mask, outpaint,
    the mask's file and hash)."""
    return {"mask_blur": r.mask_blur, "inpaint_fill": r.inpaint_fill, "only_masked": r.only_masked,
            "padding": r.padding, **mask}


def image_settings(r: Request, planner: Planner, prompt: str, strength: float, seed: int, size: tuple[int, int],
                   work: tuple[int, int], model_name: str, version: str, refiner_name: str | None = None,
                   source: str | None = None, mask: dict[str, Any] | None = None,
                   control_fields: dict[str, str] | None = None) -> dict[str, Any]:
    """The settings an image's PNG stores, the command line's and the server's alike: our JSON settings and,
    under "extra_fields", AUTOMATIC1111's parameters fields beyond those images.format_parameters writes.

    `r`: the request as the image was made (the server's with the load settings it started with); `prompt`,
    `strength`: this image's (a pass's); `size`, `work`: the output's and the model's sizes; `model_name`,
    `refiner_name`: the models as the image names them (None: no refiner); `source`: the input's file;
    `mask`: None where nothing was masked, else how the mask was made, stored with the inpainting settings
    (the command line's: invert_mask, outpaint, the mask's file and hash; {} for a mask given as pixels);
    `control_fields`: A1111's fields of ControlNet units that each had their own image and module (the
    server's), in place of a "ControlNet" list of names and the request's control_image and control_preprocess.
    """
    settings: dict[str, Any] = {
        "prompt": prompt, "negative_prompt": r.negative_prompt, "model": r.model, "model_name": model_name,
        "strength": strength, "steps": r.steps, "guidance": r.guidance, "seed": seed, "scheduler": planner.scheduler,
        "width": r.width, "height": r.height, "resize": r.resize, "max_side": planner.max_side, "dtype": r.dtype,
        "size": list(size), "model_size": list(work), "version": version,
    }
    if source is not None:
        settings["input"] = source
    extra: dict[str, str] = {}
    if mask is not None:
        settings.update(mask_settings(r, mask))
        extra.update({"Mask blur": f"{r.mask_blur:g}", "Masked content": r.inpaint_fill,
                      "Inpaint area": "Only masked" if r.only_masked else "Whole picture"})
    if r.controlnet:
        settings.update(controlnet=r.controlnet, control_scale=r.control_scale, control_start=r.control_start,
                        control_end=r.control_end, control_preprocess=r.control_preprocess)
        if control_fields is None:
            settings["control_image"] = r.control_image
            extra["ControlNet"] = ", ".join(Path(c).name for c in r.controlnet)
        else:
            extra.update(control_fields)
    if refiner_name is not None:
        settings.update(refiner=r.refiner, refiner_name=refiner_name, refiner_start=r.refiner_start)
        extra.update({"Refiner": refiner_name, "Refiner switch at": f"{r.refiner_start:g}"})
    if r.vae:
        settings["vae"] = r.vae
        extra["VAE"] = Path(r.vae).name  # the file's name, as AUTOMATIC1111 writes its VAE
    if r.prediction_type:
        settings["prediction_type"] = r.prediction_type
    if r.quantize:
        settings["quantize"] = r.quantize
        extra["Quantization"] = f"{r.quantize} bit"
    lora_settings, lora_fields = planner.extras(prompt).settings()
    settings.update(lora_settings, **not_default_settings(r))
    extra.update(lora_fields)
    tile = vae_tile_stored(r, work)
    if tile is not None:
        settings["vae_tile"] = tile
    if extra:
        settings["extra_fields"] = extra
    return settings
