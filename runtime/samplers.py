"""Sampler loops, one plain function per method, all with the signature of :data:`Sampler`.

Each function walks the model calls ``schedule.begin ..`` of a :class:`~runtime.schedulers.Schedule`,
mirroring the diffusers scheduler of the same name step for step (same state space, same history
handling, same warm-up quirks) so results agree to float32 round-off.  Coefficients are computed in
Python floats (float64); tensor updates run in the latents' dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

if TYPE_CHECKING:
    from runtime.schedulers import Schedule


class ModelFn(Protocol):
    """Raw UNet output (epsilon or v, guidance applied) for UNet input ``x`` at 0-d float32 timestep ``t``."""

    def __call__(self, x: Tensor, t: Tensor) -> Tensor: ...


NoiseFn = Callable[[], Tensor]  # fresh standard-normal noise shaped like the latents
Callback = Callable[[int, Tensor], Tensor]  # (run step index, state) -> possibly modified state
Sampler = Callable[["Schedule", ModelFn, Tensor, NoiseFn, float, "Callback | None"], Tensor]


def _call(model: ModelFn, x: Tensor, t: float) -> Tensor:
    return model(x, torch.tensor(t, dtype=torch.float32))


def _k_denoised(s: Schedule, out: Tensor, x: Tensor, sigma: float) -> Tensor:
    """x0 from the model output in k-space x = x0 + sigma*eps (UNet saw x / sqrt(sigma^2 + 1))."""
    if s.config.prediction_type == "epsilon":
        x0 = x - sigma * out
    else:  # v = alpha*eps - sigma_vp*x0 with alpha = 1/sqrt(1+s^2), sigma_vp = s*alpha
        x0 = out * (-sigma / math.sqrt(sigma * sigma + 1)) + x / (sigma * sigma + 1)
    return x0.clamp(-s.config.clip_sample_range, s.config.clip_sample_range) if s.clip else x0


def _k_call(s: Schedule, model: ModelFn, x: Tensor, i: int) -> Tensor:
    """Model call i in k-space, returning the denoised estimate."""
    sigma = s.sigmas[i]
    return _k_denoised(s, _call(model, x / math.sqrt(sigma * sigma + 1), s.timesteps[i]), x, sigma)


def _done(cb: Callback | None, s: Schedule, i: int, x: Tensor) -> Tensor:
    return x if cb is None else cb(i - s.begin, x)


# ---- k-diffusion samplers: state x = x0 + sigma * eps -----------------------------------------------


def euler(s: Schedule, model: ModelFn, x: Tensor, noise: NoiseFn, eta: float, cb: Callback | None) -> Tensor:
    """Euler on dx/dsigma = (x - x0) / sigma (Karras et al. 2022, Alg. 1 without churn)."""
    for i in range(s.begin, len(s.timesteps)):
        d = (x - _k_call(s, model, x, i)) / s.sigmas[i]
        x = _done(cb, s, i, x + d * (s.sigmas[i + 1] - s.sigmas[i]))
    return x


def euler_a(
    s: Schedule, model: ModelFn, x: Tensor, noise: NoiseFn, eta: float, cb: Callback | None
) -> Tensor:
    """Ancestral Euler: deterministic step to sigma_down, then fresh noise of std sigma_up, with
    sigma_up^2 = s_to^2 (s_from^2 - s_to^2) / s_from^2 and sigma_down^2 + sigma_up^2 = s_to^2."""
    for i in range(s.begin, len(s.timesteps)):
        s_from, s_to = s.sigmas[i], s.sigmas[i + 1]
        up = math.sqrt(s_to**2 * (s_from**2 - s_to**2) / s_from**2)
        down = math.sqrt(s_to**2 - up**2)
        d = (x - _k_call(s, model, x, i)) / s_from
        x = _done(cb, s, i, x + d * (down - s_from) + noise() * up)  # diffusers draws even when up == 0
    return x


def heun(s: Schedule, model: ModelFn, x: Tensor, noise: NoiseFn, eta: float, cb: Callback | None) -> Tensor:
    """Heun's 2nd order method (Karras Alg. 1).  Calls alternate predictor / corrector like diffusers'
    doubled timesteps; the last step (to sigma 0) is a plain Euler step.  Sigmas are laid out
    [s0, s1, s1, s2, s2, ..., 0], so call i always evaluates the model at sigmas[i]."""
    pending: tuple[Tensor, Tensor, float] | None = None  # (x at step start, its slope, dt)
    for i in range(s.begin, len(s.timesteps)):
        x0 = _k_call(s, model, x, i)
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


def lms(s: Schedule, model: ModelFn, x: Tensor, noise: NoiseFn, eta: float, cb: Callback | None) -> Tensor:
    """Order-4 linear multistep on dx/dsigma.  Like diffusers, the order is min(i + 1, 4) with i the
    absolute step, so an img2img run zips the first coefficients with the few slopes it has."""
    slopes: list[Tensor] = []
    for i in range(s.begin, len(s.timesteps)):
        slopes = [*slopes[-3:], (x - _k_call(s, model, x, i)) / s.sigmas[i]]
        order = min(i + 1, 4)
        coeffs = [_lms_coefficient(s.sigmas, order, i, j) for j in range(order)]
        x = x + sum((c * d for c, d in zip(coeffs, reversed(slopes), strict=False)), torch.zeros_like(x))
        x = _done(cb, s, i, x)
    return x


# ---- DDIM / PNDM: state x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, integer train timesteps ---------------


def _alpha_prev(s: Schedule, t: int) -> float:
    return s.alphas_cumprod[t] if t >= 0 else s.final_alpha_cumprod


def ddim(s: Schedule, model: ModelFn, x: Tensor, noise: NoiseFn, eta: float, cb: Callback | None) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12): x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - std^2) eps + std z,
    std = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).  The previous timestep is
    t - N // steps whatever the spacing (as in diffusers)."""
    ratio = s.config.num_train_timesteps // s.steps
    for i in range(s.begin, len(s.timesteps)):
        t = int(s.timesteps[i])
        out = _call(model, x, s.timesteps[i])
        a_t, a_prev = s.alphas_cumprod[t], _alpha_prev(s, t - ratio)
        if s.config.prediction_type == "epsilon":
            x0, eps = (x - math.sqrt(1 - a_t) * out) / math.sqrt(a_t), out
        else:  # v-prediction: x0 = sqrt(a) x - sqrt(1-a) v, eps = sqrt(a) v + sqrt(1-a) x
            x0 = math.sqrt(a_t) * x - math.sqrt(1 - a_t) * out
            eps = math.sqrt(a_t) * out + math.sqrt(1 - a_t) * x
        if s.clip:  # diffusers keeps the unclipped eps for the direction term
            x0 = x0.clamp(-s.config.clip_sample_range, s.config.clip_sample_range)
        std = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        direction = math.sqrt(max(1 - a_prev - std * std, 0.0))  # clamped: eta > 1 would give NaN
        x = math.sqrt(a_prev) * x0 + direction * eps
        if eta > 0:
            x = x + std * noise()
        x = _done(cb, s, i, x)
    return x


