"""Prompts: emphasis grammar, prompt -> (token ids, token weights) encoding, emphasis modes.

Grammars (``parse_prompt(text, syntax=...)``)
=============================================
``syntax="a1111"`` is exactly AUTOMATIC1111's emphasis parser:

* ``(words)`` x 1.1, ``[words]`` / 1.1; ``(words:1.3)`` x 1.3, the ``:1.3)`` closing the innermost
  open ``(`` (spaces allowed around the number ``[+-]?[.\\d]+``); nesting multiplies:
  ``((a:0.8):1.3)`` = 1.04. A bracket applies to the segments between its opening and its closing,
  so mismatched brackets overlap: ``(a [b) c]`` = a 1.1, b 1.0, c 1/1.1.
* ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are the literal character; a backslash before anything
  else is dropped (``\\:`` is a plain ``:``).
* A ``(`` or ``[`` never closed applies to the rest of the prompt; a closer with nothing to close,
  and ``:1.3)`` with no open ``(``, are text.
* ``BREAK`` (a word, upper case) is ``BREAK_SEGMENT`` = ``("BREAK", -1.0)``: the encoder pads the
  current 75-token chunk and starts a new one. Its weight is multiplied by enclosing brackets like
  any text, so inside brackets it is the word "BREAK" with a negative weight (as in A1111).
* Adjacent segments of equal weight merge; empty segments stay (A1111 tokenizes each segment on
  its own, so they keep neighbours apart); ``""`` gives ``[("", 1.0)]``.
* Where A1111 fails, we do not: a weight that is not a finite number (``(a:1.2.3)``, ``(a:.)``,
  300 digits) is text and its ``)`` an ordinary closer.

``syntax="sdfused"`` (the default) is the same reading, plus the seed's forms where A1111 reads the
text literally. The rule: wherever A1111 gives text a meaning, A1111's reading wins.

* ``(words):1.3`` after a ``)`` that closed a group: x 1.3 instead of the 1.1 (``(a:1.2):2`` = 2.4).
* ``word:1.3``: a word (no whitespace or ``,;``, at least one letter) directly followed by ``:``
  and a number (``[+-]?(\\d+(\\.\\d+)?|\\.\\d+)``, no spaces) that ends the token (end, whitespace,
  ``,`` ``;`` or a bracket next): ``cat:1.5``, ``1girl:1.2``; not ``16:9``, ``cat: 1.5``, ``x:1:2``.
  ``host\\:8080`` (and ``\\:`` anywhere) stays literal.
* Neither applies to a ``:1.3)`` that closes a ``(`` in A1111: ``((a):1.3)`` = 1.1 x 1.3.

Remaining differences between the grammars, all in ``sdfused``:

* the two seed forms above (A1111 reads them as text: ``(a):1.5`` is a x 1.1 then ":1.5");
* ``BREAK`` always breaks, inside brackets too, and its segment keeps weight -1;
* empty segments are dropped and ``""`` gives ``[]``; only a dropped backslash leaves an empty segment
  in A1111 that can keep equal-weight neighbours apart (``(a)(\\:2)(b)`` tokenizes a and b
  separately there, ``ab`` here);
* ``AND`` is text (``syntax="a1111"`` callers split positive prompts with ``split_and`` first).

Prompt editing ``[a:b:when]`` and alternation ``[a|b]`` are resolved before parsing, per step, by
``prompt_schedule`` / ``schedule_prompts`` (``runtime.prompt_schedule``), the same in both grammars.

Encoding and emphasis
=====================
``encode_prompts`` tokenizes each segment on its own and lays the tokens out in 77-token chunks
(BOS, up to 75 tokens, EOS, padding); BREAK ends a chunk early. ``apply_emphasis`` turns the encoder
output and the token weights into what the UNet takes, in one of three modes:

* ``"attention"`` (ours, the default): the weights scale the cross-attention value rows;
* ``"a1111"`` (A1111's "Original"): ``z *= w``, then ``z *= mean(z_before) / mean(z_after)``, the
  means taken per prompt and 77-token chunk (A1111 takes them per chunk over the batch it encodes at
  once, which for an unscheduled prompt is the prompt alone); attention weights all 1;
* ``"none"``: weights ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from runtime.prompt_grammar import (
    BREAK_SEGMENT,
    Syntax,
    escape_prompt_text,
    format_prompt,
    is_break,
    parse_prompt,
)
from runtime.prompt_schedule import PromptSteps, prompt_schedule, schedule_prompts, split_and
from runtime.tokenizer import ClipTokenizer

__all__ = [
    "BREAK_SEGMENT",
    "EMPHASIS_MODES",
    "Emphasis",
    "EncodedPrompt",
    "PromptSteps",
    "Syntax",
    "apply_emphasis",
    "encode_pair",
    "encode_prompt",
    "encode_prompts",
    "escape_prompt_text",
    "format_prompt",
    "is_break",
    "parse_prompt",
    "prompt_schedule",
    "schedule_prompts",
    "split_and",
]

Emphasis = Literal["attention", "a1111", "none"]
EMPHASIS_MODES: tuple[Emphasis, ...] = ("attention", "a1111", "none")


@dataclass(frozen=True)
class EncodedPrompt:
    """Token ids and per-token weights, ``n_chunks`` chunks of ``tokenizer.max_length`` (77).

    Each chunk is BOS + up to 75 tokens + EOS + padding; BOS/EOS/padding have weight 1.0.
    """

    ids: torch.Tensor  # (n_chunks * 77,) int64
    weights: torch.Tensor  # (n_chunks * 77,) float32
    n_chunks: int


_Chunk = tuple[list[int], list[float]]


def _split(ids: list[int], weights: list[float], per_chunk: int) -> list[_Chunk]:
    """Tokens -> chunks of at most ``per_chunk``; no tokens -> one empty chunk."""
    starts = range(0, max(len(ids), 1), per_chunk)
    return [(ids[s : s + per_chunk], weights[s : s + per_chunk]) for s in starts]


def _prompt_chunks(tokenizer: ClipTokenizer, prompt: str, syntax: Syntax) -> list[_Chunk]:
    """Chunks as A1111 lays them out: a BREAK closes the current chunk (even an empty one); a
    trailing empty chunk is kept only when it is the only one."""
    per_chunk = tokenizer.max_length - 2
    chunks: list[_Chunk] = []
    ids: list[int] = []
    weights: list[float] = []
    for segment in parse_prompt(prompt, syntax):
        if is_break(segment):
            chunks += _split(ids, weights, per_chunk)
            ids, weights = [], []
            continue
        text, weight = segment
        seg_ids = tokenizer.tokenize(text) if text else []
        ids.extend(seg_ids)
        weights.extend([weight] * len(seg_ids))
    if ids or not chunks:
        chunks += _split(ids, weights, per_chunk)
    return chunks


def _assemble(tokenizer: ClipTokenizer, chunks: list[_Chunk], n_chunks: int) -> EncodedPrompt:
    per_chunk = tokenizer.max_length - 2
    out_ids: list[int] = []
    out_weights: list[float] = []
    for chunk_ids, chunk_w in chunks + [([], [])] * (n_chunks - len(chunks)):
        pad = per_chunk - len(chunk_ids)
        out_ids += [tokenizer.bos_id, *chunk_ids, tokenizer.eos_id] + [tokenizer.pad_id] * pad
        out_weights += [1.0, *chunk_w, 1.0] + [1.0] * pad
    return EncodedPrompt(
        ids=torch.tensor(out_ids, dtype=torch.int64),
        weights=torch.tensor(out_weights, dtype=torch.float32),
        n_chunks=n_chunks,
    )


def encode_prompt(tokenizer: ClipTokenizer, prompt: str, min_chunks: int = 1, *,
                  syntax: Syntax = "sdfused") -> EncodedPrompt:
    """Parse ``prompt``, tokenize each segment, and lay the tokens out in 77-token chunks.

    A prompt longer than 75 tokens is split into several chunks (never truncated); ``BREAK`` starts
    a new chunk; at least ``min_chunks`` chunks are produced (extra ones are empty: BOS, EOS, padding).
    """
    chunks = _prompt_chunks(tokenizer, prompt, syntax)
    return _assemble(tokenizer, chunks, max(min_chunks, len(chunks)))


def encode_prompts(tokenizer: ClipTokenizer, prompts: Sequence[str], *,
                   syntax: Syntax = "sdfused") -> list[EncodedPrompt]:
    """Encode prompts with one chunk count, the longest prompt's (a batch shares one context length).
    Each prompt is tokenized once."""
    chunks = [_prompt_chunks(tokenizer, p, syntax) for p in prompts]
    n_chunks = max((len(c) for c in chunks), default=1)
    return [_assemble(tokenizer, c, n_chunks) for c in chunks]


def encode_pair(tokenizer: ClipTokenizer, prompt: str, negative: str, *,
                syntax: Syntax = "sdfused") -> tuple[EncodedPrompt, EncodedPrompt]:
    """Encode a prompt and its negative prompt with the same number of chunks."""
    pos, neg = encode_prompts(tokenizer, [prompt, negative], syntax=syntax)
    return pos, neg


# ============================================================================= emphasis


def apply_emphasis(context: torch.Tensor, weights: torch.Tensor, mode: Emphasis = "attention",
                   widths: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Text-encoder output ``context`` (N, 77k, D) and token ``weights`` (N, 77k) -> (context, weights
    for the cross-attention value rows). All weights 1 returns ``context`` and ``weights`` unchanged; in
    mode "a1111" so does each row whose weights are all 1. ``widths``: each encoder's share of D when the
    context concatenates several (SDXL); mode "a1111" restores each encoder's mean on its own, as A1111."""
    if mode not in EMPHASIS_MODES:
        raise ValueError(f"emphasis must be one of {EMPHASIS_MODES}, got {mode!r}")
    if mode == "attention":
        return context, weights
    ones = torch.ones_like(weights)
    if mode == "none" or bool((weights == 1).all()):
        return context, ones
    n, length, dim = context.shape
    if widths and sum(widths) != dim:
        raise ValueError(f"emphasis: encoder widths {tuple(widths)} do not add up to the context width {dim}")
    w = weights.to(context.dtype).reshape(n, length // 77, 77, 1)
    parts = []
    for part in torch.split(context, list(widths) or [dim], dim=-1):
        z = part.reshape(n, length // 77, 77, part.shape[-1])
        before = z.mean(dim=(2, 3), keepdim=True)
        z = z * w
        parts.append((z * (before / z.mean(dim=(2, 3), keepdim=True))).reshape(n, length, part.shape[-1]))
    plain = (weights == 1).all(dim=1)[:, None, None]  # rows without emphasis stay bit-identical
    return torch.where(plain, context, torch.cat(parts, dim=-1)), ones
