"""mlx_img2img.tokenizer against transformers' CLIPTokenizer on the real CLIP ViT-L/14 vocabulary.

transformers 5 has one CLIPTokenizer (backed by `tokenizers`; CLIPTokenizerFast is the same class).
It is checked loaded three ways: straight from vocab.json + merges.txt, from an SD-style tokenizer
folder (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json), and from the folder
its save_pretrained writes (tokenizer.json + tokenizer_config.json only).
"""

from __future__ import annotations

import json
import shutil
import unicodedata
import warnings
from pathlib import Path

import numpy as np
import pytest
import transformers

from mlx_img2img.errors import ModelFormatError
from mlx_img2img.tokenizer import CLIPTokenizer
from tests.clip_vocab import write_clip_tokenizer_files

LONG_PROMPT = " ".join(
    f"{word}{i}" if i % 7 == 0 else word
    for i, word in enumerate(
        (
            "a highly detailed oil painting of an old lighthouse on a rocky cliff at sunset with "
            "crashing waves seagulls dramatic clouds golden light volumetric fog by a famous artist"
        ).split()
        * 10
    )
)  # 200 words, far more than 75 tokens

PROMPTS = [
    "a photo of a cat",
    "A photo of an astronaut riding a horse on Mars",
    "café, naïve Zürich crème brûlée",
    "cafe\u0301 (decomposed accent)",
    "emoji 😀👍🏽 🇫🇷 ❤️ family 👨‍👩‍👧",
    "東京タワー 北京 서울 中文字符",
    "wow!!! what?!... (yes) [no] {maybe} --- *** ~~~ @#$%^&",
    "1234567 and 3.14 and 1,000,000 and 2nd 3rd",
    "it's a cat's toy, don't, we're, they've, I'm, you'll, he'd, IT'S, ''s, 'sad",
    "  extra   spaces\n\nnew lines\t\ttabs \r\n carriage\u00a0nbsp\u3000ideographic  ",
    "MiXeD CaSe ÉCOLE ΟΔΟΣ İstanbul straße ẞ",
    "",
    "   ",
    "ﬁ ligature, x² ½ ① zero\u200bwidth",
    "control\x00char\x1cfile\x85nel",
    "masterpiece, best quality, (ultra-detailed:1.2), 8k uhd, dslr, soft lighting",
    "a <|endoftext|> b <|startoftext|> c<|endoftext|>d",
    "upper-case specials: <|ENDOFTEXT|> <|StartOfText|>",
    LONG_PROMPT,
]


def _reference_ids(tok, prompts: list[str]) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = tok(prompts, padding="max_length", max_length=77, truncation=True)["input_ids"]
    return np.asarray(ids, dtype=np.int32)


def _encode(tok: CLIPTokenizer, prompts: list[str]) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tok.encode(prompts)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clip_tokenizers")
    out = {"sd1": root / "sd1", "sd2": root / "sd2", "plain": root / "plain"}
    write_clip_tokenizer_files(out["sd1"])
    write_clip_tokenizer_files(out["sd2"], pad_token="!")
    out["plain"].mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(out["sd1"] / name, out["plain"] / name)
    # As transformers >= 4.34 saves it: named tokens as plain strings, the added tokens (with their
    # flags) listed in tokenizer_config.json.
    out["sd1_decoder"] = root / "sd1_decoder"
    shutil.copytree(out["sd1"], out["sd1_decoder"])
    config_path = out["sd1_decoder"] / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    flags = {"lstrip": False, "normalized": True, "rstrip": False, "single_word": False, "special": True}
    config["added_tokens_decoder"] = {
        "49406": {"content": "<|startoftext|>", **flags},
        "49407": {"content": "<|endoftext|>", **flags},
    }
    config_path.write_text(json.dumps(config))
    for name in ("sd1", "sd2"):
        saved = root / f"{name}_saved"
        transformers.CLIPTokenizer.from_pretrained(str(out[name])).save_pretrained(str(saved))
        out[f"{name}_saved"] = saved
    return out


def test_known_ids(folders: dict[str, Path]) -> None:
    tok = CLIPTokenizer.from_folder(folders["sd1"])
    assert tok.tokenize_ids("a photo of a cat") == [320, 1125, 539, 320, 2368]
    ids = tok.encode(["a photo of a cat"])
    assert ids.shape == (1, 77) and ids.dtype == np.int32
    assert ids[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 49407]
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.max_length) == (49406, 49407, 49407, 77)
    assert CLIPTokenizer.from_folder(folders["sd2"]).pad_id == 0  # "!"


