"""Prompt emphasis grammar and prompt -> (ids, weights) encoding."""

from __future__ import annotations

import itertools
import math
import re
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from runtime.prompt import (
    EncodedPrompt,
    encode_pair,
    encode_prompt,
    encode_prompts,
    escape_prompt_text,
    format_prompt,
    parse_prompt,
)
from runtime.tokenizer import ClipTokenizer

UP = 1.1
DOWN = 1 / 1.1
SYNTAX = "()[]\\:"


def approx_segments(expected: list[tuple[str, float]]) -> list[tuple[str, Any]]:
    return [(t, pytest.approx(w)) for t, w in expected]


# ============================================================================= seed syntax


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a (zombie):1.5 walks", [("a ", 1.0), ("zombie", 1.5), (" walks", 1.0)]),
        ("(few words):1.5", [("few words", 1.5)]),
        ("(old man):0", [("old man", 0.0)]),
        ("(old man):-1.25 x", [("old man", -1.25), (" x", 1.0)]),
        ("cat:-0.5", [("cat", -0.5)]),
        ("cat:+2 dog", [("cat", 2.0), (" dog", 1.0)]),
        ("a cat:1.5 on a mat", [("a ", 1.0), ("cat", 1.5), (" on a mat", 1.0)]),
        ("cat:.5", [("cat", 0.5)]),
        ("cat:1.5,dog:0.5", [("cat", 1.5), (",", 1.0), ("dog", 0.5)]),
        ("cat:1.5;dog", [("cat", 1.5), (";dog", 1.0)]),
        ("1girl:1.2", [("1girl", 1.2)]),
        ("naïve:2", [("naïve", 2.0)]),
        ("(cat):1.5(dog)", [("cat", 1.5), ("dog", UP)]),
    ],
)
def test_seed_syntax(prompt: str, expected: list[tuple[str, float]]) -> None:
    assert parse_prompt(prompt) == approx_segments(expected)


@pytest.mark.parametrize(
    "prompt",
    [
        "a:b",
        "16:9 aspect ratio",
        "at 12:30 pm",
        "10:30am",
        "x:1:2",
        "cat:1.5x",
        "cat:1.5.",
        "cat:1.",
        "cat: 1.5",
        "cat :1.5",
        "cat:1e3",
        "cat:inf",
        "cat:-",
        "http://example.com/a:1/b",
        "https://example.com:443/path",
        "v1.2:3.4.5",
        "note: see below",
        "12:30:45",
        ":1.5",
        "::",
        "cat\\:1.5",
    ],
)
def test_colon_without_weight_is_literal(prompt: str) -> None:
    text = prompt.replace("\\:", ":")
    assert parse_prompt(prompt) == [(text, 1.0)]


