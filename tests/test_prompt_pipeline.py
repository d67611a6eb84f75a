"""Prompts through the pipeline (#17): the context the UNet sees at every step (prompt editing,
alternation, negative prompts, Heun's two calls per step, PLMS's warm-up, img2img), images against
diffusers switching ``prompt_embeds`` at the same steps (eager and through a pt2 artifact in a fresh
process), emphasis modes, BREAK, A1111's composable weights / AND, options and PNG metadata."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from blocked import BLOCK_MODEL_CODE

from runtime.conditioning import encode_text
from runtime.png import Parameters, format_parameters
from runtime.prompt import Emphasis
from runtime.prompt_steps import call_steps
from runtime.samplers import SCHEDULER_NAMES, make_schedule
from runtime.schedulers import SchedulerConfig
from sdexport import StableDiffusion

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-3
H = W = 64


@pytest.fixture(scope="module")
def sd1(sd1_folder: Path) -> StableDiffusion:
    return StableDiffusion.from_pretrained(sd1_folder).attention_backend("sdpa")


def _latents(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 4, H // 8, W // 8, generator=torch.Generator().manual_seed(seed))


Call = tuple[torch.Tensor, torch.Tensor]  # (context, weights) of one UNet call


@pytest.fixture
def calls(sd1: StableDiffusion, monkeypatch: pytest.MonkeyPatch) -> list[Call]:
    """Records the context and token weights of every UNet call of `sd1` (a wrapping backend)."""
    seen: list[Call] = []
    unet = sd1.backend.unet

    def spy(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, weights: torch.Tensor,
            *extra: Any) -> torch.Tensor:
        seen.append((context.clone(), weights.clone()))
        return unet(x, t, context, weights, *extra)

    monkeypatch.setattr(sd1.backend, "unet", spy)
    return seen


def _texts_seen(sd: StableDiffusion, seen: list[Call], candidates: list[str]) -> list[tuple[str, ...]]:
    """Each call's rows, named by the candidate text whose encoding they equal."""
    enc = encode_text(sd.backend, candidates, [False] * len(candidates)).context
    out = []
    for context, _ in seen:
        names = []
        for row in context:
            match = [c for c, e in zip(candidates, enc, strict=True) if torch.allclose(row, e, atol=1e-5)]
            assert len(match) == 1, match
            names.append(match[0])
        out.append(tuple(names))
    return out


def test_prompt_editing_per_step(sd1: StableDiffusion, calls: list[Call]) -> None:
    sd1.text2img("a [cat:dog:2]", "blurry", steps=4, height=H, width=W, seed=1, scheduler="euler")
    got = _texts_seen(sd1, calls, ["a cat", "a dog", "blurry"])
    assert got == [("blurry", "a cat")] * 2 + [("blurry", "a dog")] * 2  # CFG rows [negative; prompt]


def test_alternation_and_negative_editing(sd1: StableDiffusion, calls: list[Call]) -> None:
    sd1.text2img("a [cat|dog]", "[blurry::1]", steps=4, height=H, width=W, seed=1, scheduler="ddim")
    got = _texts_seen(sd1, calls, ["a cat", "a dog", "blurry", ""])
    assert got == [("blurry", "a cat"), ("", "a dog"), ("", "a cat"), ("", "a dog")]


def test_batch_and_low_ram_rows(sd1: StableDiffusion, calls: list[Call]) -> None:
    try:
        sd1.low_ram()
        sd1.text2img(["a [cat:dog:1]", "a fox"], ["", "[blurry|]"], steps=2, height=H, width=W, seed=1,
                     scheduler="euler")
    finally:
        sd1.low_ram(False)
    got = _texts_seen(sd1, calls, ["a cat", "a dog", "a fox", "blurry", ""])
    assert got == [("", "blurry"), ("a cat", "a fox"), ("", ""), ("a dog", "a fox")]  # uncond, then cond


@pytest.mark.parametrize(("scheduler", "per_call"), [
    ("heun", [0, 0, 1, 1, 2]),  # predictor and corrector share their step; the last step has one call
    ("pndm", [0, 0, 1, 2]),  # the warm-up's second call redoes step 0
])
def test_multi_call_steps_keep_their_context(sd1: StableDiffusion, calls: list[Call], scheduler: str,
                                              per_call: list[int]) -> None:
    sd1.text2img("a [cat|dog]", steps=3, scale=1.0, height=H, width=W, seed=1, scheduler=scheduler)
    got = _texts_seen(sd1, calls, ["a cat", "a dog"])
    assert got == [(["a cat", "a dog"][s % 2],) for s in per_call]


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_every_scheduler_maps_its_calls_onto_the_steps_run(scheduler: str) -> None:
    for steps, strength in ((1, 1.0), (5, 1.0), (10, 0.5), (10, 0.35)):
        schedule = make_schedule(scheduler, SchedulerConfig(), steps, strength)
        per_call = call_steps(schedule)
        assert per_call == sorted(per_call) and set(per_call) == set(range(int(steps * strength)))


