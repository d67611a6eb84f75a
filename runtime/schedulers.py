"""Noise schedules for Stable Diffusion sampling, numerically matching diffusers' schedulers.

A :class:`Schedule` is data: everything one run needs (timesteps, sigmas, alpha table, img2img start).
How a diffusers scheduler class lays its schedule out is a :class:`ScheduleKind` (DDIM, PLMS, K, ...);
:mod:`runtime.samplers` pairs every scheduler name with its kind and its sampler loop.  Each sampler
keeps diffusers' state space, so latents seen by callbacks equal diffusers' ``latents``:

* VP space ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps`` for ddim, pndm, dpmpp_2m(_karras), unipc;
* k-diffusion space ``x = x0 + sigma eps`` (``sigma = sqrt((1 - a) / a)``) for lms, euler, euler_a, heun.

This module is a leaf: it imports nothing from the samplers.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "DDIM",
    "HEUN",
    "K_NO_KARRAS",
    "MULTISTEP",
    "MULTISTEP_KARRAS",
    "PLMS",
    "PREDICTION_TYPES",
    "K",
    "Schedule",
    "ScheduleKind",
    "SchedulerConfig",
    "add_noise",
    "build_schedule",
    "initial_latents",
]

Family = Literal["discrete", "k", "multistep"]
Layout = tuple[list[float], list[float]]  # (UNet timestep, sigma) of every model call; sigmas end in 0.0
_BETA_SCHEDULES = ("linear", "scaled_linear")
PREDICTION_TYPES = ("epsilon", "v_prediction")  # what the samplers convert (Denoiser)
_SPACINGS = ("leading", "trailing", "linspace")


@dataclass(frozen=True)
class SchedulerConfig:
    """The subset of diffusers' ``scheduler_config.json`` that SD sampling depends on.

    ``None`` fields take the default diffusers uses for the chosen scheduler class (diffusers'
    ``XScheduler.from_config(cfg)`` fills missing keys with per-class defaults, e.g. DDIM/PNDM space
    timesteps "leading" but Euler/LMS/Heun/DPM/UniPC "linspace").
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str | None = None  # None: "leading" for ddim/pndm, "linspace" otherwise
    steps_offset: int = 0
    set_alpha_to_one: bool | None = None  # None: True for ddim, False for pndm
    clip_sample: bool | None = None  # None: True for ddim, False for heun (only these two clip)
    clip_sample_range: float = 1.0
    use_karras_sigmas: bool = False  # honoured by lms/euler/heun/dpmpp_2m/unipc; dpmpp_2m_karras forces it

    def __post_init__(self) -> None:
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if self.beta_schedule not in _BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {_BETA_SCHEDULES}, got {self.beta_schedule!r}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}"
            )
        if self.timestep_spacing is not None and self.timestep_spacing not in _SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {_SPACINGS}, got {self.timestep_spacing!r}")
        if not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {self.beta_start}, {self.beta_end}")
        if self.steps_offset < 0:
            raise ValueError(f"steps_offset must be >= 0, got {self.steps_offset}")
        if not self.clip_sample_range > 0.0:
            raise ValueError(f"clip_sample_range must be > 0, got {self.clip_sample_range}")

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> SchedulerConfig:
        """Build from diffusers' vocabulary; unknown keys are ignored, ``null`` means "default"."""
        # Keys whose non-default values change the math but are not implemented: refuse, don't ignore.
        for key, harmless in (("trained_betas", None), ("rescale_betas_zero_snr", False),
                              ("thresholding", False)):
            if d.get(key, harmless) not in (harmless, None):
                raise ValueError(f"scheduler config {key}={d[key]!r} is not supported")
        kw: dict[str, object] = {}
        for name, kind in (("num_train_timesteps", int), ("steps_offset", int), ("beta_start", float),
                           ("beta_end", float), ("clip_sample_range", float), ("beta_schedule", str),
                           ("prediction_type", str), ("timestep_spacing", str), ("set_alpha_to_one", bool),
                           ("clip_sample", bool), ("use_karras_sigmas", bool)):
            v = d.get(name)
            if v is None:
                continue
            if kind is float and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
                raise ValueError(f"scheduler config {name} must be {kind.__name__}, got {v!r}")
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"scheduler config {name} must be finite, got {v!r}")
            kw[name] = v
        return cls(**kw)  # type: ignore[arg-type]  # types checked above

    def to_dict(self) -> dict[str, object]:
        """diffusers-vocabulary dict (``None`` fields omitted); ``from_dict(to_dict())`` round-trips."""
        return {k: v for k, v in self.__dict__.items() if v is not None}


