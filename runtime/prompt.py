"""Prompt emphasis syntax and prompt -> (token ids, token weights) encoding.

Grammar
=======
``parse_prompt(text)`` returns ``(text, weight)`` segments. Weight syntax:

* ``(words)``          weight x 1.1            (A1111)
* ``[words]``          weight / 1.1 (x 1/1.1)  (A1111)
* ``(words:1.3)``      weight x 1.3            (A1111; spaces allowed around the number)
* ``(words):1.3``      weight x 1.3            (seed syntax; replaces the default 1.1)
* ``word:1.3``         weight x 1.3 on one word (seed syntax)
* Nesting multiplies: ``((a):0.5)`` = 0.5 x 1.1, ``[(a:2)]`` = 2 / 1.1.
  ``(words:w):f`` = w x f.
* ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\:`` ``\\\\`` are escapes for the literal character; any other
  backslash is literal.

Numbers are signed decimals without exponent: ``[+-]?(\\d+(\\.\\d+)?|\\.\\d+)`` (``1.5``, ``-0.5``,
``.5``, ``+2``, ``0``; not ``1.``, ``1e3``, ``inf``).

Rules that keep ordinary text literal:

* Brackets are paired like nested parentheses: ``(`` only with ``)``, ``[`` only with ``]``.
  A closing bracket pairs with the nearest open bracket of its kind; open brackets of the other
  kind in between become literal. A closing bracket with no open one of its kind, and open
  brackets never closed, are literal text. Parsing never raises.
* ``word:factor`` needs: a *word* (a run of characters other than whitespace and ``()[]:\\,;``)
  that contains at least one letter, directly followed by ``:``, directly followed by a number
  (no spaces), and the number must end the token: it is followed by the end of the text,
  whitespace, ``,`` ``;`` or a bracket. Thus ``16:9``, ``12:30`` (no letter), ``a:b`` (not a number),
  ``x:1:2``, ``cat:1.5x``, ``cat: 1.5``, ``http://host/x`` and ``v1.2:3.4.5`` stay literal;
  ``cat:1.5``, ``cat:-0.5,`` and ``1girl:1.2`` are weighted. (A bare ``host:8080`` would be read as a
  weight: write ``host\\:8080``.)
* ``(words):factor`` follows the same number rules (no spaces, number must end the token).
* ``[words:1.3]`` has no special meaning of its own (A1111's ``[a:b:n]`` prompt editing is not
  supported): the inside is ordinary text, where ``word:factor`` may apply.

Output: segments with empty text are dropped, adjacent segments of equal weight are merged, so
a prompt with none of ``()[]:\\`` gives ``[(text, 1.0)]`` (and ``""`` gives ``[]``).

Text property: the joined segment texts are the input with only syntax characters deleted:
brackets that pair up, the backslash of an escape, and weight annotations (``:`` + number, and the
spaces of the ``(words : 1.3 )`` form). Every other character survives, in order.
``format_prompt`` is an inverse: ``parse_prompt(format_prompt(segs)) == segs`` for merged segments.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

import torch

from runtime.tokenizer import ClipTokenizer

__all__ = [
    "EncodedPrompt",
    "encode_pair",
    "encode_prompt",
    "encode_prompts",
    "escape_prompt_text",
    "format_prompt",
    "parse_prompt",
]

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1

_ESCAPABLE = frozenset("()[]:\\")
_NOT_WORD = frozenset("()[]:\\,;")
_TERMINATORS = frozenset(",;()[]")
_NUMBER_CHARS = frozenset("+-.0123456789")
_NUMBER = r"[+-]?(?:\d+(?:\.\d+)?|\.\d+)"
_NUMBER_RE = re.compile(_NUMBER, re.ASCII)
_INNER_WEIGHT_RE = re.compile(r":\s*(" + _NUMBER + r")\s*\Z", re.ASCII)

# Atom kinds.
_CHAR = 0  # a character of text (possibly escaped)
_OPEN = 1  # a bracket that pairs with a close
_CLOSE = 2


@dataclass
class _Atom:
    kind: int
    char: str
    escaped: bool = False
    removed: bool = False  # part of a weight annotation
    multiplier: float = 1.0  # _OPEN: the group's multiplier
    word_factor: float = 1.0  # _CHAR: factor from ``word:factor``


def _lex(text: str) -> list[_Atom]:
    atoms: list[_Atom] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\" and i + 1 < n and text[i + 1] in _ESCAPABLE:
            atoms.append(_Atom(_CHAR, text[i + 1], escaped=True))
            i += 2
            continue
        atoms.append(_Atom(_OPEN if c in "([" else _CLOSE if c in ")]" else _CHAR, c))
        i += 1
    return atoms


def _pair_brackets(atoms: list[_Atom]) -> list[tuple[int, int]]:
    """Pair brackets; unpaired ones become literal characters. Returns pairs in closing order."""
    stack: list[int] = []
    open_count = {"(": 0, "[": 0}  # keeps the search below linear overall
    pairs: list[tuple[int, int]] = []
    for i, atom in enumerate(atoms):
        if atom.kind == _OPEN:
            stack.append(i)
            open_count[atom.char] += 1
        elif atom.kind == _CLOSE:
            want = "(" if atom.char == ")" else "["
            if open_count[want] == 0:
                atom.kind = _CHAR
                continue
            while atoms[stack[-1]].char != want:
                dropped = atoms[stack.pop()]
                dropped.kind = _CHAR
                open_count[dropped.char] -= 1
            pairs.append((stack.pop(), i))
            open_count[want] -= 1
    for j in stack:
        atoms[j].kind = _CHAR
    return pairs


def _is_plain(atom: _Atom, char: str | None = None) -> bool:
    """An unescaped, unclaimed character (optionally a given one)."""
    return (
        atom.kind == _CHAR and not atom.escaped and not atom.removed and (char is None or atom.char == char)
    )


def _ends_token(atoms: list[_Atom], k: int) -> bool:
    if k >= len(atoms):
        return True
    atom = atoms[k]
    return atom.kind != _CHAR or atom.char.isspace() or atom.char in _TERMINATORS


def _factor_at(atoms: list[_Atom], colon: int) -> tuple[float, int] | None:
    """``:number`` at ``colon`` ending the token -> (value, index after the number)."""
    if colon >= len(atoms) or not _is_plain(atoms[colon], ":"):
        return None
    k = colon + 1
    while k < len(atoms) and _is_plain(atoms[k]) and atoms[k].char in _NUMBER_CHARS:
        k += 1
    run = "".join(a.char for a in atoms[colon + 1 : k])
    if not _NUMBER_RE.fullmatch(run) or not _ends_token(atoms, k):
        return None
    value = float(run)
    if not math.isfinite(value):
        return None
    return value, k


def _claim(atoms: list[_Atom], start: int, stop: int) -> None:
    for a in atoms[start:stop]:
        a.removed = True


def _group_weights(atoms: list[_Atom], pairs: list[tuple[int, int]]) -> None:
    for open_i, close_i in pairs:  # inner groups first: a suffix is claimed by the innermost group
        opener = atoms[open_i]
        if opener.char == "[":
            opener.multiplier = SQUARE_MULTIPLIER
            continue
        explicit: float | None = None
        # (words:1.3): the trailing run of plain characters ends with ':' number.
        k = close_i
        while k > open_i + 1 and _is_plain(atoms[k - 1]):
            k -= 1
        tail = "".join(a.char for a in atoms[k:close_i])
        m = _INNER_WEIGHT_RE.search(tail)
        if m is not None:
            value = float(m.group(1))
            if math.isfinite(value):
                explicit = value
                _claim(atoms, k + m.start(), close_i)
        # (words):1.3
        suffix = _factor_at(atoms, close_i + 1)
        if suffix is not None:
            _claim(atoms, close_i + 1, suffix[1])
        if explicit is None and suffix is None:
            opener.multiplier = ROUND_MULTIPLIER
        else:
            opener.multiplier = (1.0 if explicit is None else explicit) * (
                1.0 if suffix is None else suffix[0]
            )


def _is_word_char(atom: _Atom) -> bool:
    return _is_plain(atom) and not atom.char.isspace() and atom.char not in _NOT_WORD


def _word_weights(atoms: list[_Atom]) -> None:
    i, n = 0, len(atoms)
    while i < n:
        if not _is_word_char(atoms[i]):
            i += 1
            continue
        j = i
        while j < n and _is_word_char(atoms[j]):
            j += 1
        has_letter = any(a.char.isalpha() for a in atoms[i:j])
        factor = _factor_at(atoms, j) if has_letter else None
        if factor is not None:
            for a in atoms[i:j]:
                a.word_factor = factor[0]
            _claim(atoms, j, factor[1])
            j = factor[1]
        i = j


def parse_prompt(text: str) -> list[tuple[str, float]]:
    """Split a prompt into ``(text, weight)`` segments (see the module docstring for the grammar)."""
    atoms = _lex(text)
    pairs = _pair_brackets(atoms)
    _group_weights(atoms, pairs)
    _word_weights(atoms)

    segments: list[tuple[str, float]] = []
    buf: list[str] = []
    buf_weight = 1.0
    current = 1.0
    saved: list[float] = []
    for atom in atoms:
        if atom.kind == _OPEN:
            saved.append(current)
            current *= atom.multiplier
            continue
        if atom.kind == _CLOSE:
            current = saved.pop()
            continue
        if atom.removed:
            continue
        weight = current * atom.word_factor
        if buf and weight != buf_weight:
            segments.append(("".join(buf), buf_weight))
            buf = []
        buf.append(atom.char)
        buf_weight = weight
    if buf:
        segments.append(("".join(buf), buf_weight))
    return segments


def escape_prompt_text(text: str) -> str:
    """Backslash-escape every syntax character so ``parse_prompt`` reads ``text`` literally."""
    return "".join("\\" + c if c in _ESCAPABLE else c for c in text)


def _format_number(value: float) -> str:
    if not math.isfinite(value):
        raise ValueError(f"weight must be finite, got {value}")
    return f"{Decimal(repr(value)):f}"


def format_prompt(segments: list[tuple[str, float]]) -> str:
    """Write segments in the prompt syntax; ``parse_prompt`` reads them back (merged)."""
    parts = []
    for text, weight in segments:
        escaped = escape_prompt_text(text)
        parts.append(escaped if weight == 1.0 else f"({escaped}:{_format_number(weight)})")
    return "".join(parts)


# ============================================================================= encoding


@dataclass(frozen=True)
class EncodedPrompt:
    """Token ids and per-token weights, ``n_chunks`` chunks of ``tokenizer.max_length`` (77).

    Each chunk is BOS + up to 75 tokens + EOS + padding; BOS/EOS/padding have weight 1.0.
    """

    ids: torch.Tensor  # (n_chunks * 77,) int64
    weights: torch.Tensor  # (n_chunks * 77,) float32
    n_chunks: int


def _prompt_tokens(tokenizer: ClipTokenizer, prompt: str) -> tuple[list[int], list[float]]:
    segments = parse_prompt(prompt)
    ids: list[int] = []
    weights: list[float] = []
    for text, weight in segments:
        seg_ids = tokenizer.tokenize(text)
        ids.extend(seg_ids)
        weights.extend([weight] * len(seg_ids))
    return ids, weights


def _chunks_needed(tokenizer: ClipTokenizer, n_tokens: int) -> int:
    per_chunk = tokenizer.max_length - 2
    return max(1, -(-n_tokens // per_chunk))


def _assemble(tokenizer: ClipTokenizer, ids: list[int], weights: list[float], n_chunks: int) -> EncodedPrompt:
    length = tokenizer.max_length
    per_chunk = length - 2
    out_ids: list[int] = []
    out_weights: list[float] = []
    for c in range(n_chunks):
        chunk_ids = ids[c * per_chunk : (c + 1) * per_chunk]
        chunk_w = weights[c * per_chunk : (c + 1) * per_chunk]
        pad = per_chunk - len(chunk_ids)
        out_ids += [tokenizer.bos_id, *chunk_ids, tokenizer.eos_id] + [tokenizer.pad_id] * pad
        out_weights += [1.0, *chunk_w, 1.0] + [1.0] * pad
    return EncodedPrompt(
        ids=torch.tensor(out_ids, dtype=torch.int64),
        weights=torch.tensor(out_weights, dtype=torch.float32),
        n_chunks=n_chunks,
    )


def encode_prompt(tokenizer: ClipTokenizer, prompt: str, min_chunks: int = 1) -> EncodedPrompt:
    """Parse ``prompt``, tokenize each segment, and lay the tokens out in 77-token chunks.

    A prompt longer than 75 tokens is split into several chunks (never truncated); at least
    ``min_chunks`` chunks are produced (extra ones are empty: BOS, EOS, padding).
    """
    ids, weights = _prompt_tokens(tokenizer, prompt)
    n_chunks = max(min_chunks, _chunks_needed(tokenizer, len(ids)))
    return _assemble(tokenizer, ids, weights, n_chunks)


def encode_prompts(tokenizer: ClipTokenizer, prompts: Sequence[str]) -> list[EncodedPrompt]:
    """Encode prompts with one chunk count, the longest prompt's (a batch shares one context length).
    Each prompt is tokenized once."""
    tokens = [_prompt_tokens(tokenizer, p) for p in prompts]
    n_chunks = max((_chunks_needed(tokenizer, len(ids)) for ids, _ in tokens), default=1)
    return [_assemble(tokenizer, ids, weights, n_chunks) for ids, weights in tokens]


def encode_pair(tokenizer: ClipTokenizer, prompt: str, negative: str) -> tuple[EncodedPrompt, EncodedPrompt]:
    """Encode a prompt and its negative prompt with the same number of chunks."""
    pos, neg = encode_prompts(tokenizer, [prompt, negative])
    return pos, neg
