"""Tests of the fused op library torch.ops.sdfused.* (runtime/ops.py, csrc/)."""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from runtime import ops

pytestmark = pytest.mark.skipif(not ops.available(), reason=ops.BUILD_HINT)

HAS_CUDA = (
    torch.cuda.is_available()
    and ops.available()
    and torch._C._dispatch_has_kernel_for_dispatch_key("sdfused::attention", "CUDA")
)
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and the CUDA build of the ops")
DEVICES = ["cpu", pytest.param("cuda", marks=[needs_cuda, pytest.mark.cuda])]

FP32_TOL = 1e-5
# every CPU kernels build this machine runs (portable, AVX2, AVX-512: csrc/cpu/kernels.h)
CPU_KERNELS = list(ops.cpu_kernel_capabilities()) if ops.available() else ["default"]


@pytest.fixture(params=CPU_KERNELS)
def cpu_kernels(request: pytest.FixtureRequest) -> Iterator[str]:
    """Runs the test on one CPU kernels build, then restores the chosen one."""
    before = ops.cpu_kernels()
    ops.use_cpu_kernels(request.param)
    try:
        yield request.param
    finally:
        ops.use_cpu_kernels(before)


def _seed(n: int = 0) -> torch.Generator:
    torch.manual_seed(n)
    return torch.Generator().manual_seed(n)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def _assert_half_ok(ours: torch.Tensor, composite: torch.Tensor, ref32: torch.Tensor) -> None:
    """Half-precision result within 2x of the torch composite's own error vs fp32 (plus one ulp)."""
    assert ours.dtype == composite.dtype
    ulp = 2.0**-10 if ours.dtype == torch.float16 else 2.0**-7
    scale = float(ref32.abs().max()) + 1.0
    e_ours, e_comp = _max_err(ours, ref32), _max_err(composite, ref32)
    assert e_ours <= 2.0 * e_comp + ulp * scale, f"error {e_ours:.3g} vs composite {e_comp:.3g}"


# ---------------------------------------------------------------------------------------------
# loading


def test_available_and_load_idempotent() -> None:
    assert ops.available()
    ops.load()
    ops.load()
    assert hasattr(torch.ops.sdfused, "group_norm")


def test_reload_module_does_not_crash() -> None:
    mod = importlib.reload(ops)
    assert mod.available()
    x = torch.randn(2, 6)
    torch.testing.assert_close(mod.geglu(x), mod.reference_geglu(x))


def test_missing_library_message(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(name: str, package: str | None = None) -> Any:
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(ops, "_loaded", False)
    monkeypatch.setattr(ops.importlib, "import_module", fail)
    assert not ops.available()
    with pytest.raises(ImportError, match=re.escape(ops.BUILD_HINT)):
        ops.load()
    with pytest.raises(ops.OpLibraryNotBuiltError):
        ops.geglu(torch.randn(2, 4))


# ---------------------------------------------------------------------------------------------
# opcheck (schema, fake kernel, autograd registration, AOT dispatch)


def _opcheck_cases(device: str) -> list[tuple[Any, tuple[Any, ...]]]:
    _seed(1)
    x = torch.randn(2, 8, 5, 3, device=device, requires_grad=True)
    xcl = torch.randn(2, 8, 5, 3, device=device).to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(8, device=device, requires_grad=True)
    b = torch.randn(8, device=device, requires_grad=True)
    q = torch.randn(1, 2, 5, 8, device=device, requires_grad=True)
    k = torch.randn(1, 2, 7, 8, device=device, requires_grad=True)
    v = torch.randn(1, 2, 7, 8, device=device, requires_grad=True)
    vw = torch.randn(1, 7, device=device, requires_grad=True)
    g = torch.randn(3, 4, 10, device=device, requires_grad=True)
    gn, at, gg = (
        torch.ops.sdfused.group_norm.default,
        torch.ops.sdfused.attention.default,
        torch.ops.sdfused.geglu,
    )
    return [
        (gn, (x, 4, w, b, 1e-5, True)),
        (gn, (xcl, 2, None, None, 1e-6, False)),
        (at, (q, k, v, 0.35, None)),
        (at, (q, k, v, 0.35, vw)),
        (gg.default, (g,)),
    ]


FAST_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device: str) -> None:
    # The AOT-dispatch check (slowest) runs on one case per op; the rest get the cheaper checks.
    for i, (op, args) in enumerate(_opcheck_cases(device)):
        full = i in (0, 3, 4)
        torch.library.opcheck(
            op, args, test_utils=(*FAST_UTILS, "test_aot_dispatch_dynamic") if full else FAST_UTILS
        )


# ---------------------------------------------------------------------------------------------
# group_norm numerics

GN_CASES = [
    # shape, groups
    ((2, 64, 16, 16), 32),
    ((1, 40, 9, 7), 8),  # Cg = 5, odd spatial
    ((2, 20, 13), 5),  # 3-d
    ((1, 12, 3, 4, 5), 3),  # 5-d
    ((3, 6, 1, 1), 3),  # spatial 1
    ((2, 320, 24, 24), 32),  # SD-like (scaled)
]