def _pndm_transfer(s: Schedule, x: Tensor, t: int, t_prev: int, out: Tensor) -> Tensor:
    """PNDM's transfer phi (Liu et al. 2022, eq. 9) from t to t_prev given a (combined) model output."""
    a_t, a_prev = s.alphas_cumprod[t], _alpha_prev(s, t_prev)
    eps = out if s.config.prediction_type == "epsilon" else math.sqrt(a_t) * out + math.sqrt(1 - a_t) * x
    denom = a_t * math.sqrt(1 - a_prev) + math.sqrt(a_t * (1 - a_t) * a_prev)
    return math.sqrt(a_prev / a_t) * x - (a_prev - a_t) / denom * eps


def pndm(s: Schedule, model: ModelFn, x: Tensor, noise: NoiseFn, eta: float, cb: Callback | None) -> Tensor:
    """PLMS (PNDM with skip_prk_steps): 4th-order Adams-Bashforth on raw model outputs.  Warm-up as
    diffusers: call 0 steps t0 -> t1 with e0; call 1 (at t1) redoes t0 -> t1 from the saved sample with
    (e0 + e1) / 2 and e1 is not kept in the history; then 2nd/3rd/4th-order AB coefficients."""
    ratio = s.config.num_train_timesteps // s.steps
    history: list[Tensor] = []
    x_start = x
    for n, i in enumerate(range(s.begin, len(s.timesteps))):
        t = int(s.timesteps[i])
        out = _call(model, x, s.timesteps[i])
        t_prev = t - ratio
        if n == 1:
            t, t_prev = t + ratio, t
            x, combined = x_start, (out + history[-1]) / 2
        else:
            history = [*history[-3:], out]
            if n == 0:
                x_start, combined = x, out
            elif len(history) == 2:
                combined = (3 * history[-1] - history[-2]) / 2
            elif len(history) == 3:
                combined = (23 * history[-1] - 16 * history[-2] + 5 * history[-3]) / 12
            else:
                combined = (55 * history[-1] - 59 * history[-2] + 37 * history[-3] - 9 * history[-4]) / 24
        x = _done(cb, s, i, _pndm_transfer(s, x, t, t_prev, combined))
    return x


