"""A1111 parity (issue #17): emphasis grammar against a reference written from A1111's rules, BREAK
chunks, prompt editing / alternation schedules, AND, emphasis modes; fuzzing."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.prompt import (
    BREAK_SEGMENT,
    EMPHASIS_MODES,
    apply_emphasis,
    encode_prompt,
    encode_prompts,
    escape_prompt_text,
    format_prompt,
    parse_prompt,
    prompt_schedule,
    schedule_prompts,
    split_and,
)
from runtime.tokenizer import ClipTokenizer
from tests.a1111_reference import emphasis_original, parse_a1111

UP = 1.1
DOWN = 1 / 1.1
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ============================================================================= generated prompts

ATOMS = [
    "(", ")", "[", "]", ":1.3)", ": 0.8 )", ":-1)", ":2)", ":.5)", ":1.2.3)", ":.)", ":+1.5 )",
    "\\(", "\\)", "\\[", "\\]", "\\\\", "\\", "\\:", ":", "BREAK", " BREAK ", "xBREAK",
    "a", "cat", " ", ", ", "1girl", ":1.5", "x:2", "16:9", "\n",
]
a1111_prompts = st.lists(st.sampled_from(ATOMS), max_size=30).map("".join)

WORDS = st.sampled_from(["a", "cat", "red fox", " ", ", ", "1girl", "x", "\\(", "\\)", "\\[", "\\]", "\\\\"])
WEIGHTS = st.sampled_from(["1.3", "0.8", " 1.5 ", "-1", "2", ".5", "0", "1.25", "+3"])


def _groups(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        inner.map(lambda s: f"({s})"),
        inner.map(lambda s: f"[{s}]"),
        st.tuples(inner, WEIGHTS).map(lambda t: f"({t[0]}:{t[1]})"),
        st.lists(inner, max_size=4).map("".join),
    )


# Balanced brackets, ':' only in weights that close a '(', BREAK only outside brackets: no seed form.
balanced = st.recursive(WORDS, _groups, max_leaves=25)
balanced_prompts = st.lists(st.one_of(balanced, st.sampled_from(["BREAK", " BREAK "])), max_size=6).map("".join)


def _normalized(segments: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """A1111's segments as ``sdfused`` gives them: no empty segments, equal weights merged except BREAK."""
    out: list[tuple[str, float]] = []
    for text, weight in segments:
        if not text:
            continue
        if out and out[-1][1] == weight and BREAK_SEGMENT not in (out[-1], (text, weight)):
            out[-1] = (out[-1][0] + text, weight)
        else:
            out.append((text, weight))
    return out


@SETTINGS
@given(st.one_of(a1111_prompts, balanced_prompts))
def test_a1111_syntax_matches_reference(text: str) -> None:
    assert parse_prompt(text, "a1111") == parse_a1111(text)


@SETTINGS
@given(balanced_prompts)
def test_combined_grammar_agrees_on_balanced_a1111_prompts(text: str) -> None:
    assert parse_prompt(text, "sdfused") == _normalized(parse_a1111(text))


@SETTINGS
@given(st.text(alphabet="()[]:\\ab 1.5-BREAK\n", max_size=60))
def test_a1111_syntax_matches_reference_on_bracket_soup(text: str) -> None:
    assert parse_prompt(text, "a1111") == parse_a1111(text)


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("((a:0.8):1.3)", [("a", 0.8 * 1.3)]),  # the example
        ("((a)", [("a", UP * UP)]),
        ("(a [b) c]", [("a ", UP), ("b", UP * DOWN), (" c", DOWN)]),
        ("a) b]", [("a) b]", 1.0)]),
        ("(a:1.5) x:1.5)", [("a", 1.5), (" x:1.5)", 1.0)]),  # ':1.5)' with no open '(' is text
        (r"\(a\) \\ \q", [("(a) \\ q", 1.0)]),
        ("(a)\\", [("a", UP), ("", 1.0)]),  # A1111 keeps the empty segment of a dropped backslash
        ("", [("", 1.0)]),
        ("()", [("", 1.0)]),
        ("a BREAK b", [("a", 1.0), BREAK_SEGMENT, ("b", 1.0)]),
        ("BREAK", [("", 1.0), BREAK_SEGMENT, ("", 1.0)]),
        ("(BREAK)", [("", UP), ("BREAK", -UP), ("", UP)]),  # A1111: a negative-weight word, no break
        ("aBREAK b", [("aBREAK b", 1.0)]),
        ("(a:1.2.3)", [("a:1.2.3", UP)]),  # A1111 raises; we read the number as text
    ],
)
def test_a1111_examples(prompt: str, expected: list[tuple[str, float]]) -> None:
    assert parse_prompt(prompt, "a1111") == [(t, pytest.approx(w)) for t, w in expected]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("((a:0.8):1.3)", [("a", 0.8 * 1.3)]),
        ("((a):1.3)", [("a", UP * 1.3)]),  # ':1.3)' closes the outer group: not the seed's (a):1.3
        ("(a):1.3", [("a", 1.3)]),
        ("((a):1.3 b)", [("a", 1.3 * UP), (" b", UP)]),
        ("(a", [("a", UP)]),
        ("(a BREAK b)", [("a", UP), BREAK_SEGMENT, ("b", UP)]),  # BREAK always breaks here
        ("BREAK:1.5", [BREAK_SEGMENT, (":1.5", 1.0)]),
        ("cat:1.5)", [("cat", 1.5), (")", 1.0)]),
        ("host\\:8080", [("host:8080", 1.0)]),
        ("", []),
    ],
)
def test_combined_grammar_examples(prompt: str, expected: list[tuple[str, float]]) -> None:
    assert parse_prompt(prompt) == [(t, pytest.approx(w)) for t, w in expected]


