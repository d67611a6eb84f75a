"""Prompt editing and alternation (A1111's schedules), and A1111's ``AND`` split.

Syntax, read as A1111 reads it (both grammars):

* ``[from:to:when]`` ``from`` up to and including step ``when``, then ``to``; ``[to:when]`` nothing,
  then ``to``; ``[from::when]`` ``from``, then nothing. ``when`` (a signed decimal, exponent allowed)
  is a step number, or where it is < 1 a fraction of the steps: step ``int(when * steps)``; either
  is capped at ``steps``; a step < 1 means ``to`` from the start. With ``decimal_fraction=True``
  (A1111 >= 1.6's default, its option "use old prompt editing timelines" off) a ``when`` written
  with a ``.`` is always a fraction (``1.5`` -> 1.5 x steps) and one without is always a step.
* ``[a|b|c]`` alternation: step t (1-based) uses option ``(t - 1) % n`` (0-based step i: ``i % n``);
  an option may be empty (``[fe|]male``).
* Nesting is allowed anywhere, also inside ``( )``; brackets that form no construct are text; ``\\x``
  escapes any character. The text around the constructs is kept verbatim (emphasis is parsed later).
* Where A1111's schedule grammar fails the whole prompt is used as is, at every step: a ``|``
  outside an alternation (``a | b``, ``(a|b)``), a backslash at the end or before a newline.

Steps are 1-based here as in A1111's schedule and documentation: ``[a:b:10]`` with 20 steps is ``a``
for the first 10 steps and ``b`` for the last 10. (A1111's samplers compare a 0-based step counter
with the same schedule, so there ``a`` runs 11 steps and ``[a|b]`` runs a, a, b, a, b, ...; we follow
the schedule as documented.)
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["PromptSteps", "prompt_schedule", "schedule_prompts", "split_and"]

_NUMBER = r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
_WHEN_CLOSE_RE = re.compile(r"\s*(" + _NUMBER + r")\s*\]")
_WHEN_RE = re.compile(r"\s*(" + _NUMBER + r")\s*")
_STOPS = frozenset(":])|")


@dataclass(frozen=True)
class _Choice:
    start: int  # the construct's span in the text
    end: int
    options: tuple[tuple[int, int], ...]  # spans of the options (scheduled: before, after)
    when: str | None  # scheduled: the number as written; alternation: None


@dataclass(frozen=True)
class _Group:
    end: int
    choice: _Choice | None
    children: tuple[int, ...]  # starts of the groups directly inside


class _Fail(Exception):
    """The schedule grammar does not match the whole prompt."""


def _scan(text: str, i: int, groups: dict[int, _Group | None]) -> tuple[int, list[int]] | None:
    """A prompt from i at one nesting level -> (position of its stop character or the end, groups)."""
    children: list[int] = []
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            if i + 1 >= n or text[i + 1] == "\n":
                return None
            i += 2
        elif c in "([":
            group = groups.get(i)
            if group is None:
                return None
            children.append(i)
            i = group.end
        elif c in _STOPS:
            break
        else:
            i += 1
    return i, children


def _square(text: str, i: int, groups: dict[int, _Group | None]) -> _Group | None:
    first = _scan(text, i + 1, groups)
    if first is None or first[0] >= len(text):
        return None
    pos, kids = first
    c = text[pos]
    if c == "]":
        return _Group(pos + 1, None, tuple(kids))
    if c == "|":
        return _alternation(text, i, pos, kids, groups)
    second = _scan(text, pos + 1, groups) if c == ":" else None
    if second is None or second[0] >= len(text):
        return None
    pos2, kids2 = second
    if text[pos2] == ":" and (m := _WHEN_CLOSE_RE.match(text, pos2 + 1)):
        options = ((i + 1, pos), (pos + 1, pos2))
        return _Group(m.end(), _Choice(i, m.end(), options, m.group(1)), (*kids, *kids2))
    if text[pos2] == "]" and (m := _WHEN_RE.fullmatch(text, pos + 1, pos2)):
        choice = _Choice(i, pos2 + 1, ((i + 1, i + 1), (i + 1, pos)), m.group(1))
        return _Group(pos2 + 1, choice, tuple(kids))
    return None


def _alternation(text: str, i: int, pos: int, kids: list[int],
                 groups: dict[int, _Group | None]) -> _Group | None:
    options = [(i + 1, pos)]
    while text[pos] == "|":
        nxt = _scan(text, pos + 1, groups)
        if nxt is None or nxt[0] >= len(text) or text[nxt[0]] not in "|]":
            return None
        options.append((pos + 1, nxt[0]))
        kids.extend(nxt[1])
        pos = nxt[0]
    return _Group(pos + 1, _Choice(i, pos + 1, tuple(options), None), tuple(kids))


def _round(text: str, i: int, groups: dict[int, _Group | None]) -> _Group | None:
    first = _scan(text, i + 1, groups)
    if first is None or first[0] >= len(text):
        return None
    pos, kids = first
    if text[pos] == ":":
        second = _scan(text, pos + 1, groups)
        if second is None:
            return None
        pos, more = second
        kids += more
    if pos < len(text) and text[pos] == ")":
        return _Group(pos + 1, None, tuple(kids))
    return None


def _choices(text: str) -> list[_Choice]:
    """Every construct in A1111's reading of ``text``; raises _Fail where its grammar does not match."""
    # A group's reading depends only on the text after it: computed right to left, each once.
    groups: dict[int, _Group | None] = {}
    for i in range(len(text) - 1, -1, -1):
        if text[i] == "(":
            groups[i] = _round(text, i, groups)
        elif text[i] == "[":
            groups[i] = _square(text, i, groups)
    stack, i = [], 0
    while i < len(text):  # the top level: brackets that form no group are text; '|' is not
        c = text[i]
        if c == "\\" and (i + 1 >= len(text) or text[i + 1] == "\n"):
            raise _Fail
        if c == "|":
            raise _Fail
        group = groups.get(i) if c in "([" else None
        if group is not None:
            stack.append(i)
            i = group.end
        else:
            i += 2 if c == "\\" else 1
    found = []
    while stack:
        group = groups[stack.pop()]
        assert group is not None
        if group.choice is not None:
            found.append(group.choice)
        stack.extend(group.children)
    return found


