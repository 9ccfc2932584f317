"""AUTOMATIC1111's prompt syntax: attention weights, prompts of any length in 75-token chunks, emphasis.

The rules are AUTOMATIC1111's (its ``prompt_parser.parse_prompt_attention`` and the chunking of
``sd_hijack_clip``), so a prompt copied from its PNGs is read as it reads it:

* ``(text)`` multiplies the weight of ``text`` by 1.1, ``[text]`` divides it by 1.1, ``(text:1.3)``
  sets a factor; nesting multiplies. ``\\(``, ``\\)``, ``\\[``, ``\\]``, ``\\\\`` are literal
  characters. An unclosed bracket applies to the rest of the prompt; a closing one with nothing open
  is literal text.
* ``BREAK`` (upper case, a word of its own) ends the current chunk.
* Each weighted fragment is tokenized on its own. Chunks hold 75 tokens; one that fills up moves the
  words after its last comma into the next chunk when that comma is among its last 20 tokens, and a
  textual-inversion embedding's vectors that do not fit in a chunk start the next one.
  Each chunk is then wrapped in the start and end tokens and padded as the tokenizer pads (for SD 2.x
  the pad token follows the first end token), and encoded on its own; the states are concatenated.
* Emphasis ("Original"): each token's state times its weight, then the chunk rescaled so that its
  mean is the unweighted mean.

One difference: AUTOMATIC1111 multiplies the marker of a ``BREAK`` inside brackets along with the
text, which turns it back into the word "BREAK"; here ``BREAK`` breaks wherever it stands.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, NamedTuple

import mlx.core as mx
import numpy as np

from .models.clip import CLIPTextModel
from .parallel import map_batch
from .tokenizer import CLIPTokenizer

__all__ = ["BREAK", "PROMPT_SYNTAXES", "Chunk", "Fragment", "apply_emphasis", "embed_prompts", "parse_prompt_attention",
           "prompt_chunks"]

PromptSyntax = Literal["a1111", "plain"]
PROMPT_SYNTAXES = ("a1111", "plain")
ROUND_FACTOR = 1.1
COMMA_BACKTRACK = 20  # AUTOMATIC1111's default "comma_padding_backtrack"

# One token of the syntax per match: escapes, brackets, a ":weight)" closer, plain text, a lone ":".
_ATTENTION_TOKEN = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:([+-]?[.\d]+)\)|\)|]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


class Fragment(NamedTuple):
    text: str
    weight: float


BREAK = Fragment("BREAK", -1.0)  # the marker the parser emits (the same object each time)


def parse_prompt_attention(text: str) -> list[Fragment]:
    """The prompt as (text, weight) fragments in order, with BREAK markers; neighbours of equal weight merged."""
    fragments: list[Fragment] = []
    round_open: list[int] = []  # index in `fragments` where each open bracket began
    square_open: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for i in range(start, len(fragments)):
            if fragments[i] is not BREAK:
                fragments[i] = Fragment(fragments[i].text, fragments[i].weight * factor)

    for match in _ATTENTION_TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            fragments.append(Fragment(token[1:], 1.0))  # a lone backslash is dropped, as AUTOMATIC1111 does
        elif token == "(":
            round_open.append(len(fragments))
        elif token == "[":
            square_open.append(len(fragments))
        elif weight is not None and round_open:
            try:
                factor = float(weight)
            except ValueError:
                raise ValueError(f"invalid attention weight {weight!r} in prompt {text!r}") from None
            scale_from(round_open.pop(), factor)
        elif token == ")" and round_open:
            scale_from(round_open.pop(), ROUND_FACTOR)
        elif token == "]" and square_open:
            scale_from(square_open.pop(), 1 / ROUND_FACTOR)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    fragments.append(BREAK)
                fragments.append(Fragment(part, 1.0))
    for start in round_open:
        scale_from(start, ROUND_FACTOR)
    for start in square_open:
        scale_from(start, 1 / ROUND_FACTOR)
    merged: list[Fragment] = []
    for fragment in fragments or [Fragment("", 1.0)]:
        last = merged[-1] if merged else None
        if last is not None and last is not BREAK and fragment is not BREAK and last.weight == fragment.weight:
            merged[-1] = Fragment(last.text + fragment.text, last.weight)
        else:
            merged.append(fragment)
    return merged


@dataclass
class Chunk:
    """One encoder input: start token, up to 75 prompt tokens, end token, padding; a weight per token."""

    ids: list[int]
    weights: list[float]


def _close(tokenizer: CLIPTokenizer, ids: list[int], weights: list[float]) -> Chunk:
    """Wrap a chunk's tokens in start and end tokens and pad it; padding follows the first end token."""
    room = tokenizer.max_length - 2
    seq = [tokenizer.bos_id, *ids, *[tokenizer.eos_id] * (room - len(ids) + 1)]
    end = seq.index(tokenizer.eos_id)
    seq[end + 1:] = [tokenizer.pad_id] * (len(seq) - end - 1)
    return Chunk(seq, [1.0, *weights, *[1.0] * (room - len(weights) + 1)])


