"""AUTOMATIC1111 prompt syntax: the parser against its documented parses, the chunking, and the conditioning
against an independent implementation of its rules on transformers' text encoders."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_img2img.models.clip import CLIPTextConfig, CLIPTextModel
from mlx_img2img.prompts import BREAK, apply_emphasis, embed_prompts, parse_prompt_attention, prompt_chunks
from mlx_img2img.tokenizer import CLIPTokenizer

# AUTOMATIC1111's parse_prompt_attention doctests, verbatim.
DOCTESTS = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
]
# Further cases, worked out by hand from the same rules.
RULES = [
    ("((a))", [("a", 1.1 * 1.1)]),
    ("[a] b", [("a", 1 / 1.1), (" b", 1.0)]),
    ("[[a]]", [("a", 1 / 1.1 / 1.1)]),
    ("(a:-1) b", [("a", -1.0), (" b", 1.0)]),
    ("a) b] c", [("a) b] c", 1.0)]),  # closers with nothing open are text
    ("(a:1.2", [("a:1.2", 1.1)]),  # no ")" after the weight: ":" and "1.2" are text in an open bracket
    ("(a: 1.2)", [("a: 1.2", 1.1)]),  # a space before the weight: text too
    ("x:1.2) y", [("x:1.2) y", 1.0)]),
    ("[a (b:2)]", [("a ", 1 / 1.1), ("b", 2 / 1.1)]),
    ("x \\\\ y", [("x \\ y", 1.0)]),  # \\ is a backslash
    ("a\\b", [("ab", 1.0)]),  # a lone backslash disappears
    ("", [("", 1.0)]),
    ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
    ("aBREAK b, BREAKING", [("aBREAK b, BREAKING", 1.0)]),
    ("(a BREAK b:1.5)", [("a", 1.5), BREAK, ("b", 1.5)]),  # AUTOMATIC1111 would read "BREAK" as a word here
]


@pytest.mark.parametrize(("prompt", "expected"), DOCTESTS + RULES)
def test_parse_prompt_attention(prompt: str, expected: list) -> None:
    parsed = parse_prompt_attention(prompt)
    assert [tuple(f) for f in parsed] == [tuple(e) for e in expected]
    assert [f is BREAK for f in parsed] == [e is BREAK for e in expected]


def test_parse_rejects_a_malformed_weight() -> None:
    with pytest.raises(ValueError, match="invalid attention weight '1..2'"):
        parse_prompt_attention("(a:1..2)")


# ------------------------------------------------------------------------------------------ chunking

@pytest.fixture(scope="module")
def clip_tokenizer(tiny_sd15: Path) -> CLIPTokenizer:
    return CLIPTokenizer.from_folder(tiny_sd15 / "tokenizer")


def test_short_prompt_is_the_tokenizer_encoding(tiny_sd15: Path, tiny_sd2v: Path) -> None:
    prompt = "a photo of an astronaut riding a horse on the moon, highly detailed!"
    for folder in (tiny_sd15, tiny_sd2v):  # SD 2.x pads with "!" after the end token
        tokenizer = CLIPTokenizer.from_folder(folder / "tokenizer")
        for syntax in ("a1111", "plain"):
            (chunk,) = prompt_chunks(tokenizer, prompt, syntax)
            assert chunk.ids == tokenizer.encode(prompt)[0].tolist()
            assert chunk.weights == [1.0] * 77


def test_long_prompt_chunks_of_75(clip_tokenizer: CLIPTokenizer) -> None:
    t = clip_tokenizer
    cat = t.tokenize_ids("cat")[0]
    chunks = prompt_chunks(t, " ".join(["cat"] * 200))
    assert [c.ids.count(cat) for c in chunks] == [75, 75, 50]
    for c in chunks:
        assert c.ids[0] == t.bos_id and len(c.ids) == 77 and c.ids[1 + c.ids.count(cat)] == t.eos_id
    assert len(prompt_chunks(t, " ".join(["cat"] * 75))) == 1
    assert len(prompt_chunks(t, " ".join(["cat"] * 76))) == 2
    with pytest.warns(UserWarning, match="longer than 75 tokens"):
        (plain,) = prompt_chunks(t, " ".join(["cat"] * 200), "plain")  # literal: one chunk, cut
    assert plain.ids.count(cat) == 75


def test_comma_backtrack(clip_tokenizer: CLIPTokenizer) -> None:
    t = clip_tokenizer
    cat, dog, comma = t.tokenize_ids("cat")[0], t.tokenize_ids("dog")[0], t.vocab[",</w>"]
    # A comma at index 70 of the chunk: 75 - 70 <= 20, so the 4 words after it move on.
    first, second = prompt_chunks(t, " ".join(["cat"] * 70) + ", " + " ".join(["dog"] * 10))
    assert first.ids[1:73] == [cat] * 70 + [comma, t.eos_id]
    assert second.ids[1:12] == [dog] * 10 + [t.eos_id]
    # A comma at index 50: 25 tokens back is too far; the chunk is cut at 75 tokens.
    first, second = prompt_chunks(t, " ".join(["cat"] * 50) + ", " + " ".join(["dog"] * 30))
    assert first.ids[1:77] == [cat] * 50 + [comma] + [dog] * 24 + [t.eos_id]
    assert second.ids[1:8] == [dog] * 6 + [t.eos_id]


def test_break_and_weights(clip_tokenizer: CLIPTokenizer) -> None:
    t = clip_tokenizer
    first, second = prompt_chunks(t, "(red:1.5) cat BREAK [dog]")
    assert first.ids[:4] == [t.bos_id, *t.tokenize_ids("red cat"), t.eos_id]
    assert first.weights[:4] == [1.0, 1.5, 1.0, 1.0]
    assert second.ids[:3] == [t.bos_id, *t.tokenize_ids("dog"), t.eos_id]
    assert second.weights[:3] == [1.0, pytest.approx(1 / 1.1), 1.0]
    assert len(prompt_chunks(t, "BREAK cat")) == 2  # an empty first chunk, as AUTOMATIC1111 makes
    with pytest.raises(ValueError, match="prompt syntax"):
        prompt_chunks(t, "cat", "comfy")  # type: ignore[arg-type]


def test_emphasis_leaves_unweighted_chunks_exact_and_survives_a_zero_mean() -> None:
    states = mx.random.normal((3, 5, 4))
    weights = mx.array([[1.0] * 5, [1.0, 2.0, 1.0, 1.0, 1.0], [1.0] * 5])
    out = apply_emphasis(states, weights)
    assert mx.array_equal(out[0], states[0]) and mx.array_equal(out[2], states[2])
    row = np.array(states[1]) * np.array(weights[1])[:, None]
    np.testing.assert_allclose(np.array(out[1]), row * np.array(states[1]).mean() / row.mean(), rtol=1e-5)
    zero = mx.zeros((1, 5, 4))
    assert mx.all(mx.isfinite(apply_emphasis(zero, weights[1:2]))).item()


# ------------------------------------------------------------------------------------------ conditioning

def load_encoder(folder: Path) -> tuple[object, CLIPTextModel]:
    """transformers' encoder from the model folder, and ours with the same weights."""
    from transformers import CLIPTextModel as HFText
    from transformers import CLIPTextModelWithProjection as HFProjected

    config = json.loads((folder / "config.json").read_text())
    hf_class = HFProjected if "CLIPTextModelWithProjection" in config["architectures"] else HFText
    hf = hf_class.from_pretrained(folder).eval()
    ours = CLIPTextModel(CLIPTextConfig.from_dict(config))
    # transformers 5's CLIPTextModel holds the transformer's parts itself; the projected model wraps them.
    weights = {k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v
               for k, v in hf.state_dict().items() if "position_ids" not in k}
    ours.load_weights([(k, mx.array(v.numpy())) for k, v in weights.items()])
    return hf, ours


