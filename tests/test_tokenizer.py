"""CLIP tokenizer: bundled vocabulary, diffusers folder layout, serialisation, parity with transformers.

transformers is the reference here only; the tokenizer it is compared with is built from the
vocab.json/merges.txt we write to a tmp folder, so nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.prompt import encode_prompt
from runtime.tokenizer import BOS_TOKEN, ClipTokenizer, TokenizerFileError

PROMPTS = [
    "a photo of a cat",
    "A Photo Of A CAT",
    "",
    " ",
    "   leading and trailing   ",
    "multiple    spaces\tand\ttabs\nand\n\nnewlines",
    "Hello, World!!! What's up? It's 12:30, isn't it?",
    "they're we've I'm you'll he'd don't",
    "DON'T SHOUT'S",
    "3.14159 and 1,000,000 and 2024-01-01 x264 1girl",
    "punctuation: ;:!?.,/\\|@#$%^&*()[]{}<>~`'\"-_=+",
    "...---...!!!???",
    "naïve café résumé über straße",
    "Ｆｕｌｌｗｉｄｔｈ ｔｅｘｔ",
    "e\u0301 combining vs é precomposed",
    "東京タワー 夜景 한국어 русский текст العربية",
    "emoji 😀🎨🔥 and flags 🇯🇵",
    "masterpiece, best quality, (ultra detailed), 8k uhd, dslr",
    "<|startoftext|> special <|endoftext|> tokens",
    "<|ENDOFTEXT|> upper",
    "zero\u200bwidth and non\u00a0breaking space",
    "photorealistic hyperdetailed octane render trending on artstation",
]




@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory: pytest.TempPathFactory, tok: ClipTokenizer) -> Path:
    folder = tmp_path_factory.mktemp("sd1") / "tokenizer"
    tok.save_folder(folder)
    return folder


@pytest.fixture(scope="module")
def sd2_folder(tmp_path_factory: pytest.TempPathFactory, tok_sd2: ClipTokenizer) -> Path:
    folder = tmp_path_factory.mktemp("sd2") / "tokenizer"
    tok_sd2.save_folder(folder)
    return folder


@pytest.fixture(scope="module")
def hf_sd1(sd1_folder: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTokenizer.from_pretrained(str(sd1_folder))


@pytest.fixture(scope="module")
def hf_sd2(sd2_folder: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTokenizer.from_pretrained(str(sd2_folder))


def _hf_ids(hf: Any, text: str) -> list[int]:
    return list(hf(text, padding="max_length", max_length=77, truncation=True).input_ids)


def _our_ids(tok: ClipTokenizer, text: str) -> list[int]:
    ids = [tok.bos_id, *tok.tokenize(text)[:75], tok.eos_id]
    return ids + [tok.pad_id] * (77 - len(ids))


# ============================================================================= bundled vocabulary


def test_bundled_vocabulary_is_clip(tok: ClipTokenizer, tok_sd2: ClipTokenizer) -> None:
    assert tok.vocab_size == 49408
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.max_length) == (49406, 49407, 49407, 77)
    vocab, merges = tok.vocab_and_merges()
    assert len(merges) == 48894
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab[BOS_TOKEN] == 49406
    # Known ids of the OpenAI CLIP vocabulary (as used by every SD1/SD2 checkpoint).
    assert tok.tokenize("a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert tok_sd2.pad_id == 0


def test_tokenize_has_no_specials(tok: ClipTokenizer) -> None:
    assert tok.tokenize("") == []
    assert tok.tokenize("   ") == []
    assert tok.decode(tok.tokenize("A Photo of a CAT!")) == "a photo of a cat !"


# ============================================================================= folder layout


def test_save_folder_layout(sd1_folder: Path, sd2_folder: Path) -> None:
    names = {p.name for p in sd1_folder.iterdir()}
    assert names == {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"}
    config = json.loads((sd2_folder / "tokenizer_config.json").read_text())
    assert config["pad_token"] == "!" and config["model_max_length"] == 77
    assert (sd1_folder / "merges.txt").read_text().startswith("#version: 0.2\n")


def test_from_folder_round_trip(sd1_folder: Path, sd2_folder: Path, tok: ClipTokenizer) -> None:
    sd1 = ClipTokenizer.from_folder(sd1_folder)
    sd2 = ClipTokenizer.from_folder(sd2_folder)
    assert (sd1.bos_id, sd1.eos_id, sd1.pad_id, sd1.max_length) == (49406, 49407, 49407, 77)
    assert (sd2.bos_id, sd2.eos_id, sd2.pad_id, sd2.max_length) == (49406, 49407, 0, 77)
    for text in PROMPTS:
        assert sd1.tokenize(text) == tok.tokenize(text)


def test_from_folder_added_token_dicts(tmp_path: Path, sd1_folder: Path) -> None:
    # Some checkpoints store special tokens as AddedToken dicts, and a huge model_max_length.
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (folder / name).write_bytes((sd1_folder / name).read_bytes())
    config = {
        "pad_token": {"__type": "AddedToken", "content": "!", "lstrip": False},
        "bos_token": {"__type": "AddedToken", "content": BOS_TOKEN},
        "model_max_length": 1000000000000000019884624838656,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    t = ClipTokenizer.from_folder(folder)
    assert t.pad_id == 0 and t.max_length == 77


def test_from_folder_pad_from_special_tokens_map(tmp_path: Path, sd2_folder: Path) -> None:
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
        (folder / name).write_bytes((sd2_folder / name).read_bytes())
    (folder / "tokenizer_config.json").write_text("{}")
    assert ClipTokenizer.from_folder(folder).pad_id == 0


@pytest.mark.parametrize("missing", ["vocab.json", "merges.txt", "tokenizer_config.json"])
def test_from_folder_missing_file(tmp_path: Path, sd1_folder: Path, missing: str) -> None:
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        if name != missing:
            (folder / name).write_bytes((sd1_folder / name).read_bytes())
    with pytest.raises(FileNotFoundError, match=missing.replace(".", r"\.")):
        ClipTokenizer.from_folder(folder)


def test_from_folder_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ClipTokenizer.from_folder(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("vocab.json", "{not json"),
        ("vocab.json", "[1, 2, 3]"),
        ("vocab.json", '{"a": 0}'),  # no special tokens
        ("merges.txt", "#version: 0.2\na b c\n"),
        ("merges.txt", "#version: 0.2\n"),
        ("merges.txt", "#version: 0.2\nzz\u2603 qq\u2603\n"),  # merge of tokens not in vocab
        ("tokenizer_config.json", "[]"),
        ("tokenizer_config.json", '{"pad_token": "<|nope|>"}'),
    ],
)
def test_from_folder_corrupt_file(tmp_path: Path, sd1_folder: Path, name: str, content: str) -> None:
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    for other in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (folder / other).write_bytes((sd1_folder / other).read_bytes())
    (folder / name).write_text(content, encoding="utf-8")
    with pytest.raises(TokenizerFileError, match=name.replace(".", r"\.")):
        ClipTokenizer.from_folder(folder)


# ============================================================================= json


def test_json_round_trip(tok: ClipTokenizer, tok_sd2: ClipTokenizer) -> None:
    for original in (tok, tok_sd2):
        restored = ClipTokenizer.from_json(original.to_json())
        assert (restored.bos_id, restored.eos_id, restored.pad_id, restored.max_length) == (
            original.bos_id,
            original.eos_id,
            original.pad_id,
            original.max_length,
        )
        for text in PROMPTS:
            assert restored.tokenize(text) == original.tokenize(text)
    assert json.loads(tok_sd2.to_json())["pad_token"] == "!"


@pytest.mark.parametrize(
    "text", ["", "not json", "[]", '{"format": "other"}', '{"format": "sdexport.clip_tokenizer"}']
)
def test_from_json_rejects_garbage(text: str) -> None:
    with pytest.raises(TokenizerFileError):
        ClipTokenizer.from_json(text)


# ============================================================================= parity with transformers


@pytest.mark.parametrize("text", PROMPTS)
def test_parity_sd1(hf_sd1: Any, tok: ClipTokenizer, text: str) -> None:
    assert _our_ids(tok, text) == _hf_ids(hf_sd1, text)


@pytest.mark.parametrize("text", PROMPTS)
def test_parity_sd2_padding(hf_sd2: Any, sd2_folder: Path, text: str) -> None:
    sd2 = ClipTokenizer.from_folder(sd2_folder)
    assert hf_sd2.pad_token_id == sd2.pad_id == 0
    assert _our_ids(sd2, text) == _hf_ids(hf_sd2, text)


@pytest.mark.parametrize("text", [p for p in PROMPTS if not any(c in p for c in "()[]\\:")])
def test_encode_prompt_parity(
    hf_sd1: Any, hf_sd2: Any, tok: ClipTokenizer, tok_sd2: ClipTokenizer, text: str
) -> None:
    # Prompts without weight syntax: encode_prompt equals transformers' padded ids exactly.
    assert encode_prompt(tok, text).ids.tolist() == _hf_ids(hf_sd1, text)
    assert encode_prompt(tok_sd2, text).ids.tolist() == _hf_ids(hf_sd2, text)


def test_long_prompt_parity_first_chunk(hf_sd1: Any, tok: ClipTokenizer) -> None:
    text = "a very long prompt, " * 30
    assert _our_ids(tok, text) == _hf_ids(hf_sd1, text)
    enc = encode_prompt(tok, text)
    assert enc.n_chunks > 1
    # transformers truncates; our first chunk is exactly its truncated output
    assert enc.ids[:77].tolist() == _hf_ids(hf_sd1, text)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.one_of(
        st.text(max_size=30),
        st.text(alphabet=st.sampled_from(list("aB c'sStT,.!?  \t\n0123456789éÉ東😀-")), max_size=40),
    )
)
def test_parity_random_text(
    hf_sd1: Any, hf_sd2: Any, tok: ClipTokenizer, tok_sd2: ClipTokenizer, text: str
) -> None:
    assert _our_ids(tok, text) == _hf_ids(hf_sd1, text)
    assert _our_ids(tok_sd2, text) == _hf_ids(hf_sd2, text)


def test_sd2_pad_token_is_special_like_transformers(tok: ClipTokenizer, tok_sd2: ClipTokenizer) -> None:
    # transformers registers SD2's pad "!" as a special token: "!" in a prompt is id 0, not "!</w>".
    assert tok.tokenize("wow!") == [2781, 256]
    assert tok_sd2.tokenize("wow!") == [2781, 0]


# ============================================================================= tokenizer.json (transformers >= 5)


def _hf_saved(folder: Path, out: Path) -> Path:
    """What transformers' own save_pretrained writes for the tokenizer in ``folder``."""
    transformers = pytest.importorskip("transformers")
    transformers.CLIPTokenizer.from_pretrained(str(folder)).save_pretrained(str(out))
    return out


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_from_folder_reads_tokenizer_json(tmp_path: Path, sd1_folder: Path, sd2_folder: Path,
                                         hf_sd1: Any, hf_sd2: Any, kind: str) -> None:
    folder = _hf_saved(sd1_folder if kind == "sd1" else sd2_folder, tmp_path / "tokenizer")
    assert "tokenizer.json" in {p.name for p in folder.iterdir()}
    assert not (folder / "vocab.json").exists() and not (folder / "merges.txt").exists()
    ours = ClipTokenizer.from_folder(folder)
    hf = hf_sd1 if kind == "sd1" else hf_sd2
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.max_length) == (49406, 49407, hf.pad_token_id, 77)
    for text in PROMPTS:
        assert _our_ids(ours, text) == _hf_ids(hf, text)


