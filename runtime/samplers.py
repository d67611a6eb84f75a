"""Sampler loops, one plain function per method, and the table of named schedulers.

Each sampler walks the model calls ``schedule.begin ..`` of a :class:`~runtime.schedulers.Schedule`,
mirroring the diffusers scheduler of the same name step for step (same state space, same history
handling, same warm-up quirks) so results agree to float32 round-off.  As in k-diffusion's
``sampling.py`` the model a sampler sees is a :class:`Denoiser`: state in, denoised x0 out; whether the
UNet predicts eps or v is known there only.  Coefficients are computed in Python floats (float64);
tensor updates run in the latents' dtype.

Usage::

    sched = make_schedule(name, SchedulerConfig.from_dict(json_dict), steps, strength)
    x = initial_latents(sched, noise, image_latents)     # image_latents=None: pure noise (text2img)
    x0 = sample(sched, unet_fn, x, noise_fn, eta, callback)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from runtime.schedulers import (
    DDIM,
    HEUN,
    K_NO_KARRAS,
    MULTISTEP,
    MULTISTEP_KARRAS,
    PLMS,
    K,
    Schedule,
    ScheduleKind,
    SchedulerConfig,
    build_schedule,
)

__all__ = [
    "SCHEDULERS",
    "SCHEDULER_NAMES",
    "Callback",
    "Denoiser",
    "ModelFn",
    "NoiseFn",
    "Scheduler",
    "get_scheduler",
    "make_schedule",
    "sample",
]


class ModelFn(Protocol):
    """Raw UNet output (epsilon or v, guidance applied) for UNet input ``x`` at 0-d float32 timestep ``t``."""

    def __call__(self, x: Tensor, t: Tensor) -> Tensor: ...


NoiseFn = Callable[[], Tensor]  # fresh standard-normal noise shaped like the latents
Callback = Callable[[int, Tensor], Tensor]  # (run step index, state) -> possibly modified state


class Denoiser:
    """The model as samplers see it: state ``x`` at model call ``i`` -> denoised x0 (k-diffusion's
    ``CompVisDenoiser`` / ``CompVisVDenoiser``).  With ``x_t = alpha x0 + sigma eps`` the UNet always
    sees ``x_t``: VP states are ``x_t`` itself, k-space states ``x = x_t / alpha``."""

    def __init__(self, schedule: Schedule, model: ModelFn) -> None:
        self.schedule = schedule
        self.model = model
        self.v_prediction = schedule.config.prediction_type == "v_prediction"

    def scalings(self, i: int) -> tuple[float, float, float]:
        """(c_in, c_skip, c_out): UNet input ``c_in x``, ``x0 = c_skip x + c_out output``."""
        alpha, sigma = self.schedule.noise_level(i)
        c_in = alpha if self.schedule.k_space else 1.0
        if self.v_prediction:  # v = alpha eps - sigma x0  =>  x0 = alpha x_t - sigma v
            return c_in, alpha * c_in, -sigma
        return c_in, c_in / alpha, -sigma / alpha  # x0 = (x_t - sigma eps) / alpha

    def output(self, x: Tensor, i: int) -> Tensor:
        """Raw UNet output (eps or v) at state ``x``, model call ``i``."""
        c_in = self.scalings(i)[0]
        t = torch.tensor(self.schedule.timesteps[i], dtype=torch.float32)
        return self.model(x if c_in == 1.0 else x * c_in, t)

    def denoised(self, out: Tensor, x: Tensor, i: int) -> Tensor:
        _, c_skip, c_out = self.scalings(i)
        return c_skip * x + c_out * out

    def eps(self, out: Tensor, x_t: Tensor, alpha: float, sigma: float) -> Tensor:
        """The noise estimate of a raw output read at ``x_t = alpha x0 + sigma eps`` (VP states)."""
        return alpha * out + sigma * x_t if self.v_prediction else out  # v = alpha eps - sigma x0

    def __call__(self, x: Tensor, i: int) -> Tensor:
        return self.denoised(self.output(x, i), x, i)


Sampler = Callable[[Denoiser, Tensor, Schedule, NoiseFn, float, "Callback | None"], Tensor]


def _clip(s: Schedule, x0: Tensor) -> Tensor:
    return x0.clamp(-s.config.clip_sample_range, s.config.clip_sample_range) if s.clip else x0


def _done(cb: Callback | None, s: Schedule, i: int, x: Tensor) -> Tensor:
    return x if cb is None else cb(i - s.begin, x)


# ---- k-diffusion samplers: state x = x0 + sigma * eps -----------------------------------------------


def euler(model: Denoiser, x: Tensor, s: Schedule, noise: NoiseFn, eta: float, cb: Callback | None) -> Tensor:
    """Euler on dx/dsigma = (x - x0) / sigma (Karras et al. 2022, Alg. 1 without churn)."""
    for i in range(s.begin, len(s.timesteps)):
        d = (x - model(x, i)) / s.sigmas[i]
        x = _done(cb, s, i, x + d * (s.sigmas[i + 1] - s.sigmas[i]))
    return x


def euler_a(
    model: Denoiser, x: Tensor, s: Schedule, noise: NoiseFn, eta: float, cb: Callback | None
) -> Tensor:
    """Ancestral Euler: deterministic step to sigma_down, then fresh noise of std sigma_up, with
    sigma_up^2 = s_to^2 (s_from^2 - s_to^2) / s_from^2 and sigma_down^2 + sigma_up^2 = s_to^2."""
    for i in range(s.begin, len(s.timesteps)):
        s_from, s_to = s.sigmas[i], s.sigmas[i + 1]
        up = math.sqrt(s_to**2 * (s_from**2 - s_to**2) / s_from**2)
        down = math.sqrt(s_to**2 - up**2)
        d = (x - model(x, i)) / s_from
        x = _done(cb, s, i, x + d * (down - s_from) + noise() * up)  # diffusers draws even when up == 0
    return x


def heun(model: Denoiser, x: Tensor, s: Schedule, noise: NoiseFn, eta: float, cb: Callback | None) -> Tensor:
    """Heun's 2nd order method (Karras Alg. 1).  Calls alternate predictor / corrector like diffusers'
    doubled timesteps; the last step (to sigma 0) is a plain Euler step.  Sigmas are laid out
    [s0, s1, s1, s2, s2, ..., 0], so call i always evaluates the model at sigmas[i]."""
    pending: tuple[Tensor, Tensor, float] | None = None  # (x at step start, its slope, dt)
    for i in range(s.begin, len(s.timesteps)):
        x0 = _clip(s, model(x, i))
        if pending is None:  # predictor: Euler from sigmas[i] to sigmas[i + 1]
            d = (x - x0) / s.sigmas[i]
            dt = s.sigmas[i + 1] - s.sigmas[i]
            pending = (x, d, dt)
            x = x + d * dt
        else:  # corrector: average the slopes at both ends, restart from the step's start
            x_start, d_start, dt = pending
            x = x_start + (d_start + (x - x0) / s.sigmas[i]) / 2 * dt
            pending = None
        x = _done(cb, s, i, x)
    return x


def _lms_coefficient(sig: tuple[float, ...], order: int, i: int, j: int) -> float:
    """Integral over [sig[i], sig[i+1]] of the Lagrange basis polynomial through sig[i], .., sig[i-order+1]
    that is 1 at sig[i-j] (linear multistep, Adams-Bashforth on non-uniform sigmas).  The integrand has
    degree <= 3, so 3-point Gauss-Legendre quadrature is exact (diffusers uses scipy.integrate.quad)."""
    a, b = sig[i], sig[i + 1]
    total = 0.0
    for node, weight in ((-math.sqrt(0.6), 5 / 9), (0.0, 8 / 9), (math.sqrt(0.6), 5 / 9)):
        tau = (a + b) / 2 + (b - a) / 2 * node
        prod = 1.0
        for k in range(order):
            if k != j:
                prod *= (tau - sig[i - k]) / (sig[i - j] - sig[i - k])
        total += weight * prod
    return total * (b - a) / 2


def lms(model: Denoiser, x: Tensor, s: Schedule, noise: NoiseFn, eta: float, cb: Callback | None) -> Tensor:
    """Order-4 linear multistep on dx/dsigma.  Like diffusers, the order is min(i + 1, 4) with i the
    absolute step, so an img2img run zips the first coefficients with the few slopes it has."""
    slopes: list[Tensor] = []
    for i in range(s.begin, len(s.timesteps)):
        slopes = [*slopes[-3:], (x - model(x, i)) / s.sigmas[i]]
        order = min(i + 1, 4)
        coeffs = [_lms_coefficient(s.sigmas, order, i, j) for j in range(order)]
        x = x + sum((c * d for c, d in zip(coeffs, reversed(slopes), strict=False)), torch.zeros_like(x))
        x = _done(cb, s, i, x)
    return x


# ---- DDIM / PNDM: state x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, integer train timesteps ---------------


def _alpha_prev(s: Schedule, t: int) -> float:
    return s.alphas_cumprod[t] if t >= 0 else s.final_alpha_cumprod


def ddim(model: Denoiser, x: Tensor, s: Schedule, noise: NoiseFn, eta: float, cb: Callback | None) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12): x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - std^2) eps + std z,
    std = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).  The previous timestep is
    t - N // steps whatever the spacing (as in diffusers)."""
    ratio = s.config.num_train_timesteps // s.steps
    for i in range(s.begin, len(s.timesteps)):
        t = int(s.timesteps[i])
        a_t, a_prev = s.alphas_cumprod[t], _alpha_prev(s, t - ratio)
        x0 = model(x, i)
        eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)  # from the unclipped x0, as diffusers
        x0 = _clip(s, x0)
        std = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        direction = math.sqrt(max(1 - a_prev - std * std, 0.0))  # clamped: eta > 1 would give NaN
        x = math.sqrt(a_prev) * x0 + direction * eps
        if eta > 0:
            x = x + std * noise()
        x = _done(cb, s, i, x)
    return x


