"""CPU execution settings shared by every engine: the thread count, and what the CPU can do natively.

One thread count binds torch (eager, pt2, AOTInductor: `torch.set_num_threads`, which also sets OpenMP's)
and the engines that keep their own pools (onnxruntime, OpenVINO), which `OMP_NUM_THREADS` alone does not.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch


def use_threads(threads: int | None) -> int:
    """Set torch's intra-op thread count to `threads` (None: keep the current one) and return the
    count every engine of this process should use."""
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive integer, got {threads!r}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def ort_session_options(threads: int, spin: bool = True) -> Any:
    """onnxruntime session options pinned to `threads` intra-op threads and one inter-op thread (the
    graphs are sequential; a second pool only competes for the cores); `spin` False: idle threads sleep
    instead of spin-waiting (onnxruntime's default), which otherwise holds the cores after each call."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return opts


@dataclass(frozen=True)
class CpuCaps:
    """The instruction sets the CPU kernels dispatch on (ATen and oneDNN choose at run time)."""

    capability: str  # torch.backends.cpu.get_cpu_capability(): "AVX2", "AVX512", ...
    avx512: bool
    avx512_bf16: bool
    amx: bool

    @property
    def native_bf16(self) -> bool:
        """bfloat16 arithmetic in hardware (AVX512-BF16 or AMX); without it oneDNN refuses bf16 and ATen
        converts to float32 and back around each op, slower than float32 throughout."""
        return self.avx512_bf16 or self.amx

    def describe(self) -> str:
        flags = [f for f, on in (("AVX512", self.avx512), ("AVX512-BF16", self.avx512_bf16), ("AMX", self.amx)) if on]
        return f"{self.capability} ({', '.join(flags) or 'no AVX512/BF16/AMX'})"


def cpu_caps() -> CpuCaps:
    return CpuCaps(capability=torch.backends.cpu.get_cpu_capability(),
                   avx512=bool(torch.cpu._is_avx512_supported()),
                   avx512_bf16=bool(torch.cpu._is_avx512_bf16_supported()),
                   amx=bool(torch.cpu._is_amx_tile_supported()))


def check_bf16(where: str) -> None:
    """A bfloat16 artifact on a CPU without native bf16 runs (results are the same), but slowly: warn."""
    caps = cpu_caps()
    if not caps.native_bf16:
        warnings.warn(f"{where}: this bfloat16 artifact runs on a CPU without native bf16 ({caps.describe()}); "
                      "it computes correctly but slower than float32. Build without --half for this CPU.",
                      RuntimeWarning, stacklevel=3)
