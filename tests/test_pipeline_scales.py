"""A CFG scale per image (`scale=[...]`, what the server's batching needs): a batch gives each image what
it gives alone with its own scale and seed."""

from __future__ import annotations

import pytest
import torch

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
