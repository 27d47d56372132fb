"""Tokenizer and text encoders against independent references on the same random weights:
open_clip's tokenizer and text tower, transformers' CLIPTokenizer and CLIPTextModel, and
diffusers' own single-file converters. Float32, CPU, nothing downloaded."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging

import open_clip
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
from torch.func import functional_call
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm.conditioning import ClipTokenizer, TextEncoder, TextEncoderConfig
from ldm.config import config_from_dict
from ldm.io.text_keys import (
    hf_to_openclip,
    infer_text_config,
    openclip_to_hf,
    text_config_from_hf,
    text_config_to_hf,
)

# ftfy (run by open_clip, by the original CLIP and by transformers' old slow tokenizer) rewrites
# these; transformers >= 5's CLIPTokenizer does not, so only open_clip is compared on them.
FTFY_PROMPTS = ["“curly” ‘quotes’ don’t", "&amp; html &lt;entities&gt;", "ﬁ ligature ＡＢＣ fullwidth"]
PROMPTS = [
    "a photo of a cat",
    "A Photo Of A CAT, in MiXeD CaSe",
    "  extra   spaces\tand\nnewlines  ",
    "",
    "crème brûlée à la café, naïve façade",
    "emoji 🐱🚀 party 🎉",
    "numbers 12345 and 3.14159 and 1,000,000",
    "hello, world; (parens) [brackets] {braces}",
    "it's, don't, we're, they'll, I'd",
    "日本語のテキスト and 한국어",
    "Ünïcödé ÀÉÎÕÜ Straße İstanbul",
    "C++ & C# <html> tags #hashtag @mention $5 100%",
    "quotes \"double\" and 'single' -- dashes - and / slashes",
    "snake_case kebab-case CamelCase",
    "a" * 300,
    " ".join(["word"] * 100),  # 100 tokens: truncated
    "an astronaut riding a horse, " * 8,  # truncated
    *FTFY_PROMPTS,
]
HF_PROMPTS = [p for p in PROMPTS if p not in FTFY_PROMPTS]
SEQ = 77


@pytest.fixture(scope="module")
def v1_tokenizer() -> ClipTokenizer:
    return ClipTokenizer()


@pytest.fixture(scope="module")
def token_ids(v1_tokenizer: ClipTokenizer) -> torch.Tensor:
    return v1_tokenizer(["a red circle in the top left", "", "emoji 🐱 crème brûlée, 3.14!"])


def _with_layer(encoder: TextEncoder, layer: str) -> TextEncoder:
    """A shallow copy of ``encoder`` (sharing its weights) that reads another layer."""
    other = copy.copy(encoder)
    other.config = dataclasses.replace(encoder.config, layer=layer)
    return other


def _hf_ids(folder, prompts: list[str]) -> torch.Tensor:
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    return tokenizer(prompts, padding="max_length", max_length=SEQ, truncation=True, return_tensors="pt").input_ids


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_equals_open_clip_with_zero_padding() -> None:
    assert len(PROMPTS) == 20
    ours = ClipTokenizer(pad_token_id=0)(PROMPTS)
    assert ours.shape == (20, SEQ) and ours.dtype == torch.long
    torch.testing.assert_close(ours, open_clip.tokenize(PROMPTS), rtol=0, atol=0)
    torch.testing.assert_close(ours, open_clip.tokenizer.SimpleTokenizer()(PROMPTS), rtol=0, atol=0)


def test_tokenizer_equals_transformers_via_save_hf(v1_tokenizer: ClipTokenizer, tmp_path) -> None:
    ours = v1_tokenizer(HF_PROMPTS)
    torch.testing.assert_close(ours, _hf_ids(v1_tokenizer.save_hf(tmp_path), HF_PROMPTS), rtol=0, atol=0)
    assert (ours[3, 2:] == 49407).all()  # "" -> <start> <end> then end-token padding (SD v1)


def test_save_hf_sd_v2_zero_padding_round_trip(tmp_path) -> None:
    v2 = ClipTokenizer(pad_token_id=0)
    folder = v2.save_hf(tmp_path)
    assert json.loads((folder / "tokenizer_config.json").read_text())["pad_token"] == "!"  # as diffusers SD v2
    # transformers treats the pad token "!" as special and splits "!!!" into three of them, so
    # prompts with "!" differ there (as in diffusers' own SD v2 tokenizer); none of ours have one.
    prompts = [p for p in HF_PROMPTS if "!" not in p]
    torch.testing.assert_close(v2(prompts), _hf_ids(folder, prompts), rtol=0, atol=0)
    loaded = ClipTokenizer.from_hf(folder)
    assert (loaded.pad_token_id, loaded.max_length) == (0, SEQ)


def test_truncation_keeps_end_token_and_warns(v1_tokenizer: ClipTokenizer, caplog) -> None:
    prompt = " ".join(["word"] * 100)
    with caplog.at_level(logging.WARNING, logger="ldm.conditioning.tokenizer"):
        ids = v1_tokenizer([prompt, "short"])
    assert ids[0, 0] == 49406 and ids[0, -1] == 49407 and (ids[0, 1:-1] != 49407).all()
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "word word" in message and "dropped its last 25 of 100 tokens" in message


# ---------------------------------------------------------------- SD v1: CLIP (transformers)


def _v1_reference(layers: int = 2) -> CLIPTextModel:
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=layers,
                            num_attention_heads=12, max_position_embeddings=SEQ, hidden_act="quick_gelu")
    return CLIPTextModel(config).eval()


@pytest.fixture(scope="module")
def v1_pair() -> tuple[TextEncoder, CLIPTextModel]:
    reference = _v1_reference()
    ours = TextEncoder(TextEncoderConfig(layers=2)).eval()
    ours.load_state_dict({"text_model." + k: v for k, v in reference.state_dict().items()})
    return ours, reference


@torch.no_grad()
def test_clip_equals_transformers(v1_pair, token_ids: torch.Tensor) -> None:
    ours, reference = v1_pair
    context = ours(token_ids)
    assert context.shape == (3, SEQ, 768)
    assert (context - reference(input_ids=token_ids).last_hidden_state).abs().max() <= 1e-5


@torch.no_grad()
def test_clip_penultimate_is_clip_skip(v1_pair, token_ids: torch.Tensor) -> None:
    ours, reference = v1_pair
    skip = _with_layer(ours, "penultimate")
    hidden = reference(input_ids=token_ids, output_hidden_states=True).hidden_states[-2]
    assert (skip(token_ids) - reference.final_layer_norm(hidden)).abs().max() <= 1e-5


@torch.no_grad()
def test_clip_original_layout_through_diffusers(v1_pair, token_ids: torch.Tensor) -> None:
    ours, _ = v1_pair
    checkpoint = {"cond_stage_model.transformer." + k: v for k, v in ours.state_dict().items()}
    converted = convert_ldm_clip_checkpoint(checkpoint)
    # diffusers' own glue (create_diffusers_clip_model_from_ldm) for the flat transformers >= 5.6 model
    converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    model = CLIPTextModel(CLIPTextConfig(**text_config_to_hf(ours.config))).eval()
    model.load_state_dict(converted)  # strict
    assert (model(input_ids=token_ids).last_hidden_state - ours(token_ids)).abs().max() <= 1e-5
    assert infer_text_config(ours.state_dict(), "clip") == ours.config


# ---------------------------------------------------------------- SD v2: OpenCLIP


def _open_clip_reference(tmp_path_factory, width: int, heads: int, layers: int) -> torch.nn.Module:
    """An open_clip CLIP with SD v2's text tower shape (ViT-H-14's text_cfg, fewer layers)."""
    name = f"sd2-text-test-{width}-{layers}"
    text_cfg = {"context_length": SEQ, "vocab_size": 49408, "width": width, "heads": heads, "layers": layers}
    vision_cfg = {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16}
    path = tmp_path_factory.mktemp("open_clip_cfg") / f"{name}.json"
    path.write_text(json.dumps({"embed_dim": width, "vision_cfg": vision_cfg, "text_cfg": text_cfg}))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    return open_clip.create_model(name, pretrained=None).eval()


def _v2_pair(tmp_path_factory, width: int, heads: int, layers: int) -> tuple[TextEncoder, torch.nn.Module]:
    reference = _open_clip_reference(tmp_path_factory, width, heads, layers)
    config = TextEncoderConfig(kind="openclip", width=width, heads=heads, layers=layers, act="gelu",
                               layer="penultimate")
    ours = TextEncoder(config).eval()
    # SD v2's FrozenOpenCLIPEmbedder deletes `visual`; the rest is what its files store
    ours.load_state_dict({k: v for k, v in reference.state_dict().items() if not k.startswith("visual.")})
    return ours, reference


@pytest.fixture(scope="module")
def v2_pair(tmp_path_factory) -> tuple[TextEncoder, torch.nn.Module]:
    return _v2_pair(tmp_path_factory, width=1024, heads=16, layers=3)


@pytest.fixture(scope="module")
def v2_tokens() -> torch.Tensor:
    return ClipTokenizer(pad_token_id=0)(["a red circle in the top left", "", "emoji 🐱 crème brûlée, 3.14!"])


@torch.no_grad()
@pytest.mark.slow
def test_openclip_penultimate_equals_open_clip(v2_pair, v2_tokens: torch.Tensor) -> None:
    ours, reference = v2_pair
    layers = ours.config.layers
    out = reference.forward_intermediates(text=v2_tokens, text_indices=[layers - 2], normalize_intermediates=True,
                                          intermediates_only=True)
    context = ours(v2_tokens)
    assert context.shape == (3, SEQ, 1024)
    assert (context - out["text_intermediates"][0]).abs().max() <= 1e-4


@torch.no_grad()
@pytest.mark.slow
def test_openclip_through_hf_keys_and_diffusers(v2_pair, v2_tokens: torch.Tensor) -> None:
    ours, _ = v2_pair
    layers = ours.config.layers
    hf_config = CLIPTextConfig(**text_config_to_hf(ours.config))
    assert hf_config.num_hidden_layers == layers - 1

    model = CLIPTextModel(hf_config).eval()
    hf_sd = openclip_to_hf(ours.state_dict(), layers)
    model.load_state_dict({k.removeprefix("text_model."): v for k, v in hf_sd.items()})
    assert (model(input_ids=v2_tokens).last_hidden_state - ours(v2_tokens)).abs().max() <= 1e-4

    checkpoint = {"cond_stage_model.model." + k: v for k, v in ours.state_dict().items()}
    converted = convert_open_clip_checkpoint(model, checkpoint)  # reads only model.config
    converted = {k.removeprefix("text_model."): v for k, v in converted.items()}  # diffusers' own glue, as above
    missing, unexpected = model.load_state_dict(converted, strict=False)  # missing == []: all replaced
    # diffusers drops the unused last block by a hard-coded key list for ViT-H's 24 blocks
    # (resblocks.23); in this 3-block model that block is resblocks.2, which diffusers' own loader
    # (load_model_dict_into_meta) ignores because the 2-layer model has no such parameters.
    assert missing == [] and {k.split(".")[2] for k in unexpected} <= {str(layers - 1)}
    assert (model(input_ids=v2_tokens).last_hidden_state - ours(v2_tokens)).abs().max() <= 1e-4


@torch.no_grad()
def test_openclip_24_blocks_through_diffusers_without_glue(tmp_path_factory, v2_tokens: torch.Tensor) -> None:
    """With 24 blocks (ViT-H's depth, narrow) diffusers' hard-coded key list applies exactly."""
    ours, _ = _v2_pair(tmp_path_factory, width=64, heads=4, layers=24)
    hf_config = CLIPTextConfig(**text_config_to_hf(ours.config))
    checkpoint = {"cond_stage_model.model." + k: v for k, v in ours.state_dict().items()}
    converted = convert_open_clip_checkpoint(CLIPTextModel(hf_config), checkpoint)
    model = CLIPTextModel(hf_config).eval()
    model.load_state_dict({k.removeprefix("text_model."): v for k, v in converted.items()})  # strict
    assert (model(input_ids=v2_tokens).last_hidden_state - ours(v2_tokens)).abs().max() <= 1e-5


@torch.no_grad()
@pytest.mark.slow
def test_hf_to_openclip_round_trip(v2_pair, v2_tokens: torch.Tensor) -> None:
    ours, _ = v2_pair
    layers = ours.config.layers
    hf_sd = openclip_to_hf(ours.state_dict(), layers)
    back = hf_to_openclip(hf_sd)
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in ours.state_dict().items()}
    kept = [k for k in back if f"resblocks.{layers - 1}." not in k and k != "text_projection"]
    assert all(torch.equal(back[k], ours.state_dict()[k]) for k in kept)
    config = text_config_from_hf(CLIPTextConfig(**text_config_to_hf(ours.config)).to_dict(), kind="openclip")
    assert config == ours.config == infer_text_config(back, "openclip")
    context = functional_call(ours, back, (v2_tokens,))  # ours with `back`'s weights
    assert (context - ours(v2_tokens)).abs().max() <= 1e-5
    last = functional_call(_with_layer(ours, "last"), back, (v2_tokens,))
    assert (last - context).abs().max() <= 1e-5  # the filled last block is an identity


# ---------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"kind": "bert"}, ["kind", "'bert'", "'clip'", "'openclip'"]),
        ({"act": "relu"}, ["act", "'relu'", "'quick_gelu'", "'gelu'"]),
        ({"layer": "middle"}, ["layer", "'middle'", "'last'", "'penultimate'"]),
        ({"width": 0}, ["width", "0", "[1, 8192]"]),
        ({"layers": 10**9}, ["layers", "1000000000", "[1, 256]"]),  # would build layers until memory runs out
        ({"heads": 5}, ["heads", "5", "divisor of 768"]),
        ({"mlp_ratio": -1.0}, ["mlp_ratio", "-1.0", "(0, 16]"]),
        ({"layers": 1, "layer": "penultimate"}, ["layers", "1", "[2, 256]"]),
    ],
)
def test_bad_config_names_field_value_allowed(kwargs: dict, words: list[str]) -> None:
    with pytest.raises(ValueError) as error:
        TextEncoderConfig(**kwargs)
    assert all(word in str(error.value) for word in words), str(error.value)


def test_bad_config_key_and_tokenizer_args() -> None:
    with pytest.raises(ValueError, match="unknown key 'widht'; allowed keys: .*vocab_size, width"):
        config_from_dict(TextEncoderConfig, {"widht": 768})
    with pytest.raises(ValueError, match="pad_token_id=-1"):
        ClipTokenizer(pad_token_id=-1)
    with pytest.raises(ValueError, match="kind='t5'.*allowed: 'clip', 'openclip'"):
        infer_text_config({}, "t5")
