#!/usr/bin/env bash
# The GPU machine's software stack, checked on this CPU machine: torch 2.11.0 (its CUDA 13 build)
# with the Triton it pins (3.6.0) in a venv of their own. It builds the extension as the device
# does (CMake, CUDA kernels and torch glue for sm_90, linked against the CUDA torch), checks that
# every op has a CUDA kernel registered, and runs the test suite there: Triton's interpreter and the
# sm_90 ptxas register/spill checks under Triton 3.6, the CPU kernels under torch 2.11. A device
# session then starts from a tree that builds and compiles there, and spends its minutes measuring.
#
#   bash .ci/device_stack.sh            # ~3 min; a 4.7 GB venv at $VENV (kept for reruns)
#
# Environment: VENV (default /tmp/dm2s2_device_stack), TORCH_SPEC (default torch==2.11.0),
# NVCC / CUDA_HOME (default: /usr/local/cuda). It exits 0 with a SKIPPED line when the package
# index has no such torch (the check needs the wheel; nothing else is skipped).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-/tmp/dm2s2_device_stack}
TORCH_SPEC=${TORCH_SPEC:-torch==2.11.0}
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
# NumPy < 2.4: Triton 3.6's interpreter fails on 2.4 (see dm2s2_fast/backends/triton/__init__.py).
# transformers: the Hugging Face loader tests, and the bench's HF rows, run under this torch too.
if ! "$PY" -m pip install -q --disable-pip-version-check "$TORCH_SPEC" "numpy<2.4" pytest scikit-build-core ninja \
    transformers safetensors; then
  if ! "$PY" -m pip download -q --no-deps -d "$VENV/probe" "$TORCH_SPEC" >/dev/null 2>&1; then
    echo "device_stack.sh: SKIPPED: the package index has no $TORCH_SPEC"
    exit 0
  fi
  echo "device_stack.sh: FAILED: pip could not install $TORCH_SPEC and its dependencies" >&2
  exit 1
fi
"$PY" -c "import torch, triton, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'numpy', numpy.__version__)"

# The CUDA toolkit here keeps its libraries in lib/, where torch's FindCUDA does not look; nvrtc
# comes from torch's own CUDA wheels.
NVRTC=$("$PY" -c "import glob, os, nvidia; print(sorted(glob.glob(os.path.join(nvidia.__path__[0], 'cu*', 'lib', 'libnvrtc.so.*')))[0])")
CUDART=$(ls "$CUDA_HOME"/lib64/libcudart.so "$CUDA_HOME"/lib/libcudart.so 2>/dev/null | head -1)
echo "== build (CMake, CUDA kernels for sm_90) into build/device-stack"
CMAKE_ARGS="-DDM2S2_FAST_CUDA=ON -DCUDA_TOOLKIT_ROOT_DIR=$CUDA_HOME -DCUDA_INCLUDE_DIRS=$CUDA_HOME/include \
-DCUDA_CUDART_LIBRARY=$CUDART -DCUDA_nvrtc_LIBRARY=$NVRTC" \
  "$PY" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps \
  -C build-dir=build/device-stack -e .

echo "== every op has a CUDA kernel in the library"
"$PY" - <<'EOF'
import torch
from dm2s2_fast import _extension, dispatch
reason = _extension.load()
assert reason is None, reason
ops = sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names()
             if n.startswith("dm2s2_fast::") and not n.startswith("dm2s2_fast::_"))  # _cpu_isa: a CPU switch
print(f"{len(ops)} ops:", ", ".join(ops))
# The library defines exactly the ops the dispatcher knows (csrc/ops.cpp against dm2s2_fast/dispatch.py).
assert set(ops) == set(dispatch.OPS), (f"library ops {sorted(set(ops) - set(dispatch.OPS))} not in dispatch.OPS; "
                                       f"dispatch.OPS {sorted(set(dispatch.OPS) - set(ops))} not in the library")
missing = [op for op in ops if "\nCUDA: registered" not in torch._C._dispatch_dump(f"dm2s2_fast::{op}")]
cpu_only = {"linear", "linear_bias_gelu", "linear_add_layernorm"}  # CPU GEMM glue; CUDA runs cuBLAS + epilogue ops
unexpected = sorted(set(missing) - cpu_only)
assert not unexpected, f"no CUDA kernel registered for {unexpected}"
print("CPU-only by design:", ", ".join(sorted(set(missing) & cpu_only)) or "none")
EOF

echo "== tests (torch 2.11, Triton 3.6)"
# The engine's tests; the serving, export and explanation tests need extras this venv leaves out
# (Ray, tritonserver, TorchRec, matplotlib, the MiniLM checkpoint) and run in the main test command.
DM2S2_FAST_REQUIRE_EXTENSION=1 DM2S2_FAST_REQUIRE_TEST_EXTRAS=1 "$PY" -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning \
  tests/test_architecture.py tests/ops tests/backends tests/data tests/model tests/graphs tests/reliability \
  tests/serving/test_ranker.py bench/tests
