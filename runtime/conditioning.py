"""What the UNet is conditioned on besides the latents: the encoded prompts and SDXL's added conditioning.

Text (every family): each text encoder sees the same prompt, tokenized by its own tokenizer in 77-token
chunks (prompt.encode_prompts); each chunk is encoded on its own and the chunks' contexts concatenated;
the encoders' contexts are concatenated on the feature axis, and the emphasis weights (of the first
tokenizer) act on those context rows. SDXL's pooled embedding is the last encoder's, of the FIRST chunk
(A1111's rule; diffusers truncates at 77 tokens). With ``force_zeros_for_empty_prompt`` an empty
negative prompt gives a zero context and a zero pooled embedding (diffusers' ``negative_prompt=None``).

Time ids (SDXL, diffusers' ``_get_add_time_ids``): the base takes original size (h, w) + crop top-left
(y, x) + target size (h, w); the refiner original size + crop + aesthetic score. Sizes default to the
image size, crops to (0, 0), aesthetic scores to 6.0 / 2.5. Negative rows: text2img with the base uses
the positive ids unless a negative_* value is given (then negative crops default to (0, 0)); img2img and
inpaint with the base take the POSITIVE crops for the negative ids (diffusers' quirk) unless
negative_crops_coords_top_left is given; the refiner's negative crops default to (0, 0). A value given
is always used (diffusers' text2img drops a lone negative_original_size; we do not).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from runtime.backend import Backend, ModelInfo
from runtime.prompt import Emphasis, EncodedPrompt, Syntax, apply_emphasis, encode_prompt, encode_prompts

Size = tuple[int, int]

_SIZES = ("original_size", "crops_coords_top_left", "target_size", "negative_original_size",
          "negative_crops_coords_top_left", "negative_target_size")
_SCORES = ("aesthetic_score", "negative_aesthetic_score")
_TARGETS = ("target_size", "negative_target_size")
BASE_TIME_IDS, REFINER_TIME_IDS = 6, 5


@dataclass(frozen=True)
class SizeConditioning:
    """SDXL's size/crop/aesthetic keyword arguments of a request; None means the reference default."""

    original_size: Size | None = None
    crops_coords_top_left: Size | None = None
    target_size: Size | None = None
    negative_original_size: Size | None = None
    negative_crops_coords_top_left: Size | None = None
    negative_target_size: Size | None = None
    aesthetic_score: float | None = None
    negative_aesthetic_score: float | None = None

    def given(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def checked(self, info: ModelInfo) -> SizeConditioning:
        """Refuse arguments the model does not take and malformed values; sizes become int tuples."""
        given = self.given()
        if given and info.time_ids == 0:
            raise ValueError(f"{given[0]} is SDXL conditioning; this {info.family} model takes none")
        wrong = _SCORES if info.time_ids == BASE_TIME_IDS else _TARGETS
        for name in given:
            if name in wrong:
                which = "SDXL refiner" if name in _SCORES else "SDXL base"
                raise ValueError(f"{name} applies to the {which} only; this model is {info.family}")
        values = {name: _size(name, getattr(self, name)) for name in _SIZES}
        for name in _SCORES:
            score = getattr(self, name)
            if score is not None and (isinstance(score, bool) or not isinstance(score, int | float)
                                      or not math.isfinite(score)):
                raise ValueError(f"{name} must be a finite number, got {score!r}")
        return SizeConditioning(**values, aesthetic_score=self.aesthetic_score,
                                negative_aesthetic_score=self.negative_aesthetic_score)

    def time_ids(self, n_ids: int, height: int, width: int, text2img: bool) -> tuple[list[float], list[float]]:
        """(positive, negative) time ids of an image of height x width px (module docstring)."""
        size = (height, width)
        orig, target = self.original_size or size, self.target_size or size
        crops = self.crops_coords_top_left or (0, 0)
        neg_orig = self.negative_original_size or orig
        neg_target = self.negative_target_size or target
        if n_ids == REFINER_TIME_IDS:
            pos = [*orig, *crops, 6.0 if self.aesthetic_score is None else self.aesthetic_score]
            neg_score = 2.5 if self.negative_aesthetic_score is None else self.negative_aesthetic_score
            neg = [*neg_orig, *(self.negative_crops_coords_top_left or (0, 0)), neg_score]
        elif n_ids == BASE_TIME_IDS:
            pos = [*orig, *crops, *target]
            negatives_given = any(n.startswith("negative_") for n in self.given())
            if text2img and not negatives_given:
                neg = pos
            else:
                neg_crops = self.negative_crops_coords_top_left or ((0, 0) if text2img else crops)
                neg = [*neg_orig, *neg_crops, *neg_target]
        else:
            raise ValueError(f"unsupported number of SDXL time ids: {n_ids} (expected 5 or 6)")
        return [float(v) for v in pos], [float(v) for v in neg]


def _size(name: str, value: object) -> Size | None:
    if value is None:
        return None
    if (not isinstance(value, tuple | list) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
        raise ValueError(f"{name} must be a pair of integers >= 0 (height, width / top, left), got {value!r}")
    return int(value[0]), int(value[1])


@dataclass(frozen=True)
class TextConditioning:
    """Per-row UNet conditioning; rows are [negatives; prompts] under CFG, else prompts."""

    context: Tensor  # (N, 77k, D) in the backend dtype
    weights: Tensor  # (N, 77k) token weights
    text_embeds: Tensor | None = None  # (N, P) pooled embedding (SDXL)
    time_ids: Tensor | None = None  # (N, n) float32 (SDXL)

    def rows(self, s: slice) -> TextConditioning:
        return TextConditioning(self.context[s], self.weights[s],
                                None if self.text_embeds is None else self.text_embeds[s],
                                None if self.time_ids is None else self.time_ids[s])

    def unet(self, backend: Backend, x: Tensor, t: Tensor, control: Sequence[Tensor] | None = None) -> Tensor:
        """One UNet call on these rows (the added conditioning only where the model takes it; ControlNet
        residuals only when given)."""
        if control is not None:
            return backend.unet(x, t, self.context, self.weights, self.text_embeds, self.time_ids, control=control)
        if self.text_embeds is None and self.time_ids is None:
            return backend.unet(x, t, self.context, self.weights)
        return backend.unet(x, t, self.context, self.weights, self.text_embeds, self.time_ids)


def _tokenize(backend: Backend, texts: Sequence[str], syntax: Syntax) -> list[list[EncodedPrompt]]:
    """Each text with each tokenizer, all with one chunk count (the longest)."""
    per_tokenizer = [encode_prompts(tok, texts, syntax=syntax) for tok in backend.tokenizers]
    chunks = max(enc[0].n_chunks for enc in per_tokenizer)
    return [enc if enc[0].n_chunks == chunks else [encode_prompt(tok, t, chunks, syntax=syntax) for t in texts]
            for tok, enc in zip(backend.tokenizers, per_tokenizer, strict=True)]


def _encode_ids(backend: Backend, ids: list[Tensor], per_call: int) -> tuple[Tensor, Tensor | None]:
    """backend.encode_text on at most `per_call` chunks at a time (what an artifact's encoder takes)."""
    parts = [backend.encode_text([i[s : s + per_call] for i in ids]) for s in range(0, ids[0].shape[0], per_call)]
    if len(parts) == 1:
        return parts[0]
    pooled = [p for _, p in parts if p is not None]
    return torch.cat([c for c, _ in parts]), torch.cat(pooled) if pooled else None


def encode_text(backend: Backend, texts: Sequence[str], zero: Sequence[bool], *, syntax: Syntax = "sdfused",
                emphasis: Emphasis = "attention", batch: int | None = None) -> TextConditioning:
    """Context, token weights (after the `emphasis` mode) and pooled embedding of `texts`, parsed with
    `syntax`; rows where `zero` is set are zeros. The pooled embedding never carries emphasis (A1111).
    `batch`: the most texts encoded in one backend call (None: all)."""
    encoded = _tokenize(backend, texts, syntax)
    n, chunks = len(texts), encoded[0][0].n_chunks
    ids = [torch.stack([e.ids for e in enc]).reshape(-1, 77).to(backend.device) for enc in encoded]
    weights = torch.stack([e.weights for e in encoded[0]]).to(backend.device, backend.dtype)
    with torch.inference_mode():  # each 77-token chunk encoded on its own
        ctx, pooled = _encode_ids(backend, ids, chunks * (batch or n))
    ctx = ctx.reshape(n, chunks * 77, -1)
    if pooled is not None:
        pooled = pooled.reshape(n, chunks, -1)[:, 0]  # the first chunk's
    # before zeroing: A1111's mean of zeros is 0/0
    ctx, weights = apply_emphasis(ctx, weights, emphasis, backend.info.context_widths)
    if any(zero):
        keep = torch.tensor([not z for z in zero], device=ctx.device)
        ctx = torch.where(keep[:, None, None], ctx, torch.zeros_like(ctx))
        if pooled is not None:
            pooled = torch.where(keep[:, None], pooled, torch.zeros_like(pooled))
    return TextConditioning(ctx, weights, pooled)


def time_id_rows(info: ModelInfo, size: SizeConditioning, height: int, width: int, text2img: bool,
                 negatives: int, rows: int, device: torch.device) -> Tensor | None:
    """(rows, n) float32 time ids, the first `negatives` rows negative; None for SD 1/2."""
    if info.time_ids == 0:
        return None
    pos, neg = size.time_ids(info.time_ids, height, width, text2img)
    return torch.tensor([neg] * negatives + [pos] * (rows - negatives), dtype=torch.float32, device=device)


def default_scheduler(info: ModelInfo) -> str:
    """The sampler a request without one uses: SDXL's published Euler; DDIM for SD 1.x/2.x."""
    return "euler" if info.time_ids else "ddim"
