"""linear_bias_gelu and linear_add_layernorm (a linear layer with its BERT epilogue) on every backend
that can run here, against an fp64 torch run (DESIGN §5), plus their argument errors."""
import pytest
import torch
import torch.nn.functional as F

from conftest import FP32_TOL, rel_err
from dm2s2_fast import backends, ops


def _cases():
    cases = []
    for device in ("cpu", "cuda"):
        for backend in backends.BACKENDS:
            if (backend, device) in (("cpp", "cuda"), ("cuda", "cpu")):
                continue  # never runs there
            reason = backends.why_not(backend, "linear_bias_gelu", device)
            if reason is None and device == "cuda" and not torch.cuda.is_available():
                reason = "no CUDA device"
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                if device == "cpu" and dtype != torch.float32 and backend != "triton":
                    continue  # DESIGN §5: fp32 on CPU (the interpreter tests the half paths there)
                marks = [pytest.mark.skipif(reason is not None, reason=str(reason))]
                if device == "cuda":
                    marks.append(pytest.mark.cuda)
                cases.append(pytest.param(backend, device, dtype, marks=marks,
                                          id=f"{backend}-{device}-{str(dtype)[6:]}"))
    return cases


CASES = pytest.mark.parametrize("backend,device,dtype", _cases())
# (rows, in, out): empty, no inputs (the bias alone), one row, odd sizes that are no tile multiple,
# the ads FFN shape (small N).
SHAPES = [(0, 8, 12), (5, 0, 12), (1, 16, 24), (37, 24, 40), (130, 96, 160)]


def _bound(out_err_in_dtype: float, dtype: torch.dtype) -> float:
    return FP32_TOL if dtype == torch.float32 else min(2e-2, max(2 * out_err_in_dtype, FP32_TOL))


def _rand(*shape, g, scale=1.0):
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


@CASES
@pytest.mark.parametrize("N,K,Fo", SHAPES)
def test_linear_bias_gelu(backend, device, dtype, N, K, Fo):
    g = torch.Generator().manual_seed(N + K)
    x, w, b = _rand(N, K, g=g), _rand(Fo, K, g=g, scale=max(K, 1) ** -0.5), _rand(Fo, g=g)
    ref = F.gelu(x @ w.T + b)
    args = [t.to(device, dtype) for t in (x, w, b)]
    out = ops.linear_bias_gelu(*args, backend=backend)
    assert out.dtype == dtype and out.shape == (N, Fo)
    if N == 0:
        return
    own = ops.linear_bias_gelu(*args, backend="torch")  # the reference run in this dtype
    assert rel_err(out.cpu(), ref) <= _bound(rel_err(own.cpu(), ref), dtype)


@CASES
@pytest.mark.parametrize("N,K,Fo", SHAPES)
def test_linear(backend, device, dtype, N, K, Fo):
    g = torch.Generator().manual_seed(N + K + 2)
    x, w, b = _rand(N, K, g=g), _rand(Fo, K, g=g, scale=max(K, 1) ** -0.5), _rand(Fo, g=g)
    ref = x @ w.T + b
    args = [t.to(device, dtype) for t in (x, w, b)]
    out = ops.linear(*args, backend=backend)
    assert out.dtype == dtype and out.shape == (N, Fo)
    if N == 0:
        return
    own = ops.linear(*args, backend="torch")
    assert rel_err(out.cpu(), ref) <= _bound(rel_err(own.cpu(), ref), dtype)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_linear_ops_on_huge_page_buffers(backend):
    """Outputs past the cpp backend's huge-page threshold (8 MB) and epilogues run in place there."""
    if backends.why_not(backend, "linear", "cpu"):
        pytest.skip(backends.why_not(backend, "linear", "cpu"))
    g = torch.Generator().manual_seed(9)
    x, w, b = torch.randn(1500, 96, generator=g), torch.randn(1536, 96, generator=g) / 10, torch.randn(1536, generator=g)
    y = x.double() @ w.double().T
    assert rel_err(ops.linear(x, w, b, backend=backend), y + b.double()) <= FP32_TOL
    assert rel_err(ops.linear_bias_gelu(x, w, b, backend=backend), F.gelu(y + b.double())) <= FP32_TOL
    res, lw, lb = torch.randn(1500, 1536, generator=g), torch.rand(1536, generator=g) + 0.5, torch.randn(1536, generator=g)
    ref = F.layer_norm(y + b.double() + res.double(), (1536,), lw.double(), lb.double(), 1e-12)
    assert rel_err(ops.linear_add_layernorm(x, w, b, res, lw, lb, 1e-12, backend=backend), ref) <= FP32_TOL


