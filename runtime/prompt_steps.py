"""Prompts in the sampling loop: the context of every step (prompt editing, alternation) and guidance weights.

Each UNet row's prompt ([negatives; prompts] under CFG, else prompts) is scheduled over the request's
``steps`` (``schedule_prompts``); the distinct texts are encoded once, before the loop, in batches of at
most the request's rows (an artifact's encoder takes no more), with the emphasis mode applied once.
At sampling step j the rows gather the table rows ``index[j]`` (context, token weights and, for SDXL,
the pooled embedding; time ids are per row). When no prompt changes, the rows are gathered once.

Steps are sampling steps, not model calls: Heun's predictor and corrector, and PLMS's warm-up redo of
step 0, share their step's context (:func:`call_steps`). The pipeline's step callback moves the context
on (``sample`` calls it after every model call). img2img / inpaint below strength 1 count as A1111
does: the schedule spans all ``steps``; the steps actually run count from 0.

``syntax="a1111"`` reads positive prompts as A1111's composable prompts: a trailing ``:w`` (``a cat :1.2``)
is a guidance weight, ``uncond + w * scale * (cond - uncond)``; ``AND`` (several sub-prompts) is refused
with a ValueError. ``when`` is read as A1111 >= 1.6 reads it (``decimal_fraction``: a number written
with a ``.`` is a fraction of the steps). ``syntax="sdfused"``: ``AND`` and ``:w`` are text, and
``when`` >= 1 is a step, < 1 a fraction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from runtime.backend import Backend
from runtime.conditioning import TextConditioning, encode_text
from runtime.prompt import EMPHASIS_MODES, Emphasis, Syntax, schedule_prompts, split_and
from runtime.prompt_grammar import SYNTAXES
from runtime.schedulers import PLMS, Schedule

__all__ = ["StepCursor", "StepText", "call_steps", "check_prompt_options", "composable", "encode_steps"]


def check_prompt_options(syntax: object, emphasis: object) -> None:
    if syntax not in SYNTAXES:
        raise ValueError(f"syntax must be one of {SYNTAXES}, got {syntax!r}")
    if emphasis not in EMPHASIS_MODES:
        raise ValueError(f"emphasis must be one of {EMPHASIS_MODES}, got {emphasis!r}")


def composable(prompts: Sequence[str], syntax: Syntax) -> tuple[list[str], list[float]]:
    """(texts to encode, guidance weight per prompt): A1111's split under "a1111", else as given."""
    if syntax != "a1111":
        return list(prompts), [1.0] * len(prompts)
    texts, weights = [], []
    for prompt in prompts:
        parts = split_and(prompt)
        if len(parts) > 1:
            raise ValueError(f"AND (composable prompts) is not supported: {prompt!r} has {len(parts)} "
                             "sub-prompts under syntax='a1111' (syntax='sdfused' reads AND as text)")
        texts.append(parts[0][0])
        weights.append(parts[0][1])
    return texts, weights


@dataclass(frozen=True)
class StepText:
    """The encoded distinct texts and the table row of every UNet row at every step."""

    table: TextConditioning  # one row per distinct text, emphasis applied, no time ids
    index: Tensor  # (steps, rows) int64 on the table's device
    time_ids: Tensor | None = None  # (rows, n) float32 (SDXL)

    @property
    def static(self) -> bool:
        return bool((self.index == self.index[:1]).all())

    def at(self, step: int) -> TextConditioning:
        """The rows' conditioning at 0-based sampling step `step`."""
        rows, t = self.index[step], self.table
        pooled = None if t.text_embeds is None else t.text_embeds[rows]
        return TextConditioning(t.context[rows], t.weights[rows], pooled, self.time_ids)


def encode_steps(backend: Backend, rows: Sequence[str], negatives: int, steps: int, syntax: Syntax,
                 emphasis: Emphasis, time_ids: Tensor | None) -> StepText:
    """Schedule and encode `rows` (the first `negatives` are negative prompts; an empty one is zeros
    where the model says so, force_zeros_for_empty_prompt)."""
    sched = schedule_prompts(rows, steps, decimal_fraction=syntax == "a1111")
    texts, index = list(sched.texts), sched.index.clone()
    zero = [False] * len(texts)
    empty = [j for j in range(negatives) if not rows[j]]
    if empty and backend.info.force_zeros_for_empty_prompt:
        texts.append("")
        zero.append(True)
        index[:, empty] = len(texts) - 1
    # at most len(rows) texts per encoder call: what the request would encode without schedules
    table = encode_text(backend, texts, zero, syntax=syntax, emphasis=emphasis, batch=len(rows))
    if time_ids is not None and table.text_embeds is None:
        raise ValueError(f"this {backend.info.family} model's text encoders gave no pooled embedding")
    return StepText(table, index.to(table.context.device), time_ids)


def call_steps(schedule: Schedule) -> list[int]:
    """The 0-based sampling step (of this run) of each of the run's model calls."""
    calls = range(schedule.num_steps)
    order = schedule.kind.order
    if order > 1:  # Heun: predictor and corrector (the last step has the predictor only)
        return [c // order for c in calls]
    if schedule.kind == PLMS:  # the warm-up's second call redoes step 0
        return [max(c - 1, 0) for c in calls]
    return list(calls)


class StepCursor:
    """The conditioning of the sampler's next model call: step 0's, then moved on by `after_call`."""

    def __init__(self, text: StepText, schedule: Schedule) -> None:
        self._text = text
        self._steps = call_steps(schedule)
        self._static = text.static
        self.step = 0
        self.current = text.at(0)

    def after_call(self, i: int) -> None:
        """Model call `i` of the run is done; the next one may start a new step."""
        if self._static or i + 1 >= len(self._steps) or self._steps[i + 1] == self.step:
            return
        self.step = self._steps[i + 1]
        self.current = self._text.at(self.step)


def guidance_scale(scale: float, weights: Sequence[float], device: torch.device) -> float | Tensor:
    """CFG scale per image: `scale` times each prompt's guidance weight (a float when all are 1)."""
    if all(w == 1.0 for w in weights):
        return scale
    return torch.tensor([scale * w for w in weights], dtype=torch.float32, device=device).view(-1, 1, 1, 1)