@pytest.mark.parametrize(("shape", "groups"), GN_CASES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.usefixtures("cpu_kernels")
def test_group_norm_fp32(shape: tuple[int, ...], groups: int, channels_last: bool, silu: bool) -> None:
    _seed(2)
    x = torch.randn(shape) * 3 + 1.5
    if channels_last and x.dim() == 4:
        x = x.to(memory_format=torch.channels_last)
    elif channels_last and x.dim() == 5:
        x = x.to(memory_format=torch.channels_last_3d)
    c = shape[1]
    for weight, bias in [(torch.randn(c), torch.randn(c)), (None, None), (torch.randn(c), None)]:
        y = ops.group_norm(x, groups, weight, bias, 1e-5, silu)
        ref = ops.reference_group_norm(x, groups, weight, bias, 1e-5, silu)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert _max_err(y, ref) <= FP32_TOL
        if channels_last and x.dim() == 4:
            assert y.is_contiguous(memory_format=torch.channels_last)
        elif not channels_last:
            assert y.is_contiguous()


@pytest.mark.usefixtures("cpu_kernels")
def test_group_norm_noncontiguous_and_large_mean() -> None:
    _seed(3)
    x = torch.randn(2, 16, 10, 12).transpose(2, 3)  # neither contiguous nor channels_last
    torch.testing.assert_close(
        ops.group_norm(x, 4, None, None, 1e-5, False), F.group_norm(x, 4), atol=FP32_TOL, rtol=0
    )
    x = torch.randn(1, 8, 32, 32) * 0.01 + 100.0  # variance needs a centred second pass
    ref64 = ops.reference_group_norm(x.double(), 4, silu=True)
    e_ours = _max_err(ops.group_norm(x, 4, None, None, 1e-5, True), ref64)
    assert e_ours <= 1.5 * _max_err(ops.reference_group_norm(x, 4, silu=True), ref64) + 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.usefixtures("cpu_kernels")
def test_group_norm_half_cpu(dtype: torch.dtype, channels_last: bool) -> None:
    _seed(4)
    x = torch.randn(2, 64, 12, 12) * 2
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b = torch.randn(64), torch.randn(64)
    ref = ops.reference_group_norm(x, 32, w, b, 1e-5, True)
    xh = x.to(dtype)
    comp = F.silu(F.group_norm(xh, 32, w.to(dtype), b.to(dtype), 1e-5))
    _assert_half_ok(ops.group_norm(xh, 32, w.to(dtype), b.to(dtype), 1e-5, True), comp, ref)


# ---------------------------------------------------------------------------------------------
# attention numerics

ATTN_CASES = [
    # B, H, Lq, Lk, D
    (2, 8, 256, 256, 40),  # SD self-attention head dim 40 (scaled token count)
    (2, 4, 64, 77, 80),  # cross attention, 77 text tokens
    (1, 2, 33, 130, 160),  # odd lengths, Lk spans a partial key block
    (1, 3, 5, 3, 7),  # tiny, D not a multiple of the vector width
    (2, 2, 70, 64, 64),
    (1, 1, 96, 100, 512),  # the VAE mid-block: one head of 512 channels
]


def _weights(kind: str, b: int, lk: int) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "ones":
        return torch.ones(b, lk)
    if kind == "zeros":
        return torch.zeros(b, lk)
    return torch.rand(b, lk) * 2.5 - 1.0  # includes negatives


@pytest.mark.parametrize(("b", "h", "lq", "lk", "d"), ATTN_CASES)
@pytest.mark.parametrize("weights", ["none", "ones", "zeros", "mixed"])
@pytest.mark.usefixtures("cpu_kernels")
def test_attention_fp32(b: int, h: int, lq: int, lk: int, d: int, weights: str) -> None:
    _seed(5)
    q, k, v = torch.randn(b, h, lq, d), torch.randn(b, h, lk, d), torch.randn(b, h, lk, d)
    w = _weights(weights, b, lk)
    scale = d**-0.5
    out = ops.attention(q, k, v, scale, w)
    ref = ops.reference_attention(q, k, v, scale, w)
    assert out.shape == (b, h, lq, d) and out.is_contiguous()
    assert _max_err(out, ref) <= FP32_TOL
    if weights == "zeros":
        assert float(out.abs().max()) == 0.0
    if weights == "ones":
        assert _max_err(out, ops.attention(q, k, v, scale, None)) <= FP32_TOL


@pytest.mark.usefixtures("cpu_kernels")
def test_attention_strided_inputs_and_default_scale() -> None:
    _seed(6)
    # (B, L, H, D) -> (B, H, L, D) views, as produced by a fused qkv projection
    qkv = torch.randn(2, 50, 3, 4, 40)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    torch.testing.assert_close(
        ops.attention(q, k, v), F.scaled_dot_product_attention(q, k, v), atol=FP32_TOL, rtol=0
    )
    # large logits: online softmax must stay finite
    out = ops.attention(q * 30, k * 30, v, 1.0, None)
    assert _max_err(out, ops.reference_attention(q * 30, k * 30, v, 1.0, None)) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.usefixtures("cpu_kernels")
def test_attention_half_cpu(dtype: torch.dtype) -> None:
    _seed(7)
    q, k, v = torch.randn(1, 2, 64, 40), torch.randn(1, 2, 77, 40), torch.randn(1, 2, 77, 40)
    w = torch.rand(1, 77) + 0.5
    ref = ops.reference_attention(q, k, v, 40**-0.5, w)
    qh, kh, vh = q.to(dtype), k.to(dtype), v.to(dtype)
    comp = F.scaled_dot_product_attention(qh, kh, vh * w.to(dtype)[:, None, :, None])
    _assert_half_ok(ops.attention(qh, kh, vh, 40**-0.5, w), comp, ref)


# ---------------------------------------------------------------------------------------------
# geglu numerics


@pytest.mark.parametrize("shape", [(2, 64, 640), (3, 26), (1, 5, 7, 18), (4, 2)])
@pytest.mark.usefixtures("cpu_kernels")
def test_geglu_fp32(shape: tuple[int, ...]) -> None:
    _seed(8)
    x = torch.randn(shape) * 3
    y = ops.geglu(x)
    assert y.shape == (*shape[:-1], shape[-1] // 2)
    assert _max_err(y, ops.reference_geglu(x)) <= FP32_TOL
    xt = torch.randn(shape[-1], *shape[:-1]).movedim(0, -1)  # non-contiguous
    assert _max_err(ops.geglu(xt), ops.reference_geglu(xt)) <= FP32_TOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.usefixtures("cpu_kernels")
def test_geglu_half_cpu(dtype: torch.dtype) -> None:
    _seed(9)
    x = torch.randn(4, 77, 2 * 320) * 2
    _assert_half_ok(ops.geglu(x.to(dtype)), ops.reference_geglu(x.to(dtype)), ops.reference_geglu(x))


# ---------------------------------------------------------------------------------------------
# autograd formulas vs autograd through the references


def _grads(fn: Callable[..., torch.Tensor], args: list[Any], seed: int) -> list[torch.Tensor | None]:
    args = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    out = fn(*args)
    gen = torch.Generator().manual_seed(seed)
    out.backward(torch.randn(out.shape, generator=gen))
    return [a.grad if isinstance(a, torch.Tensor) else None for a in args]


@pytest.mark.parametrize("silu", [False, True])
def test_backward_matches_reference(silu: bool) -> None:
    _seed(10)
    cases: list[tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor], list[Any]]] = [
        (
            ops.group_norm,
            ops.reference_group_norm,
            [torch.randn(2, 8, 5, 3), 4, torch.randn(8), torch.randn(8), 1e-5, silu],
        ),
        (
            ops.attention,
            ops.reference_attention,
            [
                torch.randn(1, 2, 6, 8),
                torch.randn(1, 2, 9, 8),
                torch.randn(1, 2, 9, 8),
                0.4,
                torch.randn(1, 9),
            ],
        ),
        (ops.geglu, ops.reference_geglu, [torch.randn(3, 12)]),
    ]
    for fused, ref, args in cases:
        for g1, g2 in zip(_grads(fused, args, 0), _grads(ref, args, 0), strict=True):
            assert (g1 is None) == (g2 is None)
            if g1 is not None and g2 is not None:
                torch.testing.assert_close(g1, g2, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# bad inputs


BAD_INPUTS: list[tuple[Callable[[], Any], str]] = [
    (lambda: ops.group_norm(torch.randn(2, 6, 4), 4), "must divide the channel count"),
    (lambda: ops.group_norm(torch.randn(6), 2), "at least 2 dims"),
    (lambda: ops.group_norm(torch.randn(2, 6, 4), 0), "groups must be positive"),
    (
        lambda: ops.group_norm(torch.randn(2, 6, 4), 2, torch.randn(5)),
        "weight must be a 1-d tensor of C=6",
    ),
    (
        lambda: ops.group_norm(torch.randn(2, 6, 4), 2, None, torch.randn(6, 1)),
        "bias must be a 1-d tensor",
    ),
    (lambda: ops.group_norm(torch.ones(2, 6, 4, dtype=torch.int32), 2), "float32, float16 or bfloat16"),
    (lambda: ops.group_norm(torch.randn(2, 6, 4).double(), 2), "float32, float16 or bfloat16"),
    (
        lambda: ops.attention(torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8), 1.0),
        "must be 4-d",
    ),
    (
        lambda: ops.attention(
            torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), 1.0
        ),
        "disagree in B, H or D",
    ),
    (
        lambda: ops.attention(
            torch.randn(1, 2, 5, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 5, 8), 1.0
        ),
        "k and v must have the same shape",
    ),
    (
        lambda: ops.attention(
            torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8).half(), torch.randn(1, 2, 5, 8), 1.0
        ),
        "same dtype",
    ),
    (
        lambda: ops.attention(
            torch.randn(1, 2, 5, 8),
            torch.randn(1, 2, 6, 8),
            torch.randn(1, 2, 6, 8),
            1.0,
            torch.ones(1, 5),
        ),
        r"value_weights must have shape \(B, Lk\) = \(1, 6\)",
    ),
    (
        lambda: ops.attention(
            torch.randn(1, 2, 5, 8), torch.randn(1, 2, 0, 8), torch.randn(1, 2, 0, 8), 1.0
        ),
        "at least one key",
    ),
    (lambda: ops.geglu(torch.randn(3, 7)), "last dim must be even"),
    (lambda: ops.geglu(torch.ones(3, 8, dtype=torch.int64)), "float32, float16 or bfloat16"),
    (lambda: ops.group_norm(torch.randn(2, 6, 4), 2, None, None, -1.0), "eps must be non-negative"),
    (
        lambda: ops.group_norm(torch.randn(2, 6, 4), 2, torch.ones(6, dtype=torch.int32)),
        "weight must be a floating-point tensor",
    ),
    (
        lambda: ops.attention(
            torch.randn(1, 2, 5, 8).double(), torch.randn(1, 2, 5, 8).double(), torch.randn(1, 2, 5, 8).double()
        ),
        "float32, float16 or bfloat16",
    ),
    (
        lambda: ops.attention(
            torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), 1.0,
            torch.ones(1, 5, dtype=torch.int32),
        ),
        "value_weights must be floating point",
    ),
    (lambda: ops.geglu(torch.tensor(1.0)), "at least 1 dim"),
]