def final_norm(hf_encoder) -> torch.nn.Module:
    return getattr(hf_encoder, "text_model", hf_encoder).final_layer_norm


def reference_conditioning(hf_tokenizer, hf_encoder, fragments: list, *, clip_skip: int = 1,
                           penultimate: bool = False, chunks: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """AUTOMATIC1111's rules, written independently: tokenize each (text, weight) fragment with transformers'
    tokenizer, fill 75-token chunks (comma backtrack up to 20 tokens, BREAK), pad each chunk after its
    first end token, encode each chunk alone, apply "Original" emphasis, concatenate."""
    bos, eos, pad = hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id
    comma = hf_tokenizer.convert_tokens_to_ids(",</w>")
    stream: list = []  # (token, weight) pairs and "break" markers
    for fragment in fragments:
        if fragment is BREAK:
            stream.append("break")
        else:
            text, weight = fragment
            stream += [(tok, weight) for tok in hf_tokenizer(text, add_special_tokens=False).input_ids]
    groups: list[list[tuple[int, float]]] = [[]]
    comma_at = None
    for item in stream:
        current = groups[-1]
        if item == "break":
            groups.append([])
            comma_at = None
            continue
        if item[0] == comma:
            comma_at = len(current)
        elif len(current) == 75 and comma_at is not None and 75 - comma_at <= 20:
            groups[-1], moved = current[: comma_at + 1], current[comma_at + 1:]
            groups.append(moved)
            comma_at = None
        if len(groups[-1]) == 75:
            groups.append([])
            comma_at = None
        groups[-1].append(item)
    if not groups[-1] and len(groups) > 1:  # no trailing empty chunk (a BREAK at the end or a full last chunk)
        groups.pop()
    while len(groups) < chunks:
        groups.append([])
    states, pooled = [], None
    for group in groups:
        ids = [bos] + [t for t, _ in group] + [eos] * (76 - len(group))
        first_end = ids.index(eos)
        ids = ids[: first_end + 1] + [pad] * (76 - first_end)
        weights = torch.tensor([1.0] + [w for _, w in group] + [1.0] * (76 - len(group)))
        with torch.no_grad():
            out = hf_encoder(torch.tensor([ids]), output_hidden_states=True)
            if penultimate:
                z = out.hidden_states[-2]
            elif clip_skip > 1:
                z = final_norm(hf_encoder)(out.hidden_states[-clip_skip])
            else:
                z = out.last_hidden_state
        original_mean = z.mean()
        z = z * weights[None, :, None]
        z = z * (original_mean / z.mean())
        states.append(z[0])
        if pooled is None:
            pooled = out.text_embeds[0] if hasattr(out, "text_embeds") else out.pooler_output[0]
    return torch.cat(states), pooled


# 50 phrases of 3 words and a comma: ~200 tokens, and chunks that fill up mid-phrase (comma backtrack).
LONG = ", ".join(f"{a} {b} {c}" for a, b, c in zip(["red", "blue", "green", "tiny", "huge"] * 10,
                                                   ["cat", "dog", "house", "tree", "sky"] * 10,
                                                   ["at", "in", "on"] * 17, strict=False))
CASES = {  # prompt -> its fragments, as AUTOMATIC1111 reads them
    "weights": ("a (castle:1.3) on a ((hill)), [fog], \\(literal\\)",
                [("a ", 1.0), ("castle", 1.3), (" on a ", 1.0), ("hill", 1.1 * 1.1), (", ", 1.0),
                 ("fog", 1 / 1.1), (", (literal)", 1.0)]),
    "break": ("a red cat BREAK (a blue dog:0.8)", [("a red cat", 1.0), BREAK, ("", 1.0), ("a blue dog", 0.8)]),
    "long": (LONG + " (sunset:1.2)", [(LONG + " ", 1.0), ("sunset", 1.2)]),  # ~200 tokens, commas at chunk ends
}


@pytest.mark.parametrize(("case", "model", "subfolder", "clip_skip", "penultimate"), [
    ("weights", "tiny_sd15", "text_encoder", 1, False),
    ("break", "tiny_sd15", "text_encoder", 1, False),
    ("long", "tiny_sd15", "text_encoder", 1, False),
    ("weights", "tiny_sd15", "text_encoder", 2, False),
    ("long", "tiny_sd2v", "text_encoder", 1, False),  # "!" padding
    ("break", "tiny_sd2v", "text_encoder", 1, False),
    ("long", "tiny_sdxl", "text_encoder_2", 1, True),  # SDXL: penultimate states, projected pooled embedding
])
def test_conditioning_matches_reference(case: str, model: str, subfolder: str, clip_skip: int, penultimate: bool,
                                        request: pytest.FixtureRequest) -> None:
    from transformers import CLIPTokenizer as HFTokenizer

    folder = request.getfixturevalue(model)
    prompt, fragments = CASES[case]
    hf_tokenizer = HFTokenizer.from_pretrained(folder / subfolder.replace("text_encoder", "tokenizer"))
    hf, ours = load_encoder(folder / subfolder)
    tokenizer = CLIPTokenizer.from_folder(folder / subfolder.replace("text_encoder", "tokenizer"))
    assert [tuple(f) for f in parse_prompt_attention(prompt)] == [tuple(f) for f in fragments]
    states, pooled = embed_prompts(tokenizer, ours, [prompt, "plain words"], clip_skip=clip_skip,
                                   penultimate=penultimate)
    want, want_pooled = reference_conditioning(hf_tokenizer, hf, fragments, clip_skip=clip_skip,
                                               penultimate=penultimate)
    assert states.shape[1] == want.shape[0] and states.shape[1] % 77 == 0
    scale = float(want.abs().max())
    np.testing.assert_allclose(np.array(states[0]), want.numpy(), atol=2e-5 * scale, rtol=0)
    np.testing.assert_allclose(np.array(pooled[0]), want_pooled.numpy(), atol=2e-5 * float(want_pooled.abs().max()))
    # The shorter prompt of the batch is padded with empty-prompt chunks.
    other, _ = reference_conditioning(hf_tokenizer, hf, [("plain words", 1.0)], clip_skip=clip_skip,
                                      penultimate=penultimate, chunks=want.shape[0] // 77)
    np.testing.assert_allclose(np.array(states[1]), other.numpy(), atol=2e-5 * scale, rtol=0)


def test_clip_skip_range(tiny_sd15: Path) -> None:
    _, ours = load_encoder(tiny_sd15 / "text_encoder")
    tokenizer = CLIPTokenizer.from_folder(tiny_sd15 / "tokenizer")
    for bad in (0, 3, 1.5, True):
        with pytest.raises(ValueError, match="clip_skip"):
            embed_prompts(tokenizer, ours, ["cat"], clip_skip=bad)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ encode_prompt

@pytest.fixture(scope="module")
def sd15_pipe(tiny_sd15: Path):
    from mlx_img2img import Img2ImgPipeline

    return Img2ImgPipeline.from_pretrained(tiny_sd15)


def test_unweighted_short_prompt_is_todays_conditioning(sd15_pipe) -> None:
    """No weights and at most 75 tokens: exactly the literal ("plain", diffusers') conditioning."""
    prompt = "a watercolour painting of a house, golden hour"
    a1111 = sd15_pipe.encode_prompt(prompt, "blurry")
    plain = sd15_pipe.encode_prompt(prompt, "blurry", prompt_syntax="plain")
    assert a1111.context.shape == (2, 77, 32)
    assert mx.array_equal(a1111.context, plain.context)


def test_encode_prompt_weights_long_prompt_negative_padding_clip_skip(tiny_sd15: Path, sd15_pipe) -> None:
    from transformers import CLIPTokenizer as HFTokenizer

    hf_tokenizer = HFTokenizer.from_pretrained(tiny_sd15 / "tokenizer")
    hf, _ = load_encoder(tiny_sd15 / "text_encoder")
    prompt, fragments = CASES["long"]
    for clip_skip in (None, 2):
        conditioning = sd15_pipe.encode_prompt(prompt, "ugly", clip_skip=clip_skip)
        skip = clip_skip or 1
        want, _ = reference_conditioning(hf_tokenizer, hf, fragments, clip_skip=skip)
        negative, _ = reference_conditioning(hf_tokenizer, hf, [("ugly", 1.0)], clip_skip=skip,
                                             chunks=want.shape[0] // 77)
        assert conditioning.context.shape == (2, want.shape[0], 32) and want.shape[0] == 3 * 77
        # float32 through the encoder and the emphasis rescale: errors grow with the values (up to ~6 here)
        for got, expected in ((conditioning.context[1], want), (conditioning.context[0], negative)):
            np.testing.assert_allclose(np.array(got), expected.numpy(), atol=3e-5 * float(expected.abs().max()))
    with pytest.warns(UserWarning, match="longer than 75 tokens"):  # literal and cut
        plain = sd15_pipe.encode_prompt(prompt, "ugly", prompt_syntax="plain")
    assert plain.context.shape == (2, 77, 32)
    with pytest.raises(ValueError, match="prompt_syntax"):
        sd15_pipe.encode_prompt("x", prompt_syntax="compel")
    with pytest.raises(ValueError, match="clip_skip"):
        sd15_pipe.encode_prompt("x", clip_skip=0)


def test_sdxl_chunks_both_encoders_pooled_from_the_first_chunk(tiny_sdxl: Path) -> None:
    from transformers import CLIPTokenizer as HFTokenizer

    from mlx_img2img import Img2ImgPipeline

    pipe = Img2ImgPipeline.from_pretrained(tiny_sdxl)
    prompt, fragments = CASES["long"]
    conditioning = pipe.encode_prompt(prompt, "ugly")
    parts, pooled = [], None
    for sub in ("", "_2"):
        hf_tokenizer = HFTokenizer.from_pretrained(tiny_sdxl / f"tokenizer{sub}")
        hf, _ = load_encoder(tiny_sdxl / f"text_encoder{sub}")
        states, pooled = reference_conditioning(hf_tokenizer, hf, fragments, penultimate=True)
        parts.append(states)
    want = torch.cat(parts, dim=-1)
    assert conditioning.context.shape == (2, 3 * 77, 64)
    np.testing.assert_allclose(np.array(conditioning.context[1]), want.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.array(conditioning.pooled[1]), pooled.numpy(), atol=1e-4)
    # AUTOMATIC1111 (default settings) applies no clip skip to SDXL; neither do we.
    assert mx.array_equal(pipe.encode_prompt(prompt, "ugly", clip_skip=2).context, conditioning.context)


def test_an_embedding_is_not_split_across_chunks(clip_tokenizer: CLIPTokenizer) -> None:
    from mlx_img2img.loading.embeddings import EmbeddingTokenizer

    t = EmbeddingTokenizer.extend(clip_tokenizer, [["myemb", "myemb_1", "myemb_2"]])
    vectors = t.tokenize_ids("myemb")
    assert len(vectors) == 3
    first, second = prompt_chunks(t, " ".join(["cat"] * 73) + " (myemb:1.2) dog")
    assert first.ids[74] == t.eos_id  # 73 + 3 > 75: the embedding starts the next chunk, whole
    assert second.ids[1:6] == [*vectors, t.tokenize_ids("dog")[0], t.eos_id]
    assert second.weights[1:5] == [1.2, 1.2, 1.2, 1.0]
    assert len(prompt_chunks(t, " ".join(["cat"] * 72) + " myemb")) == 1  # 72 + 3 fits exactly


# ------------------------------------------------------------------------------------------ settings

def test_metadata_writes_and_reads_clip_skip_rng_and_syntax() -> None:
    from mlx_img2img.images import format_parameters, parse_parameters

    text = format_parameters({"prompt": "a (cat:1.2)", "steps": 4, "seed": 1, "clip_skip": 2, "rng": "torch",
                              "prompt_syntax": "plain"})
    assert text.endswith("Steps: 4, Seed: 1, Clip skip: 2, RNG: CPU, Prompt syntax: plain")
    parsed = parse_parameters(text)
    assert (parsed["prompt"], parsed["clip_skip"], parsed["rng"], parsed["prompt_syntax"]) == ("a (cat:1.2)", 2,
                                                                                               "torch", "plain")
    default = format_parameters({"prompt": "x", "steps": 4, "clip_skip": 1, "rng": "mlx", "prompt_syntax": "a1111"})
    assert default == "x\nSteps: 4"  # AUTOMATIC1111 writes neither Clip skip 1 nor its default generator
    assert "rng" not in parse_parameters("x\nSteps: 4, RNG: GPU")  # a GPU's noise cannot be reproduced


def test_cli_options_are_stored_and_honoured_by_from(tiny_sd15: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner
    from PIL import Image, PngImagePlugin

    from mlx_img2img.cli import main
    from mlx_img2img.images import read_metadata

    monkeypatch.chdir(tmp_path)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save("in.png")

    def run(*args: object) -> np.ndarray:
        result = CliRunner().invoke(main, ["run", "-m", str(tiny_sd15), "in.png", "--steps", "4", "--dtype", "float32",
                                           "--seed", "5", *map(str, args)])
        assert result.exit_code == 0, result.output
        with Image.open(args[args.index("-o") + 1]) as im:
            return np.asarray(im.convert("RGB"))

    first = run("-p", "a (castle:1.3) BREAK on a hill", "--clip-skip", 2, "--rng", "torch", "-o", "first.png")
    text, settings = read_metadata("first.png")
    assert (settings["clip_skip"], settings["rng"]) == (2, "torch") and "prompt_syntax" not in settings
    assert "Clip skip: 2, RNG: CPU" in text
    assert np.array_equal(run("--stored-model", "--from", "first.png", "-o", "again.png"), first)
    assert not np.array_equal(run("--from", "first.png", "--clip-skip", 1, "-o", "skip1.png"), first)
    # An AUTOMATIC1111 PNG's Clip skip and CPU generator are taken by --from.
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a (castle:1.3) BREAK on a hill\nSteps: 4, Sampler: Euler a, Seed: 5, Clip skip: 2, "
                  "RNG: CPU, Denoising strength: 0.65")
    Image.new("RGB", (8, 8)).save("a1111.png", pnginfo=info)
    run("--from", "a1111.png", "-o", "from_a1111.png")
    _, settings = read_metadata("from_a1111.png")
    assert (settings["clip_skip"], settings["rng"]) == (2, "torch")
    assert settings["prompt"] == "a (castle:1.3) BREAK on a hill"
    result = CliRunner().invoke(main, ["run", "-m", str(tiny_sd15), "in.png", "-p", "x", "--rng", "numpy"])
    assert result.exit_code == 2 and "numpy" in result.output