def prompt_chunks(tokenizer: CLIPTokenizer, prompt: str, syntax: PromptSyntax = "a1111") -> list[Chunk]:
    """The prompt's chunks, each ``tokenizer.max_length`` long. "plain" reads it literally as one
    chunk, cut to length (with a warning), as diffusers does."""
    if syntax == "plain":
        return [Chunk(tokenizer.encode([prompt])[0].tolist(), [1.0] * tokenizer.max_length)]
    if syntax != "a1111":
        raise ValueError(f"prompt syntax must be one of {PROMPT_SYNTAXES}, not {syntax!r}")
    room = tokenizer.max_length - 2
    comma = tokenizer.vocab.get(",</w>")
    chunks: list[Chunk] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def flush(keep_ids: list[int] | None = None, keep_weights: list[float] | None = None) -> None:
        nonlocal ids, weights, last_comma
        chunks.append(_close(tokenizer, ids, weights))
        ids, weights, last_comma = keep_ids or [], keep_weights or [], -1

    # A textual-inversion token stands for several ids (loading/embeddings.py); they stay in one chunk.
    expansions: dict[int, list[int]] = getattr(tokenizer, "expansions", {})
    for fragment in parse_prompt_attention(prompt):
        if fragment is BREAK:
            flush()
            continue
        tokens = tokenizer.tokenize_ids(fragment.text)
        position = 0
        while position < len(tokens):
            token = tokens[position]
            unit = expansions.get(token, [token])
            if tokens[position:position + len(unit)] != unit:
                unit = [token]
            if token == comma:
                last_comma = len(ids)
            elif len(ids) == room and last_comma != -1 and room - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1  # the words after the comma move on to the next chunk
                moved_ids, moved_weights = ids[cut:], weights[cut:]
                ids, weights = ids[:cut], weights[:cut]
                flush(moved_ids, moved_weights)
            if len(ids) == room or (len(unit) > 1 and len(ids) + len(unit) > room >= len(unit)):
                flush()
            ids += unit
            weights += [fragment.weight] * len(unit)
            position += len(unit)
    if ids or not chunks:
        flush()
    return chunks


def batch_chunks(tokenizer: CLIPTokenizer, prompts: list[str], syntax: PromptSyntax = "a1111",
                 min_chunks: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (B, N, L) int32 and weights (B, N, L) float32 of the prompts, each padded to the same
    number of chunks N (at least ``min_chunks``) with empty-prompt chunks."""
    per_prompt = [prompt_chunks(tokenizer, p, syntax) for p in prompts]
    n = max([min_chunks, *(len(c) for c in per_prompt)])
    empty = _close(tokenizer, [], [])
    rows = [c + [empty] * (n - len(c)) for c in per_prompt]
    ids = np.array([[c.ids for c in row] for row in rows], dtype=np.int32)
    weights = np.array([[c.weights for c in row] for row in rows], dtype=np.float32)
    return ids, weights


def apply_emphasis(states: mx.array, weights: mx.array) -> mx.array:
    """AUTOMATIC1111's "Original" emphasis on (chunks, L, C) states with (chunks, L) weights: scale each
    token's state, then restore the chunk's mean. A chunk weighted all 1 is returned as it is, and one
    whose weighted mean is zero is only scaled (there is no mean to restore it to)."""
    exact = states.astype(mx.float32)  # the means of a half-precision chunk, in float32
    weighted = exact * weights[..., None].astype(mx.float32)
    old_mean = mx.mean(exact, axis=(1, 2), keepdims=True)
    new_mean = mx.mean(weighted, axis=(1, 2), keepdims=True)
    safe = new_mean != 0
    weighted = mx.where(safe, weighted * (old_mean / mx.where(safe, new_mean, 1)), weighted)
    plain = mx.all(weights == 1, axis=1)[:, None, None]
    return mx.where(plain, states, weighted.astype(states.dtype))


def embed_prompts(tokenizer: CLIPTokenizer, encoder: CLIPTextModel, prompts: list[str], *,
                  syntax: PromptSyntax = "a1111", clip_skip: int | None = None, penultimate: bool = False,
                  min_chunks: int = 1) -> tuple[mx.array, mx.array]:
    """One text encoder's context (B, N*L, C) and pooled embedding (B, P, from each prompt's first chunk).

    All chunks go through the encoder in one batch. ``penultimate`` (SDXL) takes the last layer's
    input unnormalised; otherwise ``clip_skip`` N takes the output of the N-th layer from the end through
    the final layer norm (AUTOMATIC1111's "Clip skip"; 1 or None is the last layer)."""
    if clip_skip is not None:  # (the encoder is read only when a layer is skipped: any callable encoder works)
        layers = encoder.config.num_hidden_layers
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 1 <= clip_skip <= layers:
            raise ValueError(f"clip_skip must be a whole number from 1 to {layers} for this encoder, "
                             f"not {clip_skip!r}")
    ids, weights = batch_chunks(tokenizer, prompts, syntax, min_chunks)
    b, n, length = ids.shape

    def encode(chunk_ids: mx.array) -> tuple[mx.array, mx.array]:
        out = encoder(chunk_ids)
        if penultimate:
            return out.penultimate_hidden_state, out.pooled
        if clip_skip is None or clip_skip == 1:
            return out.last_hidden_state, out.pooled
        return encoder.text_model.final_layer_norm(out.hidden_states[-clip_skip]), out.pooled

    # The sequences (a negative and a positive prompt at least, with guidance) are independent: on a CPU
    # they run as parts on parallel streams, which also spreads the element-wise work over the cores.
    states, pooled = map_batch(encode, b * n, mx.array(ids.reshape(b * n, length)))
    if syntax == "a1111" and not np.all(weights == 1):
        states = apply_emphasis(states, mx.array(weights.reshape(b * n, length)))
    pooled = pooled.reshape(b, n, -1)[:, 0]
    return states.reshape(b, n * length, -1), pooled