@pytest.mark.parametrize(("call", "match"), BAD_INPUTS)
def test_bad_inputs(call: Callable[[], Any], match: str) -> None:
    with pytest.raises(RuntimeError, match=match):
        call()


@pytest.mark.parametrize(("call", "match"), BAD_INPUTS)
def test_fake_rejects_what_the_kernel_rejects(call: Callable[[], Any], match: str) -> None:
    # Under FakeTensorMode the same calls reach the fake kernels: a bad graph fails at trace time.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), pytest.raises(RuntimeError, match=match):
        call()


def test_fake_rejects_device_mismatch() -> None:
    # Only a fake can put tensors on a device this machine lacks: weights on "meta" vs x on CPU.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=False):
        x, w = torch.randn(2, 6, 4), torch.randn(6, device="meta")
        with pytest.raises(RuntimeError, match="weight is on meta but x is on cpu"):
            ops.group_norm(x, 2, w)
        q = torch.randn(1, 2, 5, 8)
        with pytest.raises(RuntimeError, match="value_weights is on meta but q is on cpu"):
            ops.attention(q, q, q, 1.0, torch.ones(1, 5, device="meta"))


@pytest.mark.usefixtures("cpu_kernels")
def test_empty_inputs() -> None:
    assert ops.group_norm(torch.randn(0, 4, 3, 3), 2).shape == (0, 4, 3, 3)
    assert ops.attention(
        torch.randn(1, 2, 0, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), 1.0
    ).shape == (
        1,
        2,
        0,
        8,
    )
    assert ops.geglu(torch.randn(0, 8)).shape == (0, 4)


