"""Prompts as the SD WebUIs encode them: A1111's weighting syntax, 75-token chunks, clip skip.

The parser against A1111's documented results; the encodings against transformers' CLIPTextModel
and open_clip on the same random weights, computed here step by step. Float32, CPU, nothing downloaded.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from sd_fixtures import randomize
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.conditioning import ClipTokenizer, TextEncoder, TextEncoderConfig
from ldm.conditioning.prompt_weights import BREAK, has_weighting, parse_prompt_attention
from ldm.conditioning.prompts import chunk_prompt, encode_prompt_pair, encode_prompts, pad_to_same_chunks
from ldm.conditioning.text import clip_skip_from_diffusers

SEQ = 77
WIDTH, HEADS, LAYERS = 64, 4, 3
# Single-token words (checked below), so that a prompt of n words is n tokens.
WORDS = ("red blue green cat dog house tree river mountain sky cloud sun moon star city street car boat "
         "bird fish flower garden window door table chair book lamp road bridge forest lake beach ocean").split()


def _print_max(label: str, diff: torch.Tensor) -> float:
    value = float(diff.abs().max())
    print(f"\n[max |diff|] {label}: {value:.3g}")
    return value


# ---------------------------------------------------------------- parser (A1111 prompt_parser semantics)

PARSER_CASES = [
    # A1111's own doctests (modules/prompt_parser.py), weights exactly as A1111 computes them
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    # the documented rules: ( ) x1.1, [ ] /1.1, (x:w), nesting multiplies, escapes are literal
    ("(word)", [("word", 1.1)]),
    ("((word))", [("word", 1.2100000000000002)]),  # 1.1 * 1.1
    ("[word]", [("word", 0.9090909090909091)]),  # 1 / 1.1
    ("[[word]]", [("word", 0.8264462809917354)]),  # (1 / 1.1)²
    ("(word:1.3)", [("word", 1.3)]),
    ("(word: 1.3 )", [("word", 1.3)]),
    ("(word:-0.5)", [("word", -0.5)]),
    ("((word:1.5))", [("word", 1.6500000000000001)]),  # 1.5 * 1.1
    ("(a (b:2) c)", [("a ", 1.1), ("b", 2.2), (" c", 1.1)]),
    ("a (red:1.5) [(blue)]", [("a ", 1.0), ("red", 1.5), (" blue", 1.0)]),  # [(x)] = 1.1 / 1.1 = 1
    ("\\(word\\) \\[x\\]", [("(word) [x]", 1.0)]),
    ("a\\\\b", [("a\\b", 1.0)]),
    ("(word:1.3", [("word:1.3", 1.1)]),  # no ")" after the weight: text, in an unclosed "("
    ("a:1.2) b ]", [("a:1.2) b ]", 1.0)]),  # closers with nothing open are text
    ("ratio 16:9, f/2.8", [("ratio 16:9, f/2.8", 1.0)]),
    ("", [("", 1.0)]),
    ("a cat BREAK a dog", [("a cat", 1.0), BREAK, ("a dog", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), BREAK, ("b", 1.1)]),  # A1111 would weight the marker into the word "break"
]


@pytest.mark.parametrize(("text", "expected"), PARSER_CASES)
def test_parser_matches_a1111(text: str, expected: list) -> None:
    assert parse_prompt_attention(text) == expected


def test_parser_bad_weight_and_has_weighting() -> None:
    with pytest.raises(ValueError, match=r"weight '1\.2\.3' is not a number"):
        parse_prompt_attention("(a:1.2.3)")
    assert not has_weighting("a photo of a cat, 16:9, 50% off!")
    assert all(has_weighting(t) for t in ("(a)", "[a]", "a\\(", "a BREAK b", "(a:1)"))


def test_token_weights_multiply_per_token(tokenizer: ClipTokenizer) -> None:
    (chunk,) = chunk_prompt(tokenizer, "a ((red)) [[cat]] (astronaut riding:1.3)")
    n = len(tokenizer.encode("a red cat astronaut riding"))
    assert chunk.token_ids[: n + 2] == (49406, *tokenizer.encode("a red cat astronaut riding"), 49407)
    riding = len(tokenizer.encode("astronaut riding"))
    assert chunk.weights[: n + 2] == (1.0, 1.0, 1.1 * 1.1, 1 / 1.1 / 1.1, *[1.3] * riding, 1.0)
    assert set(chunk.weights[n + 2:]) == {1.0} and len(chunk.weights) == len(chunk.token_ids) == SEQ


# ---------------------------------------------------------------- fixtures: random weights, real layouts


@pytest.fixture(scope="module")
def tokenizer() -> ClipTokenizer:
    return ClipTokenizer()


@pytest.fixture(scope="module")
def clip_pair() -> tuple[TextEncoder, CLIPTextModel]:
    """Ours and transformers' CLIPTextModel with the same random weights (SD v1 layout, narrow)."""
    config = CLIPTextConfig(vocab_size=49408, hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=LAYERS,
                            num_attention_heads=HEADS, max_position_embeddings=SEQ, hidden_act="quick_gelu")
    reference = CLIPTextModel(config).eval()
    randomize(reference, 1)
    ours = TextEncoder(TextEncoderConfig(width=WIDTH, layers=LAYERS, heads=HEADS)).eval()
    ours.text_model.load_state_dict(getattr(reference, "text_model", reference).state_dict())  # strict
    return ours, reference