def test_from_folder_tokenizer_json_string_merges(tmp_path: Path, sd1_folder: Path, tok: ClipTokenizer) -> None:
    # tokenizers < 0.20 wrote merges as "a b" strings instead of [a, b] pairs.
    folder = _hf_saved(sd1_folder, tmp_path / "tokenizer")
    doc = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    assert isinstance(doc["model"]["merges"][0], list)
    doc["model"]["merges"] = [f"{a} {b}" for a, b in doc["model"]["merges"]]
    (folder / "tokenizer.json").write_text(json.dumps(doc), encoding="utf-8")
    ours = ClipTokenizer.from_folder(folder)
    for text in PROMPTS:
        assert ours.tokenize(text) == tok.tokenize(text)


@pytest.mark.parametrize(
    "content",
    ["{not json", "[]", '{"model": {"type": "WordPiece"}}', '{"model": {"type": "BPE", "vocab": [], "merges": []}}',
     '{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b c"]}}'],
)
def test_from_folder_corrupt_tokenizer_json(tmp_path: Path, sd1_folder: Path, content: str) -> None:
    folder = _hf_saved(sd1_folder, tmp_path / "tokenizer")
    (folder / "tokenizer.json").write_text(content, encoding="utf-8")
    with pytest.raises(TokenizerFileError, match=r"tokenizer\.json"):
        ClipTokenizer.from_folder(folder)


