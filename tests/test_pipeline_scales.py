"""A CFG scale per image (`scale=[...]`, what the server's batching needs): a batch gives each image what
it gives alone with its own scale and seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from runtime.pipeline import StopSampling
from sdexport.presets import random_pipeline


@pytest.fixture(scope="module")
def sd() -> object:
    torch.manual_seed(0)
    return random_pipeline("demo")


def test_per_image_scale_equals_alone(sd: object) -> None:
    kw = dict(steps=3, height=64, width=64, scheduler="euler", output="tensor", syntax="a1111")
    prompts, negatives = ["a red fox", "a (blue):1.3 bird :1.2"], ["", "blurry"]
    batch = sd.text2img(prompts, negatives, scale=[3.0, 9.5], seed=[4, 7], **kw)  # type: ignore[attr-defined]
    for i, (p, n, s, seed) in enumerate(zip(prompts, negatives, [3.0, 9.5], [4, 7], strict=True)):
        alone = sd.text2img(p, n, scale=s, seed=seed, **kw)  # type: ignore[attr-defined]
        torch.testing.assert_close(batch[i:i + 1], alone, atol=1e-5, rtol=0)
    same = sd.text2img(prompts, negatives, scale=[6.0, 6.0], seed=[4, 7], **kw)  # type: ignore[attr-defined]
    torch.testing.assert_close(same, sd.text2img(prompts, negatives, scale=6.0, seed=[4, 7], **kw),  # type: ignore[attr-defined]
                               atol=0, rtol=0)


@pytest.mark.parametrize(("scale", "match"), [([3.0], "list of 2"), ([3.0, 1.0], "all > 1 or all <= 1"),
                                              ([3.0, float("nan")], "finite"), (True, "finite")])
def test_bad_scales(sd: object, scale: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sd.text2img(["a", "b"], steps=1, height=64, width=64, scale=scale)  # type: ignore[attr-defined]


def _pictures(n: int, seed: int, mode: str = "RGB") -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    shape = (64, 64, 3) if mode == "RGB" else (64, 64)
    return [Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode) for _ in range(n)]


@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
def test_per_image_init_and_mask_equal_alone(sd: object, kind: str) -> None:
    """img2img / inpaint batches (the server's batching): each image its own init image, mask, prompt,
    seed and scale, as it gives alone."""
    kw = dict(steps=3, strength=0.7, scheduler="euler_a", output="tensor", syntax="a1111")
    prompts, negatives, scales, seeds = ["a red fox", "a (blue):1.3 bird"], ["", "blurry"], [3.0, 9.5], [4, 7]
    inits, masks = _pictures(2, 0), _pictures(2, 1, "L")
    head = (inits, masks) if kind == "inpaint" else (inits,)
    batch = getattr(sd, kind)(*head, prompts, negatives, scale=scales, seed=seeds, **kw)
    for i in range(2):
        one = (inits[i], masks[i]) if kind == "inpaint" else (inits[i],)
        alone = getattr(sd, kind)(*one, prompts[i], negatives[i], scale=scales[i], seed=seeds[i], **kw)
        torch.testing.assert_close(batch[i:i + 1], alone, atol=1e-4, rtol=0)  # batched GEMM round-off


@pytest.mark.parametrize("kind", ["text2img", "inpaint"])
def test_stop_sampling_returns_the_latents_so_far(sd: object, kind: str) -> None:
    """A progress callback raising StopSampling ends the call with the images of the latents after that
    model call (the server's /interrupt): stopped at the last call, the images of the full run."""
    kw = dict(steps=4, scheduler="euler", output="tensor", seed=[3, 4], scale=5.0)
    head = (_pictures(2, 2), _pictures(2, 3, "L")) if kind == "inpaint" else ()
    prompts = ["a red fox", "a bird"]
    size = {} if kind == "inpaint" else {"height": 64, "width": 64}
    full = getattr(sd, kind)(*head, prompts, **size, **kw)
    for stop_at in (4, 2):
        calls: list[int] = []

        def progress(i: int, total: int, stop_at: int = stop_at, calls: list[int] = calls) -> None:
            calls.append(i)
            if i == stop_at:
                raise StopSampling

        out = getattr(sd, kind)(*head, prompts, **size, progress=progress, **kw)
        assert calls == list(range(1, stop_at + 1)) and out.shape == full.shape
        if stop_at == 4:
            torch.testing.assert_close(out, full, atol=0, rtol=0)
        else:
            assert (out - full).abs().max().item() > 1e-3  # stopped early: not the finished images
