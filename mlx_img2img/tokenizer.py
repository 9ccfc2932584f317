"""CLIP's byte-level BPE tokenizer in plain Python, giving the ids transformers gives.

The reference is transformers' ``CLIPTokenizer`` (the `tokenizers`-backed one of transformers 5,
the same pipeline as ``CLIPTokenizerFast`` in 4.x) called as Stable Diffusion pipelines call it::

    tokenizer(prompts, padding="max_length", max_length=77, truncation=True)

Steps, in the reference's order:

1. Special ("added") tokens are cut out of the text: those flagged ``normalized=False`` from the
   raw text, the others from the normalised text. For SD 2.x this includes the pad token ``!``,
   so a ``!`` in a prompt becomes the pad id, exactly as in transformers.
2. Normalisation: Unicode NFC, each run of whitespace to one space, lower case (char by char).
3. Pre-tokenisation with CLIP's pattern ``'s|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+``
   (whitespace is dropped). Python's ``re`` has no ``\\p{..}`` classes, so a small scanner does it
   with ``unicodedata`` categories instead (no ``regex`` dependency).
4. Each piece's UTF-8 bytes are mapped to GPT-2's printable byte alphabet, ``</w>`` is appended to
   its last symbol, and BPE merges are applied lowest rank first.
5. ``<|startoftext|>`` + ids + ``<|endoftext|>``, truncated to ``max_length`` (the end token is
   kept) and padded with the pad id.
"""

from __future__ import annotations

import heapq
import json
import re
import unicodedata
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .errors import ModelFormatError