# --------------------------------------------------------------------------------------------------------
# Timestep spacing (diffusers set_timesteps); values reproduce numpy's linspace/arange/round bit for bit.


def _linspace(stop: float, num: int) -> list[float]:
    if num == 1:
        return [0.0]
    step = stop / (num - 1)
    return [i * step for i in range(num - 1)] + [stop]


def _float32(values: list[float]) -> list[float]:
    """Values rounded to float32 (diffusers keeps schedules in float32 tensors)."""
    return torch.tensor(values, dtype=torch.float64).float().double().tolist()


def _base_timesteps(cfg: SchedulerConfig, family: Family, spacing: str, n: int) -> list[float]:
    """Descending train timesteps of the n inference steps.  Multistep solvers space n + 1 points and
    drop the last; discrete schedulers round to integers, k-samplers keep float32 values."""
    big_n = cfg.num_train_timesteps
    multi = family == "multistep"
    if spacing == "trailing":  # round(np.arange(N, 0, -N / n)) - 1; numpy fills start + k * (v1 - start)
        step = -big_n / n
        delta = (big_n + step) - big_n
        return [float(round(big_n + k * delta) - 1) for k in range(math.ceil(-big_n / step))]
    if spacing == "leading":
        # ddim-style: k * (N // n) for k < n; multistep: k * (N // (n + 1)) for 0 < k <= n
        ratio = big_n // (n + 1) if multi else big_n // n
        ks = range(n, 0, -1) if multi else range(n - 1, -1, -1)
        return [float(k * ratio + cfg.steps_offset) for k in ks]
    if multi:  # linspace over n + 1 points, drop the final 0
        return [float(round(v)) for v in reversed(_linspace(big_n - 1, n + 1))][:-1]
    lin = list(reversed(_linspace(big_n - 1, n)))
    if family == "discrete":
        return [float(round(v)) for v in lin]
    return _float32(lin)  # np.float32 cast, unrounded


def _interp(table: list[float], t: float) -> float:
    """np.interp(t, arange(len(table)), table), which clamps outside the table."""
    t = min(max(t, 0.0), len(table) - 1.0)
    lo = min(math.floor(t), len(table) - 2)
    return (table[lo + 1] - table[lo]) * (t - lo) + table[lo]


def _karras(sigma_max: float, sigma_min: float, n: int, rho: float = 7.0) -> list[float]:
    """Karras et al. 2022 eq. 5: (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho."""
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return [(hi + r * (lo - hi)) ** rho for r in _linspace(1.0, n)]


def _sigma_to_t(sigma: float, log_table: list[float]) -> float:
    """Fractional train timestep whose log-sigma (piecewise linearly interpolated) equals log(sigma)."""
    ls = math.log(max(sigma, 1e-10))
    low = min(max(bisect.bisect_right(log_table, ls) - 1, 0), len(log_table) - 2)  # last entry <= ls
    w = min(max((log_table[low] - ls) / (log_table[low] - log_table[low + 1]), 0.0), 1.0)
    return (1 - w) * low + w * (low + 1)


def _log(table: list[float]) -> list[float]:
    return torch.tensor(table, dtype=torch.float32).log().double().tolist()