def test_img2img_counts_run_steps_from_zero(sd1: StableDiffusion, calls: list[Call]) -> None:
    """A1111: the schedule spans all 4 steps; the 2 steps strength 0.5 runs are steps 1 and 2 of it."""
    image = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(3))
    sd1.img2img(image, "a [cat:dog:1]", strength=0.5, steps=4, scale=1.0, seed=1, scheduler="euler")
    assert _texts_seen(sd1, calls, ["a cat", "a dog"]) == [("a cat",), ("a dog",)]


def test_each_text_encoded_once(sd1: StableDiffusion, monkeypatch: pytest.MonkeyPatch) -> None:
    batches: list[int] = []
    encode = sd1.backend.encode_text

    def spy(ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        batches.append(ids[0].shape[0])
        return encode(ids)

    monkeypatch.setattr(sd1.backend, "encode_text", spy)
    sd1.text2img(["a [cat|dog]", "a [cat|dog]"], "[x:y:2]", steps=5, height=H, width=W, seed=1,
                 scheduler="euler")
    assert batches == [4]  # x, y, a cat, a dog: one batch before the loop


def test_break_and_scheduled_chunk_counts(sd1: StableDiffusion, calls: list[Call]) -> None:
    sd1.text2img("a fox [BREAK a cat:2]", steps=3, scale=1.0, height=H, width=W, seed=1, scheduler="euler")
    # one chunk count for all texts of a request (A1111 pads a prompt's schedule texts alike)
    assert [tuple(c.shape[:2]) for c, _ in calls] == [(1, 154)] * 3
    assert torch.equal(calls[0][0][0, 77:], calls[2][0][0, 77:]) is False
    calls.clear()
    sd1.text2img("a fox BREAK a cat", steps=2, height=H, width=W, seed=1, scheduler="euler")
    assert [tuple(c.shape[:2]) for c, _ in calls] == [(2, 154)] * 2


# ---- images against diffusers switching prompt_embeds at the same steps -----------------------------
@functools.cache
def _diffusers(folder: Path, scheduler: str) -> Any:
    import diffusers as d

    cls: Any = d.StableDiffusionPipeline
    pipe = cls.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    sched: Any = {"euler": d.EulerDiscreteScheduler, "heun": d.HeunDiscreteScheduler}[scheduler]
    pipe.scheduler = sched.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _reference(folder: Path, scheduler: str, steps: list[tuple[str, str]], latents: torch.Tensor,
               step_of_call: Callable[[int], int]) -> torch.Tensor:
    """diffusers with the (negative, prompt) of every step given by `steps`, swapped in its step callback."""
    pipe = _diffusers(folder, scheduler)

    def embeds(neg: str, pos: str) -> torch.Tensor:
        p, n = pipe.encode_prompt(pos, "cpu", 1, True, negative_prompt=neg)
        return torch.cat([n, p])

    def swap(pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        step = min(step_of_call(i + 1), len(steps) - 1)
        return {"prompt_embeds": embeds(*steps[step])}

    first = embeds(*steps[0])
    images: torch.Tensor = pipe(
        prompt_embeds=first[1:], negative_prompt_embeds=first[:1], num_inference_steps=len(steps),
        guidance_scale=7.5, height=H, width=W, latents=latents.clone(), output_type="pt",
        callback_on_step_end=swap, callback_on_step_end_tensor_inputs=["prompt_embeds"]).images
    return images


PROMPT, NEGATIVE = "a photo of a [cat:dog:2], [snow|rain]", "[blurry::3]"
STEPS = [("blurry", "a photo of a cat, snow"), ("blurry", "a photo of a cat, rain"),
         ("blurry", "a photo of a dog, snow"), ("", "a photo of a dog, rain")]


@pytest.mark.parametrize(("scheduler", "step_of_call"), [("euler", lambda c: c), ("heun", lambda c: c // 2)])
def test_image_matches_reference_loop(sd1_folder: Path, sd1: StableDiffusion, scheduler: str,
                                      step_of_call: Callable[[int], int]) -> None:
    lat = _latents(4)
    ref = _reference(sd1_folder, scheduler, STEPS, lat, step_of_call)
    ours = sd1.text2img(PROMPT, NEGATIVE, steps=4, scale=7.5, height=H, width=W, latents=lat,
                        scheduler=scheduler, output="tensor")
    assert isinstance(ours, torch.Tensor)
    assert (ours - ref).abs().max().item() <= TOL
    static = sd1.text2img(STEPS[0][1], STEPS[0][0], steps=4, height=H, width=W, latents=lat,
                          scheduler=scheduler, output="tensor")
    assert isinstance(static, torch.Tensor) and (static - ours).abs().max().item() > 1e-3


CHILD = BLOCK_MODEL_CODE + r"""
import torch, runtime
pipe = runtime.load(sys.argv[1])
lat = torch.load(sys.argv[3], weights_only=True)
out = pipe.text2img(PROMPT, NEGATIVE, steps=4, height=64, width=64, latents=lat, scheduler="euler", output="tensor")
assert "sdexport" not in sys.modules and "diffusers" not in sys.modules
torch.save(out, sys.argv[2])
"""


def test_artifact_in_fresh_process_matches_reference(sd1_folder: Path, sd1: StableDiffusion,
                                                     tmp_path: Path) -> None:
    from sdexport.export.build import BuildOptions, build

    build(sd1, tmp_path / "art", BuildOptions(format="pt2", kernels="native", max_batch=2, min_size=64,
                                              max_size=64, max_chunks=1))
    sd1.attention_backend("sdpa")
    lat = _latents(4)
    torch.save(lat, tmp_path / "lat.pt")
    script = tmp_path / "child.py"
    script.write_text(f"PROMPT, NEGATIVE = {PROMPT!r}, {NEGATIVE!r}\n" + CHILD)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "art"), str(tmp_path / "out.pt"),
                           str(tmp_path / "lat.pt")], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = torch.load(tmp_path / "out.pt", weights_only=True)
    ref = _reference(sd1_folder, "euler", STEPS, lat, lambda c: c)
    assert (ours - ref).abs().max().item() <= TOL


# ---- emphasis -------------------------------------------------------------------------------------
def _a1111_embeds(sd: StableDiffusion, text: str) -> torch.Tensor:
    """A1111's "Original" from its formula: z * w, then z * (mean before / mean after), one chunk."""
    from runtime.prompt import encode_prompt

    enc = encode_prompt(sd.tokenizer, text)
    assert sd.text_encoder is not None
    z = sd.text_encoder(enc.ids[None])
    weighted = z * enc.weights[None, :, None]
    out: torch.Tensor = weighted * (z.mean() / weighted.mean())
    return out


def test_emphasis_a1111_matches_reference(sd1_folder: Path) -> None:
    # The tiny encoder's final LayerNorm has zero bias: mean(z) ~ 0 and A1111's rescale would blow up.
    sd1 = StableDiffusion.from_pretrained(sd1_folder).attention_backend("sdpa")
    assert sd1.text_encoder is not None
    sd1.text_encoder.final_layer_norm.bias.data.normal_(0.5, 0.1, generator=torch.Generator().manual_seed(0))
    prompt, negative = "a (red:1.5) fox, [snow]", "(blurry:0.7)"
    pipe = _diffusers(sd1_folder, "euler")
    lat = _latents(5)
    ref = pipe(prompt_embeds=_a1111_embeds(sd1, prompt), negative_prompt_embeds=_a1111_embeds(sd1, negative),
               num_inference_steps=3, guidance_scale=7.5, height=H, width=W, latents=lat.clone(),
               output_type="pt").images
    ours = sd1.text2img(prompt, negative, steps=3, height=H, width=W, latents=lat, scheduler="euler",
                        emphasis="a1111", output="tensor")
    attention = sd1.text2img(prompt, negative, steps=3, height=H, width=W, latents=lat, scheduler="euler",
                             output="tensor")
    assert isinstance(ours, torch.Tensor) and isinstance(attention, torch.Tensor)
    assert (ours - ref).abs().max().item() <= TOL
    assert (ours - attention).abs().max().item() > 1e-3


def _modes() -> Iterator[Emphasis]:
    yield from ("attention", "a1111", "none")


def test_weight_one_is_bit_identical_in_every_mode(sd1: StableDiffusion) -> None:
    lat = _latents(6)
    plain = sd1.text2img("a red fox", "ugly", steps=2, height=H, width=W, latents=lat, output="tensor")
    for mode in _modes():
        for prompt in ("a red fox", "a (red fox:1)"):
            img = sd1.text2img(prompt, "ugly", steps=2, height=H, width=W, latents=lat, emphasis=mode,
                               output="tensor")
            assert isinstance(img, torch.Tensor) and isinstance(plain, torch.Tensor)
            assert torch.equal(img, plain), (mode, prompt)


def test_emphasis_none_ignores_weights(sd1: StableDiffusion) -> None:
    lat = _latents(7)
    plain = sd1.text2img("a red fox", steps=2, height=H, width=W, latents=lat, output="tensor")
    none = sd1.text2img("a (red:1.8) fox", steps=2, height=H, width=W, latents=lat, emphasis="none",
                        output="tensor")
    assert isinstance(plain, torch.Tensor) and isinstance(none, torch.Tensor)
    assert torch.equal(plain, none)


# ---- syntax, AND, options, PNG --------------------------------------------------------------------
def test_a1111_composable_weight_and_and(sd1: StableDiffusion) -> None:
    lat = _latents(8)
    weighted = sd1.text2img("a fox :1.5", steps=2, scale=4.0, height=H, width=W, latents=lat, syntax="a1111",
                            output="tensor")
    scaled = sd1.text2img("a fox", steps=2, scale=6.0, height=H, width=W, latents=lat, output="tensor")
    assert isinstance(weighted, torch.Tensor) and isinstance(scaled, torch.Tensor)
    assert (weighted - scaled).abs().max().item() <= 1e-6  # uncond + 1.5 * 4 * (cond - uncond)
    with pytest.raises(ValueError, match=r"AND \(composable prompts\) is not supported.*2 sub-prompts"):
        sd1.text2img("a fox AND a cat", steps=2, height=H, width=W, syntax="a1111")
    with pytest.raises(ValueError, match=r"needs guidance \(scale > 1\)"):
        sd1.text2img("a fox :1.5", steps=2, scale=1.0, height=H, width=W, syntax="a1111")
    sd1.text2img("a fox AND a cat", "x AND y", steps=1, height=H, width=W, output="tensor")  # sdfused: text


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"syntax": "comfy"}, "syntax must be one of ('sdfused', 'a1111'), got 'comfy'"),
    ({"emphasis": "Original"}, "emphasis must be one of ('attention', 'a1111', 'none'), got 'Original'"),
])
def test_bad_prompt_options(sd1: StableDiffusion, kwargs: dict[str, Any], message: str) -> None:
    import re

    calls: list[Callable[[], Any]] = [lambda: sd1.text2img("a", steps=1, height=H, width=W, **kwargs),
                 lambda: sd1.img2img(torch.rand(1, 3, H, W), "a", steps=1, **kwargs),
                 lambda: sd1.inpaint(torch.rand(1, 3, H, W), torch.ones(1, 1, H, W), "a", steps=1, **kwargs)]
    for call in calls:
        with pytest.raises(ValueError, match=re.escape(message)):
            call()


