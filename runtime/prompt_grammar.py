"""Emphasis parsing: prompt text -> ``(text, weight)`` segments, in A1111's grammar or ours.

The grammars and their differences are described in ``runtime.prompt``'s docstring.
Both are read by one tokenizer (A1111's tokens); ``sdfused`` adds the seed forms where A1111
reads the text literally.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Literal

import numpy as np

__all__ = [
    "BREAK_SEGMENT",
    "Syntax",
    "escape_prompt_text",
    "format_prompt",
    "is_break",
    "parse_prompt",
]

Syntax = Literal["sdfused", "a1111"]
SYNTAXES: tuple[Syntax, ...] = ("sdfused", "a1111")

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
BREAK_SEGMENT: tuple[str, float] = ("BREAK", -1.0)  # A1111's marker: pad the chunk, start a new one

# A1111's tokens, in its order of preference.
_TOKEN_RE = re.compile(
    r"(?P<esc>\\[()\[\]\\])|(?P<lone>\\)|(?P<open>[(\[])"
    r"|(?P<weight>:\s*(?P<num>[+-]?[.\d]+)\s*\))|(?P<close>[)\]])"
    r"|(?P<text>[^\\()\[\]:]+)|(?P<colon>:)"
)
_BREAK_RE = re.compile(r"\s*\bBREAK\b\s*")
_BREAK_WORD_RE = re.compile(r"\bBREAK\b")
# The seed forms' number: no exponent, ASCII digits, no trailing dot.
_SEED_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d+)?|\.\d+)", re.ASCII)
_NUMBER_RUN_RE = re.compile(r"[-+.0-9]*")
_WORD_TAIL_RE = re.compile(r"[^\s,;]*\Z")
_ESCAPABLE = frozenset("()[]:\\|")


@dataclass
class _Token:
    kind: str  # esc, lone, open, weight, close, text, colon; "skip" once consumed by a seed form
    text: str
    num: str | None = None


@dataclass
class _State:
    seed: bool  # sdfused: seed forms on, BREAK markers keep weight -1
    tokens: list[_Token]
    texts: list[str] = field(default_factory=list)
    base: list[float] = field(default_factory=list)
    marker: list[bool] = field(default_factory=list)
    events: list[tuple[int, int, float]] = field(default_factory=list)  # (start, stop, multiplier), in order
    rounds: list[int] = field(default_factory=list)
    squares: list[int] = field(default_factory=list)

    def add(self, text: str, weight: float = 1.0, marker: bool = False) -> None:
        self.texts.append(text)
        self.base.append(weight)
        self.marker.append(marker)

    def close(self, start: int, multiplier: float) -> None:
        self.events.append((start, len(self.texts), multiplier))


def _tokens(text: str) -> list[_Token]:
    out = []
    for m in _TOKEN_RE.finditer(text):
        kind = m.lastgroup
        assert kind is not None
        out.append(_Token("weight" if kind == "num" else kind, m.group(), m.group("num")))
    return out


def _a1111_weight(num: str | None) -> float | None:
    """The number of ``(…:w)``; None where A1111 would raise (``1.2.3``, ``.``) or overflow."""
    try:
        value = float(num or "")
    except ValueError:
        return None
    return value if math.isfinite(value) else None


# ----------------------------------------------------------------------------- seed forms


def _ends_token(tokens: list[_Token], j: int) -> bool:
    """A seed number must end its token: end of text, a bracket, or (escaped) bracket next."""
    if j >= len(tokens):
        return True
    tok = tokens[j]
    return tok.kind in ("open", "close") or (tok.kind == "esc" and tok.text[1] in "()[]")


def _seed_number(tokens: list[_Token], j: int, round_open: bool) -> float | None:
    """``:number`` at token j read as a seed factor (and consumed), or None."""
    if j >= len(tokens):
        return None
    tok = tokens[j]
    if tok.kind == "weight" and not round_open:  # ``:1.5)`` that closes nothing: literal in A1111
        body = tok.text[1:-1]
        if not _SEED_NUMBER_RE.fullmatch(body) or not math.isfinite(value := float(body)):
            return None
        tokens[j] = _Token("text", ")")
        return value
    if tok.kind != "colon" or j + 1 >= len(tokens) or tokens[j + 1].kind != "text":
        return None
    text = tokens[j + 1].text
    run = _NUMBER_RUN_RE.match(text)
    assert run is not None
    rest = text[run.end():]
    if not _SEED_NUMBER_RE.fullmatch(run.group()):
        return None
    if (rest and not (rest[0].isspace() or rest[0] in ",;")) or (not rest and not _ends_token(tokens, j + 2)):
        return None
    value = float(run.group())
    if not math.isfinite(value):
        return None
    tokens[j] = _Token("skip", "")
    tokens[j + 1] = _Token("text", rest)
    return value


def _close_round(st: _State, i: int, explicit: float | None) -> None:
    start = st.rounds.pop()
    factor = _seed_number(st.tokens, i + 1, bool(st.rounds)) if st.seed else None
    if factor is None:
        st.close(start, ROUND_MULTIPLIER if explicit is None else explicit)
    else:  # ``(words):f`` replaces the default 1.1; ``(words:w):f`` is w x f
        st.close(start, factor if explicit is None else explicit * factor)


# ----------------------------------------------------------------------------- tokens


def _add_text(st: _State, i: int, text: str) -> None:
    parts = _BREAK_RE.split(text)
    for k, part in enumerate(parts):
        if k:
            st.add(*BREAK_SEGMENT, marker=True)
        if k == len(parts) - 1 and st.seed:
            _add_tail(st, i, part)
        else:
            st.add(part)


def _add_tail(st: _State, i: int, part: str) -> None:
    """The last part of a text token: ``word:factor`` may follow it."""
    m = _WORD_TAIL_RE.search(part)
    assert m is not None
    word = m.group()
    factor = None
    if any(c.isalpha() for c in word):
        factor = _seed_number(st.tokens, i + 1, bool(st.rounds))
    if factor is None:
        st.add(part)
        return
    st.add(part[: m.start()])
    st.add(word, factor)


def _step(st: _State, i: int) -> None:
    tok = st.tokens[i]
    kind = tok.kind
    if kind == "esc":
        st.add(tok.text[1])
    elif kind == "lone":
        st.add("")  # A1111 drops a backslash that escapes nothing
    elif kind == "open":
        (st.rounds if tok.text == "(" else st.squares).append(len(st.texts))
    elif kind == "weight" and st.rounds:
        value = _a1111_weight(tok.num)
        if value is None:  # A1111 raises; we read ``:…`` as text and ``)`` as a plain closer
            st.add(tok.text[:-1])
        _close_round(st, i, value)
    elif kind == "close" and tok.text == ")" and st.rounds:
        _close_round(st, i, None)
    elif kind == "close" and tok.text == "]" and st.squares:
        st.close(st.squares.pop(), SQUARE_MULTIPLIER)
    elif kind == "text":
        _add_text(st, i, tok.text)
    elif kind != "skip":  # colon, weight or closer that closes nothing
        st.add(tok.text)


def _weights(st: _State) -> list[float]:
    for start in st.rounds:  # unclosed brackets apply to the rest of the prompt
        st.close(start, ROUND_MULTIPLIER)
    for start in st.squares:
        st.close(start, SQUARE_MULTIPLIER)
    w = np.array(st.base, dtype=np.float64)
    for start, stop, multiplier in st.events:  # in A1111's order: float products are order-sensitive
        w[start:stop] *= multiplier
    out = [float(x) for x in w]
    if st.seed:
        out = [-1.0 if m else x for x, m in zip(out, st.marker, strict=True)]
    return out


def _merge_a1111(texts: list[str], weights: list[float]) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    for text, weight in zip(texts, weights, strict=True):
        if out and out[-1][1] == weight:
            out[-1] = (out[-1][0] + text, out[-1][1])
        else:
            out.append((text, weight))
    return out or [("", 1.0)]


def _merge_sdfused(texts: list[str], weights: list[float], marker: list[bool]) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    last_marker = False
    for text, weight, is_marker in zip(texts, weights, marker, strict=True):
        if not text:
            continue
        if out and out[-1][1] == weight and not (is_marker or last_marker):
            out[-1] = (out[-1][0] + text, weight)
        else:
            out.append((text, weight))
        last_marker = is_marker
    return out


def parse_prompt(text: str, syntax: Syntax = "sdfused") -> list[tuple[str, float]]:
    """Split a prompt into ``(text, weight)`` segments; ``BREAK_SEGMENT`` marks a chunk break.

    ``"a1111"``: exactly A1111's segments (empty ones included; ``""`` gives ``[("", 1.0)]``).
    ``"sdfused"``: no empty segments (``""`` gives ``[]``), equal weights merged except across a BREAK.
    Never raises on any text.
    """
    if syntax not in SYNTAXES:
        raise ValueError(f"syntax must be one of {SYNTAXES}, got {syntax!r}")
    st = _State(seed=syntax == "sdfused", tokens=_tokens(text))
    for i in range(len(st.tokens)):
        _step(st, i)
    weights = _weights(st)
    if st.seed:
        return _merge_sdfused(st.texts, weights, st.marker)
    return _merge_a1111(st.texts, weights)


def is_break(segment: tuple[str, float]) -> bool:
    """Whether a segment is a chunk break (A1111's test: text ``BREAK`` with weight exactly -1)."""
    return segment[0] == BREAK_SEGMENT[0] and segment[1] == BREAK_SEGMENT[1]


# ----------------------------------------------------------------------------- writing


def escape_prompt_text(text: str) -> str:
    """Escape ``text`` so both grammars (and the scheduler) read it literally: a backslash before each
    of ``()[]:\\|``, and one inside each word ``BREAK`` (``BREA\\K``: a backslash escaping nothing is
    dropped)."""
    escaped = "".join("\\" + c if c in _ESCAPABLE else c for c in text)
    return _BREAK_WORD_RE.sub("BREA\\\\K", escaped)


def _format_number(value: float) -> str:
    if not math.isfinite(value):
        raise ValueError(f"weight must be finite, got {value}")
    return f"{Decimal(repr(value)):f}"


def format_prompt(segments: list[tuple[str, float]]) -> str:
    """Write segments in the prompt syntax; ``parse_prompt`` reads them back (merged)."""
    parts = []
    for text, weight in segments:
        if is_break((text, weight)):
            parts.append(" BREAK ")
            continue
        escaped = escape_prompt_text(text)
        parts.append(escaped if weight == 1.0 else f"({escaped}:{_format_number(weight)})")
    return "".join(parts)