# ============================================================================= A1111 syntax


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("(words)", [("words", UP)]),
        ("[words]", [("words", DOWN)]),
        ("(words:1.3)", [("words", 1.3)]),
        ("(a cat:0.5) sits", [("a cat", 0.5), (" sits", 1.0)]),
        ("(words : 1.3 )", [("words ", 1.3)]),
        ("(words:-1)", [("words", -1.0)]),
        ("((words))", [("words", UP * UP)]),
        ("[[words]]", [("words", DOWN * DOWN)]),
        ("([words])", [("words", 1.0)]),
        ("((words:2))", [("words", 2 * UP)]),
        ("[(words:2)]", [("words", 2 * DOWN)]),
        ("((a) b:2)", [("a", 2 * UP), (" b", 2.0)]),
        ("((a):0.5)", [("a", 0.5 * UP)]),
        ("(a:1.2):2", [("a", 2.4)]),
        ("(a (b (c)))", [("a ", UP), ("b ", UP**2), ("c", UP**3)]),
        (
            "(a cat:1.5) and [a dog] (sky)",
            [("a cat", 1.5), (" and ", 1.0), ("a dog", DOWN), (" ", 1.0), ("sky", UP)],
        ),
        ("[cat:1.5]", [("cat", 1.5 * DOWN)]),
        ("(cat:1.5:2)", [("cat:1.5", 2.0)]),
    ],
)
def test_a1111_syntax(prompt: str, expected: list[tuple[str, float]]) -> None:
    assert parse_prompt(prompt) == approx_segments(expected)


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        (r"\(x\)", [("(x)", 1.0)]),
        (r"\[x\]", [("[x]", 1.0)]),
        (r"a \(b\) (c)", [("a (b) ", 1.0), ("c", UP)]),
        (r"(\(x\))", [("(x)", UP)]),
        # A1111: a backslash that escapes nothing is dropped, so ``\:`` does not stop ``:1.5)``.
        (r"(a\:1.5)", [("a", 1.5)]),
        (r"a\\b", [("a\\b", 1.0)]),
        (r"a\nb \q", [("anb q", 1.0)]),
        ("trailing\\", [("trailing", 1.0)]),
        (r"\\(x)", [("\\", 1.0), ("x", UP)]),
    ],
)
def test_escapes(prompt: str, expected: list[tuple[str, float]]) -> None:
    assert parse_prompt(prompt) == approx_segments(expected)


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        # A1111: an open bracket never closed applies to the rest; a stray closer is text;
        # mismatched brackets each apply from their opening to their closing.
        ("(a", [("a", UP)]),
        ("a)", [("a)", 1.0)]),
        ("[a", [("a", DOWN)]),
        ("a]", [("a]", 1.0)]),
        ("((a)", [("a", UP * UP)]),
        ("(a))", [("a", UP), (")", 1.0)]),
        ("(a]", [("a]", UP)]),
        ("(a [b) c]", [("a ", UP), ("b", UP * DOWN), (" c", DOWN)]),
        ("[a (b] c)", [("a ", DOWN), ("b", DOWN * UP), (" c", UP)]),
        (")(", [(")", 1.0)]),
        ("cat):1.5", [("cat):1.5", 1.0)]),
        ("(a:1.5", [("a", 1.5 * UP)]),  # the word rule still applies
    ],
)
def test_unbalanced_brackets(prompt: str, expected: list[tuple[str, float]]) -> None:
    got = parse_prompt(prompt)
    assert got == approx_segments(_merge(expected))


def _merge(segments: list[tuple[str, float]]) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    for text, weight in segments:
        if not text:
            continue
        if out and out[-1][1] == weight:
            out[-1] = (out[-1][0] + text, weight)
        else:
            out.append((text, weight))
    return out


def test_empty_and_trivial() -> None:
    assert parse_prompt("") == []
    assert parse_prompt("()") == []
    assert parse_prompt("(:1.5)") == []
    assert parse_prompt("a photo of a cat") == [("a photo of a cat", 1.0)]
    assert parse_prompt("  spaces   kept \n") == [("  spaces   kept \n", 1.0)]


def test_adjacent_equal_weights_merge() -> None:
    assert parse_prompt("(a)(b)") == [("ab", UP)]
    assert parse_prompt("a(b:1)c") == [("abc", 1.0)]
    assert parse_prompt("(a:2) (b:2)") == [("a", 2.0), (" ", 1.0), ("b", 2.0)]


def test_pathological_inputs_are_fast() -> None:
    n = 5000
    [(text, weight)] = parse_prompt("[" * n + ")" * n)  # n unclosed '[' over n stray ')'
    assert text == ")" * n and weight == pytest.approx(DOWN**n)
    assert len(parse_prompt("(a" * n + ")" * n)) == n  # ranges of every length: still fast
    assert parse_prompt("(a)" * n) == [("a" * n, UP)]
    assert len(parse_prompt("(" * 300 + "a" + ")" * 300)) == 1


# ============================================================================= properties

syntaxy_text = st.text(alphabet=st.sampled_from(list("ab c,;()[]\\:.-+019")), max_size=40)
any_text = st.text(max_size=40)


def _is_subsequence(small: str, big: str) -> bool:
    it = iter(big)
    return all(c in it for c in small)