def test_png_records_syntax_and_emphasis(sd1: StableDiffusion) -> None:
    images = sd1.text2img("a [cat:dog:2]", "[ugly|bad]", steps=2, height=H, width=W, seed=3, scheduler="euler")
    assert isinstance(images, list)
    text = images[0].info["parameters"]
    assert text.splitlines()[:2] == ["a [cat:dog:2]", "Negative prompt: [ugly|bad]"]
    assert text.endswith(", Prompt syntax: sdfused, Prompt emphasis: attention")
    base = Parameters("p", "", 2, "euler", 7.0, 1, 8, 8)
    fields = {(s, e): format_parameters(Parameters(**{**base.__dict__, "syntax": s, "emphasis": e}))
              for s in ("a1111", "sdfused") for e in _modes()}
    assert fields[("a1111", "a1111")] == format_parameters(base)  # A1111's defaults: nothing written
    assert fields[("a1111", "none")].endswith("Size: 8x8, Emphasis: Ignore")
    assert fields[("sdfused", "a1111")].endswith("Size: 8x8, Prompt syntax: sdfused")


def test_sdxl_pooled_embedding_follows_the_step(sdxl_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sdxl = StableDiffusion.from_pretrained(sdxl_folder)
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    unet = sdxl.backend.unet

    def spy(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, weights: torch.Tensor,
            text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None) -> torch.Tensor:
        assert text_embeds is not None and time_ids is not None
        seen.append((context.clone(), text_embeds.clone(), time_ids.clone()))
        return unet(x, t, context, weights, text_embeds, time_ids)

    monkeypatch.setattr(sdxl.backend, "unet", spy)
    sdxl.text2img("a [cat|dog]", "", steps=3, scale=5.0, height=H, width=W, seed=1, scheduler="euler")
    ref = encode_text(sdxl.backend, ["a cat", "a dog"], [False, False])
    assert ref.text_embeds is not None and sdxl.info.force_zeros_for_empty_prompt
    for step, (context, pooled, time_ids) in enumerate(seen):
        k = step % 2
        assert torch.allclose(context[1], ref.context[k], atol=1e-5)
        assert torch.allclose(pooled[1], ref.text_embeds[k], atol=1e-5)
        assert not context[0].any() and not pooled[0].any()  # the empty negative: zeros
        assert time_ids.shape == (2, 6)
    assert len(seen) == 3