def test_deep_nesting() -> None:
    n = 400
    assert parse_prompt("(" * n + "a" + ")" * n, "a1111") == parse_a1111("(" * n + "a" + ")" * n)
    assert parse_prompt("[" * n + "a", "a1111") == [("a", pytest.approx(DOWN**n))]
    assert parse_prompt("((" * n + "a" + "):2)" * n, "a1111") == parse_a1111("((" * n + "a" + "):2)" * n)


def test_unknown_syntax_raises() -> None:
    with pytest.raises(ValueError, match="syntax"):
        parse_prompt("a", "comfy")  # type: ignore[arg-type]


# ============================================================================= fuzzing

fuzz_text = st.one_of(
    st.text(max_size=200),
    st.text(alphabet="()[]:|\\ ab15.-+eBREAKAND\n", max_size=200),
    st.text(alphabet="([", max_size=300),
    st.text(alphabet="[]:|", max_size=200),
)


@settings(max_examples=400, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(fuzz_text)
def test_parsers_and_scheduler_never_raise(text: str) -> None:
    for syntax in ("sdfused", "a1111"):
        segments = parse_prompt(text, syntax)  # type: ignore[arg-type]
        assert all(isinstance(t, str) and math.isfinite(w) for t, w in segments)
    schedule = prompt_schedule(text, 7)
    assert schedule[-1][0] == 7
    assert all(a[0] < b[0] for a, b in itertools.pairwise(schedule))
    assert split_and(text)


@SETTINGS
@given(st.text(max_size=60))
def test_escaped_text_is_literal_everywhere(text: str) -> None:
    escaped = escape_prompt_text(text)
    assert _normalized(parse_prompt(escaped, "a1111")) == ([(text, 1.0)] if text else [])
    assert prompt_schedule(escaped, 5) == [(5, escaped)]


def test_format_prompt_reads_back_in_a1111_syntax() -> None:
    segments = [("a (cat)", 1.5), (" BREAK: x", 1.0), ("[x|y:3]", 0.5)]
    assert _normalized(parse_prompt(format_prompt(segments), "a1111")) == segments


# ============================================================================= BREAK chunks


def _chunk_ids(ids: torch.Tensor, n: int) -> list[list[int]]:
    return ids.view(n, 77).tolist()


def test_break_starts_a_new_chunk(tok: ClipTokenizer) -> None:
    enc = encode_prompt(tok, "a cat BREAK a dog")
    assert enc.n_chunks == 2
    first, second = _chunk_ids(enc.ids, 2)
    cat, dog = tok.tokenize("a cat"), tok.tokenize("a dog")
    assert first[: len(cat) + 2] == [tok.bos_id, *cat, tok.eos_id]
    assert second[: len(dog) + 2] == [tok.bos_id, *dog, tok.eos_id]
    assert encode_prompt(tok, "a cat BREAK a dog", syntax="a1111").ids.equal(enc.ids)


@pytest.mark.parametrize(
    ("prompt", "chunks"),
    [("BREAK a", 2), ("a BREAK", 1), ("BREAK", 1), ("BREAK BREAK", 2), ("a BREAK BREAK b", 3), ("", 1)],
)
def test_break_chunk_counts(tok: ClipTokenizer, prompt: str, chunks: int) -> None:
    # A1111: BREAK closes the current chunk even when empty; an empty last chunk only if it is the only one.
    for syntax in ("sdfused", "a1111"):
        assert encode_prompt(tok, prompt, syntax=syntax).n_chunks == chunks  # type: ignore[arg-type]


def test_break_after_a_full_chunk_adds_none(tok: ClipTokenizer) -> None:
    assert encode_prompt(tok, "cat " * 75 + "BREAK dog").n_chunks == 2
    assert encode_prompt(tok, "cat " * 80 + "BREAK dog").n_chunks == 3


def test_break_pads_the_batch(tok: ClipTokenizer) -> None:
    a, b = encode_prompts(tok, ["a BREAK b BREAK c", "blurry"])
    assert a.n_chunks == b.n_chunks == 3


def test_break_inside_brackets_a1111_is_a_word(tok: ClipTokenizer) -> None:
    enc = encode_prompt(tok, "a (BREAK) b", syntax="a1111")
    assert enc.n_chunks == 1
    word = tok.tokenize("BREAK")
    assert enc.ids[2 : 2 + len(word)].tolist() == word
    assert enc.weights[2 : 2 + len(word)].tolist() == pytest.approx([-UP] * len(word))
    assert encode_prompt(tok, "a (BREAK) b").n_chunks == 2


# ============================================================================= schedules


@pytest.mark.parametrize(
    ("prompt", "steps", "expected"),
    [
        ("test", 10, [(10, "test")]),
        ("a [b:3]", 10, [(3, "a "), (10, "a b")]),
        ("a [b: 3]", 10, [(3, "a "), (10, "a b")]),
        ("a [[[b]]:2]", 10, [(2, "a "), (10, "a [[b]]")]),
        ("[(a:2):3]", 10, [(3, ""), (10, "(a:2)")]),
        ("a [b : c : 1] d", 10, [(1, "a b  d"), (10, "a  c  d")]),
        ("a[b:[c:d:2]:1]e", 10, [(1, "abe"), (2, "ace"), (10, "ade")]),
        ("a [unbalanced", 10, [(10, "a [unbalanced")]),
        ("a [b:.5] c", 10, [(5, "a  c"), (10, "a b c")]),
        ("((a][:b:c [d:3]", 10, [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
        ("[a:b:10]", 20, [(10, "a"), (20, "b")]),
        ("[a:b:0.25]", 30, [(7, "a"), (30, "b")]),  # int(0.25 * 30)
        ("[a:b:25]", 20, [(20, "a")]),  # capped at the step count
        ("[a:b:0]", 20, [(20, "b")]),
        ("[a::5]", 10, [(5, "a"), (10, "")]),
        ("(a [b:c:2])", 4, [(2, "(a b)"), (4, "(a c)")]),
        ("[a:b:1.5]", 10, [(1, "a"), (10, "b")]),
        ("a | b [c:d:2]", 4, [(4, "a | b [c:d:2]")]),  # A1111's schedule grammar fails: used as is
        ("(a|b) [c:d:2]", 4, [(4, "(a|b) [c:d:2]")]),
        ("[c:d:2] x\\", 4, [(4, "[c:d:2] x\\")]),
        (r"[a\:b:c:2] \|", 4, [(2, r"a\:b \|"), (4, r"c \|")]),
        ("[a:b:c]", 4, [(4, "[a:b:c]")]),
    ],
)
def test_prompt_editing(prompt: str, steps: int, expected: list[tuple[int, str]]) -> None:
    assert prompt_schedule(prompt, steps) == expected


def test_a1111_documented_example() -> None:
    prompt = ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
              "[ in foreground::0.6][: in background:0.25] [shoddy:masterful:0.5]")
    assert prompt_schedule(prompt, 100) == [
        (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (75, "fantasy landscape with a lake and an oak in background masterful"),
        (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
    ]


def test_alternation() -> None:
    assert prompt_schedule("[cow|horse] in a field", 4) == [
        (1, "cow in a field"), (2, "horse in a field"), (3, "cow in a field"), (4, "horse in a field")]
    assert [t for _, t in prompt_schedule("[fe|||]male", 6)] == ["female", *["male"] * 3, "female", "male"]
    assert [t for _, t in prompt_schedule("[a|(b:1.1)]", 3)] == ["a", "(b:1.1)", "a"]
    assert [t for _, t in prompt_schedule("[a|[b:c:2]]", 4)] == ["a", "b", "a", "c"]


def test_decimal_fraction_timeline() -> None:
    assert prompt_schedule("[a:b:1.5]", 10, decimal_fraction=True) == [(10, "a")]  # 15 capped
    assert prompt_schedule("[a:b:0.5]", 10, decimal_fraction=True) == [(5, "a"), (10, "b")]
    assert prompt_schedule("[a:b:3]", 10, decimal_fraction=True) == [(3, "a"), (10, "b")]
    assert prompt_schedule("[a:b:5e-1]", 10) == [(5, "a"), (10, "b")]
    assert prompt_schedule("[a:b:5e-1]", 10, decimal_fraction=True) == [(10, "b")]


def test_schedule_never_overflows() -> None:
    assert prompt_schedule("[a:b:1e999]", 10) == [(10, "a")]
    assert prompt_schedule("[a:b:-1e999]", 10) == [(10, "b")]
    with pytest.raises(ValueError, match="steps"):
        prompt_schedule("a", 0)


def test_pathological_schedules_are_fast() -> None:
    n = 5000
    for text in ("[" * n, "(" * n + "a", "[a:" * n + "1]" * n, "[a|" * n + "]" * n, "\\[" * n):
        assert prompt_schedule(text, 3)[-1][0] == 3
    assert len(prompt_schedule("[a|b]" * 200, 50)) == 50


def test_schedule_prompts_per_step_selection() -> None:
    ps = schedule_prompts(["a [b:c:2]", "x", "[p|q]"], 4)
    assert ps.texts == ("a b", "a c", "x", "p", "q")
    assert ps.index.tolist() == [[0, 2, 3], [0, 2, 4], [1, 2, 3], [1, 2, 4]]
    assert ps.changes() == [0, 1, 2, 3] and not ps.static
    contexts = torch.arange(len(ps.texts)).float()[:, None, None].expand(-1, 77, 8)  # one per text
    for step in range(4):
        context = contexts[ps.index[step]]  # (3, 77, 8), the pipeline's per-step pick
        assert context[:, 0, 0].tolist() == ps.index[step].float().tolist()


def test_schedule_prompts_static_and_shared_texts() -> None:
    ps = schedule_prompts(["blurry", "a cat", "blurry"], 3)
    assert ps.texts == ("blurry", "a cat") and ps.static and ps.changes() == [0]
    assert ps.index.tolist() == [[0, 1, 0]] * 3
    empty = schedule_prompts([], 3)
    assert empty.texts == () and tuple(empty.index.shape) == (3, 0)


# ============================================================================= AND


def test_split_and() -> None:
    assert split_and("a cat :1.2 AND a dog AND a penguin :2.2") == [
        ("a cat", 1.2), (" a dog", 1.0), (" a penguin", 2.2)]
    assert split_and("rock and roll") == [("rock and roll", 1.0)]
    assert split_and("a photo:1.5 ") == [("a photo", 1.5)]  # A1111: a guidance weight, even alone
    assert split_and("(a:1.5)") == [("(a:1.5)", 1.0)]
    assert split_and("ANDROID AND") == [("ANDROID", 1.0), ("", 1.0)]


# ============================================================================= emphasis


def test_emphasis_a1111_matches_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 154, 6, generator=gen, dtype=torch.float64) + 0.3
    w = 1 + 0.5 * torch.rand(2, 154, generator=gen, dtype=torch.float64)
    out, att = apply_emphasis(z, w, "a1111")
    assert torch.equal(att, torch.ones_like(w))
    for n in range(2):
        for c in range(2):
            rows = slice(77 * c, 77 * (c + 1))
            want = emphasis_original(z[n, rows].tolist(), w[n, rows].tolist())
            torch.testing.assert_close(out[n, rows], torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", EMPHASIS_MODES)
def test_weight_one_is_bit_identical(mode: str, dtype: torch.dtype) -> None:
    z = torch.randn(3, 154, 8, generator=torch.Generator().manual_seed(1)).to(dtype)
    ones = torch.ones(3, 154, dtype=dtype)
    out, att = apply_emphasis(z, ones, mode)  # type: ignore[arg-type]
    assert torch.equal(out, z) and torch.equal(att, ones)
    mixed = ones.clone()
    mixed[1, 5] = 1.3  # rows with weight 1 stay bit-identical next to a weighted row
    out, _ = apply_emphasis(z, mixed, mode)  # type: ignore[arg-type]
    assert torch.equal(out[0], z[0]) and torch.equal(out[2], z[2])


def test_emphasis_modes() -> None:
    z = torch.randn(1, 77, 4)
    w = torch.full((1, 77), 1.5)
    out, att = apply_emphasis(z, w, "attention")
    assert out is z and att is w
    out, att = apply_emphasis(z, w, "none")
    assert out is z and torch.equal(att, torch.ones_like(w))
    with pytest.raises(ValueError, match="emphasis"):
        apply_emphasis(z, w, "original")  # type: ignore[arg-type]


def test_a1111_emphasis_restores_each_encoders_mean() -> None:
    """SDXL: the context concatenates two encoders; A1111 restores each one's mean on its own."""
    torch.manual_seed(0)
    z, w = torch.randn(2, 154, 12) + 0.5, torch.rand(2, 154) + 0.5
    out, _ = apply_emphasis(z, w, "a1111", (5, 7))
    parts = [apply_emphasis(p.contiguous(), w, "a1111")[0] for p in z.split([5, 7], dim=-1)]
    assert torch.allclose(out, torch.cat(parts, dim=-1), rtol=1e-6, atol=1e-6)  # summation order only
    assert not torch.allclose(out, apply_emphasis(z, w, "a1111")[0])  # the joint mean differs
    with pytest.raises(ValueError, match="do not add up"):
        apply_emphasis(z, w, "a1111", (5, 6))