def _plain(text: str) -> str:
    """Characters the grammar can never delete."""
    return "".join(c for c in text if c not in "()[]\\:+-.0123456789" and not c.isspace())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(syntaxy_text, any_text))
def test_any_string_parses_and_only_syntax_is_removed(text: str) -> None:
    segments = parse_prompt(text)
    joined = "".join(t for t, _ in segments)
    # Nothing is invented or reordered: the output is the input with characters deleted...
    assert _is_subsequence(joined, text)
    # ...and only syntax characters (brackets, backslashes, ':', numbers, spaces of weights) are deleted.
    assert _plain(joined) == _plain(text)
    # Segments are non-empty and merged.
    assert all(t for t, _ in segments)
    assert all(a[1] != b[1] for a, b in itertools.pairwise(segments))
    assert all(math.isfinite(w) for _, w in segments)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters=SYNTAX), max_size=60)
       .filter(lambda t: not re.search(r"\bBREAK\b", t)))  # the keyword is syntax too (a chunk break)
@example("BREAKING news, a BREAKdown")
def test_text_without_syntax_is_one_segment(text: str) -> None:
    assert parse_prompt(text) == ([(text, 1.0)] if text else [])


@settings(max_examples=200, deadline=None)
@given(any_text)
def test_escaped_text_is_literal(text: str) -> None:
    assert parse_prompt(escape_prompt_text(text)) == ([(text, 1.0)] if text else [])


weights = st.one_of(
    st.just(1.0),
    st.sampled_from([0.0, -0.5, 0.5, 1.1, 1.5, 2.0, 1e-7, 123.25]),
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.one_of(syntaxy_text, any_text), weights), max_size=6))
def test_format_prompt_round_trips(segments: list[tuple[str, float]]) -> None:
    expected = _merge(segments)
    assert parse_prompt(format_prompt(segments)) == expected


def _num(x: float) -> str:
    return format_prompt([("a", x)])[3:-1] if x != 1.0 else "1"


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.from_regex(r"[a-z][a-z0-9]{0,5}", fullmatch=True), weights), min_size=1, max_size=5)
)
def test_word_factor_weights(words: list[tuple[str, float]]) -> None:
    prompt = " ".join(f"{w}:{_num(x)}" for w, x in words)
    expected: list[tuple[str, float]] = []
    for i, (w, x) in enumerate(words):
        if i:
            expected.append((" ", 1.0))
        expected.append((w, x))
    assert parse_prompt(prompt) == _merge(expected)


# ============================================================================= encoding




def _chunks(enc: EncodedPrompt) -> list[list[int]]:
    return enc.ids.view(enc.n_chunks, 77).tolist()


