"""One worker thread per device: a queue of jobs, compatible ones batched into one pipeline call.

A job is one API request: a list of units (one pipeline call's worth of images each: n_iter, batch
splits), and for hires fix a follow-up that turns the first pass's images into second-pass units. The
worker takes the first queued job's next unit and, with batching on, adds the next units of later jobs
that carry the same batching key (model, size, steps, sampler, ...: `Unit.key`) while the images fit in
the artifact's max_batch (txt2img, img2img, inpaint and the hires fix's second pass alike). Every image
keeps its own prompt, negative prompt, seed, guidance scale, init image and mask, so a batched request
gives the images it gives alone. The model runs here, never on the event loop, so
/progress and /interrupt answer while a job runs; /interrupt stops the running call after its current
model call (the step callback raises runtime.pipeline.StopSampling) and the jobs in it return, as A1111's,
the images finished before and those of the stopped call decoded from their latents as they are.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from runtime.pipeline import Pipeline, StopSampling
from runtime.serve.errors import QueueFull

Images = list[Image.Image]
Loader = Callable[[str], Pipeline]


@dataclass
class Unit:
    """One pipeline call's images of one job."""

    kind: str  # "txt2img" | "img2img" | "inpaint"
    model: str
    prompts: list[str]
    negatives: list[str]
    seeds: list[int]
    scale: float
    kwargs: dict[str, Any]  # steps, height/width (txt2img), scheduler, eta, strength, syntax, emphasis
    images: Images | None = None  # init images (img2img / inpaint), one per image
    mask: Image.Image | None = None  # inpaint: the mask of all this unit's images
    key: Hashable | None = None  # batching key; None: runs alone
    post: Callable[[Images], Images] | None = None  # applied to this unit's outputs (inpaint overlay)


@dataclass
class Job:
    units: list[Unit]
    then: Callable[[Images], list[Unit]] | None = None  # hires fix: second-pass units from the first pass
    results: Images = field(default_factory=list)
    future: Future[Images] = field(default_factory=Future)
    cancelled: bool = False  # the client went away
    interrupted: bool = False
    calls_run: int = 0  # model calls of its last pipeline call (how far an interrupted one got)
    total_units: int = 0
    done_units: int = 0

    def __post_init__(self) -> None:
        self.total_units = len(self.units) * (2 if self.then is not None else 1)


@dataclass
class _State:
    job_timestamp: str = "0"
    sampling_step: int = 0
    sampling_steps: int = 0
    started: float = 0.0
    fraction: float = 0.0