def test_diffusers_save_pretrained_folder_loads(tmp_path: Path, sd1_folder: Path) -> None:
    """A StableDiffusionPipeline saved by the installed diffusers/transformers loads, same token ids."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    import tiny_configs  # tests/ is on sys.path (conftest)

    from sdexport import StableDiffusion

    hf_tok = transformers.CLIPTokenizer.from_pretrained(str(sd1_folder))
    pipe = diffusers.StableDiffusionPipeline(
        vae=diffusers.AutoencoderKL(**tiny_configs.vae_config()),
        text_encoder=transformers.CLIPTextModel(transformers.CLIPTextConfig(**tiny_configs.text_config("sd1"))),
        tokenizer=hf_tok,
        unet=diffusers.UNet2DConditionModel(**tiny_configs.unet_config("sd1")),
        scheduler=diffusers.DDIMScheduler.from_config(tiny_configs.scheduler_config("sd1")),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(str(tmp_path / "model"))
    assert (tmp_path / "model" / "tokenizer" / "tokenizer.json").is_file()
    sd = StableDiffusion.from_pretrained(tmp_path / "model")
    for text in ["a photo of a cat", "masterpiece, best quality!", "naïve café 😀", ""]:
        assert _our_ids(sd.tokenizer, text) == _hf_ids(hf_tok, text)
