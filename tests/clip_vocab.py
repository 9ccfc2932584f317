"""Rebuild the CLIP ViT-L/14 tokenizer files (as shipped with Stable Diffusion) offline.

open_clip ships OpenAI's BPE merge list (``bpe_simple_vocab_16e6.txt.gz``). The Hugging Face
``openai/clip-vit-large-patch14`` vocabulary is derived from it deterministically:

* the 256 byte-level characters, in byte-to-unicode order;
* the same 256 characters with the end-of-word marker ``</w>`` appended;
* the first 48,894 merges, each pair concatenated;
* ``<|startoftext|>`` and ``<|endoftext|>``;

49,408 entries in all, numbered in that order. ``write_clip_tokenizer_files`` writes them as
``vocab.json`` + ``merges.txt`` together with the small config files a Stable Diffusion
``tokenizer/`` folder carries, so tests can use the real vocabulary without downloading anything.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
from pathlib import Path

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
N_MERGES = 49152 - 256 - 2  # the slice OpenAI's CLIP uses: 48,894 merges
VOCAB_SIZE = 49408


def _byte_chars() -> list[str]:
    """GPT-2's byte-level alphabet in vocabulary order.

    Printable Latin-1 bytes stand for themselves and come first, in byte order; the remaining 68
    bytes (controls, space, ...) follow in byte order, mapped to code points from U+0100 up.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]  # "!".."~", "¡".."¬", "®".."ÿ"
    rest = [b for b in range(256) if b not in set(printable)]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(rest))]


def _bpe_gz_path() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open_clip is not installed; it provides bpe_simple_vocab_16e6.txt.gz")
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / "bpe_simple_vocab_16e6.txt.gz"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("bpe_simple_vocab_16e6.txt.gz not found in the open_clip package")


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], tuple[str, ...]]:
    """(vocab, merges) of openai/clip-vit-large-patch14; merges are "a b" strings. Cached."""
    lines = gzip.decompress(_bpe_gz_path().read_bytes()).decode("utf-8").split("\n")
    # Line 0 is a version header; the merges the model uses follow it.
    merges = tuple(lines[1 : 1 + N_MERGES])
    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split(" ")) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise RuntimeError(f"rebuilt CLIP vocabulary has {len(vocab)} entries, expected {VOCAB_SIZE}")
    return vocab, merges


@functools.lru_cache(maxsize=1)
def _file_texts() -> tuple[str, str]:
    vocab, merges = clip_vocab_and_merges()
    vocab_text = json.dumps(vocab, ensure_ascii=False)
    merges_text = "#version: 0.2\n" + "\n".join(merges) + "\n"
    return vocab_text, merges_text


def _special(content: str) -> dict[str, object]:
    return {
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    }


def write_clip_tokenizer_files(folder: Path, pad_token: str = EOS) -> None:
    """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json into ``folder``.

    ``pad_token`` is ``<|endoftext|>`` for SD 1.x and ``"!"`` for SD 2.x.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_text, merges_text = _file_texts()
    (folder / "vocab.json").write_text(vocab_text, encoding="utf-8")
    (folder / "merges.txt").write_text(merges_text, encoding="utf-8")

    special_map = {
        "bos_token": _special(BOS),
        "eos_token": _special(EOS),
        "pad_token": _special(pad_token) if pad_token != EOS else pad_token,
        "unk_token": _special(EOS),
    }
    config = {
        "add_prefix_space": False,
        "bos_token": _special(BOS),
        "do_lower_case": True,
        "eos_token": _special(EOS),
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": _special(EOS),
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