def test_encode_short_prompt(tok: ClipTokenizer) -> None:
    enc = encode_prompt(tok, "a photo of a cat")
    assert enc.n_chunks == 1
    assert enc.ids.dtype == torch.int64 and enc.weights.dtype == torch.float32
    assert enc.ids.shape == enc.weights.shape == (77,)
    assert enc.ids[:7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert enc.ids[7:].tolist() == [49407] * 70
    assert torch.all(enc.weights == 1.0)


def test_encode_sd2_padding(tok_sd2: ClipTokenizer) -> None:
    enc = encode_prompt(tok_sd2, "a photo of a cat")
    assert enc.ids[:7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert enc.ids[7:].tolist() == [0] * 70


def test_encode_empty_prompt_is_one_chunk(tok: ClipTokenizer) -> None:
    enc = encode_prompt(tok, "")
    assert enc.n_chunks == 1
    assert enc.ids.tolist() == [49406] + [49407] * 76
    enc = encode_prompt(tok, "", min_chunks=3)
    assert enc.n_chunks == 3 and enc.ids.numel() == 3 * 77
    assert all(c[:2] == [49406, 49407] for c in _chunks(enc))


def test_weights_follow_tokens(tok: ClipTokenizer) -> None:
    enc = encode_prompt(tok, "a (red:1.5) [cat] sat:0.5")
    plain = tok.tokenize("a red cat sat")
    assert enc.ids[1 : 1 + len(plain)].tolist() == plain
    n = len(plain)
    assert enc.weights[: n + 2].tolist() == pytest.approx([1.0, 1.0, 1.5, DOWN, 0.5, 1.0])
    assert torch.all(enc.weights[n + 1 :] == 1.0)


def test_multi_token_word_weight(tok: ClipTokenizer) -> None:
    ids = tok.tokenize("photorealistic")
    assert len(ids) > 1
    enc = encode_prompt(tok, "(photorealistic:1.3)")
    assert enc.ids[1 : 1 + len(ids)].tolist() == ids
    assert enc.weights[1 : 1 + len(ids)].tolist() == pytest.approx([1.3] * len(ids))


def test_long_prompt_is_chunked_not_truncated(tok: ClipTokenizer) -> None:
    prompt = " ".join(["(cat:1.5) dog"] * 80)  # 160 tokens
    enc = encode_prompt(tok, prompt)
    assert enc.n_chunks == 3
    assert enc.ids.numel() == enc.weights.numel() == 3 * 77
    chunks = _chunks(enc)
    for c in chunks:
        assert c[0] == tok.bos_id
        assert tok.eos_id in c[1:]
    cat, dog = tok.tokenize("cat dog")
    body = [t for c in chunks for t in c[1:76]]
    body_w = enc.weights.view(3, 77)[:, 1:76].reshape(-1).tolist()
    assert body[:160] == [cat, dog] * 80
    assert body_w[:160] == pytest.approx([1.5, 1.0] * 80)
    assert chunks[0][76] == tok.eos_id and chunks[1][76] == tok.eos_id
    # last chunk: 10 tokens, EOS, padding
    assert chunks[2][11] == tok.eos_id and chunks[2][12:] == [tok.pad_id] * 65
    assert torch.all(enc.weights.view(3, 77)[:, [0, 76]] == 1.0)


def test_exactly_75_tokens_is_one_chunk(tok: ClipTokenizer) -> None:
    enc = encode_prompt(tok, "cat " * 75)
    assert enc.n_chunks == 1
    assert enc.ids[76].item() == tok.eos_id
    assert encode_prompt(tok, "cat " * 76).n_chunks == 2


def test_encode_pair_same_chunks(tok: ClipTokenizer) -> None:
    pos, neg = encode_pair(tok, "cat " * 100, "blurry")
    assert pos.n_chunks == neg.n_chunks == 2
    assert neg.ids.shape == pos.ids.shape == neg.weights.shape
    assert _chunks(neg)[1][:3] == [tok.bos_id, tok.eos_id, tok.eos_id]
    assert _chunks(neg)[0][:3] == [tok.bos_id, *tok.tokenize("blurry"), tok.eos_id][:3]
    neg2, pos2 = encode_pair(tok, "blurry", "cat " * 200)
    assert neg2.n_chunks == pos2.n_chunks == 3
    a, b = encode_pair(tok, "", "")
    assert a.n_chunks == b.n_chunks == 1


def test_encode_prompts_pads_to_longest_tokenizing_once(tok: ClipTokenizer,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = ["cat " * 100, "(blurry):0.5", ""]
    expected = [encode_prompt(tok, p, min_chunks=2) for p in prompts]
    texts: list[str] = []
    tokenize = tok.tokenize

    def counting(text: str) -> list[int]:
        texts.append(text)
        return tokenize(text)

    monkeypatch.setattr(tok, "tokenize", counting)
    encoded = encode_prompts(tok, prompts)
    assert texts == ["cat " * 100, "blurry"]  # one call per weighted segment, no second pass
    assert [e.n_chunks for e in encoded] == [2, 2, 2]
    for e, want in zip(encoded, expected, strict=True):
        assert torch.equal(e.ids, want.ids) and torch.equal(e.weights, want.weights)
    assert encode_prompts(tok, []) == []