def test_cpp_packed_weights_follow_the_weight():
    """The cpp backend's packed-weight GEMM (small outputs) sees in-place updates and new weights."""
    if backends.why_not("cpp", "linear", "cpu"):
        pytest.skip(backends.why_not("cpp", "linear", "cpu"))
    g = torch.Generator().manual_seed(11)
    x, w, b = torch.randn(20, 32, generator=g), torch.randn(48, 32, generator=g), torch.randn(48, generator=g)
    for _ in range(2):
        assert rel_err(ops.linear(x, w, b, backend="cpp"), x.double() @ w.double().T + b.double()) <= FP32_TOL
        with torch.no_grad():
            w.mul_(-0.5)  # in place: same address, new version
    w = torch.randn(48, 32, generator=g)  # a new tensor (possibly at a freed one's address)
    assert rel_err(ops.linear_bias_gelu(x, w, b, backend="cpp"), F.gelu(x.double() @ w.double().T + b.double())) \
        <= FP32_TOL


@CASES
@pytest.mark.parametrize("N,K,d", SHAPES)
def test_linear_add_layernorm(backend, device, dtype, N, K, d):
    g = torch.Generator().manual_seed(N + K + 1)
    x, w, b = _rand(N, K, g=g), _rand(d, K, g=g, scale=max(K, 1) ** -0.5), _rand(d, g=g)
    res, lw, lb = _rand(N, d, g=g), 0.5 + torch.rand(d, generator=g, dtype=torch.float64), _rand(d, g=g)
    ref = F.layer_norm(x @ w.T + b + res, (d,), lw, lb, 1e-12)
    args = [t.to(device, dtype) for t in (x, w, b, res, lw, lb)]
    out = ops.linear_add_layernorm(*args, 1e-12, backend=backend)
    assert out.dtype == dtype and out.shape == (N, d)
    if N == 0:
        return
    own = ops.linear_add_layernorm(*args, 1e-12, backend="torch")
    assert rel_err(out.cpu(), ref) <= _bound(rel_err(own.cpu(), ref), dtype)


@pytest.mark.parametrize("call,message", [
    (lambda: ops.linear(torch.randn(3, 4), torch.randn(5, 6), torch.randn(5)), r"weight must have shape \(5, 4\)"),
    (lambda: ops.linear(torch.randn(3, 4), torch.randn(5, 4), torch.randn(6)), r"bias must have shape \(5,\)"),
    (lambda: ops.linear_bias_gelu(torch.randn(3, 4), torch.randn(5, 6), torch.randn(5)),
     r"weight must have shape \(5, 4\)"),
    (lambda: ops.linear_bias_gelu(torch.randn(3, 4), torch.randn(5, 4), torch.randn(4)),
     r"bias must have shape \(5,\)"),
    (lambda: ops.linear_bias_gelu(torch.randn(3, 4), torch.randn(5, 4).double(), torch.randn(5)),
     "weight has dtype"),
    (lambda: ops.linear_bias_gelu(torch.randn(3), torch.randn(5, 3), torch.randn(5)), "x must have 2 dims"),
    (lambda: ops.linear_add_layernorm(torch.randn(3, 4), torch.randn(5, 4), torch.randn(5), torch.randn(3, 4),
                                      torch.ones(5), torch.zeros(5), 1e-12), r"residual must have shape \(3, 5\)"),
    (lambda: ops.linear_add_layernorm(torch.randn(3, 4), torch.randn(5, 4), torch.randn(5), torch.randn(3, 5),
                                      torch.ones(4), torch.zeros(5), 1e-12), r"ln_weight must have shape \(5,\)"),
    (lambda: ops.linear_add_layernorm(torch.randn(3, 4), torch.randn(5, 4), torch.randn(5).half(),
                                      torch.randn(3, 5), torch.ones(5), torch.zeros(5), 1e-12), "bias has dtype"),
])
def test_bad_linear_arguments_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