__all__ = ["CLIPTokenizer", "SpecialToken"]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
DEFAULT_MAX_LENGTH = 77
END_OF_WORD = "</w>"
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
# What the reference (the Oniguruma engine behind `tokenizers`) counts as ``\s``: Unicode's
# White_Space property. Python's str.isspace() also accepts U+001C..U+001F; the reference does not.
_WHITESPACE = frozenset(
    "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
_WHITESPACE_RUN = re.compile("[" + "".join(sorted(_WHITESPACE)) + "]+")


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


_BYTE_TO_CHAR = _byte_alphabet()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


@lru_cache(maxsize=4096)
def _char_class(ch: str) -> str:
    """'S' whitespace, 'L' letter (\\p{L}), 'N' number (\\p{N}), 'O' anything else."""
    if ch in _WHITESPACE:
        return "S"
    major = unicodedata.category(ch)[0]
    return major if major in "LN" else "O"


def _pre_tokenize(text: str) -> list[str]:
    """Split normalised text the way CLIP's pattern does; whitespace is dropped."""
    pieces: list[str] = []
    i, n = 0, len(text)
    while i < n:
        kind = _char_class(text[i])
        if kind == "S":
            i += 1
            continue
        if text[i] == "'":
            found = next((c for c in _CONTRACTIONS if text.startswith(c, i)), None)
            if found is not None:
                pieces.append(found)
                i += len(found)
                continue
        if kind == "N":  # digits are split one by one
            pieces.append(text[i])
            i += 1
            continue
        j = i + 1
        while j < n and _char_class(text[j]) == kind:
            j += 1
        pieces.append(text[i:j])
        i = j
    return pieces


def _normalize(text: str) -> str:
    text = _WHITESPACE_RUN.sub(" ", unicodedata.normalize("NFC", text))
    # Char by char, as the reference does: no final-sigma context rule (str.lower() has one).
    return "".join(ch.lower() for ch in text)


@dataclass(frozen=True)
class SpecialToken:
    """A token matched as a whole before BPE. ``normalized``: matched in the normalised text."""

    content: str
    id: int
    normalized: bool = False


class CLIPTokenizer:
    """CLIP BPE tokenizer: ``encode(prompts)`` gives the (batch, max_length) int32 ids of transformers."""

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        *,
        pad_token: str = EOS_TOKEN,
        bos_token: str = BOS_TOKEN,
        eos_token: str = EOS_TOKEN,
        unk_token: str = EOS_TOKEN,
        max_length: int = DEFAULT_MAX_LENGTH,
        special_tokens: list[SpecialToken] | None = None,
    ) -> None:
        self.vocab = dict(vocab)
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.max_length = int(max_length)
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2 (start and end token), got {max_length}")
        if special_tokens is None:  # all named tokens, matched in the raw text (transformers' default)
            special_tokens = []
            for token in dict.fromkeys((bos_token, eos_token, unk_token, pad_token)):
                if token in self.vocab:
                    special_tokens.append(SpecialToken(token, self.vocab[token]))
        for tok in special_tokens:
            self.vocab.setdefault(tok.content, tok.id)
        for name, token in (("bos", bos_token), ("eos", eos_token), ("unk", unk_token), ("pad", pad_token)):
            if token not in self.vocab:
                raise ModelFormatError(f"tokenizer {name} token {token!r} is not in the vocabulary")
        self.bos_id: int = self.vocab[bos_token]
        self.eos_id: int = self.vocab[eos_token]
        self.unk_id: int = self.vocab[unk_token]
        self.pad_id: int = self.vocab[pad_token]
        self.pad_token = pad_token
        self.special_tokens = list(special_tokens)
        self._raw_split = self._splitter([t for t in special_tokens if not t.normalized])
        self._normalized_split = self._splitter([t for t in special_tokens if t.normalized])
        self._special_ids = {t.content: t.id for t in special_tokens}
        self._id_to_token = {i: t for t, i in self.vocab.items()}
        self._bpe = lru_cache(maxsize=65536)(self._bpe_uncached)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_folder(cls, path: str | Path) -> CLIPTokenizer:
        """Load a Hugging Face tokenizer folder: vocab.json + merges.txt, or tokenizer.json.

        The pad token and model_max_length come from tokenizer_config.json (and
        special_tokens_map.json, which takes precedence, as in transformers).
        """
        folder = Path(path)
        config = _read_json(folder / "tokenizer_config.json") or {}
        special_map = _read_json(folder / "special_tokens_map.json") or {}
        tokenizer_json = _read_json(folder / "tokenizer.json")
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab = _read_json(folder / "vocab.json")
            merges = _parse_merges((folder / "merges.txt").read_text(encoding="utf-8").splitlines())
        elif tokenizer_json is not None:
            model = tokenizer_json.get("model") or {}
            vocab, merges = model.get("vocab"), _parse_merges(model.get("merges") or [])
        else:
            raise ModelFormatError(f"{folder}: no vocab.json + merges.txt and no tokenizer.json")
        if not isinstance(vocab, dict) or not vocab or not merges:
            raise ModelFormatError(f"{folder}: tokenizer vocabulary or merges are missing or empty")

        # Named tokens: special_tokens_map.json wins over tokenizer_config.json, as in transformers.
        defaults = {
            "bos_token": BOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "unk_token": EOS_TOKEN,
            "pad_token": EOS_TOKEN,
        }
        named = {key: special_map.get(key) or config.get(key) or default for key, default in defaults.items()}
        strings = {key: _token_content(value) for key, value in named.items()}

        # Tokens cut out before BPE, with their `normalized` flags: the saved added-token list where
        # there is one, else the named tokens (later keys win, as when transformers adds them in turn;
        # a plain string means normalized=False).
        added = tokenizer_json.get("added_tokens") if tokenizer_json is not None else None
        if added is None and isinstance(config.get("added_tokens_decoder"), dict):
            added = [{**t, "id": i} for i, t in config["added_tokens_decoder"].items() if isinstance(t, dict)]
        special: dict[str, SpecialToken] = {}
        for entry in added or []:
            content, normalized = entry.get("content"), bool(entry.get("normalized", False))
            if isinstance(content, str) and "id" in entry:
                special[content] = SpecialToken(content, int(entry["id"]), normalized)
        for value in named.values():
            content = _token_content(value)
            if content in special and added:
                continue
            token_id = vocab.get(content)
            if token_id is None:
                raise ModelFormatError(f"{folder}: special token {content!r} is not in the vocabulary")
            normalized = bool(value.get("normalized", False)) if isinstance(value, dict) else False
            special[content] = SpecialToken(content, int(token_id), normalized)

        max_length = config.get("model_max_length", DEFAULT_MAX_LENGTH)
        if not isinstance(max_length, int) or not 2 <= max_length <= 1_000_000:
            max_length = DEFAULT_MAX_LENGTH  # transformers writes ~1e30 for "no limit"
        return cls(
            vocab,
            merges,
            pad_token=strings["pad_token"],
            bos_token=strings["bos_token"],
            eos_token=strings["eos_token"],
            unk_token=strings["unk_token"],
            max_length=max_length,
            special_tokens=list(special.values()),
        )

    # ------------------------------------------------------------------ encoding
    def tokenize_ids(self, text: str) -> list[int]:
        """Ids of ``text`` without start/end tokens, padding or truncation."""
        ids: list[int] = []
        for raw_part, raw_special in self._split(text, self._raw_split):
            if raw_special:
                ids.append(self._special_ids[raw_part])
                continue
            for part, is_special in self._split(_normalize(raw_part), self._normalized_split):
                if is_special:
                    ids.append(self._special_ids[part])
                    continue
                for piece in _pre_tokenize(part):
                    ids.extend(self._bpe(piece))
        return ids

    def encode(self, prompts: list[str] | str) -> np.ndarray:
        """(len(prompts), max_length) int32: start, ids, end, then pad ids; long prompts are cut."""
        if isinstance(prompts, str):
            prompts = [prompts]
        out = np.full((len(prompts), self.max_length), self.pad_id, dtype=np.int32)
        room = self.max_length - 2
        for row, prompt in enumerate(prompts):
            ids = self.tokenize_ids(prompt)
            if len(ids) > room:
                dropped = self.decode(ids[room:])
                if len(dropped) > 300:
                    dropped = dropped[:300] + "..."
                message = (
                    f"prompt is longer than {room} tokens; this part was dropped by truncation: {dropped!r}"
                )
                warnings.warn(message, stacklevel=2)
                ids = ids[:room]
            seq = [self.bos_id, *ids, self.eos_id]
            out[row, : len(seq)] = seq
        return out

    __call__ = encode

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` (special tokens kept as text), for messages."""
        special_text = {t.id: t.content for t in self.special_tokens}
        out: list[str] = []
        buf = bytearray()
        for i in map(int, ids):
            if i in special_text:
                out.append(buf.decode("utf-8", errors="replace") + special_text[i])
                buf = bytearray()
                continue
            token = self._id_to_token.get(i, "")
            word_end = token.endswith(END_OF_WORD)
            if word_end:
                token = token[: -len(END_OF_WORD)]
            buf.extend(_CHAR_TO_BYTE.get(c, 0x3F) for c in token)  # "?" for an unknown id
            if word_end:
                buf.append(0x20)
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out).strip()

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _splitter(tokens: list[SpecialToken]) -> re.Pattern[str] | None:
        if not tokens:
            return None
        # Longest first, so at any position the longest token wins (leftmost-longest).
        contents = sorted({t.content for t in tokens}, key=len, reverse=True)
        return re.compile("|".join(re.escape(c) for c in contents))

    @staticmethod
    def _split(text: str, pattern: re.Pattern[str] | None) -> list[tuple[str, bool]]:
        """[(part, is_special)] with the special-token matches of ``pattern`` cut out."""
        if pattern is None:
            return [(text, False)]
        parts: list[tuple[str, bool]] = []
        start = 0
        for m in pattern.finditer(text):
            if m.start() > start:
                parts.append((text[start : m.start()], False))
            parts.append((m.group(), True))
            start = m.end()
        if start < len(text):
            parts.append((text[start:], False))
        return parts

    def _bpe_uncached(self, piece: str) -> tuple[int, ...]:
        """BPE of one pre-token: merge the adjacent pair of lowest rank (leftmost on ties) until none is left.

        A heap of candidate pairs over a linked list keeps long pieces (a CJK sentence has no spaces)
        at O(n log n); entries made stale by an earlier merge are skipped when popped.
        """
        symbols: list[str | None] = [_BYTE_TO_CHAR[b] for b in piece.encode("utf-8", errors="surrogatepass")]
        symbols[-1] += END_OF_WORD
        n = len(symbols)
        prev, nxt = list(range(-1, n - 1)), [*range(1, n), -1]
        heap = [
            (r, i) for i in range(n - 1) if (r := self.ranks.get((symbols[i], symbols[i + 1]))) is not None
        ]
        heapq.heapify(heap)
        while heap:
            rank, i = heapq.heappop(heap)
            j = nxt[i]
            if symbols[i] is None or j < 0 or self.ranks.get((symbols[i], symbols[j])) != rank:
                continue  # stale: one side has been merged since this entry was pushed
            symbols[i] += symbols[j]
            symbols[j] = None
            nxt[i] = nxt[j]
            if nxt[i] >= 0:
                prev[nxt[i]] = i
            for left in (prev[i], i):
                right = nxt[left] if left >= 0 else -1
                if right >= 0 and (r := self.ranks.get((symbols[left], symbols[right]))) is not None:
                    heapq.heappush(heap, (r, left))
        return tuple(self.vocab.get(s, self.unk_id) for s in symbols if s is not None)


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise ModelFormatError(f"{path}: cannot read tokenizer file ({e})") from e
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path}: expected a JSON object {{...}}, not {type(data).__name__}")
    return data


def _token_content(value: str | dict) -> str:
    if isinstance(value, dict):
        content = value.get("content")
        if not isinstance(content, str):
            raise ModelFormatError(f"special token entry without content: {value!r}")
        return content
    return str(value)


def _parse_merges(lines: list) -> list[tuple[str, str]]:
    """merges.txt lines or tokenizer.json merges ("a b" strings or [a, b] pairs)."""
    merges: list[tuple[str, str]] = []
    for line in lines:
        if isinstance(line, (list, tuple)) and len(line) == 2:
            merges.append((str(line[0]), str(line[1])))
        elif isinstance(line, str):
            if line.startswith("#version") or not line.strip():
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise ModelFormatError(f"malformed BPE merge entry: {line!r}")
            merges.append((parts[0], parts[1]))
        else:
            raise ModelFormatError(f"malformed BPE merge entry: {line!r}")
    return merges