def _when_step(when: str, steps: int, decimal_fraction: bool) -> int:
    v = float(when)
    if ("." in when) if decimal_fraction else v < 1:
        v *= steps
    if v >= steps:
        return steps
    return int(v) if math.isfinite(v) else -1


def _text_at(text: str, choices: list[_Choice], whens: list[int], step: int) -> str:
    """The text at 1-based ``step``: each construct replaced by its chosen option."""
    drop = [0] * (len(text) + 1)
    for choice, when in zip(choices, whens, strict=True):
        if choice.when is None:
            keep = choice.options[(step - 1) % len(choice.options)]
        else:
            keep = choice.options[0 if step <= when else 1]
        for a, b in ((choice.start, keep[0]), (keep[1], choice.end)):
            drop[a] += 1
            drop[b] -= 1
    out, depth = [], 0
    for k, c in enumerate(text):
        depth += drop[k]
        if depth == 0:
            out.append(c)
    return "".join(out)


def prompt_schedule(text: str, steps: int, *, decimal_fraction: bool = False) -> list[tuple[int, str]]:
    """A1111's schedule of one prompt: ``[(until_step, text), ...]``, 1-based steps, ascending, the last
    ``until_step`` == ``steps``; step t uses the first entry with ``t <= until_step``.

    ``prompt_schedule("a [b:c:10]", 20) == [(10, "a b"), (20, "a c")]``. Never raises on any text.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    try:
        choices = _choices(text)
    except _Fail:
        return [(steps, text)]
    whens = [-1 if c.when is None else _when_step(c.when, steps, decimal_fraction) for c in choices]
    bounds = {steps, *(w for w in whens if w >= 1)}
    if any(c.when is None for c in choices):
        bounds.update(range(1, steps + 1))
    return [(t, _text_at(text, choices, whens, t)) for t in sorted(bounds)]


@dataclass(frozen=True)
class PromptSteps:
    """Per-step prompts of a batch: encode ``texts`` once; at 0-based step i row j of the batch uses
    ``texts[index[i, j]]`` (so its context is ``contexts[index[i]]`` for contexts encoded from ``texts``)."""

    texts: tuple[str, ...]
    index: torch.Tensor  # (steps, n_prompts) int64

    @property
    def static(self) -> bool:
        """No prompt changes during sampling."""
        return bool((self.index == self.index[:1]).all())

    def changes(self) -> list[int]:
        """The 0-based steps at which some row's text changes (always step 0)."""
        moved = (self.index[1:] != self.index[:-1]).any(dim=1)
        return [0, *(int(i) + 1 for i in torch.nonzero(moved).flatten())]


def schedule_prompts(prompts: Sequence[str], steps: int, *, decimal_fraction: bool = False) -> PromptSteps:
    """Schedule a batch (positive and negative prompts alike): distinct texts, first seen first."""
    ids: dict[str, int] = {}
    columns = []
    for prompt in prompts:
        schedule = prompt_schedule(prompt, steps, decimal_fraction=decimal_fraction)
        column, k = [], 0
        for t in range(1, steps + 1):
            while schedule[k][0] < t:
                k += 1
            column.append(ids.setdefault(schedule[k][1], len(ids)))
        columns.append(column)
    index = torch.tensor(columns, dtype=torch.int64).reshape(len(prompts), steps).T.contiguous()
    return PromptSteps(tuple(ids), index)


# ----------------------------------------------------------------------------- AND

_AND_RE = re.compile(r"\bAND\b")
_SUB_WEIGHT_RE = re.compile(r"\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+))\s*\Z")


def split_and(text: str) -> list[tuple[str, float]]:
    """A1111's composable-diffusion split of a positive prompt: ``[(sub_prompt, guidance weight)]``.

    Sub-prompts are separated by the word ``AND`` (upper case); each may end with ``:weight``
    (default 1.0; trailing whitespace is dropped). A1111 then schedules each sub-prompt on its own and
    guides with ``uncond + sum_k weight_k * scale * (cond_k - uncond)``; negative prompts are not split.
    ``split_and("a cat :1.2 AND a dog") == [("a cat", 1.2), (" a dog", 1.0)]``.
    """
    out = []
    for sub in _AND_RE.split(text):
        m = _SUB_WEIGHT_RE.search(sub)
        out.append((sub[: m.start()], float(m.group(1))) if m else (sub.rstrip(), 1.0))
    return out
