"""LoRA files merged into a loaded model's weights: W + scale * alpha / rank * up @ down per layer.

Formats: kohya / AUTOMATIC1111 (`lora_unet_*`, `lora_te_*`, SDXL `lora_te1_*`/`lora_te2_*`, with
`lora_down`/`lora_up`/`alpha`; the UNet named as diffusers names it, as kohya's SD 1.x training does, or
in the original layout, as its SDXL training does; LoCon convolution layers in the same format) and
diffusers/PEFT (`unet.<layer>.lora_A/lora_B`, `text_encoder.*`, `text_encoder_2.*`, or `.lora.down/.up`).

The scale is AUTOMATIC1111's `<lora:name:scale>` and diffusers' `fuse_lora(lora_scale=)`: one multiplier for
the UNet and the text encoders. Every pair in the file is applied (diffusers drops a kohya text-encoder
LoRA's attention pairs when the file has no out_proj pair; AUTOMATIC1111 applies them, and so do we).
Merging costs nothing per step; all the LoRAs loaded before the weights are next used are merged in one
product per layer (see LoRAState). The base weights of every touched layer are kept, so unloading gives the
base model back exactly; a quantized layer is dequantized, patched and quantized again.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..errors import ModelFormatError
from .single_file import read_safetensors, unet_module_names

KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
PEFT_PAIRS = ((".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight"))
UNSUPPORTED = {"hada_w1_a": "LoHa", "lokr_w1": "LoKr", "lora_mid": "LoCon with a Tucker middle (lora_mid)",
               "dora_scale": "DoRA"}


@dataclass
class LoRALayer:
    """One low-rank pair in torch layouts: down (rank, in[, kh, kw]), up (out, rank[, 1, 1])."""

    down: mx.array
    up: mx.array
    alpha: float | None  # None: alpha = rank (diffusers/PEFT files without alphas)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def factors(self, scale: float) -> tuple[mx.array, mx.array]:
        """float32 (out, rank) and (rank, K) whose product is scale * alpha / rank * up @ down in MLX's
        layout, flattened to (out, K): a convolution's down is put in MLX's (kh, kw, in) order before the
        product, so that the large delta is never transposed. The scale goes into the small up factor."""
        down = self.down.astype(mx.float32)
        if down.ndim == 4:
            down = down.transpose(0, 2, 3, 1)
        factor = scale * (self.alpha if self.alpha is not None else self.rank) / self.rank
        return self.up.astype(mx.float32).reshape(-1, self.rank) * factor, down.reshape(self.rank, -1)


def merged(weight: mx.array, pairs: list[tuple[float, LoRALayer]]) -> mx.array:
    """weight + the sum of scale * alpha / rank * up @ down over `pairs`, in the weight's (MLX) layout and
    dtype. All pairs are one product (their ranks side by side) added to the weight inside the matrix
    multiply, in float32 (half-precision matrix products are slow on the CPU and less exact); a
    half-precision weight is rounded once, at the end."""
    ups, downs = zip(*(pair.factors(scale) for scale, pair in pairs), strict=True)
    up, down = (ups[0], downs[0]) if len(pairs) == 1 else (mx.concatenate(ups, 1), mx.concatenate(downs, 0))
    flat = weight.reshape(weight.shape[0], -1).astype(mx.float32)
    return mx.addmm(flat, up, down).astype(weight.dtype).reshape(weight.shape)


@dataclass
class LoRAFile:
    """A LoRA file's pairs by component and by the file's own layer name (not yet matched to a model)."""

    path: Path
    layers: dict[str, dict[str, LoRALayer]]  # component -> layer name as in the file -> pair
    kohya: bool


def read_lora(path: str | Path) -> LoRAFile:
    path = Path(path).expanduser()
    tensors = read_safetensors(path)
    for marker, kind in UNSUPPORTED.items():
        if any(marker in k for k in tensors):
            raise ModelFormatError(f"{path.name} is a {kind} file; only plain LoRA (lora_down/lora_up, "
                                   "lora_A/lora_B) pairs are supported")
    kohya = any(k.startswith(tuple(KOHYA_PREFIXES)) for k in tensors)
    mx.eval([v for k, v in tensors.items() if k.endswith(".alpha")])  # read together, not one by one
    layers: dict[str, dict[str, LoRALayer]] = {}
    used = set()
    for key in tensors:
        if kohya and key.endswith(".lora_down.weight"):
            name = key.removesuffix(".lora_down.weight")
            prefix = next((p for p in sorted(KOHYA_PREFIXES, key=len, reverse=True) if name.startswith(p)), None)
            if prefix is None:
                continue
            up_key, alpha_key = f"{name}.lora_up.weight", f"{name}.alpha"
            component, layer = KOHYA_PREFIXES[prefix], name[len(prefix):]
        elif not kohya and (pair := next((p for p in PEFT_PAIRS if key.endswith(p[0])), None)):
            name = key.removesuffix(pair[0])
            component, _, layer = name.partition(".")
            if component not in ("unet", "text_encoder", "text_encoder_2"):
                continue
            up_key, alpha_key = name + pair[1], name + ".alpha"
        else:
            continue
        if up_key not in tensors:
            raise ModelFormatError(f"{path.name}: {key} has no {up_key}")
        alpha = float(tensors[alpha_key].item()) if alpha_key in tensors else None
        layers.setdefault(component, {})[layer] = LoRALayer(tensors[key], tensors[up_key], alpha)
        used.update({key, up_key, alpha_key})
    if not layers:
        raise ModelFormatError(
            f"{path.name} is not a LoRA file: no lora_unet_*/lora_te*_* lora_down/lora_up pairs and no "
            f"unet.*/text_encoder*.* lora_A/lora_B pairs (keys start with "
            f"{', '.join(sorted({k.split('.')[0][:24] for k in tensors})[:4])})")
    return LoRAFile(path, layers, kohya)


# ---------------------------------------------------------------------------------------------- matching

def _weighted_layers(module: nn.Module) -> dict[str, nn.Module]:
    """Our layers a LoRA can patch: linear (also quantized) and convolution layers, by module path."""
    return {path: m for path, m in module.named_modules()
            if isinstance(m, (nn.Linear, nn.QuantizedLinear, nn.Conv2d))}


def _original_unet_names(unet: nn.Module, paths: list[str]) -> dict[str, str]:
    """Our (diffusers) UNet layer path -> the same layer's path in the original layout."""
    config = asdict(unet.config)
    inverse = {ours: ldm for ldm, ours in unet_module_names(config).items()}
    out = {}
    for path in paths:
        parts = path.split(".")
        for cut in range(len(parts), 0, -1):
            head = ".".join(parts[:cut])
            if head in inverse:
                out[path] = ".".join([inverse[head], *parts[cut:]])
                break
    return out


