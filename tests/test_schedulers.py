"""runtime.schedulers / runtime.samplers against diffusers' schedulers (the parity reference).

A deterministic smooth fake "UNet" drives both a diffusers-style denoising loop and our ``sample``
from identical starting latents; final latents must agree to 1e-4 (relative to their scale).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 __array__ notes in diffusers
import diffusers.schedulers.scheduling_euler_ancestral_discrete as euler_a_module  # noqa: E402

from runtime.samplers import SCHEDULER_NAMES, SCHEDULERS, make_schedule, sample  # noqa: E402
from runtime.schedulers import SchedulerConfig, _base_timesteps, add_noise, initial_latents  # noqa: E402

SD1: dict[str, Any] = {  # runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False,
}
SD2V: dict[str, Any] = {  # stabilityai/stable-diffusion-2-1 (768, v-prediction)
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
}

DETERMINISTIC = ("ddim", "pndm", "lms", "euler", "heun", "dpmpp_2m", "dpmpp_2m_karras", "unipc")
SHAPE = (2, 4, 6, 5)


def reference(name: str, cfg: dict[str, Any]) -> Any:
    d = diffusers
    cls, extra = {
        "ddim": (d.DDIMScheduler, {}), "pndm": (d.PNDMScheduler, {}), "lms": (d.LMSDiscreteScheduler, {}),
        "euler": (d.EulerDiscreteScheduler, {}), "euler_a": (d.EulerAncestralDiscreteScheduler, {}),
        "heun": (d.HeunDiscreteScheduler, {}), "dpmpp_2m": (d.DPMSolverMultistepScheduler, {}),
        "dpmpp_2m_karras": (d.DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
        "unipc": (d.UniPCMultistepScheduler, {}),
    }[name]
    return cls.from_config(cfg, **extra)


def fake_unet(x: Tensor, t: Tensor) -> Tensor:
    """Smooth stand-in for a guided UNet: mostly proportional to its input, with t dependence."""
    tf = t.float()
    return 0.8 * x + 0.2 * torch.sin(2.0 * x + tf / 250.0) - 0.05 * torch.cos(tf / 500.0)


def noise_stream(seed: int) -> Iterator[Tensor]:
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randn(SHAPE, generator=g)


def diffusers_loop(
    name: str, cfg: dict[str, Any], steps: int, noise: Tensor, *, strength: float = 1.0,
    image: Tensor | None = None, eta: float = 0.0, step_noise: Iterator[Tensor] | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """What StableDiffusion(Img2Img|Inpaint)Pipeline does around the scheduler."""
    sch = reference(name, cfg)
    sch.set_timesteps(steps)
    timesteps = sch.timesteps
    if image is None:
        latents = noise * sch.init_noise_sigma
    else:  # get_timesteps + prepare_latents of the img2img / inpaint pipelines
        t_start = max(steps - min(int(steps * strength), steps), 0)
        timesteps = sch.timesteps[t_start * sch.order:]
        if hasattr(sch, "set_begin_index"):
            sch.set_begin_index(t_start * sch.order)
        latents = sch.add_noise(image, noise, timesteps[:1])
    kwargs: dict[str, Any] = {}
    for i, t in enumerate(timesteps):
        out = fake_unet(sch.scale_model_input(latents, t), t)
        if name == "ddim" and eta > 0:
            assert step_noise is not None
            kwargs = {"eta": eta, "variance_noise": next(step_noise)}
        latents = sch.step(out, t, latents, **kwargs).prev_sample
        if mask is not None:  # legacy 4-channel inpainting blend
            assert image is not None
            proper = image if i == len(timesteps) - 1 else sch.add_noise(image, noise, timesteps[i + 1:i + 2])
            latents = (1 - mask) * proper + mask * latents
    result: Tensor = latents
    return result


def ours(
    name: str, cfg: dict[str, Any], steps: int, noise: Tensor, *, strength: float = 1.0,
    image: Tensor | None = None, eta: float = 0.0, step_noise: Iterator[Tensor] | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    sched = make_schedule(name, SchedulerConfig.from_dict(cfg), steps, strength)
    x = initial_latents(sched, noise, image)
    callback: Callable[[int, Tensor], Tensor] | None = None
    if mask is not None:
        assert image is not None
        img, m = image, mask

        def callback(i: int, x: Tensor) -> Tensor:
            proper = add_noise(sched, img, noise, i + 1) if i < sched.num_steps - 1 else img
            return (1 - m) * proper + m * x

    def no_noise() -> Tensor:
        raise AssertionError("deterministic sampler drew noise")

    draw = (lambda: next(step_noise)) if step_noise is not None else no_noise
    return sample(sched, fake_unet, x, draw, eta, callback)


def assert_close(a: Tensor, b: Tensor, tol: float = 1e-4) -> None:
    assert a.shape == b.shape and torch.isfinite(a).all()
    err = (a - b).abs().max().item()
    scale = max(1.0, b.abs().max().item())
    assert err <= tol * scale, f"max abs err {err:.3g} (scale {scale:.3g})"


def start_noise(seed: int = 0) -> Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------- deterministic parity


@pytest.mark.parametrize("name", DETERMINISTIC)
@pytest.mark.parametrize("cfg", [SD1, SD2V], ids=["sd1", "sd2v"])
def test_parity_text2img(name: str, cfg: dict[str, Any]) -> None:
    for steps in (1, 2, 10, 25):
        noise = start_noise(steps)
        assert_close(ours(name, cfg, steps, noise), diffusers_loop(name, cfg, steps, noise))


@pytest.mark.parametrize("name", DETERMINISTIC)
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_parity_spacing(name: str, spacing: str) -> None:
    for cfg in (SD1, SD2V):
        for steps in (3, 20):
            c = {**cfg, "timestep_spacing": spacing}
            noise = start_noise(steps)
            assert_close(ours(name, c, steps, noise), diffusers_loop(name, c, steps, noise))


@pytest.mark.parametrize("name", ["lms", "euler", "heun", "unipc"])
def test_parity_karras_config(name: str) -> None:
    c = {**SD1, "use_karras_sigmas": True}
    for steps in (4, 15):
        noise = start_noise(steps)
        assert_close(ours(name, c, steps, noise), diffusers_loop(name, c, steps, noise))


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
@pytest.mark.parametrize("spacing", [None, "leading", "trailing", "linspace"])
def test_schedule_matches_diffusers_timesteps(name: str, spacing: str | None) -> None:
    cfg = SD1 if spacing is None else {**SD1, "timestep_spacing": spacing}
    for steps in (*range(1, 31), 37, 50, 99, 150, 333, 500, 999, 1000):
        if name in ("ddim", "pndm") and steps == 1000 and spacing in (None, "leading"):
            with pytest.raises(ValueError, match="exceed"):  # t = 1000 is off the table (diffusers fails)
                make_schedule(name, SchedulerConfig.from_dict(cfg), steps)
            continue
        if name == "dpmpp_2m_karras" and steps > 150:
            continue  # rounded karras timesteps collide; diffusers' step-index lookup is ill-defined there
        sch = reference(name, cfg)
        sch.set_timesteps(steps)
        ours_s = make_schedule(name, SchedulerConfig.from_dict(cfg), steps)
        assert list(ours_s.timesteps) == sch.timesteps.double().tolist(), (name, steps)
        if hasattr(sch, "sigmas") and name not in ("ddim", "pndm"):
            np.testing.assert_allclose(ours_s.sigmas, sch.sigmas.double().numpy(), rtol=1e-6)
        assert ours_s.init_noise_sigma == pytest.approx(float(sch.init_noise_sigma), rel=1e-6)


def test_spacing_rules_all_step_counts() -> None:
    """Every step count 1..N: the spacing rules reproduce numpy's arange/linspace/round exactly."""
    for spacing in ("leading", "trailing", "linspace"):
        sch = diffusers.DDIMScheduler.from_config({**SD1, "timestep_spacing": spacing})
        cfg = SchedulerConfig.from_dict(SD1)
        for n in range(1, 1000):
            sch.set_timesteps(n)
            assert _base_timesteps(cfg, "discrete", spacing, n) == sch.timesteps.double().tolist(), (spacing, n)
    cfg = SchedulerConfig()
    for n in range(1, 1001):  # spacing variants of the k-diffusion and multistep schedulers
        k_lin = np.linspace(0, 999, n, dtype=np.float32)[::-1]
        assert _base_timesteps(cfg, "k", "linspace", n) == k_lin.astype(float).tolist(), n
        m_lin = np.linspace(0, 999, n + 1).round()[::-1][:-1]
        assert _base_timesteps(cfg, "multistep", "linspace", n) == m_lin.tolist(), n
        m_lead = (np.arange(0, n + 1) * (1000 // (n + 1))).round()[::-1][:-1]
        assert _base_timesteps(cfg, "multistep", "leading", n) == m_lead.astype(float).tolist(), n


# ---------------------------------------------------------------------------------- img2img and inpaint


@pytest.mark.parametrize("name", DETERMINISTIC)
@pytest.mark.parametrize("cfg", [SD1, SD2V], ids=["sd1", "sd2v"])
def test_parity_img2img(name: str, cfg: dict[str, Any]) -> None:
    image = 0.8 * start_noise(99)
    for steps, strength in ((10, 0.6), (25, 0.75), (7, 1.0), (4, 0.3)):
        noise = start_noise(steps)
        a = ours(name, cfg, steps, noise, strength=strength, image=image)
        b = diffusers_loop(name, cfg, steps, noise, strength=strength, image=image)
        assert_close(a, b)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_parity_inpaint_blend(name: str) -> None:
    image = 0.8 * start_noise(98)
    mask = (torch.arange(SHAPE[-1]) < 3).float().expand(SHAPE[0], 1, SHAPE[2], SHAPE[3]).contiguous()
    for steps, strength in ((8, 1.0), (10, 0.7)):
        noise = start_noise(steps)
        a = ours(name, SD1, steps, noise, strength=strength, image=image, mask=mask)
        b = diffusers_loop(name, SD1, steps, noise, strength=strength, image=image, mask=mask)
        assert_close(a, b)
        assert torch.equal(a[..., 3:], image[..., 3:])  # unmasked region is the image itself at the end


def test_add_noise_semantics() -> None:
    image, noise = start_noise(1), start_noise(2)
    for name in SCHEDULER_NAMES:
        sched = make_schedule(name, SchedulerConfig.from_dict(SD1), 10, 0.5)
        assert torch.equal(add_noise(sched, image, noise, sched.num_steps), image)
        assert torch.equal(add_noise(sched, image, noise, 0), initial_latents(sched, noise, image))
        for bad in (-1, sched.num_steps + 1):
            with pytest.raises(ValueError, match="step"):
                add_noise(sched, image, noise, bad)


def test_callback_sees_every_model_call() -> None:
    seen: list[int] = []

    def cb(i: int, x: Tensor) -> Tensor:
        seen.append(i)
        return x

    for name in SCHEDULER_NAMES:
        sched = make_schedule(name, SchedulerConfig.from_dict(SD1), 6, 0.5)
        seen.clear()
        sample(sched, fake_unet, initial_latents(sched, start_noise(), start_noise(1)), start_noise, 0.0, cb)
        assert seen == list(range(sched.num_steps)), name
        assert sched.num_steps == {"heun": 5, "pndm": 4}.get(name, 3)


# ---------------------------------------------------------------------------------- stochastic samplers


def test_euler_a_matches_diffusers_with_same_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    for cfg in (SD1, SD2V):
        for steps in (1, 10, 25):
            stream = noise_stream(7)
            monkeypatch.setattr(euler_a_module, "randn_tensor", lambda *a, s=stream, **k: next(s))
            noise = start_noise(steps)
            b = diffusers_loop("euler_a", cfg, steps, noise)
            assert_close(ours("euler_a", cfg, steps, noise, step_noise=noise_stream(7)), b)


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_eta_matches_diffusers_with_same_noise(eta: float) -> None:
    for cfg in (SD1, SD2V):
        for steps in (1, 10, 25):
            noise = start_noise(steps)
            b = diffusers_loop("ddim", cfg, steps, noise, eta=eta, step_noise=noise_stream(3))
            assert_close(ours("ddim", cfg, steps, noise, eta=eta, step_noise=noise_stream(3)), b)


@pytest.mark.parametrize(("name", "eta"), [("euler_a", 0.0), ("ddim", 1.0)])
def test_stochastic_determinism(name: str, eta: float) -> None:
    noise = start_noise()
    a = ours(name, SD1, 8, noise, eta=eta, step_noise=noise_stream(1))
    b = ours(name, SD1, 8, noise, eta=eta, step_noise=noise_stream(1))
    c = ours(name, SD1, 8, noise, eta=eta, step_noise=noise_stream(2))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


# ---------------------------------------------------------------------------------- config and validation


def test_config_from_dict() -> None:
    cfg = SchedulerConfig.from_dict({**SD2V, "unknown_key": [1, 2], "timestep_spacing": None})
    assert cfg.prediction_type == "v_prediction" and cfg.beta_schedule == "scaled_linear"
    assert cfg.steps_offset == 1 and cfg.set_alpha_to_one is False and cfg.timestep_spacing is None
    assert SchedulerConfig.from_dict(cfg.to_dict()) == cfg
    assert SchedulerConfig.from_dict({}) == SchedulerConfig()
    assert isinstance(SchedulerConfig.from_dict({"clip_sample_range": 2}).clip_sample_range, float)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"beta_schedule": "cosine"}, "beta_schedule"),
        ({"prediction_type": "sample"}, "prediction_type"),
        ({"timestep_spacing": "middle"}, "timestep_spacing"),
        ({"num_train_timesteps": "1000"}, "num_train_timesteps"),
        ({"num_train_timesteps": True}, "num_train_timesteps"),
        ({"steps_offset": -1}, "steps_offset"),
        ({"beta_start": float("nan")}, "beta_start"),
        ({"beta_start": 0.1, "beta_end": 0.01}, "beta_start"),
        ({"set_alpha_to_one": "yes"}, "set_alpha_to_one"),
        ({"trained_betas": [0.1, 0.2]}, "trained_betas"),
        ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
    ],
)
def test_config_rejects(bad: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SchedulerConfig.from_dict({**SD1, **bad})


def test_bad_arguments() -> None:
    cfg = SchedulerConfig.from_dict(SD1)
    with pytest.raises(ValueError, match="unknown scheduler 'karras'"):
        make_schedule("karras", cfg, 10)
    for steps in (0, -3, 1001):
        with pytest.raises(ValueError, match="steps"):
            make_schedule("euler", cfg, steps)
    for strength in (-0.1, 1.5, math.nan, math.inf):
        with pytest.raises(ValueError, match="strength"):
            make_schedule("euler", cfg, 10, strength)
    with pytest.raises(ValueError, match="strength"):
        make_schedule("euler", cfg, 10, 0.05)  # int(10 * 0.05) == 0 denoising steps
    sched = make_schedule("ddim", cfg, 4)
    x = initial_latents(sched, start_noise())
    for eta in (-0.5, math.nan, math.inf):
        with pytest.raises(ValueError, match="eta"):
            sample(sched, fake_unet, x, start_noise, eta)
    with pytest.raises(ValueError, match="image_latents"):
        initial_latents(make_schedule("ddim", cfg, 4, 0.5), start_noise())


def test_scheduler_table_names_and_a1111_names() -> None:
    from runtime.png import Parameters, format_parameters

    assert tuple(SCHEDULERS) == SCHEDULER_NAMES
    assert len({s.a1111 for s in SCHEDULERS.values()}) == len(SCHEDULERS)
    for name, scheduler in SCHEDULERS.items():
        text = format_parameters(Parameters("p", "", 1, name, 7.0, 1, 8, 8))
        assert f"Sampler: {scheduler.a1111}, " in text
        assert make_schedule(name, SchedulerConfig(), 3).kind is scheduler.schedule