def _words(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def test_words_are_single_tokens(tokenizer: ClipTokenizer) -> None:
    assert all(len(tokenizer.encode(w)) == 1 for w in WORDS)
    assert len(tokenizer.encode(_words(200))) == 200


# ---------------------------------------------------------------- (b) chunks of 75 tokens


@torch.no_grad()
def test_long_prompt_is_chunked_not_cut(clip_pair, tokenizer: ClipTokenizer) -> None:
    ours, _ = clip_pair
    words = _words(200).split()
    context = encode_prompts(ours, tokenizer, " ".join(words))
    assert context.shape == (1, 3 * SEQ, WIDTH)  # 231
    chunks = [" ".join(words[i:i + 75]) for i in range(0, 200, 75)]  # 75, 75, 50 tokens
    alone = [ours(tokenizer([c])) for c in chunks]
    assert torch.equal(context[:, :SEQ], alone[0])  # the first 75 tokens: today's (truncated) encoding
    _print_max("chunk 1 vs first 75 tokens alone", context[:, :SEQ] - alone[0])
    for k in (1, 2):
        _print_max(f"chunk {k + 1} vs its tokens alone", context[:, k * SEQ:(k + 1) * SEQ] - alone[k])
        assert (context[:, k * SEQ:(k + 1) * SEQ] - alone[k]).abs().max() <= 1e-6
        # the later chunks carry the rest of the prompt: not a copy of the first, not padding
        assert (context[:, k * SEQ:(k + 1) * SEQ] - alone[0]).abs().max() > 1e-2
    empty = ours(tokenizer([""]))
    assert (context[:, 2 * SEQ:] - empty).abs().max() > 1e-2


def test_chunk_boundaries(tokenizer: ClipTokenizer) -> None:
    words = _words(150).split()
    exactly = chunk_prompt(tokenizer, " ".join(words[:75]))
    assert len(exactly) == 1 and exactly[0].token_ids == tuple(tokenizer([" ".join(words[:75])])[0].tolist())
    assert len(chunk_prompt(tokenizer, " ".join(words[:76]))) == 2
    assert len(chunk_prompt(tokenizer, " ".join(words))) == 2  # 150 = 2 full chunks, no empty third
    (empty,) = chunk_prompt(tokenizer, "")
    assert empty.token_ids == tuple(tokenizer([""])[0].tolist())


def test_comma_backtrack(tokenizer: ClipTokenizer) -> None:
    """A full chunk whose last comma is within 20 tokens ends after that comma (A1111's comma_padding_backtrack)."""
    words = _words(100, seed=1).split()
    prompt = " ".join(words[:70]) + ", " + " ".join(words[70:])  # comma = token 71 of 101
    first, second = chunk_prompt(tokenizer, prompt)
    ids = tokenizer.encode(prompt)
    assert first.token_ids == (49406, *ids[:71], 49407, *[49407] * 4)  # the 70 words and the comma
    assert second.token_ids[1:32] == (*ids[71:], 49407)
    first, _ = chunk_prompt(tokenizer, prompt, comma_backtrack=0)  # off: a plain cut after 75 tokens
    assert first.token_ids == (49406, *ids[:75], 49407)
    far = " ".join(words[:50]) + ", " + " ".join(words[50:])  # comma 25 tokens before the cut: no backtrack
    assert chunk_prompt(tokenizer, far)[0].token_ids == (49406, *tokenizer.encode(far)[:75], 49407)


@torch.no_grad()
def test_break_starts_a_chunk(clip_pair, tokenizer: ClipTokenizer) -> None:
    ours, _ = clip_pair
    context = encode_prompts(ours, tokenizer, "a red cat BREAK a blue dog")
    assert context.shape == (1, 2 * SEQ, WIDTH)
    assert torch.equal(context[:, :SEQ], ours(tokenizer(["a red cat"])))
    assert torch.equal(context[:, SEQ:], ours(tokenizer(["a blue dog"])))


# ---------------------------------------------------------------- cond / uncond of equal length


@torch.no_grad()
def test_negative_is_padded_with_empty_chunks(clip_pair, tokenizer: ClipTokenizer) -> None:
    ours, _ = clip_pair
    empty = ours(tokenizer([""]))
    long, short = _words(100), "blurry"
    cond, uncond = encode_prompt_pair(ours, tokenizer, long, "")
    assert cond.shape == uncond.shape == (1, 2 * SEQ, WIDTH)
    assert torch.equal(uncond[:, :SEQ], empty) and torch.equal(uncond[:, SEQ:], empty)
    assert torch.equal(cond, encode_prompts(ours, tokenizer, long))
    cond, uncond = encode_prompt_pair(ours, tokenizer, short, long)  # a long negative pads the prompt
    assert cond.shape == uncond.shape == (1, 2 * SEQ, WIDTH)
    assert torch.equal(cond[:, :SEQ], ours(tokenizer([short]))) and torch.equal(cond[:, SEQ:], empty)
    # the tensor helper (for prompt_embeds=) gives the same
    padded = pad_to_same_chunks(ours(tokenizer([short])), encode_prompts(ours, tokenizer, long), empty)
    assert torch.equal(padded[0], cond) and torch.equal(padded[1], uncond)
    with pytest.raises(ValueError, match=r"cond has shape \(1, 70, 64\); expected \(B, 77·k, 64\)"):
        pad_to_same_chunks(cond[:, :70], uncond, empty)


@torch.no_grad()
def test_batch_pads_shorter_prompts(clip_pair, tokenizer: ClipTokenizer) -> None:
    ours, _ = clip_pair
    long = _words(90)
    context = encode_prompts(ours, tokenizer, ["a red cat", long])
    assert context.shape == (2, 2 * SEQ, WIDTH)
    assert (context[1:] - encode_prompts(ours, tokenizer, long)).abs().max() <= 1e-6
    assert (context[:1, SEQ:] - ours(tokenizer([""]))).abs().max() <= 1e-6


# ---------------------------------------------------------------- (c) weights against transformers directly


@torch.no_grad()
@pytest.mark.parametrize(("prompt", "weight"), [("a (red:1.5) circle", 1.5), ("a ((red)) circle", 1.1 * 1.1),
                                                ("a [red] circle", 1 / 1.1), ("a (red:0.3) circle", 0.3)])
def test_weight_equals_transformers_reweighted(clip_pair, tokenizer: ClipTokenizer, prompt: str,
                                               weight: float) -> None:
    ours, reference = clip_pair
    ids = tokenizer(["a red circle"])  # the project's tokenizer, the prompt without syntax
    z = reference(input_ids=ids).last_hidden_state  # (1, 77, D), transformers directly
    original_mean = z.mean()
    position = ids[0].tolist().index(tokenizer.encode("red")[0])
    z[:, position] *= weight
    expected = z * (original_mean / z.mean())  # A1111's "Original" emphasis: restore the mean

    context = encode_prompts(ours, tokenizer, prompt)
    assert _print_max(f"{prompt!r} vs transformers reweighted", context - expected) <= 1e-6
    plain = encode_prompts(ours, tokenizer, "a red circle")
    assert (context - plain).abs().max() > 1e-3  # the weight changes the context
    assert torch.allclose(context.mean(), plain.mean(), rtol=1e-5, atol=1e-7)


@torch.no_grad()
def test_weights_in_second_chunk(clip_pair, tokenizer: ClipTokenizer) -> None:
    ours, reference = clip_pair
    head = _words(75, seed=2)
    context = encode_prompts(ours, tokenizer, head + " a (red circle:1.4)")
    assert torch.equal(context[:, :SEQ], ours(tokenizer([head])))  # first chunk: no weights, untouched
    ids = tokenizer(["a red circle"])
    z = reference(input_ids=ids).last_hidden_state
    original_mean = z.mean()
    z[:, 2:4] *= 1.4  # <start> a [red circle] <end>
    expected = z * (original_mean / z.mean())
    assert _print_max("weighted second chunk vs transformers", context[:, SEQ:] - expected) <= 1e-6


# ---------------------------------------------------------------- (d) clip skip


@torch.no_grad()
@pytest.mark.parametrize("clip_skip", [1, 2, 3])
def test_clip_skip_equals_transformers_hidden_states(clip_pair, tokenizer: ClipTokenizer, clip_skip: int) -> None:
    ours, reference = clip_pair
    prompts = ["a red circle in the top left", ""]
    out = reference(input_ids=tokenizer(prompts), output_hidden_states=True)
    expected = reference.final_layer_norm(out.hidden_states[-clip_skip])  # A1111: CLIP_stop_at_last_layers
    if clip_skip == 1:
        expected = out.last_hidden_state
    context = encode_prompts(ours, tokenizer, prompts, clip_skip=clip_skip)
    assert _print_max(f"clip_skip={clip_skip} vs transformers", context - expected) <= 1e-6
    if clip_skip > 1:
        assert (context - out.last_hidden_state).abs().max() > 1e-2  # a different layer, not the last


@torch.no_grad()
def test_clip_skip_default_and_bad_values(clip_pair, tokenizer: ClipTokenizer) -> None:
    ours, _ = clip_pair
    ids = tokenizer(["a cat"])
    assert torch.equal(ours(ids), ours(ids, clip_skip=1))
    for bad in (0, LAYERS + 1, 1.5, True):
        with pytest.raises(ValueError, match=rf"clip_skip={bad!r}.*\[1, {LAYERS}\]"):
            encode_prompts(ours, tokenizer, "a cat", clip_skip=bad)


@torch.no_grad()
@pytest.mark.parametrize("diffusers_clip_skip", [1, 2])
def test_diffusers_clip_skip_counts_one_less(clip_pair, tokenizer: ClipTokenizer, diffusers_clip_skip: int) -> None:
    """diffusers' StableDiffusionPipeline.encode_prompt: hidden_states[-(clip_skip + 1)] then final_layer_norm."""
    ours, reference = clip_pair
    ids = tokenizer(["a red circle"])
    hidden = reference(input_ids=ids, output_hidden_states=True).hidden_states
    expected = reference.final_layer_norm(hidden[-(diffusers_clip_skip + 1)])
    clip_skip = clip_skip_from_diffusers(diffusers_clip_skip, ours.config)
    assert clip_skip == diffusers_clip_skip + 1
    assert (encode_prompts(ours, tokenizer, "a red circle", clip_skip=clip_skip) - expected).abs().max() <= 1e-6
    assert clip_skip_from_diffusers(None, ours.config) is None


@pytest.fixture(scope="module")
def openclip_pair(tmp_path_factory) -> tuple[TextEncoder, torch.nn.Module]:
    """Ours (kind openclip, SD v2's penultimate default) and open_clip's CLIP with the same random weights."""
    import open_clip

    name = f"sd2-prompts-test-{WIDTH}-{LAYERS}"
    text_cfg = {"context_length": SEQ, "vocab_size": 49408, "width": WIDTH, "heads": HEADS, "layers": LAYERS}
    vision_cfg = {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16}
    path = tmp_path_factory.mktemp("open_clip_cfg") / f"{name}.json"
    path.write_text(json.dumps({"embed_dim": WIDTH, "vision_cfg": vision_cfg, "text_cfg": text_cfg}))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    reference = open_clip.create_model(name, pretrained=None).eval()
    config = TextEncoderConfig(kind="openclip", width=WIDTH, heads=HEADS, layers=LAYERS, act="gelu",
                               layer="penultimate")
    ours = TextEncoder(config).eval()
    ours.load_state_dict({k: v for k, v in reference.state_dict().items() if not k.startswith("visual.")})
    return ours, reference


@torch.no_grad()
@pytest.mark.parametrize("clip_skip", [None, 1, 2, 3])
def test_openclip_clip_skip_equals_open_clip(openclip_pair, clip_skip: int | None) -> None:
    """SD v2: clip_skip=n is open_clip's block n-th from the end through ln_final; None is SD v2's 2."""
    ours, reference = openclip_pair
    tokenizer = ClipTokenizer(pad_token_id=0)
    ids = tokenizer(["a red circle in the top left", ""])
    index = LAYERS - (2 if clip_skip is None else clip_skip)
    expected = reference.forward_intermediates(text=ids, text_indices=[index], normalize_intermediates=True,
                                               intermediates_only=True)["text_intermediates"][0]
    context = encode_prompts(ours, tokenizer, ["a red circle in the top left", ""], clip_skip=clip_skip)
    assert _print_max(f"openclip clip_skip={clip_skip} vs open_clip", context - expected) <= 1e-5
    assert clip_skip_from_diffusers(1, ours.config) == 3  # diffusers' SD v2 encoder lacks the last block


# ---------------------------------------------------------------- (e) prompts without syntax: bitwise as before

PLAIN = ["a photo of a cat", "A Photo Of A CAT, in MiXeD CaSe", "  extra   spaces\tand\nnewlines  ", "",
         "crème brûlée à la café", "emoji 🐱🚀 party 🎉", "numbers 12345 and 3.14159 and 1,000,000",
         "ratio 16:9: a colon, {braces}", "it's, don't, we're", "C++ & C# <html> #hashtag @mention $5 100%",
         "an astronaut riding a horse, " * 5]


@torch.no_grad()
def test_plain_prompts_bitwise_unchanged(clip_pair, openclip_pair, tokenizer: ClipTokenizer) -> None:
    assert not any(has_weighting(p) for p in PLAIN)
    assert all(len(tokenizer.encode(p)) <= 75 for p in PLAIN)
    for encoder, tok in ((clip_pair[0], tokenizer), (openclip_pair[0], ClipTokenizer(pad_token_id=0))):
        before = encoder(tok(PLAIN))  # what the pipelines compute today
        after = encode_prompts(encoder, tok, PLAIN)
        assert after.shape == before.shape and torch.equal(after, before)
        assert torch.equal(encode_prompts(encoder, tok, PLAIN[1]), encoder(tok([PLAIN[1]])))
        cond, uncond = encode_prompt_pair(encoder, tok, PLAIN[:3], ["", "", "blurry"])
        assert torch.equal(cond, before[:3]) and torch.equal(uncond, encoder(tok(["", "", "blurry"])))
    # a weighted prompt beside plain ones leaves the plain rows untouched
    ours = clip_pair[0]
    mixed = encode_prompts(ours, tokenizer, ["a photo of a cat", "a (photo:1.2) of a dog"])
    assert torch.equal(mixed[:1], ours(tokenizer(["a photo of a cat", "a photo of a dog"]))[:1])