def layer_lookup(component: str, module: nn.Module, kohya: bool) -> dict[str, str]:
    """The file's layer name -> our layer path, for one component in one format."""
    paths = list(_weighted_layers(module))
    if not kohya:
        return {p: p for p in paths}
    lookup = {p.replace(".", "_"): p for p in paths}
    if component == "unet":  # kohya's SDXL LoRAs name the UNet in the original layout
        lookup.update({ldm.replace(".", "_"): p for p, ldm in _original_unet_names(module, paths).items()})
    return lookup


def _few(names: list[str], n: int = 4) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def match(lora: LoRAFile, components: dict[str, nn.Module]) -> dict[str, dict[str, LoRALayer]]:
    """component -> our layer path -> pair; a clear error if any pair fits no layer of this model (a LoRA
    for another family), naming a few of those."""
    matched: dict[str, dict[str, LoRALayer]] = {}
    unmatched, misshapen = [], []
    for component, layers in lora.layers.items():
        module = components.get(component)
        if module is None:
            unmatched += [f"{component}:{name}" for name in layers]
            continue
        lookup = layer_lookup(component, module, lora.kohya)
        targets = _weighted_layers(module)
        for name, layer in layers.items():
            path = lookup.get(name)
            if path is None:
                unmatched.append(name)
                continue
            if layer.up.shape[0] * math.prod(layer.down.shape[1:]) != _torch_shape_size(targets[path]):
                misshapen.append(name)
                continue
            matched.setdefault(component, {})[path] = layer
    if unmatched or misshapen:
        parts = [f"{len(unmatched)} of its layers are not in this model ({_few(unmatched)})" if unmatched else "",
                 f"{len(misshapen)} have other shapes ({_few(misshapen)})" if misshapen else ""]
        raise ModelFormatError(f"{lora.path.name} does not fit this model, it is probably for another model "
                               f"family: " + "; ".join(p for p in parts if p))
    return matched


