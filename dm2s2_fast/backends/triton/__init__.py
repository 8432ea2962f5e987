"""The ``triton`` backend: ``@triton.jit`` kernels, one file per op.

On CUDA these are the fast path. On CPU they run only under ``TRITON_INTERPRET=1`` (Triton's
interpreter, for tests on machines without a GPU); the variable must be set before this module is
imported, since ``@triton.jit`` picks compiled or interpreted kernels when it decorates them.
Importing ``dm2s2_fast`` never imports this module; when Triton is missing the backend is registered
as unavailable, with the reason, instead of failing.

Every launcher is also exposed as a ``torch.library.triton_op`` in the ``dm2s2_triton`` namespace
(``torch.ops.dm2s2_triton.<op>``) so ``torch.compile``/``torch.export`` see the kernels; the
registered backend kernels call the launchers directly in eager mode (no dispatcher overhead) and go
through the custom op only while compiling.
"""
import torch

from ... import dispatch, tuning

INTERPRET = dispatch.triton_interpret()
DEVICES = ("cuda", "cpu") if INTERPRET else ("cuda",)
NAMESPACE = "dm2s2_triton"

try:
    import triton
    import triton.language as tl
except Exception as exc:  # noqa: BLE001 - any import failure makes the backend unavailable, with why
    triton = tl = None
    UNAVAILABLE: "str | None" = (f"triton is not importable ({type(exc).__name__}: {exc}); "
                                 "install triton to use this backend")
else:
    UNAVAILABLE = None
    # Triton's own @jit library functions (tl.sum, tl.max, ...) were made interpreted or compiled
    # when triton was first imported; kernels made in the other mode cannot call them.
    from triton.runtime.jit import JITFunction as _JITFunction

    if isinstance(tl.sum, _JITFunction) == INTERPRET:
        UNAVAILABLE = (
            f"TRITON_INTERPRET is {'on' if INTERPRET else 'off'} now but was "
            f"{'off' if INTERPRET else 'on'} when this process imported triton; set it in the "
            "environment before anything imports triton")
        triton = tl = None


def _interpreter_reason() -> "str | None":
    """Why Triton's interpreter cannot run this package's kernels here (None when it can): one
    tiny kernel with a run-time loop bound, as every kernel here has. Triton 3.6's interpreter
    (the version torch 2.11 pins) turns such a bound into a Python int with ``int()`` of a
    1-element array, a TypeError since NumPy 2.4; Triton 3.8 fixed it."""
    import numpy as np
    import torch

    @triton.jit
    def _loop_probe(X, n):
        total = 0
        for _ in range(n):
            total += 1
        tl.store(X, total)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        _loop_probe[(1,)](out, 3)
    except Exception as exc:  # noqa: BLE001 - any failure is the reason
        return (f"Triton {triton.__version__}'s interpreter fails on this machine "
                f"(NumPy {np.__version__}): {type(exc).__name__}: {exc} (Triton 3.8 has the fix; older ones need NumPy < 2.4)")
    if int(out[0]) != 3:
        return f"Triton {triton.__version__}'s interpreter ran a 3-step loop {int(out[0])} times"
    return None


if INTERPRET and triton is not None:
    UNAVAILABLE = _interpreter_reason()
    if UNAVAILABLE is not None:
        triton = tl = None

CAPABILITY = dispatch.Capability(devices=DEVICES, dtypes=(torch.float32, torch.float16, torch.bfloat16),
                                 hint=" (use backend='torch' for fp64)")
dispatch.register_backend("triton", CAPABILITY, UNAVAILABLE)

# Why the torch.library.triton_op wrappers are not registered (None when they are).
COMPILE_UNAVAILABLE: "str | None" = None