# ---- DPM-Solver++(2M) and UniPC (bh2): state x_t, data prediction, log-SNR steps ----------------------


def _vp(sigma: float) -> tuple[float, float, float]:
    """(alpha, sigma_vp, lambda = log(alpha / sigma_vp)) for k-sigma ``sigma`` > 0."""
    alpha = 1 / math.sqrt(sigma * sigma + 1)
    return alpha, sigma * alpha, -math.log(sigma)


def _vp_denoised(s: Schedule, model: ModelFn, x: Tensor, i: int) -> Tensor:
    alpha, sigma_vp, _ = _vp(s.sigmas[i])
    out = _call(model, x, s.timesteps[i])
    if s.config.prediction_type == "epsilon":
        return (x - sigma_vp * out) / alpha
    return alpha * x - sigma_vp * out


def dpmpp_2m(
    s: Schedule, model: ModelFn, x: Tensor, noise: NoiseFn, eta: float, cb: Callback | None
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2, midpoint form), h = lambda_next - lambda_cur:
    x_next = (sigma_next/sigma_cur) x - alpha_next (e^-h - 1) (D0 + D1/2), D1 = (m0 - m1) h / h_prev.
    First and last steps are first order (the last goes to sigma 0 and returns x0 exactly)."""
    prev: tuple[Tensor, float] | None = None  # (previous x0 estimate, its lambda)
    for i in range(s.begin, len(s.timesteps)):
        m0 = _vp_denoised(s, model, x, i)
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


def unipc(s: Schedule, model: ModelFn, x: Tensor, noise: NoiseFn, eta: float, cb: Callback | None) -> Tensor:
    """UniPC-2 with bh2 (diffusers defaults): each call first corrects the previous predictor result
    (UniC, using the new model output), then predicts the next state (UniP).  Orders ramp up 1 -> 2 and
    drop to 1 for the final step, which lands on sigma 0 and returns x0."""
    hist: list[tuple[Tensor, float]] = []  # (x0 estimate, lambda) of earlier calls, newest last
    last_x: Tensor | None = None  # state before the previous predictor step
    order = 1
    n = len(s.timesteps)
    for i in range(s.begin, n):
        m = _vp_denoised(s, model, x, i)
        alpha_c, sig_c, lam_c = _vp(s.sigmas[i])
        if last_x is not None:  # UniC: x_i = phi_1 part from last_x + B(h) sum rho_k D_k
            m0, lam0 = hist[-1]
            h = lam_c - lam0
            base = (sig_c / _vp(s.sigmas[i - 1])[1]) * last_x - (alpha_c * math.expm1(-h)) * m0
            r = (hist[-2][1] - lam0) / h if order == 2 else None
            rhos = _unipc_rhos(h, r)
            corr = rhos[-1] * (m - m0)
            if r is not None:
                corr = corr + rhos[0] * (hist[-2][0] - m0) / r
            x = base - (alpha_c * math.expm1(-h)) * corr
        hist = [*hist[-1:], (m, lam_c)]
        order = min(2, n - i, len(hist))
        last_x = x
        if s.sigmas[i + 1] == 0.0:
            x = m  # limit h -> inf of the predictor
        else:  # UniP: first-order DPM++ step plus (order 2) rho_p = 1/2 times B(h) D1
            alpha_n, sig_n, lam_n = _vp(s.sigmas[i + 1])
            h = lam_n - lam_c
            x = (sig_n / sig_c) * x - (alpha_n * math.expm1(-h)) * m
            if order == 2:
                r = (hist[-2][1] - lam_c) / h
                x = x - (alpha_n * math.expm1(-h) * 0.5 / r) * (hist[-2][0] - m)
        x = _done(cb, s, i, x)
    return x


SAMPLERS: dict[str, Sampler] = {
    "ddim": ddim, "pndm": pndm, "lms": lms, "euler": euler, "euler_a": euler_a, "heun": heun,
    "dpmpp_2m": dpmpp_2m, "dpmpp_2m_karras": dpmpp_2m, "unipc": unipc,
}
