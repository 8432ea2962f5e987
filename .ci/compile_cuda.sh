#!/usr/bin/env bash
# Compile every torch-free CUDA kernel source (csrc/cuda/kernels/*.cu) for Hopper (sm_90) with this
# machine's nvcc. No GPU is needed; nothing runs. Fails on any compile error, and on any register
# spill or stack frame in a kernel (local-memory traffic is a silent slowdown).
#
#   bash .ci/compile_cuda.sh
#
# It also compiles the torch glue, csrc/cuda/ops_cuda.cu, against the installed torch's headers
# (compile only, no link: a CPU-only torch ships the c10/cuda and ATen headers but not
# c10/cuda/impl/cuda_cmake_macros.h, for which a one-line stand-in is generated in a temp dir), so
# API mistakes there show before a GPU build. ~1 min; DM2S2_CHECK_TORCH_GLUE=0 skips it, and it is
# skipped when torch is not importable.
#
# Environment: NVCC (default: nvcc on PATH, else /usr/local/cuda/bin/nvcc), DM2S2_ARCH (default 90).
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
if [ ! -x "$NVCC" ]; then
  echo "compile_cuda.sh: nvcc not found (set NVCC=...)" >&2
  exit 1
fi
ARCH=${DM2S2_ARCH:-90}
OUT=$(mktemp -d /tmp/dm2s2_cuda.XXXXXX)
trap 'rm -rf "$OUT"' EXIT

# The defines PyTorch's CUDA builds use: the kernels must compile under them too.
TORCH_DEFS="-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__"
FLAGS="-std=c++17 -O3 -gencode=arch=compute_${ARCH},code=sm_${ARCH} -Xptxas -v -Xptxas -warn-spills -Xcompiler -Wall"

"$NVCC" --version | tail -n 2
status=0
shopt -s nullglob
sources=(csrc/cuda/kernels/*.cu)
if [ ${#sources[@]} -eq 0 ]; then
  echo "compile_cuda.sh: no sources under csrc/cuda/kernels" >&2
  exit 1
fi
for src in "${sources[@]}"; do
  name=$(basename "$src" .cu)
  log="$OUT/$name.log"
  echo "== nvcc $src (sm_${ARCH})"
  if ! "$NVCC" $FLAGS $TORCH_DEFS -Icsrc/cuda/kernels -c "$src" -o "$OUT/$name.o" >"$log" 2>&1; then
    cat "$log"
    echo "FAILED: $src" >&2
    status=1
    continue
  fi
  # One line per kernel: registers, shared memory, spills, stack frame.
  python3 - "$log" <<'EOF' || status=1
import re, sys
text = open(sys.argv[1]).read()
bad = False
current = None
rows = []
for line in text.splitlines():
    m = re.search(r"Compiling entry function '([^']+)'", line)
    if m:
        current = {"name": m.group(1)}
        rows.append(current)
        continue
    if current is None:
        continue
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m:
        current["stack"], current["spill_st"], current["spill_ld"] = map(int, m.groups())
    m = re.search(r"Used (\d+) registers", line)
    if m:
        current["regs"] = int(m.group(1))
        s = re.search(r"(\d+) bytes smem", line)
        current["smem"] = int(s.group(1)) if s else 0
for r in rows:
    short = r["name"]
    try:
        import subprocess
        short = subprocess.run(["c++filt", r["name"]], capture_output=True, text=True).stdout.strip() or short
    except Exception:
        pass
    short = short.replace("(anonymous namespace)::", "").replace("dm2s2::", "")
    short = re.sub(r"^void ", "", short)
    short = re.sub(r"\((?!anonymous).*$", "", short)
    spill = r.get("spill_st", 0) + r.get("spill_ld", 0)
    flag = ""
    if spill or r.get("stack", 0):
        flag = "  <-- SPILL/STACK"
        bad = True
    print(f"   {r.get('regs', '?'):>3} regs {r.get('smem', 0):>6} B static smem "
          f"stack {r.get('stack', 0):>4} spill {spill:>4}  {short}{flag}")
for line in text.splitlines():
    if "warning" in line.lower() and "Compiling entry" not in line:
        print("   " + line)
sys.exit(1 if bad else 0)
EOF
done

if [ "${DM2S2_CHECK_TORCH_GLUE:-1}" = "1" ] && [ -f csrc/cuda/ops_cuda.cu ]; then
  TI=$(python3 -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'include'))" 2>/dev/null || true)
  if [ -n "$TI" ] && [ -d "$TI/c10/cuda" ]; then
    mkdir -p "$OUT/stub/c10/cuda/impl"
    if [ ! -f "$TI/c10/cuda/impl/cuda_cmake_macros.h" ]; then
      printf '#pragma once\n' >"$OUT/stub/c10/cuda/impl/cuda_cmake_macros.h"
    fi
    echo "== compile csrc/cuda/ops_cuda.cu (torch glue) against $TI"
    if ! "$NVCC" -std=c++17 -O0 -gencode=arch=compute_${ARCH},code=sm_${ARCH} $TORCH_DEFS -diag-suppress 3306 \
        -I"$OUT/stub" -I"$TI" -I"$TI/torch/csrc/api/include" -Icsrc/cuda/kernels \
        -c csrc/cuda/ops_cuda.cu -o "$OUT/ops_cuda.o" >"$OUT/ops_cuda.log" 2>&1; then
      cat "$OUT/ops_cuda.log"
      echo "FAILED: csrc/cuda/ops_cuda.cu (torch glue)" >&2
      status=1
    fi
  else
    echo "== skip torch glue check: no torch headers"
  fi
fi

if [ $status -ne 0 ]; then
  echo "compile_cuda.sh: FAILED" >&2
  exit 1
fi
echo "compile_cuda.sh: all CUDA kernel sources compiled for sm_${ARCH}"