if triton is not None:
    import functools
    import threading

    @triton.jit
    def cast_out(x, DTYPE: tl.constexpr, INTERP: tl.constexpr):
        """Downcast fp32 ``x`` to ``DTYPE`` rounding to nearest even.

        On the GPU ``.to(tl.bfloat16)`` already rounds to nearest even. Triton's CPU interpreter
        (3.x) truncates fp32 -> bf16 instead, which doubles the rounding error and would make the
        interpreter's parity tests meaningless; with ``INTERP`` (set only when interpreting) the
        rounding is done by hand on the bits, after which the truncating cast is exact.
        """
        if INTERP:
            if DTYPE == tl.bfloat16:
                bits = x.to(tl.uint32, bitcast=True)
                bits = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16) << 16
                x = bits.to(tl.float32, bitcast=True)
        return x.to(DTYPE)

    @triton.jit
    def mma(a, b, acc, INTERP: tl.constexpr):
        """``acc + a @ b`` in fp32 (``tl.dot``); fp32 operands use IEEE fp32 (no TF32).

        fp16/bf16 operands go to the tensor cores as they are (their products are exact in the
        fp32 accumulator). Triton's interpreter (3.x) multiplies the raw bits of bf16 operands, so
        there (``INTERP``) they are widened to fp32 first, which gives the same exact products.
        """
        if a.dtype == tl.float32:
            return tl.dot(a, b.to(tl.float32), acc, input_precision="ieee")
        elif INTERP:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)

    @triton.jit
    def tanh_f32(x):
        """tanh in fp32 from exp (no libdevice: the interpreter lacks it); |error| <~ 1e-7."""
        t = tl.exp(-2.0 * tl.abs(x))
        y = (1.0 - t) / (1.0 + t)
        return tl.where(x < 0, -y, y)

    _SM_COUNT: dict = {}

    def sm_count(device) -> int:
        """The device's SM count (launchers size grids by it); 132, an H200's, in the interpreter so
        that CPU tests take the GPU's choices."""
        if device.type != "cuda":
            return 132
        idx = device.index if device.index is not None else torch.cuda.current_device()
        if idx not in _SM_COUNT:
            _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
        return _SM_COUNT[idx]

    _tracing = threading.local()

    _FAST_LAUNCHERS: dict = {}

    def wrap(kernel):
        """The kernel to launch: ``torch.library.wrap_triton(kernel)`` inside a custom op's body
        (so make_fx / torch.compile / torch.export can trace the launch), the kernel itself
        otherwise: eager launches skip wrap_triton's higher-order-op dispatch (tens of µs per call).
        Interpreted kernels are never wrapped (wrap_triton's tracing does not apply to them).
        With ``Tuning.triton_fast_launch`` eager launches go through ``fast_launch.FastLaunch``.
        """
        if INTERPRET:
            return kernel
        if getattr(_tracing, "on", False):
            return torch.library.wrap_triton(kernel)
        if tuning.current().triton_fast_launch:
            fast = _FAST_LAUNCHERS.get(kernel)
            if fast is None:
                from .fast_launch import UNSUPPORTED, FastLaunch
                if UNSUPPORTED is not None:
                    raise RuntimeError(f"Tuning(triton_fast_launch=True): {UNSUPPORTED}")
                fast = _FAST_LAUNCHERS[kernel] = FastLaunch(kernel)
            return fast
        return kernel

    def compiling() -> bool:
        if COMPILE_UNAVAILABLE is not None:
            return False
        try:
            return torch.compiler.is_compiling()
        except AttributeError:  # very old torch
            return False

    def triton_op(name: str, mutates_args=()):
        """Register ``fn`` as ``torch.ops.dm2s2_triton.<name>`` (a ``torch.library.triton_op``).

        Returns ``torch.ops.dm2s2_triton.<name>``, or ``fn`` itself where it cannot be registered
        (interpreter, old torch), with the reason in ``COMPILE_UNAVAILABLE``. The schema comes from
        ``fn``'s annotations; its body launches through ``wrap``, which wraps kernels only there.
        """
        def deco(fn):
            global COMPILE_UNAVAILABLE
            if INTERPRET:
                COMPILE_UNAVAILABLE = "interpreted kernels are not traceable (TRITON_INTERPRET=1)"
                return fn

            @functools.wraps(fn)
            def body(*args, **kwargs):
                previous = getattr(_tracing, "on", False)
                _tracing.on = True
                try:
                    return fn(*args, **kwargs)
                finally:
                    _tracing.on = previous

            try:
                torch.library.triton_op(f"{NAMESPACE}::{name}", body, mutates_args=mutates_args)
                return getattr(getattr(torch.ops, NAMESPACE), name)  # the OpOverloadPacket
            except Exception as exc:  # noqa: BLE001 - compile support is optional
                COMPILE_UNAVAILABLE = f"torch.library.triton_op failed: {type(exc).__name__}: {exc}"
                return fn
        return deco

    try:
        from . import add_layernorm, bias_gelu, embed_layernorm, linear, mra_pool, set_attention  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - a kernel that fails to define disables the backend
        dispatch.register_backend(
            "triton", CAPABILITY, f"dm2s2_fast.backends.triton kernels failed to load: {type(exc).__name__}: {exc}")
