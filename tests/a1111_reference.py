"""A reference for A1111's emphasis parser, written from its documented rules (a character scanner;
deliberately unlike runtime.prompt_grammar's tokenizer and numpy ranges):

- a backslash before one of ``()[]\\`` is that character; before anything else it is dropped
  (leaving an empty segment);
- ``(`` and ``[`` open a bracket at the current segment; ``)`` / ``]`` multiply every segment since
  its opening by 1.1 / (1 / 1.1); ``:`` + optional spaces + ``[+-]?[.\\d]+`` + optional spaces + ``)``
  multiplies by that number instead and closes the innermost ``(``; each multiplication happens when
  the bracket closes, in that order;
- a closer with nothing open, and a ``:…)`` with no ``(`` open, are text; other ``:`` are text;
- brackets never closed multiply the rest: first the ``(`` (outermost first), then the ``[``;
- ``\\s*\\bBREAK\\b\\s*`` inside a run of text is a ``("BREAK", -1)`` segment (multiplied like any);
- adjacent segments of equal weight merge; no segment at all gives ``[("", 1.0)]``.

Where A1111 raises (a weight that ``float`` rejects) or overflows (a weight past the float range) we
read the ``:…`` as text and the ``)`` as a plain closer, as runtime.prompt_grammar documents.
"""

from __future__ import annotations

import math
import re

BREAK = re.compile(r"\s*\bBREAK\b\s*")
ESCAPABLE = "()[]\\"
SPECIAL = "\\()[]:"


def _weight_token(text: str, i: int) -> tuple[int, str] | None:
    """At a ':' -> (index after the ')', the number) if ``:\\s*[+-]?[.\\d]+\\s*)`` starts here."""
    j = i + 1
    while j < len(text) and text[j].isspace():
        j += 1
    start = j
    if j < len(text) and text[j] in "+-":
        j += 1
    digits = j
    while j < len(text) and (text[j] == "." or text[j].isdecimal()):
        j += 1
    if j == digits:
        return None
    number = text[start:j]
    while j < len(text) and text[j].isspace():
        j += 1
    if j < len(text) and text[j] == ")":
        return j + 1, number
    return None


def _number(s: str) -> float | None:
    try:
        value = float(s)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_a1111(text: str) -> list[tuple[str, float]]:
    res: list[list[object]] = []
    rounds: list[int] = []
    squares: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for piece in res[start:]:
            piece[1] = float(piece[1]) * factor  # type: ignore[arg-type]

    def literal(s: str) -> None:
        parts = BREAK.split(s)
        for k, part in enumerate(parts):
            if k:
                res.append(["BREAK", -1.0])
            res.append([part, 1.0])

    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            escaped = i + 1 < len(text) and text[i + 1] in ESCAPABLE
            res.append([text[i + 1] if escaped else "", 1.0])
            i += 2 if escaped else 1
        elif c == "(":
            rounds.append(len(res))
            i += 1
        elif c == "[":
            squares.append(len(res))
            i += 1
        elif c == ":":
            token = _weight_token(text, i)
            if token is None:
                literal(":")
                i += 1
                continue
            end, number = token
            value = _number(number)
            if not rounds:
                literal(text[i:end])
            elif value is None:
                literal(text[i : end - 1])
                multiply(rounds.pop(), 1.1)
            else:
                multiply(rounds.pop(), value)
            i = end
        elif c == ")" and rounds:
            multiply(rounds.pop(), 1.1)
            i += 1
        elif c == "]" and squares:
            multiply(squares.pop(), 1 / 1.1)
            i += 1
        elif c in ")]":
            literal(c)
            i += 1
        else:
            j = i
            while j < len(text) and text[j] not in SPECIAL:
                j += 1
            literal(text[i:j])
            i = j
    for start in rounds:
        multiply(start, 1.1)
    for start in squares:
        multiply(start, 1 / 1.1)

    out: list[tuple[str, float]] = []
    for piece_text, weight in res:
        assert isinstance(piece_text, str) and isinstance(weight, float)
        if out and out[-1][1] == weight:
            out[-1] = (out[-1][0] + piece_text, weight)
        else:
            out.append((piece_text, weight))
    return out or [("", 1.0)]


def emphasis_original(z: list[list[float]], w: list[float]) -> list[list[float]]:
    """A1111's "Original" emphasis on one 77-token chunk (77 rows of D floats) of one prompt:
    z * w, then scaled so that the mean over the whole chunk equals the mean before."""
    count = sum(len(row) for row in z)
    before = sum(sum(row) for row in z) / count
    weighted = [[x * w_t for x in row] for row, w_t in zip(z, w, strict=True)]
    after = sum(sum(row) for row in weighted) / count
    return [[x * (before / after) for x in row] for row in weighted]