# ---------------------------------------------------------------------------------------------
# torch.export / AOTInductor


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm_w = torch.nn.Parameter(torch.randn(8))
        self.norm_b = torch.nn.Parameter(torch.randn(8))
        self.proj = torch.nn.Linear(8, 48)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, emphasis: torch.Tensor) -> torch.Tensor:
        h = ops.group_norm(x, 4, self.norm_w, self.norm_b, 1e-5, True)
        b, c, hh, ww = h.shape
        tokens = h.flatten(2).transpose(1, 2)  # (B, L, C)
        q = tokens.reshape(b, hh * ww, 2, 4).transpose(1, 2)
        kv = ctx.reshape(b, ctx.shape[1], 2, 4).transpose(1, 2)
        a = ops.attention(q, kv, kv, 0.5, emphasis)
        a = a.transpose(1, 2).reshape(b, hh * ww, c)
        out = ops.geglu(self.proj(a))  # (B, L, 24)
        return out


def _tiny_inputs() -> tuple[torch.Tensor, ...]:
    _seed(11)
    return torch.randn(2, 8, 4, 5), torch.randn(2, 7, 8), torch.rand(2, 7) + 0.5


def _tiny_reference(m: _Tiny, x: torch.Tensor, ctx: torch.Tensor, emphasis: torch.Tensor) -> torch.Tensor:
    h = ops.reference_group_norm(x, 4, m.norm_w, m.norm_b, 1e-5, True)
    b, c, hh, ww = h.shape
    q = h.flatten(2).transpose(1, 2).reshape(b, hh * ww, 2, 4).transpose(1, 2)
    kv = ctx.reshape(b, ctx.shape[1], 2, 4).transpose(1, 2)
    a = ops.reference_attention(q, kv, kv, 0.5, emphasis).transpose(1, 2).reshape(b, hh * ww, c)
    return ops.reference_geglu(m.proj(a))


def test_torch_export_keeps_custom_ops() -> None:
    m = _Tiny().eval()
    inputs = _tiny_inputs()
    ep = torch.export.export(m, inputs)
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    for name in ("sdfused.group_norm.default", "sdfused.attention.default", "sdfused.geglu.default"):
        assert name in targets, targets
    with torch.no_grad():
        out = ep.module()(*inputs)
        assert _max_err(out, _tiny_reference(m, *inputs)) <= FP32_TOL


