"""Textual-inversion embeddings: new tokens whose vectors are appended to the text encoders' token tables.

Files (.safetensors only): AUTOMATIC1111's `{"emb_params": (n, width)}` (the token is the file's stem, as
AUTOMATIC1111 names embeddings), SDXL's `{"clip_l": (n, 768), "clip_g": (n, 1280)}` pairs (one table per
text encoder, by name, never by width) and diffusers' `{token: (width,) or (n, width)}`.
An n-vector embedding is n tokens, as diffusers adds them ("tok", "tok_1", ... "tok_{n-1}"); the prompt
names only the first and the tokenizer puts all n in its place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from ..errors import ModelFormatError
from ..models.clip import CLIPTextModel
from ..tokenizer import CLIPTokenizer, SpecialToken
from .single_file import read_safetensors

SDXL_TABLES = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}


@dataclass
class Embedding:
    token: str
    vectors: dict[str, mx.array]  # text encoder component -> (n, width)

    @property
    def count(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    def tokens(self) -> list[str]:
        return [self.token] + [f"{self.token}_{i}" for i in range(1, self.count)]


def read_embeddings(path: str | Path, token: str | None = None) -> list[Embedding]:
    path = Path(path).expanduser()
    tensors = {k: v if v.ndim == 2 else v.reshape(1, -1) for k, v in read_safetensors(path).items()}
    if "emb_params" in tensors:
        return [Embedding(token or path.stem, {"text_encoder": tensors["emb_params"]})]
    if set(SDXL_TABLES) & set(tensors):
        vectors = {SDXL_TABLES[k]: v for k, v in tensors.items() if k in SDXL_TABLES}
        if len({v.shape[0] for v in vectors.values()}) != 1:
            raise ModelFormatError(f"{path.name}: clip_l and clip_g have different numbers of vectors")
        return [Embedding(token or path.stem, vectors)]
    if not tensors or any(v.ndim != 2 for v in tensors.values()):
        raise ModelFormatError(f"{path.name} is not a textual-inversion embedding (no emb_params, clip_l/clip_g "
                               "or token: vector entries)")
    if token is not None and len(tensors) != 1:
        raise ModelFormatError(f"{path.name} holds {len(tensors)} tokens; token= can rename only a single one")
    return [Embedding(token or key, {"text_encoder": value}) for key, value in tensors.items()]


class EmbeddingTokenizer(CLIPTokenizer):
    """A tokenizer with embedding tokens added, each standing for all of its embedding's ids."""

    expansions: dict[int, list[int]]

    @classmethod
    def extend(cls, base: CLIPTokenizer, tokens: list[list[str]]) -> EmbeddingTokenizer:
        vocab = dict(base.vocab)
        added, expansions = [], dict(getattr(base, "expansions", {}))
        for names in tokens:
            ids = []
            for name in names:
                # Matched in the normalised (lower-case) prompt, as transformers matches the tokens diffusers adds.
                name = name.lower()
                if name in vocab:
                    raise ValueError(f"token {name!r} is already in the vocabulary; pass another token=")
                vocab[name] = len(vocab)
                ids.append(vocab[name])
                added.append(SpecialToken(name, vocab[name], normalized=True))
            expansions[ids[0]] = ids
        named = {k: base.decode([i]) for k, i in (("bos_token", base.bos_id), ("eos_token", base.eos_id),
                                                  ("unk_token", base.unk_id), ("pad_token", base.pad_id))}
        tokenizer = cls(vocab, sorted(base.ranks, key=base.ranks.get), max_length=base.max_length,
                        special_tokens=base.special_tokens + added, **named)
        tokenizer.expansions = expansions
        return tokenizer

    def tokenize_ids(self, text: str) -> list[int]:
        return [j for i in super().tokenize_ids(text) for j in self.expansions.get(i, [i])]


@dataclass
class EmbeddingState:
    """The embeddings loaded into a pipeline, in order (their rows follow the base vocabulary)."""

    loaded: list[Embedding] = field(default_factory=list)

    def load(self, path: str | Path, token: str | None, tokenizers: list[CLIPTokenizer], names: list[str],
             encoders: list[CLIPTextModel]) -> tuple[list[str], list[CLIPTokenizer]]:
        """Read and check an embedding file, add its tokens and vectors; returns the tokens and the new
        tokenizers."""
        embeddings = read_embeddings(path, token)
        for embedding in embeddings:
            if "text_encoder_2" in embedding.vectors and "text_encoder_2" not in names:
                raise ModelFormatError(f"{Path(path).name} is an SDXL embedding (clip_l/clip_g); this model is not "
                                       "SDXL")
            missing = [n for n in names if n not in embedding.vectors]
            if missing:
                raise ModelFormatError(f"{Path(path).name} has no vectors for this model's {', '.join(missing)} "
                                       f"(it has {', '.join(embedding.vectors)}): it is for another model family")
            for name, encoder in zip(names, encoders, strict=True):
                width, have = encoder.config.hidden_size, embedding.vectors[name].shape[1]
                if have != width:
                    raise ModelFormatError(f"{Path(path).name}: {have}-wide vectors, this model's {name} is "
                                           f"{width} wide: it is for another model family")
        tokens = [e.tokens() for e in embeddings]
        new_tokenizers = [EmbeddingTokenizer.extend(t, tokens) for t in tokenizers]
        self.loaded += embeddings
        self.extend(names, encoders, embeddings)
        return [e.token for e in embeddings], new_tokenizers

    def extend(self, names: list[str], encoders: list[CLIPTextModel],
               embeddings: list[Embedding] | None = None) -> list[CLIPTextModel]:
        """Append the vectors of `embeddings` (default: all loaded, for freshly loaded encoders)."""
        embeddings = self.loaded if embeddings is None else embeddings
        if not embeddings:
            return encoders
        for name, encoder in zip(names, encoders, strict=True):
            table = encoder.text_model.embeddings.token_embedding
            rows = [e.vectors[name].astype(table.weight.dtype) for e in embeddings]
            table.weight = mx.concatenate([table.weight, *rows])
        return encoders