def test_matches_transformers_from_vocab_and_merges(folders: dict[str, Path]) -> None:
    ref = transformers.CLIPTokenizer(
        str(folders["plain"] / "vocab.json"), str(folders["plain"] / "merges.txt")
    )
    np.testing.assert_array_equal(
        _encode(CLIPTokenizer.from_folder(folders["plain"]), PROMPTS), _reference_ids(ref, PROMPTS)
    )


@pytest.mark.parametrize("name", ["sd1", "sd2", "sd1_decoder", "sd1_saved", "sd2_saved"])
def test_matches_transformers_from_folder(folders: dict[str, Path], name: str) -> None:
    if name.endswith("_saved"):  # transformers 5 writes tokenizer.json only; ours must read that
        assert (folders[name] / "tokenizer.json").is_file() and not (folders[name] / "vocab.json").exists()
    ref = transformers.AutoTokenizer.from_pretrained(str(folders[name]))
    ours = CLIPTokenizer.from_folder(folders[name])
    assert ours.pad_id == ref.pad_token_id
    np.testing.assert_array_equal(_encode(ours, PROMPTS), _reference_ids(ref, PROMPTS))


def test_sd2_pad_and_bang_in_prompt(folders: dict[str, Path]) -> None:
    ours = CLIPTokenizer.from_folder(folders["sd2"])
    ids = ours.encode(["a cat!"])[0]
    # "!" is SD 2.x's pad token, so transformers cuts it out as a special token (id 0) there too.
    assert ids[:5].tolist() == [49406, 320, 2368, 0, 49407]
    assert (ids[5:] == 0).all()
    assert CLIPTokenizer.from_folder(folders["sd1"]).encode(["a cat!"])[0, 3] == 256  # "!</w>"


def test_sd2_hub_layout_pad_from_special_tokens_map(folders: dict[str, Path], tmp_path: Path) -> None:
    # stabilityai/stable-diffusion-2-1 keeps pad "<|endoftext|>" in tokenizer_config.json and "!" in
    # special_tokens_map.json; transformers lets the latter win.
    shutil.copytree(folders["sd2"], tmp_path / "tok")
    config_path = tmp_path / "tok" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["pad_token"] = "<|endoftext|>"
    config_path.write_text(json.dumps(config))
    special_path = tmp_path / "tok" / "special_tokens_map.json"
    special = json.loads(special_path.read_text())
    special["pad_token"] = "!"
    special_path.write_text(json.dumps(special))
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    ours = CLIPTokenizer.from_folder(tmp_path / "tok")
    assert ours.pad_id == ref.pad_token_id == 0
    np.testing.assert_array_equal(_encode(ours, PROMPTS), _reference_ids(ref, PROMPTS))


def test_truncation_warns_and_keeps_eos(folders: dict[str, Path]) -> None:
    tok = CLIPTokenizer.from_folder(folders["sd1"])
    assert len(tok.tokenize_ids(LONG_PROMPT)) > 75
    with pytest.warns(UserWarning, match="dropped by truncation") as record:
        ids = tok.encode(["short one", LONG_PROMPT])
    assert len(record) == 1
    dropped_start = tok.decode(tok.tokenize_ids(LONG_PROMPT)[75:85])
    assert dropped_start in str(record[0].message)  # the dropped text is named
    assert ids.shape == (2, 77)
    assert ids[1, 0] == tok.bos_id and ids[1, -1] == tok.eos_id
    assert ids[1, 1:76].tolist() == tok.tokenize_ids(LONG_PROMPT)[:75]


def test_no_warning_for_exactly_75_tokens(folders: dict[str, Path]) -> None:
    tok = CLIPTokenizer.from_folder(folders["sd1"])
    prompt = " ".join(["cat"] * 75)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = tok.encode([prompt])
    assert ids[0, -1] == tok.eos_id and (ids[0, 1:76] == 2368).all()


def test_missing_files_raise_model_format_error(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError):
        CLIPTokenizer.from_folder(tmp_path)


def test_unicode_sweep(folders: dict[str, Path]) -> None:
    """Every character of Unicode 3.2 (planes 0-2), run together in chunks, tokenizes identically.

    Characters assigned only in recent Unicode versions are left out: Python's unicodedata and the
    reference's tables follow different Unicode versions, and may class those differently.
    """
    ref = transformers.CLIPTokenizer.from_pretrained(str(folders["sd1"]))
    ours = CLIPTokenizer.from_folder(folders["sd1"])
    old = unicodedata.ucd_3_2_0
    chars = [chr(c) for c in range(1, 0x30000) if old.category(chr(c)) not in ("Cn", "Co", "Cs")]
    for k in range(0, len(chars), 2000):
        text = "".join(chars[k : k + 2000])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = ref(text, add_special_tokens=False)["input_ids"]
        assert ours.tokenize_ids(text) == expected, f"chunk starting at U+{ord(chars[k]):04X}"