class Worker:
    def __init__(self, loader: Loader, max_batch: Callable[[str], int], max_queue: int, batching: bool,
                 preload: str | None = None) -> None:
        self._loader = loader
        self._preload = preload  # loaded first thing in the thread, so that the first request does not wait
        self._max_batch = max_batch
        self._max_queue = max_queue
        self.batching = batching
        self._cond = threading.Condition()
        self._queue: list[Job] = []
        self._running: list[Job] = []
        self._stop = False
        self._interrupt = threading.Event()
        self._state = _State()
        self._unit_seconds = 1.0  # moving average, for Retry-After
        self.batches = 0  # pipeline calls made
        self.batched_units = 0  # units that ran in them
        self.busy_s = 0.0  # seconds spent in pipeline calls
        self._thread = threading.Thread(target=self._loop, name="sdexport-serve-worker", daemon=True)
        self._thread.start()

    # ---- the event loop's side -----------------------------------------------------------------
    def submit(self, job: Job) -> Future[Images]:
        with self._cond:
            if self._stop:
                raise QueueFull(5)
            waiting = len(self._queue) - len(self._running)
            if waiting >= self._max_queue:
                raise QueueFull(max(1, math.ceil(self._unit_seconds * (waiting + 1))))
            self._queue.append(job)
            self._cond.notify()
        return job.future

    def cancel(self, job: Job) -> None:
        with self._cond:
            job.cancelled = True
            if job not in self._running and job in self._queue:
                self._queue.remove(job)
                job.future.cancel()

    def interrupt(self) -> None:
        with self._cond:
            if self._running:
                self._interrupt.set()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the running call, refuse what is queued, end the thread."""
        with self._cond:
            self._stop = True
            for job in self._queue:
                if job not in self._running:
                    job.future.set_exception(QueueFull(5))
            self._queue = [j for j in self._queue if j in self._running]
            self._cond.notify_all()
        self._thread.join(timeout)

    def progress(self) -> dict[str, Any]:
        """A1111's /progress fields (without the image)."""
        with self._cond:
            s, jobs = self._state, len(self._queue)
            running = bool(self._running)
            frac = s.fraction if running else 0.0
            elapsed = time.monotonic() - s.started if running else 0.0
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        return {
            "progress": round(frac, 4),
            "eta_relative": round(eta, 3),
            "state": {"skipped": False, "interrupted": self._interrupt.is_set(), "job": "",
                      "job_count": jobs, "job_timestamp": s.job_timestamp, "job_no": 0,
                      "sampling_step": s.sampling_step if running else 0,
                      "sampling_steps": s.sampling_steps if running else 0},
            "current_image": None,
            "textinfo": None,
        }

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    # ---- the worker thread -----------------------------------------------------------------------
    def _loop(self) -> None:
        if self._preload is not None:
            with contextlib.suppress(Exception):  # the first request that needs it reports the error
                self._loader(self._preload)
        while True:
            with self._cond:
                while not self._stop and not self._queue:
                    self._cond.wait()
                if not self._queue:
                    return
                self._queue = [j for j in self._queue if j.units and not j.future.done()]
                if not self._queue:
                    continue
                picked = self._pick()
                self._running = sorted({id(j): j for j, _ in picked}.values(), key=self._queue.index)
                self._interrupt.clear()
                head = picked[0][0]
                self._state = _State(job_timestamp=time.strftime("%Y%m%d%H%M%S"), started=time.monotonic(),
                                     sampling_steps=0, fraction=head.done_units / max(head.total_units, 1))
            t0 = time.monotonic()
            stopped = False
            try:
                outcome, stopped = self._run_units(picked)
            except BaseException as e:  # never let the worker die: fail what it held
                outcome = [e if isinstance(e, Exception) else RuntimeError(str(e)) for _ in picked]
            with self._cond:
                self.busy_s += time.monotonic() - t0
                self._unit_seconds = 0.7 * self._unit_seconds + 0.3 * (time.monotonic() - t0)
                self._finish(picked, outcome, stopped)
                self._running = []

    def _pick(self) -> list[tuple[Job, Unit]]:
        head = self._queue[0]
        unit = head.units[0]
        picked = [(head, unit)]
        if self.batching and unit.key is not None:
            room = self._max_batch(unit.model) - len(unit.prompts)
            for job in self._queue:
                for u in job.units[1:] if job is head else job.units[:1]:
                    if u.key == unit.key and len(u.prompts) <= room:
                        picked.append((job, u))
                        room -= len(u.prompts)
                    else:
                        break  # a job's units run in order
        for job, u in picked:
            job.units.remove(u)
        return picked

    def _run_units(self, picked: list[tuple[Job, Unit]]) -> tuple[list[Images | Exception], bool]:
        """Each unit's images or error, and whether /interrupt (or every client leaving) stopped the call."""
        units = [u for _, u in picked]
        try:
            images, stopped = self._call(units, [j for j, _ in picked])
            results: list[Images | Exception] = [*images]
            return results, stopped
        except Exception as e:
            if len(units) == 1:
                return [e], False
        # a batch failed: run each alone, so that one bad request fails alone
        out: list[Images | Exception] = []
        for n, (job, u) in enumerate(picked):
            try:
                images, stopped = self._call([u], [job])
            except Exception as e:
                out.append(e)
                continue
            out.extend(images)
            if stopped and self._interrupt.is_set():  # the rest are not run: interrupted with what they have
                return out + [[] for _ in picked[n + 1:]], True
        return out, False

    def _call(self, units: list[Unit], jobs: list[Job]) -> tuple[list[Images], bool]:
        u0 = units[0]
        pipe = self._loader(u0.model)
        head = jobs[0]
        stopped = False

        def step(i: int, total: int) -> None:
            nonlocal stopped
            with self._cond:
                for j in jobs:
                    j.calls_run = i
                self._state.sampling_step, self._state.sampling_steps = i, total
                self._state.fraction = (head.done_units + i / total) / max(head.total_units, 1)
            if self._interrupt.is_set() or all(j.cancelled for j in jobs):
                stopped = True
                raise StopSampling  # the pipeline returns the images of the latents so far (A1111)

        prompts = [p for u in units for p in u.prompts]
        negatives = [p for u in units for p in u.negatives]
        seeds = [s for u in units for s in u.seeds]
        scales = [u.scale for u in units for _ in u.prompts]
        scale: float | list[float] = scales[0] if len(set(scales)) == 1 else scales
        kw: dict[str, Any] = dict(u0.kwargs, seed=seeds, scale=scale, progress=step, output="pil")
        inits = [im for u in units for im in (u.images or [])]  # one per image (img2img / inpaint)
        if u0.kind == "txt2img":
            images = pipe.text2img(prompts, negatives, **kw)
        elif u0.kind == "img2img":
            images = pipe.img2img(inits, prompts, negatives, **kw)
        else:
            masks = [u.mask for u in units if u.mask is not None for _ in u.prompts]
            assert len(masks) == len(prompts), "an inpaint unit without its mask"
            images = pipe.inpaint(inits, masks, prompts, negatives, **kw)
        assert isinstance(images, list)
        self.batches += 1
        self.batched_units += len(units)
        out, k = [], 0
        for u in units:
            mine = images[k:k + len(u.prompts)]
            k += len(u.prompts)
            out.append(u.post(mine) if u.post is not None else mine)
        return out, stopped

    def _finish(self, picked: list[tuple[Job, Unit]], outcome: list[Images | Exception], stopped: bool) -> None:
        jobs: list[Job] = []
        for n, (job, _) in enumerate(picked):
            if job not in jobs:
                jobs.append(job)
            if job.future.done():
                continue
            if isinstance(result := outcome[n], Exception):
                self._fail(job, result)
                continue
            job.results.extend(result)
            job.done_units += 1
            if stopped:  # A1111: an interrupted job returns the images so far, the stopped call's included
                job.interrupted = True
                job.units.clear()
                job.then = None
        for job in jobs:
            if job.future.done():  # failed, or cancelled by its client
                if job in self._queue:
                    self._queue.remove(job)
                continue
            if not job.units and job.then is not None and not job.cancelled:
                try:
                    job.units = job.then(job.results)
                except Exception as e:
                    self._fail(job, e)
                    continue
                job.results, job.then = [], None
            if not job.units or job.cancelled:
                if job in self._queue:
                    self._queue.remove(job)
                job.future.set_result(job.results)

    def _fail(self, job: Job, e: BaseException) -> None:
        if job in self._queue:
            self._queue.remove(job)
        job.future.set_exception(e)