def _torch_shape_size(layer: nn.Module) -> int:
    if isinstance(layer, nn.QuantizedLinear):
        return layer.scales.shape[0] * layer.scales.shape[1] * layer.group_size
    return layer.weight.size


# ---------------------------------------------------------------------------------------------- merging

def _dequantized(layer: nn.QuantizedLinear, arrays: dict[str, mx.array]) -> mx.array:
    return mx.dequantize(arrays["weight"], arrays["scales"], arrays["biases"], layer.group_size, layer.bits)


# Merged layers are evaluated in batches of about this many weights: fewer evaluations, bounded temporaries.
EVAL_BATCH = 64 * 2**20


@dataclass
class LoRAState:
    """The LoRAs merged into a pipeline, the base weights of every layer they touch (the arrays themselves,
    not copies: merged weights are new arrays), and the layers whose merged weights are not computed yet.

    Loading only builds each merged weight as a lazy MLX expression; `flush` computes them (the pipeline
    does before it encodes a prompt or denoises; MLX would compute them at their first use anyway). A layer
    that several LoRAs touch before a flush is one product of all their pairs added to its base weight."""

    applied: list[tuple[str, float, dict[str, dict[str, LoRALayer]]]] = field(default_factory=list)
    base: dict[tuple[str, str], dict[str, mx.array]] = field(default_factory=dict)
    pending: dict[tuple[str, str], nn.Module] = field(default_factory=dict)

    def names(self) -> list[str]:
        return [name for name, _, _ in self.applied]

    def load(self, path: str | Path, scale: float, adapter_name: str | None,
             components: dict[str, nn.Module]) -> str:
        """Read, match (all or nothing) and merge one LoRA file; returns its adapter name."""
        lora = read_lora(path)
        name = adapter_name or _adapter_name(lora.path)
        self.add(name, float(scale), match(lora, components), components)
        return name

    def rebase(self, names: list[str], encoders: list[nn.Module]) -> list[nn.Module]:
        """Freshly loaded text encoders (low memory reloads them) with the applied LoRAs merged again."""
        components = dict(zip(names, encoders, strict=True))
        self.base = {key: value for key, value in self.base.items() if key[0] not in components}
        self.pending = {key: layer for key, layer in self.pending.items() if key[0] not in components}
        touched = [(c, path) for _, _, matched in self.applied for c, layers in matched.items()
                   if c in components for path in layers]
        self._rebuild(components, touched)
        self.flush()  # now: the reload happens inside prompt encoding, after its flush
        return encoders

    def add(self, name: str, scale: float, matched: dict[str, dict[str, LoRALayer]],
            components: dict[str, nn.Module]) -> None:
        """Merge one matched LoRA. A float layer whose weight is computed gets only this LoRA's product
        added to it; a pending one, or a quantized one (quantized once, from its base weights), is rebuilt
        from its base weights with every applied LoRA's pairs in one product."""
        if name in self.names():
            raise ValueError(f"a LoRA named {name!r} is already loaded; unload it or pass another adapter_name")
        self.applied.append((name, scale, matched))
        layers_of = {c: dict(m.named_modules()) for c, m in components.items()}
        for component, layers in matched.items():
            for path, pair in layers.items():
                key, layer = (component, path), layers_of[component][path]
                self.base.setdefault(key, _arrays(layer))
                if key in self.pending or isinstance(layer, nn.QuantizedLinear):
                    layer.update(self._merged(key, layer))
                else:
                    layer.update({"weight": merged(layer.weight, [(scale, pair)])})
                self.pending[key] = layer

    def remove(self, name: str | None, components: dict[str, nn.Module]) -> None:
        """Unmerge one LoRA (by name) or all of them (None): the touched layers are set to their base
        weights plus the deltas of the LoRAs still applied (none: the base arrays themselves, bit for bit)."""
        if name is not None and name not in self.names():
            raise ValueError(f"no LoRA named {name!r} is loaded (loaded: {', '.join(self.names()) or 'none'})")
        dropped = [a for a in self.applied if name is None or a[0] == name]
        self.applied = [a for a in self.applied if a not in dropped]
        touched = [(component, path) for _, _, matched in dropped for component, layers in matched.items()
                   for path in layers]
        self._rebuild(components, touched)

    def flush(self) -> None:
        """Compute the merged weights still pending, with every core (see _evaluate)."""
        if self.pending:
            _evaluate([a for layer in self.pending.values() for a in _arrays(layer).values()])
            self.pending.clear()

    def _rebuild(self, components: dict[str, nn.Module], touched: list[tuple[str, str]]) -> None:
        """Each touched layer set to its base weights plus the deltas of every LoRA applied to it."""
        layers_of = {c: dict(m.named_modules()) for c, m in components.items()}
        for key in dict.fromkeys(touched):
            layer = layers_of[key[0]][key[1]]
            self.base.setdefault(key, _arrays(layer))
            layer.update(self._merged(key, layer))
            if self._pairs(key):
                self.pending[key] = layer
            else:
                del self.base[key]
                self.pending.pop(key, None)

    def _pairs(self, key: tuple[str, str]) -> list[tuple[float, LoRALayer]]:
        component, path = key
        return [(scale, matched[component][path]) for _, scale, matched in self.applied
                if path in matched.get(component, {})]

    def _merged(self, key: tuple[str, str], layer: nn.Module) -> dict[str, mx.array]:
        """The layer's arrays: its base ones with every applied LoRA's delta added in one product."""
        base, pairs = self.base[key], self._pairs(key)
        if not pairs:
            return base
        if not isinstance(layer, nn.QuantizedLinear):
            return {**base, "weight": merged(base["weight"], pairs)}
        w, scales, biases = mx.quantize(merged(_dequantized(layer, base).astype(mx.float32), pairs),
                                        layer.group_size, layer.bits)
        return {**base, "weight": w, "scales": scales.astype(base["scales"].dtype),
                "biases": biases.astype(base["biases"].dtype)}