def test_torch_export_dynamic_batch() -> None:
    m = _Tiny().eval()
    inputs = _tiny_inputs()
    batch = torch.export.Dim("batch", min=1, max=8)
    ep = torch.export.export(m, inputs, dynamic_shapes=({0: batch}, {0: batch}, {0: batch}))
    x, ctx, emph = (t.repeat(2, *([1] * (t.dim() - 1))) for t in inputs)
    with torch.no_grad():
        assert _max_err(ep.module()(x, ctx, emph), _tiny_reference(m, x, ctx, emph)) <= FP32_TOL


@pytest.mark.slow
def test_aoti_compile_cpu(tmp_path: Any) -> None:
    m = _Tiny().eval()
    inputs = _tiny_inputs()
    ep = torch.export.export(m, inputs)
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "tiny.pt2"))
    compiled = torch._inductor.aoti_load_package(path)
    with torch.no_grad():
        assert _max_err(compiled(*inputs), _tiny_reference(m, *inputs)) <= FP32_TOL


# ---------------------------------------------------------------------------------------------
# CUDA numerics (fp16 / bf16 within 2x of torch's own half composite error vs fp32)

HALF = [torch.float16, torch.bfloat16]


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize(
    ("shape", "groups"), [((2, 320, 64, 64), 32), ((2, 1280, 8, 8), 32), ((1, 40, 9, 7), 8), ((2, 20, 13), 5)]
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_cuda(
    dtype: torch.dtype, shape: tuple[int, ...], groups: int, channels_last: bool
) -> None:
    _seed(12)
    x = torch.randn(shape, device="cuda") * 2 + 0.5
    if channels_last and x.dim() == 4:
        x = x.to(memory_format=torch.channels_last)
    c = shape[1]
    w, b = torch.randn(c, device="cuda"), torch.randn(c, device="cuda")
    ref = ops.reference_group_norm(x, groups, w, b, 1e-5, True)
    xh, wh, bh = x.to(dtype), w.to(dtype), b.to(dtype)
    comp = F.silu(F.group_norm(xh, groups, wh, bh, 1e-5))
    y = ops.group_norm(xh, groups, wh, bh, 1e-5, True)
    _assert_half_ok(y, comp, ref)
    if channels_last and x.dim() == 4:
        assert y.is_contiguous(memory_format=torch.channels_last)
    assert _max_err(ops.group_norm(x, groups, w, b, 1e-5, True), ref) <= 1e-4  # fp32 path
    assert _max_err(ops.group_norm(x, groups, None, None, 1e-5, False), F.group_norm(x, groups)) <= 1e-4


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize(
    ("lq", "lk", "d"),
    [
        (1024, 1024, 40),
        (256, 256, 80),
        (64, 64, 160),
        (1024, 77, 40),
        (256, 77, 160),
        (100, 77, 64),
        (37, 50, 24),
    ],
)
@pytest.mark.parametrize("weights", ["none", "mixed"])
def test_attention_cuda(dtype: torch.dtype, lq: int, lk: int, d: int, weights: str) -> None:
    _seed(13)
    b, h = 2, 8
    q = torch.randn(b, h, lq, d, device="cuda")
    k = torch.randn(b, h, lk, d, device="cuda")
    v = torch.randn(b, h, lk, d, device="cuda")
    w = _weights(weights, b, lk)
    w = w.cuda() if w is not None else None
    scale = d**-0.5
    ref = ops.reference_attention(
        q.double(), k.double(), v.double(), scale, w.double() if w is not None else None
    )
    qh, kh, vh = q.to(dtype), k.to(dtype), v.to(dtype)
    vw = vh * w.to(dtype)[:, None, :, None] if w is not None else vh
    comp = F.scaled_dot_product_attention(qh, kh, vw, scale=scale)
    _assert_half_ok(ops.attention(qh, kh, vh, scale, w), comp, ref.float())
    assert _max_err(ops.attention(q, k, v, scale, w), ref) <= 1e-4  # fp32 (SIMT) path


@needs_cuda
@pytest.mark.cuda
def test_attention_cuda_strided() -> None:
    _seed(14)
    qkv = torch.randn(2, 333, 3, 8, 40, device="cuda", dtype=torch.float16)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    ref = ops.reference_attention(q.float(), k.float(), v.float(), 40**-0.5, None)
    _assert_half_ok(ops.attention(q, k, v, 40**-0.5, None), F.scaled_dot_product_attention(q, k, v), ref)


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape", [(2, 4096, 2 * 1280), (2, 77, 2 * 640), (3, 5, 2 * 13)])
def test_geglu_cuda(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    _seed(15)
    x = torch.randn(shape, device="cuda") * 2
    ref = ops.reference_geglu(x)
    _assert_half_ok(ops.geglu(x.to(dtype)), ops.reference_geglu(x.to(dtype)), ref)
    assert _max_err(ops.geglu(x), ref) <= 1e-5


@needs_cuda
@pytest.mark.cuda
def test_cuda_export_runs() -> None:
    m = _Tiny().eval().cuda()
    inputs = tuple(t.cuda() for t in _tiny_inputs())
    ep = torch.export.export(m, inputs)
    with torch.no_grad():
        assert _max_err(ep.module()(*inputs), _tiny_reference(m, *inputs)) <= 1e-4


# ---------------------------------------------------------------------------------------------
# CUDA edge cases: odd lengths and tails, every head-dim tile (and the SIMT fallback), unaligned
# and strided inputs (scalar-load paths), channels_last(_3d), empty tensors, graph capture.

ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _check_cuda(ours: torch.Tensor, composite: torch.Tensor, ref: torch.Tensor, fp32_tol: float = 1e-4) -> None:
    """fp32: close to the (double or fp32) reference; half: within 2x of the composite's error."""
    assert ours.shape == ref.shape and ours.device == ref.device
    assert torch.isfinite(ours).all()
    if ours.dtype == torch.float32:
        assert _max_err(ours, ref) <= fp32_tol
    else:
        _assert_half_ok(ours, composite, ref.float())


def _cast_keep_layout(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` in `dtype` with the same sizes, strides and storage offset (so the same alignment)."""
    if any(st == 0 and n > 1 for n, st in zip(t.shape, t.stride(), strict=True)):  # expanded dims
        idx = tuple(slice(0, 1) if st == 0 else slice(None) for st in t.stride())
        return _cast_keep_layout(t[idx], dtype).expand(t.shape)
    extent = t.storage_offset() + sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True)) + 1
    out = torch.zeros(extent, dtype=dtype, device=t.device).as_strided(t.shape, t.stride(), t.storage_offset())
    out.copy_(t)
    return out


def _attn_case(
    dtype: torch.dtype, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor | None
) -> None:
    """q, k, v: fp32 CUDA tensors of any layout; runs the op on `dtype` copies of the same layout."""
    d = q.shape[-1]
    scale = d**-0.5
    ref = ops.reference_attention(q.double(), k.double(), v.double(), scale, w.double() if w is not None else None)
    qh, kh, vh = (_cast_keep_layout(t, dtype) for t in (q, k, v))
    assert qh.stride() == q.stride() and qh.storage_offset() == q.storage_offset()
    vw = vh * w.to(dtype)[:, None, :, None] if w is not None else vh
    comp = F.scaled_dot_product_attention(qh, kh, vw, scale=scale)
    out = ops.attention(qh, kh, vh, scale, w)
    assert out.dtype == dtype and out.is_contiguous()
    _check_cuda(out, comp, ref)


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize(
    ("b", "h", "lq", "lk", "d"),
    [
        (1, 2, 1, 1, 40),  # single query, single key
        (2, 3, 65, 1, 80),  # one key: every key tile is a 1-row tail
        (1, 2, 4097, 77, 40),  # query tail of 1 row, 77 text tokens
        (2, 2, 63, 129, 160),  # Lk = 2 tiles + 1
        (1, 3, 17, 33, 7),  # D not a multiple of 8: scalar loads, DP = 48
        (1, 2, 40, 100, 33),  # odd D
        (1, 2, 70, 70, 64),
        (1, 2, 31, 95, 96),  # DP = 128
        (1, 2, 19, 50, 200),  # D > 160: SIMT fallback for half too
    ],
)
def test_attention_cuda_edges(dtype: torch.dtype, b: int, h: int, lq: int, lk: int, d: int) -> None:
    _seed(16)
    q = torch.randn(b, h, lq, d, device="cuda")
    k = torch.randn(b, h, lk, d, device="cuda")
    v = torch.randn(b, h, lk, d, device="cuda")
    w = torch.rand(b, lk, device="cuda") * 2.5 - 1.0  # includes negatives
    _attn_case(dtype, q, k, v, w)
    _attn_case(dtype, q, k, v, None)


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("d", [40, 80, 160])
def test_attention_cuda_layouts(dtype: torch.dtype, d: int) -> None:
    _seed(17)
    b, h, lq, lk = 2, 4, 130, 77
    # (B, L, H, D) -> (B, H, L, D) views (fused projection layout), k / v from one packed buffer
    q = torch.randn(b, lq, h, d, device="cuda").transpose(1, 2)
    kv = torch.randn(b, lk, 2, h, d, device="cuda")
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    w = torch.rand(lk, b, device="cuda").t() * 2 - 0.5  # non-contiguous weights
    _attn_case(dtype, q, k, v, w)
    # data pointers off the 16-byte grid (storage offset of one element): scalar-load path
    buf = torch.randn(b * h * lq * d + 1, device="cuda")
    q_off = buf[1:].view(b, h, lq, d)
    _attn_case(dtype, q_off, k, v, None)
    # head dim not unit-stride: made contiguous by the host code
    q_t = torch.randn(b, h, d, lq, device="cuda").transpose(2, 3)
    _attn_case(dtype, q_t, k, v, w)
    # k / v broadcast over heads (stride 0)
    k1, v1 = torch.randn(b, 1, lk, d, device="cuda"), torch.randn(b, 1, lk, d, device="cuda")
    _attn_case(dtype, q, k1.expand(b, h, lk, d), v1.expand(b, h, lk, d), w)


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize(
    ("shape", "groups", "layout"),
    [
        ((2, 64, 1, 1), 32, "contiguous"),  # HxW = 1
        ((1, 15, 7, 5), 5, "contiguous"),  # Cg = 3, S = 35: no vector loads
        ((1, 15, 7, 5), 5, "channels_last"),  # C not a multiple of the vector width
        ((2, 32, 9, 9), 8, "channels_last"),
        ((1, 24, 3, 4, 5), 6, "channels_last_3d"),
        ((1, 16, 10, 12), 4, "transposed"),  # neither layout: made contiguous
        ((1, 16, 8, 8), 4, "offset"),  # data pointer off the 16-byte grid
        ((3, 12), 4, "contiguous"),  # 2-d (N, C)
        ((1, 8, 1024 * 9 + 3), 2, "contiguous"),  # several split blocks per group, odd tail
    ],
)
def test_group_norm_cuda_edges(dtype: torch.dtype, shape: tuple[int, ...], groups: int, layout: str) -> None:
    _seed(18)
    x = torch.randn(shape, device="cuda") * 2 + 0.5
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "channels_last_3d":
        x = x.to(memory_format=torch.channels_last_3d)
    elif layout == "transposed":
        x = x.transpose(2, 3)
    elif layout == "offset":
        x = torch.randn(x.numel() + 1, device="cuda")[1:].view(shape) * 2 + 0.5
    c = shape[1]
    w, b = torch.randn(c, device="cuda"), torch.randn(c, device="cuda")
    for weight, bias, silu in [(w, b, True), (None, None, False)]:
        w64 = weight.double() if weight is not None else None
        b64 = bias.double() if bias is not None else None
        ref = ops.reference_group_norm(x.double(), groups, w64, b64, 1e-5, silu)
        xh = _cast_keep_layout(x, dtype)
        wh = weight.to(dtype) if weight is not None else None
        bh = bias.to(dtype) if bias is not None else None
        comp = ops.reference_group_norm(xh, groups, wh, bh, 1e-5, silu)
        y = ops.group_norm(xh, groups, wh, bh, 1e-5, silu)
        assert y.dtype == dtype and y.shape == x.shape
        _check_cuda(y, comp, ref)
        if layout == "channels_last":
            assert y.is_contiguous(memory_format=torch.channels_last)
        elif layout == "channels_last_3d":
            assert y.is_contiguous(memory_format=torch.channels_last_3d)
        else:
            assert y.is_contiguous()


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_geglu_cuda_edges(dtype: torch.dtype) -> None:
    _seed(19)
    for x in [
        torch.randn(7, 2 * 9, device="cuda") * 2,  # F odd: scalar path
        torch.randn(5, 2 * 40 + 1, device="cuda")[:, 1:] * 2,  # off the 16-byte grid, non-contiguous
        torch.randn(2 * 64, 6, device="cuda").t() * 2,  # transposed
        torch.randn(1, 2, device="cuda"),  # F = 1
    ]:
        ref = ops.reference_geglu(x.double())
        xh = _cast_keep_layout(x, dtype)
        _check_cuda(ops.geglu(xh), ops.reference_geglu(xh), ref, fp32_tol=1e-5)


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_empty_inputs_cuda(dtype: torch.dtype) -> None:
    def r(*s: int) -> torch.Tensor:
        return torch.randn(*s, device="cuda", dtype=dtype)

    assert ops.group_norm(r(0, 4, 3, 3), 2).shape == (0, 4, 3, 3)
    assert ops.group_norm(r(2, 4, 0, 3), 2).shape == (2, 4, 0, 3)
    assert ops.attention(r(1, 2, 0, 40), r(1, 2, 3, 40), r(1, 2, 3, 40), 1.0).shape == (1, 2, 0, 40)
    assert ops.attention(r(0, 2, 5, 40), r(0, 2, 3, 40), r(0, 2, 3, 40), 1.0).shape == (0, 2, 5, 40)
    assert ops.geglu(r(0, 8)).shape == (0, 4)
    assert ops.geglu(r(3, 0)).shape == (3, 0)
    torch.cuda.synchronize()


@needs_cuda
@pytest.mark.cuda
def test_cuda_graph_capture_ops() -> None:
    _seed(20)
    q = torch.randn(2, 8, 256, 80, device="cuda", dtype=torch.float16)
    k = torch.randn(2, 8, 77, 80, device="cuda", dtype=torch.float16)
    w = torch.rand(2, 77, device="cuda") + 0.5
    x = torch.randn(2, 64, 16, 16, device="cuda", dtype=torch.float16)
    g = torch.randn(2, 77, 2 * 96, device="cuda", dtype=torch.float16)

    def run() -> tuple[torch.Tensor, ...]:
        return (
            ops.attention(q, k, k, None, w),
            ops.group_norm(x, 32, None, None, 1e-5, True),
            ops.geglu(g),
        )

    eager = run()
    stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # warm-up on a side stream, as torch.cuda.graphs recommends
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    for t in (q, k, x, g):
        t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    expected = run()
    for a, b in zip(captured, expected, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(eager, expected, strict=True):
        assert not torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Attention on both devices: every head dim (the VAE's D = 512), large logits in half precision,
# value weights in half precision.


def _attn_check(out: torch.Tensor, comp: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.is_contiguous() and torch.isfinite(out).all()
    if out.dtype == torch.float32:
        assert _max_err(out, ref) <= 1e-4
    else:
        _assert_half_ok(out, comp, ref.float())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize(("b", "h", "lq", "lk", "d"), [(1, 1, 256, 256, 512), (2, 1, 64, 77, 320), (1, 2, 33, 40, 264)])
def test_attention_any_head_dim(device: str, dtype: torch.dtype, b: int, h: int, lq: int, lk: int, d: int) -> None:
    _seed(21)
    q, k, v = (torch.randn(b, h, n, d, device=device) for n in (lq, lk, lk))
    w = torch.rand(b, lk, device=device) * 2 - 0.5
    ref = ops.reference_attention(q.double(), k.double(), v.double(), d**-0.5, w.double())
    qh, kh, vh = q.to(dtype), k.to(dtype), v.to(dtype)
    comp = F.scaled_dot_product_attention(qh, kh, vh * w.to(dtype)[:, None, :, None])
    _attn_check(ops.attention(qh, kh, vh, d**-0.5, w), comp, ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF)
def test_attention_large_logits_half(device: str, dtype: torch.dtype) -> None:
    # logits with a spread of hundreds: exp overflows unless each row's max is subtracted first
    _seed(22)
    d = 64
    q, k, v = (torch.randn(2, 2, n, d, device=device) for n in (50, 77, 77))
    q, k = q * 6, k * 6  # |q.k| * d**-0.5 up to ~300
    ref = ops.reference_attention(q.double(), k.double(), v.double(), d**-0.5, None)
    qh, kh, vh = q.to(dtype), k.to(dtype), v.to(dtype)
    out = ops.attention(qh, kh, vh, d**-0.5, None)
    _attn_check(out, F.scaled_dot_product_attention(qh, kh, vh), ref)
    assert float(ref.abs().max()) > 1.0  # the probabilities are peaked: rows near a single value row


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("wdtype", HALF)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_attention_half_value_weights(device: str, wdtype: torch.dtype, dtype: torch.dtype) -> None:
    _seed(23)
    q, k, v = (torch.randn(2, 4, n, 40, device=device) for n in (64, 77, 77))
    w = (torch.rand(2, 77, device=device) * 2.5 - 1.0).to(wdtype)  # emphasis as the model passes it
    ref = ops.reference_attention(q.double(), k.double(), v.double(), 40**-0.5, w.double())
    qh, kh, vh = q.to(dtype), k.to(dtype), v.to(dtype)
    comp = F.scaled_dot_product_attention(qh, kh, vh * w.to(dtype)[:, None, :, None])
    _attn_check(ops.attention(qh, kh, vh, 40**-0.5, w), comp, ref)


# ---------------------------------------------------------------------------------------------
# group_norm: weight / bias of any float dtype (the CUDA kernel reads them as they are, no casts),
# strided, or only one of them; every layout, on both the fused one-launch and the split paths.


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("wdtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(
    ("shape", "layout"),
    [
        ((2, 320, 32, 32), "channels_last"),  # Cg = 10: 4-byte packs in half; one block per group
        ((2, 640, 40, 40), "channels_last"),  # Cg = 20: 8-byte packs in half; 7 blocks per group
        ((1, 1280, 8, 8), "contiguous"),  # one block per group
        ((2, 64, 96, 96), "contiguous"),  # 4 blocks per group (statistics, then apply)
    ],
)
def test_group_norm_affine_dtypes(
    device: str, dtype: torch.dtype, wdtype: torch.dtype, shape: tuple[int, ...], layout: str
) -> None:
    _seed(24)
    x = torch.randn(shape, device=device) * 2 + 0.5
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    c = shape[1]
    w = torch.randn(2 * c, device=device).to(wdtype)[::2]  # strided
    b = torch.randn(c, device=device).to(wdtype)
    xh = x.to(dtype)
    for weight, bias in [(w, b), (None, b), (w, None)]:
        w64 = weight.double() if weight is not None else None
        b64 = bias.double() if bias is not None else None
        ref = ops.reference_group_norm(x.to(dtype).double(), 32, w64, b64, 1e-5, True)
        wc = weight.to(dtype) if weight is not None else None
        bc = bias.to(dtype) if bias is not None else None
        comp = ops.reference_group_norm(xh, 32, wc, bc, 1e-5, True)
        y = ops.group_norm(xh, 32, weight, bias, 1e-5, True)
        assert y.dtype == dtype and torch.isfinite(y).all()
        if layout == "channels_last":
            assert y.is_contiguous(memory_format=torch.channels_last)
        if dtype == torch.float32:
            assert _max_err(y, ref) <= 1e-4
        else:
            _assert_half_ok(y, comp, ref.float())