def _pndm_transfer(s: Schedule, x: Tensor, t: int, t_prev: int, eps: Tensor) -> Tensor:
    """PNDM's transfer phi (Liu et al. 2022, eq. 9) from t to t_prev given a (combined) noise estimate."""
    a_t, a_prev = s.alphas_cumprod[t], _alpha_prev(s, t_prev)
    denom = a_t * math.sqrt(1 - a_prev) + math.sqrt(a_t * (1 - a_t) * a_prev)
    return math.sqrt(a_prev / a_t) * x - (a_prev - a_t) / denom * eps


def _plms_combined(history: list[Tensor]) -> Tensor:
    """Adams-Bashforth of order len(history) (1..4) on the newest-last outputs."""
    h = history
    if len(h) == 1:
        return h[-1]
    if len(h) == 2:
        return (3 * h[-1] - h[-2]) / 2
    if len(h) == 3:
        return (23 * h[-1] - 16 * h[-2] + 5 * h[-3]) / 12
    return (55 * h[-1] - 59 * h[-2] + 37 * h[-3] - 9 * h[-4]) / 24


def pndm(model: Denoiser, x: Tensor, s: Schedule, noise: NoiseFn, eta: float, cb: Callback | None) -> Tensor:
    """PLMS (PNDM with skip_prk_steps): 4th-order Adams-Bashforth on raw model outputs, converted to eps
    only at the transfer (as diffusers; for v-models that differs from extrapolating eps).  Warm-up as
    diffusers: call 0 steps t0 -> t1 with e0; call 1 (at t1) redoes t0 -> t1 from the saved sample with
    (e0 + e1) / 2 and e1 is not kept in the history; then 2nd/3rd/4th-order AB coefficients."""
    ratio = s.config.num_train_timesteps // s.steps
    history: list[Tensor] = []
    x_start = x
    for n, i in enumerate(range(s.begin, len(s.timesteps))):
        out = model.output(x, i)
        t = int(s.timesteps[i])
        t_prev = t - ratio
        if n == 1:  # redo t0 -> t1 from the saved sample with the averaged output
            t, t_prev = t + ratio, t
            x, combined = x_start, (out + history[-1]) / 2
        else:
            history = [*history[-3:], out]
            x_start = x if n == 0 else x_start
            combined = _plms_combined(history)
        a_t = s.alphas_cumprod[t]
        eps = model.eps(combined, x, math.sqrt(a_t), math.sqrt(1 - a_t))
        x = _done(cb, s, i, _pndm_transfer(s, x, t, t_prev, eps))
    return x