def _alphas_cumprod(cfg: SchedulerConfig) -> Tensor:
    n = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float32)
    else:  # scaled_linear: linear in sqrt(beta), the SD default
        lo, hi = float(cfg.beta_start**0.5), float(cfg.beta_end**0.5)
        betas = torch.linspace(lo, hi, n, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


# --------------------------------------------------------------------------------------------------------
# One layout per scheduler family: (config, steps, spacing, karras, sigma table) -> (timesteps, sigmas).


def _discrete_layout(cfg: SchedulerConfig, steps: int, spacing: str, karras: bool, table: list[float]) -> Layout:
    """DDIM / PNDM: integer train timesteps that index the alpha table; no sigmas."""
    ts = _base_timesteps(cfg, "discrete", spacing, steps)
    if max(ts) >= cfg.num_train_timesteps:  # e.g. leading spacing + steps_offset at steps == N
        raise ValueError(f"{steps} steps with this spacing/steps_offset exceed the training timesteps")
    return ts, []


def _k_layout(cfg: SchedulerConfig, steps: int, spacing: str, karras: bool, table: list[float]) -> Layout:
    """k-samplers: the table's sigma at each spaced timestep; Karras sigmas span that range and map
    back to fractional (float32) timesteps."""
    ts = _base_timesteps(cfg, "k", spacing, steps)
    sig = [_interp(table, t) for t in ts]
    if karras:
        sig = _karras(sig[0], sig[-1], steps)
        log_table = _log(table)
        ts = _float32([_sigma_to_t(s, log_table) for s in sig])
    return ts, _float32([*sig, 0.0])


def _multistep_layout(cfg: SchedulerConfig, steps: int, spacing: str, karras: bool,
                      table: list[float]) -> Layout:
    """DPM-Solver++ / UniPC: as the k layout, but Karras sigmas span the whole table and their
    timesteps are rounded to integers."""
    ts = _base_timesteps(cfg, "multistep", spacing, steps)
    sig = [_interp(table, t) for t in ts]
    if karras:
        sig = _karras(table[-1], table[0], steps)
        log_table = _log(table)
        ts = [float(round(_sigma_to_t(s, log_table))) for s in sig]
    return ts, _float32([*sig, 0.0])


_LAYOUTS: dict[Family, Callable[[SchedulerConfig, int, str, bool, list[float]], Layout]] = {
    "discrete": _discrete_layout, "k": _k_layout, "multistep": _multistep_layout,
}


def _plms_warmup(ts: list[float], sig: list[float]) -> Layout:
    """PLMS warm-up evaluates the second timestep twice."""
    return (ts[:2] + ts[1:] if len(ts) > 1 else ts), sig


def _heun_pairs(ts: list[float], sig: list[float]) -> Layout:
    """Heun: every step but the last makes two model calls (predictor, corrector)."""
    ts = ts[:1] + [t for t in ts[1:] for _ in (0, 1)]
    return ts, sig[:1] + [s for s in sig[1:-1] for _ in (0, 1)] + sig[-1:]


@dataclass(frozen=True)
class ScheduleKind:
    """One diffusers scheduler class's schedule rules (its ``set_timesteps`` and per-class defaults)."""

    family: Family  # discrete: DDIM-style alpha table; k: state x0 + sigma eps; multistep: VP, n + 1 spacing
    spacing: str = "linspace"  # timestep_spacing when the config has none
    karras: Literal["never", "config", "always"] = "config"  # use Karras sigmas
    clips: bool | None = None  # clip_sample default; None: never clips x0
    alpha_to_one: bool = False  # set_alpha_to_one default (alpha past the last DDIM/PLMS step)
    repeat: Callable[[list[float], list[float]], Layout] | None = None  # model calls beyond one per step
    order: int = 1  # model calls per step (Heun: 2)


DDIM = ScheduleKind("discrete", spacing="leading", karras="never", clips=True, alpha_to_one=True)
PLMS = ScheduleKind("discrete", spacing="leading", karras="never", repeat=_plms_warmup)
K = ScheduleKind("k")  # LMS, Euler
K_NO_KARRAS = ScheduleKind("k", karras="never")  # Euler ancestral ignores use_karras_sigmas
HEUN = ScheduleKind("k", clips=False, repeat=_heun_pairs, order=2)
MULTISTEP = ScheduleKind("multistep")
MULTISTEP_KARRAS = ScheduleKind("multistep", karras="always")


@dataclass(frozen=True)
class Schedule:
    """One sampling run.  ``timesteps``/``sigmas`` describe the full (strength 1) diffusers schedule; the
    run starts at model call ``begin`` (diffusers' ``begin_index`` for img2img)."""

    name: str
    kind: ScheduleKind
    config: SchedulerConfig
    steps: int  # requested inference steps (diffusers' num_inference_steps)
    begin: int  # index of this run's first model call in ``timesteps``
    timesteps: tuple[float, ...]  # UNet timestep of every model call (heun: doubled, pndm: steps + 1)
    sigmas: tuple[float, ...]  # sqrt((1-a)/a) per model call, then the final 0.0 (empty for ddim/pndm)
    alphas_cumprod: tuple[float, ...]  # training table (float32 values), indexed by integer timestep
    final_alpha_cumprod: float  # "alpha_prod_t_prev" past the last step (ddim/pndm)
    init_noise_sigma: float

    @property
    def num_steps(self) -> int:
        """Model calls in this run; ``sample``'s callback sees indices ``0 .. num_steps - 1``."""
        return len(self.timesteps) - self.begin

    @property
    def k_space(self) -> bool:
        """State ``x = x0 + sigma eps`` (k-diffusion); otherwise the VP state ``x_t`` itself."""
        return self.kind.family == "k"

    @property
    def clip(self) -> bool:
        """Clamp x0 estimates to ``clip_sample_range`` (only DDIM and Heun honour ``clip_sample``)."""
        c = self.config.clip_sample
        return bool(self.kind.clips) if c is None else (c and self.kind.clips is not None)

    def noise_level(self, index: int) -> tuple[float, float]:
        """(alpha, sigma) of ``x_t = alpha x0 + sigma eps`` at model call ``index``."""
        if self.kind.family == "discrete":
            a = self.alphas_cumprod[int(self.timesteps[index])]
            return math.sqrt(a), math.sqrt(1 - a)
        s = self.sigmas[index]
        alpha = 1 / math.sqrt(s * s + 1)
        return alpha, s * alpha


def _kept_steps(config: SchedulerConfig, steps: int, strength: float) -> int:
    """Validated arguments -> denoising steps of the run (diffusers get_timesteps)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if steps > config.num_train_timesteps:
        raise ValueError(f"steps ({steps}) cannot exceed num_train_timesteps ({config.num_train_timesteps})")
    if not (isinstance(strength, int | float) and 0.0 <= strength <= 1.0):
        raise ValueError(f"strength must be a number in [0, 1], got {strength!r}")
    kept = min(int(steps * strength), steps)
    if kept < 1:
        raise ValueError(f"strength {strength} with {steps} steps leaves no denoising step")
    return kept


def _init_noise_sigma(kind: ScheduleKind, spacing: str, sigmas: list[float]) -> float:
    if kind.family != "k":
        return 1.0  # VP states start at unit variance
    smax = max(sigmas)
    return smax if spacing != "leading" else float(torch.tensor(math.sqrt(smax**2 + 1)).float())


def build_schedule(name: str, kind: ScheduleKind, config: SchedulerConfig, steps: int,
                   strength: float = 1.0) -> Schedule:
    """Schedule of ``kind`` for ``steps`` inference steps; ``strength < 1`` keeps the last
    ``int(steps * strength)`` (img2img)."""
    kept = _kept_steps(config, steps, strength)
    ac32 = _alphas_cumprod(config)
    table = ((1 - ac32) / ac32).sqrt().double().tolist()  # sigma(t), float32 values as in diffusers
    spacing = config.timestep_spacing or kind.spacing
    karras = {"never": False, "config": config.use_karras_sigmas, "always": True}[kind.karras]
    ts, sig = _LAYOUTS[kind.family](config, steps, spacing, karras, table)
    if kind.repeat is not None:
        ts, sig = kind.repeat(ts, sig)
    ac = ac32.double().tolist()
    one = kind.alpha_to_one if config.set_alpha_to_one is None else config.set_alpha_to_one
    return Schedule(
        name=name, kind=kind, config=config, steps=steps, begin=(steps - kept) * kind.order,
        timesteps=tuple(ts), sigmas=tuple(sig), alphas_cumprod=tuple(ac),
        final_alpha_cumprod=1.0 if one else ac[0], init_noise_sigma=_init_noise_sigma(kind, spacing, sig),
    )


def _noised(schedule: Schedule, x0: Tensor, noise: Tensor, index: int) -> Tensor:
    """x0 at the noise level of absolute model call ``index``, in the sampler's state space."""
    if schedule.k_space:
        return x0 + schedule.sigmas[index] * noise
    alpha, sigma = schedule.noise_level(index)
    return alpha * x0 + sigma * noise


def initial_latents(schedule: Schedule, noise: Tensor, image_latents: Tensor | None = None) -> Tensor:
    """Starting state: ``noise * init_noise_sigma`` without image latents (text2img; also diffusers' inpaint
    at strength 1), else the image latents noised to the run's first timestep (img2img / inpaint)."""
    if image_latents is None:
        if schedule.begin != 0:
            raise ValueError("strength < 1 needs image_latents to start from")
        return noise * schedule.init_noise_sigma
    if image_latents.shape != noise.shape:
        raise ValueError(f"image_latents {tuple(image_latents.shape)} vs noise {tuple(noise.shape)} shape")
    return _noised(schedule, image_latents, noise, schedule.begin)


def add_noise(schedule: Schedule, x0: Tensor, noise: Tensor, step: int) -> Tensor:
    """``x0`` noised to the level of run step ``step`` (0-based, as seen by the callback); ``step ==
    num_steps`` (past the end) returns ``x0`` itself."""
    if not 0 <= step <= schedule.num_steps:
        raise ValueError(f"step must be in [0, {schedule.num_steps}], got {step}")
    if step == schedule.num_steps:
        return x0
    return _noised(schedule, x0, noise, schedule.begin + step)
