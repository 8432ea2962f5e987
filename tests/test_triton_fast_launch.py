"""DM2S2_TRITON_FAST_LAUNCH (dm2s2_fast/triton/fast_launch.py), checked without a GPU.

A subprocess compiles the real kernels for sm_90 (Triton's bundled ptxas) behind a stand-in CUDA
driver whose launcher records what it is handed instead of launching. Each launcher of the
package then runs with the fast path off and on: a cache hit must hand the launcher exactly what
Triton's own ``JITFunction.run`` hands it (grid, compiled kernel, every argument), and inputs that
Triton specializes differently (a misaligned tensor, a size not divisible by 16, a size of 1) must
not hit another input's kernel.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_SCRIPT = r'''
import os
os.environ["TRITON_INTERPRET"] = "0"
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.driver import CudaDriver
from triton.runtime.driver import driver

CALLS = []

class Utils:
    def load_binary(self, name, kernel, shared, device):
        return (0, name, 0, 0, 1024)  # module, function (the name, to compare), regs, spills, threads
    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}

class Launcher:
    def __init__(self, src, metadata):
        pass
    def __call__(self, gx, gy, gz, stream, function, packed_metadata, launch_metadata, enter, exit_, *args):
        norm = tuple((str(a.dtype), a.data_ptr(), tuple(a.shape), a.stride()) if isinstance(a, torch.Tensor)
                     else (type(a).__name__, a) for a in args)
        CALLS.append(((gx, gy, gz), stream, function, id(packed_metadata), launch_metadata, enter, exit_, norm))

class Driver(CudaDriver):
    def __init__(self):
        self.utils, self.launcher_cls = Utils(), Launcher
    def get_current_device(self):
        return 0
    def get_current_stream(self, device=None):
        return 7
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)
    def get_active_torch_device(self):
        return torch.device("cpu")
    def get_device_capability(self, device=0):
        return (9, 0)

driver.set_active(Driver())
from triton.runtime.jit import JITFunction
RUNS = []
_run = JITFunction.run
def counted_run(self, *args, **kwargs):
    RUNS.append(self)
    return _run(self, *args, **kwargs)
JITFunction.run = counted_run
from dm2s2_fast.triton import add_layernorm as AL, bias_gelu as BG, embed_layernorm as EL, mra_pool as MP
from dm2s2_fast.triton import set_attention as SA
import dm2s2_fast.triton as T

g = torch.Generator().manual_seed(0)
def rnd(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, generator=g).to(dtype)

def comparable(calls):
    # The launches' own outputs are new allocations each call: no addresses. Launch metadata is
    # built only for the hooks to read, and no hook is registered: not compared.
    for grid, stream, function, kernel, _, enter, exit_, args in calls:
        assert getattr(enter, "calls", []) == [] and getattr(exit_, "calls", []) == []
        yield grid, stream, function, kernel, enter, exit_, tuple(
            a[:1] + a[2:] if a[0].startswith("torch.") else a for a in args)

def check(label, fn):
    CALLS.clear(); T.FAST_LAUNCH = False; fn(); slow = list(CALLS)
    CALLS.clear(); T.FAST_LAUNCH = True; fn(); miss = list(CALLS)
    CALLS.clear(); RUNS.clear(); fn(); hit = list(CALLS)
    assert not RUNS, (label, "the second fast call went through JITFunction.run", RUNS)
    T.FAST_LAUNCH = False
    assert slow, label
    for name, got in (("miss", miss), ("hit", hit)):
        assert list(comparable(got)) == list(comparable(slow)), (label, name, got, slow)
    print("SAME", label, len(slow), "launches")
    return slow

d, n = 384, 100
x, r, w, b = rnd(n, d), rnd(n, d), rnd(d), rnd(d)
check("add_layernorm", lambda: AL._launch(x, r, w, b, 1e-12))
xs = torch.empty(n * d + 1, dtype=torch.bfloat16)[1:].view(n, d).copy_(x)  # 2-byte offset: not 16-byte aligned
aligned = check("add_layernorm aligned again", lambda: AL._launch(x, r, w, b, 1e-12))
odd = check("add_layernorm misaligned", lambda: AL._launch(xs, r, w, b, 1e-12))
assert aligned[0][3] != odd[0][3], "a misaligned input got the aligned input's kernel"
check("add_layernorm n=96", lambda: AL._launch(x[:96], r[:96], w, b, 1e-12))
check("add_layernorm n=1", lambda: AL._launch(x[:1], r[:1], w, b, 1e-12))
h = rnd(n, 1536)
check("bias_gelu", lambda: BG._launch(h, rnd(1536)))
qkv = rnd(n, 3, 12, 32)
cu = torch.tensor([0, 1, 40, 100], dtype=torch.int32)
check("set_attention group", lambda: SA._launch(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, 60, 32 ** -0.5))
cu_short = torch.arange(0, n + 1, 4, dtype=torch.int32)
check("set_attention packed", lambda: SA._launch(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_short, 20, 32 ** -0.5))
Wm, c, v = rnd(d, d), rnd(d), rnd(d)
cu_seg = torch.tensor([0, 3, 50, 100], dtype=torch.int32)
check("intra_mra", lambda: MP._intra_launch(x, cu_seg, Wm, c, v))
pos = torch.randint(0, 64, (n,), generator=g); typ = torch.zeros(n, dtype=torch.int64)
ids = torch.randint(0, 500, (n,), generator=g)
pt, tt, table = rnd(64, d), rnd(4, d), rnd(500, d)
check("embed_layernorm", lambda: EL._launch_new(pos, typ, pt, tt, w, b, 1e-12, ids, table, None))
print("ALL-SAME")
'''


def test_fast_launch_hands_the_launcher_what_triton_does():
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.driver import CudaDriver  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"this triton has no CUDA backend to compile with: {exc}")
    from dm2s2_fast.triton import fast_launch
    if fast_launch.UNSUPPORTED is not None:
        pytest.skip(fast_launch.UNSUPPORTED)
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, cwd=str(ROOT),
                          timeout=600)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("triton's ptxas is not available")
    assert proc.returncode == 0 and "ALL-SAME" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.stdout.count("SAME ") >= 10, proc.stdout