# ---- DPM-Solver++(2M) and UniPC (bh2): state x_t, data prediction, log-SNR steps ----------------------


def _vp(sigma: float) -> tuple[float, float, float]:
    """(alpha, sigma_vp, lambda = log(alpha / sigma_vp)) for k-sigma ``sigma`` > 0."""
    alpha = 1 / math.sqrt(sigma * sigma + 1)
    return alpha, sigma * alpha, -math.log(sigma)


def dpmpp_2m(
    model: Denoiser, x: Tensor, s: Schedule, noise: NoiseFn, eta: float, cb: Callback | None
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2, midpoint form), h = lambda_next - lambda_cur:
    x_next = (sigma_next/sigma_cur) x - alpha_next (e^-h - 1) (D0 + D1/2), D1 = (m0 - m1) h / h_prev.
    First and last steps are first order (the last goes to sigma 0 and returns x0 exactly)."""
    prev: tuple[Tensor, float] | None = None  # (previous x0 estimate, its lambda)
    for i in range(s.begin, len(s.timesteps)):
        m0 = model(x, i)
        _, sig_cur, lam_cur = _vp(s.sigmas[i])
        if s.sigmas[i + 1] == 0.0:
            x = m0  # limit h -> inf of the first-order update
        else:
            alpha_n, sig_n, lam_n = _vp(s.sigmas[i + 1])
            h = lam_n - lam_cur
            d = m0 if prev is None else m0 + 0.5 * (m0 - prev[0]) * (h / (lam_cur - prev[1]))
            x = (sig_n / sig_cur) * x - (alpha_n * math.expm1(-h)) * d
        prev = (m0, lam_cur)
        x = _done(cb, s, i, x)
    return x


def _unipc_rhos(h: float, r: float | None) -> tuple[float, ...]:
    """UniPC bh2 corrector weights (Zhao et al. 2023, Alg. 1 with B(h) = e^h - 1, data prediction): order
    1 -> (1/2,); order 2 solves [[1, 1], [r, 1]] rho = g with g_k = k! phi_{k+1}(-h)-style terms."""
    hh = -h
    b_h = math.expm1(hh)
    phi = b_h / hh - 1
    g1 = phi / b_h
    if r is None:
        return (0.5,)
    g2 = (phi / hh - 0.5) * 2 / b_h
    rho0 = (g1 - g2) / (1 - r)
    return (rho0, g1 - rho0)


_History = list[tuple[Tensor, float]]  # (x0 estimate, lambda) of earlier model calls, newest last


def _unic(s: Schedule, i: int, last_x: Tensor, m: Tensor, hist: _History, order: int) -> Tensor:
    """UniC corrector of the state at call i (predicted from ``last_x``) with the new x0 estimate ``m``:
    x_i = the first-order part from last_x + B(h) sum rho_k D_k."""
    alpha_c, sig_c, lam_c = _vp(s.sigmas[i])
    m0, lam0 = hist[-1]
    h = lam_c - lam0
    base = (sig_c / _vp(s.sigmas[i - 1])[1]) * last_x - (alpha_c * math.expm1(-h)) * m0
    r = (hist[-2][1] - lam0) / h if order == 2 else None
    rhos = _unipc_rhos(h, r)
    corr = rhos[-1] * (m - m0)
    if r is not None:
        corr = corr + rhos[0] * (hist[-2][0] - m0) / r
    return base - (alpha_c * math.expm1(-h)) * corr


def _unip(s: Schedule, i: int, x: Tensor, hist: _History, order: int) -> Tensor:
    """UniP predictor from call i to i + 1: a first-order DPM++ step plus (order 2) rho_p = 1/2 times
    B(h) D1.  The step to sigma 0 (limit h -> inf) returns the x0 estimate."""
    m, lam_c = hist[-1]
    if s.sigmas[i + 1] == 0.0:
        return m
    alpha_n, sig_n, lam_n = _vp(s.sigmas[i + 1])
    h = lam_n - lam_c
    x = (sig_n / _vp(s.sigmas[i])[1]) * x - (alpha_n * math.expm1(-h)) * m
    if order == 2:
        r = (hist[-2][1] - lam_c) / h
        x = x - (alpha_n * math.expm1(-h) * 0.5 / r) * (hist[-2][0] - m)
    return x


def unipc(model: Denoiser, x: Tensor, s: Schedule, noise: NoiseFn, eta: float, cb: Callback | None) -> Tensor:
    """UniPC-2 with bh2 (diffusers defaults): each call first corrects the previous predictor result
    (UniC, using the new model output), then predicts the next state (UniP).  Orders ramp up 1 -> 2 and
    drop to 1 for the final step, which lands on sigma 0 and returns x0."""
    hist: _History = []
    last_x: Tensor | None = None  # state before the previous predictor step
    order = 1
    n = len(s.timesteps)
    for i in range(s.begin, n):
        m = model(x, i)
        if last_x is not None:
            x = _unic(s, i, last_x, m, hist, order)
        hist = [*hist[-1:], (m, _vp(s.sigmas[i])[2])]
        order = min(2, n - i, len(hist))
        last_x = x
        x = _done(cb, s, i, _unip(s, i, x, hist, order))
    return x


# ---- the named schedulers ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Scheduler:
    """A scheduler name's sampler loop, schedule rules, and the sampler name A1111 writes in PNG info."""

    sampler: Sampler
    schedule: ScheduleKind
    a1111: str