def _evaluate(arrays: list[mx.array]) -> None:
    """Compute merged weights a batch at a time (one evaluation per layer costs more; all at once would
    hold every layer's float32 temporaries), with OpenBLAS on every core: its thread count moves the last
    bits of a product, and the same LoRAs must give the same weights whatever ran before."""
    from ..parallel import fit_blas_threads

    fit_blas_threads()
    batch, size = [], 0
    for array in arrays:
        batch.append(array)
        size += array.size
        if size >= EVAL_BATCH:
            mx.eval(batch)
            batch, size = [], 0
    mx.eval(batch)


def _arrays(layer: nn.Module) -> dict[str, mx.array]:
    return {k: v for k, v in layer.items() if isinstance(v, mx.array)}


def _adapter_name(path: Path) -> str:
    return re.sub(r"\s+", "_", path.stem)


def merge_at_load(files: list[tuple[str | Path, float]]):
    """A weight patch for the loading chain's LoRA slot: these (file, scale) LoRAs merged into each
    component's weights as it loads, before quantization, so a quantized layer is quantized once, with its
    LoRA in it (closer to the float result than patching an already quantized layer). Not unloadable."""
    loras = [(read_lora(path), float(scale)) for path, scale in files]

    def patch(component: str, module: nn.Module, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        pairs: dict[str, list[tuple[float, LoRALayer]]] = {}
        for lora, scale in loras:
            if component in lora.layers:
                part = LoRAFile(lora.path, {component: lora.layers[component]}, lora.kohya)
                for path, layer in match(part, {component: module})[component].items():
                    pairs.setdefault(path + ".weight", []).append((scale, layer))
        for key, merged_pairs in pairs.items():
            weights[key] = merged(weights[key], merged_pairs)
        _evaluate([weights[key] for key in pairs])
        return weights

    return patch