SCHEDULERS: dict[str, Scheduler] = {
    "ddim": Scheduler(ddim, DDIM, "DDIM"),
    "pndm": Scheduler(pndm, PLMS, "PLMS"),
    "lms": Scheduler(lms, K, "LMS"),
    "euler": Scheduler(euler, K, "Euler"),
    "euler_a": Scheduler(euler_a, K_NO_KARRAS, "Euler a"),
    "heun": Scheduler(heun, HEUN, "Heun"),
    "dpmpp_2m": Scheduler(dpmpp_2m, MULTISTEP, "DPM++ 2M"),
    "dpmpp_2m_karras": Scheduler(dpmpp_2m, MULTISTEP_KARRAS, "DPM++ 2M Karras"),
    "unipc": Scheduler(unipc, MULTISTEP, "UniPC"),
}
SCHEDULER_NAMES: tuple[str, ...] = tuple(SCHEDULERS)


def get_scheduler(name: str) -> Scheduler:
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULER_NAMES)}")
    return SCHEDULERS[name]


def make_schedule(name: str, config: SchedulerConfig, steps: int, strength: float = 1.0) -> Schedule:
    """Schedule of scheduler ``name`` for ``steps`` steps; ``strength < 1`` keeps the last
    ``int(steps * strength)`` (img2img)."""
    return build_schedule(name, get_scheduler(name).schedule, config, steps, strength)


def sample(
    schedule: Schedule,
    model: ModelFn,
    x: Tensor,
    noise: NoiseFn,
    eta: float = 0.0,
    callback: Callback | None = None,
) -> Tensor:
    """Run all model calls of ``schedule`` from state ``x``; returns the denoised latents x0.

    ``model`` gives raw UNet outputs (:class:`ModelFn`).  ``eta`` is DDIM's stochasticity (0:
    deterministic DDIM, 1: DDPM-like); other samplers ignore it (euler_a is always fully ancestral).
    ``noise()`` is called for step noise by euler_a and by ddim with eta > 0 (once per step, as
    diffusers draws it).  ``callback(i, x)`` runs after model call i.
    """
    if isinstance(eta, bool) or not isinstance(eta, int | float) or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    sampler = get_scheduler(schedule.name).sampler
    return sampler(Denoiser(schedule, model), x, schedule, noise, float(eta), callback)
