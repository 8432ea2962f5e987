"""CPU benchmark across precisions (issue #14): the `cpp` engine in fp32 and bf16 against OpenVINO,
ONNX Runtime, Hugging Face and the GEMM floors, on the `ads` workload, in one run on one machine.

    python bench/cpu_precision.py                          # B = 1, 64; fp32 and bf16
    python bench/cpu_precision.py --sizes 1,16,64 --rounds 9 --out-dir bench/results/<date>-cpu-<machine>/

Rows per precision (fp32, bf16):
- floor: the encoder's 24 linear layers (per layer: qkv, attention output, FFN in, FFN out; FFN in without
  its bias, which the engine applies with the GELU) on the packed tokens, with every GEMM library this
  torch has — `F.linear` (MKL sgemm in fp32, oneDNN in bf16), MKL's packed sgemm (fp32), oneDNN with
  prepacked weights — timed in the same run; the floor is the fastest of them (its name is in the table).
- engine `cpp`: `dm.convert(model.to(dtype), "cpp")`, the whole model (embeddings, encoder, MRA, head).
- OpenVINO: `ov.convert_model` of the HF `BertModel` holding the same weights, compiled for the CPU with
  `INFERENCE_PRECISION_HINT` set explicitly (`f32` / `bf16`), 2 threads, latency hint; padded encoder.
- ONNX Runtime (fp32 only: its CPU provider has no bf16 kernels): the padded encoder exported once,
  `ORT_ENABLE_ALL`, intra-op threads = torch's threads.
- HF `BertModel` (sdpa), in the precision's dtype, padded encoder.
The peers take the per-element embedding content (computed once, outside the timing) and do the
embedding epilogue and the 6 layers; the engine's row is the whole model, so the comparison favours
the peers.

Timing: after warm-up, `--rounds` rounds; in each round every provider runs one untimed call then one
timed call (glibc unmaps freed blocks over its mmap threshold, so the first call after another
provider re-faults its buffers), in a rotated order. Medians; the others' CPU share during each row
and the load average are recorded. Parity is checked before timing (hidden states over the valid
tokens against the fp32 reference: fp32 ≤ 2e-4, bf16 ≤ 5e-2 — a sanity check, not the parity contract).
A precision the CPU lacks (bf16 without AVX512_BF16 or AMX) is skipped with the reason.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import dm2s2_fast as dm  # noqa: E402
from dm2s2_fast.backends import cpp as cpp_backend  # noqa: E402
from dm2s2_fast.config import DM2S2Config  # noqa: E402
from dm2s2_fast.reference import DM2S2  # noqa: E402
from dm2s2_fast.workloads import ads_batch, padded_tokens  # noqa: E402
from bench.peers import PaddedEncoder, Skip, cpu_model, make_hf_bert, make_model, relative_error  # noqa: E402

ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")
PARITY = {torch.float32: 2e-4, torch.bfloat16: 5e-2}


# ---------------------------------------------------------------------------------------------- machine

def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [f for f in ISA_FLAGS if f in have]
    except OSError:
        pass
    return []


def others_cpu():
    """(wall, busy jiffies of all CPUs, own jiffies): for the share of CPU the other processes used."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
        return time.perf_counter(), busy, int(own[11]) + int(own[12])
    except (OSError, ValueError, IndexError):
        return None


def others_share(start, end) -> float | None:
    if start is None or end is None or end[0] <= start[0]:
        return None
    hz = os.sysconf("SC_CLK_TCK")
    return round(max(0.0, 100.0 * ((end[1] - start[1]) - (end[2] - start[2])) / hz / (end[0] - start[0])
                     / (os.cpu_count() or 1)), 1)


# ---------------------------------------------------------------------------------------------- workload

class Work:
    """One seeded ads batch, packed and padded, with the embedding content the peers take."""

    def __init__(self, model: DM2S2, B: int):
        cfg, emb = model.config, model.embeddings
        self.B = B
        self.batch = ads_batch(B, cfg, seed=0)
        layout = self.batch.layout
        self.N, d = layout.num_elements, cfg.hidden_size
        content = torch.empty(self.N, d)
        positions = torch.empty(self.N, dtype=torch.long)
        types = torch.empty(self.N, dtype=torch.long)
        with torch.no_grad():
            for m, modality in enumerate(cfg.modalities):
                rows = layout.rows[m]
                if rows.numel():
                    content[rows] = emb.content(modality, self.batch.values[modality.name]).float()
                    positions[rows] = layout.positions[m]
                    types[rows] = m
        samples = layout.element_sample
        cu = layout.cu_seqlens_set.long()
        within = torch.arange(self.N) - cu[samples]
        self.T = max(layout.max_seqlen_set, 1)
        self.mask = torch.zeros(B, self.T, dtype=torch.bool)
        self.mask[samples, within] = True

        def pad(x):
            out = torch.zeros((B, self.T) + tuple(x.shape[1:]), dtype=x.dtype)
            out[samples, within] = x
            return out

        self.content, self.pad_content = content, pad(content)
        self.pad_positions, self.pad_types = pad(positions), pad(types)
        self.padded = padded_tokens(self.batch)


def linear_flops(cfg: DM2S2Config, N: int) -> int:
    d, inner = cfg.hidden_size, cfg.intermediate_size
    return 2 * N * (4 * d * d + 2 * d * inner) * cfg.num_layers


# ---------------------------------------------------------------------------------------------- providers

class Provider:
    scope = "encoder"
    info: dict

    def call(self):
        raise NotImplementedError

    def hidden(self) -> torch.Tensor | None:
        return None


class Engine(Provider):
    scope = "full model"

    def __init__(self, model_t: DM2S2, work: Work):
        self.engine = dm.convert(model_t, "cpp")
        cpp_backend.prepare(model_t)
        self.batch = work.batch
        self.info = {}

    def call(self):
        return self.engine(self.batch)

    def hidden(self):
        out = self.engine(self.batch)
        self.info["ops"] = sorted(set(self.engine.last_backends.values()))
        return out.hidden.float()


class Floor(Provider):
    """The 24 linear layers on the packed tokens with one GEMM library."""

    scope = "linears"

    def __init__(self, model_t: DM2S2, work: Work, library: str):
        cfg = model_t.config
        dtype = model_t.embeddings.word.weight.dtype
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(work.N, cfg.hidden_size, generator=g).to(dtype)
        self.ctx = torch.randn(work.N, cfg.hidden_size, generator=g).to(dtype)
        self.inner = torch.randn(work.N, cfg.intermediate_size, generator=g).to(dtype)
        self.library = library
        self.info = {"library": library}
        layers = []
        for layer in model_t.layers:
            layers.append([(layer.qkv.weight, layer.qkv.bias), (layer.attention_output.weight, layer.attention_output.bias),
                           (layer.intermediate.weight, None), (layer.output.weight, layer.output.bias)])
        if library == "F.linear":
            self.layers = layers
        elif library == "mkl-packed":
            if dtype != torch.float32 or not torch.backends.mkl.is_available():
                raise Skip("MKL's packed sgemm is fp32 only")
            pack = torch.ops.mkl._mkl_reorder_linear_weight
            self.layers = [[(pack(w.detach().contiguous(), work.N), w, b) for w, b in layer] for layer in layers]
        elif library == "onednn-packed":
            if not torch.backends.mkldnn.is_available():
                raise Skip("no oneDNN in this torch")
            pack = torch.ops.mkldnn._reorder_linear_weight
            self.layers = [[(pack(w.detach().contiguous(), None), b) for w, b in layer] for layer in layers]
        else:
            raise ValueError(library)

    def call(self):
        x, ctx, inner = self.x, self.ctx, self.inner
        inputs = (x, ctx, x, inner)
        if self.library == "F.linear":
            for layer in self.layers:
                for a, (w, b) in zip(inputs, layer):
                    F.linear(a, w, b)
        elif self.library == "mkl-packed":
            lin = torch.ops.mkl._mkl_linear
            for layer in self.layers:
                for a, (p, w, b) in zip(inputs, layer):
                    lin(a, p, w, b, a.shape[0])
        else:
            lin = torch.ops.mkldnn._linear_pointwise
            for layer in self.layers:
                for a, (p, b) in zip(inputs, layer):
                    lin(a, p, b, "none", [], "")


def hf_inputs(work: Work, dtype=torch.float32) -> dict:
    return dict(inputs_embeds=work.pad_content.to(dtype), attention_mask=work.mask.long(),
                token_type_ids=work.pad_types, position_ids=work.pad_positions)


class HF(Provider):
    def __init__(self, bert, work: Work, dtype):
        import transformers

        self.bert = bert if dtype == torch.float32 else copy.deepcopy(bert).to(dtype)
        self.inputs, self.mask = hf_inputs(work, dtype), work.mask
        self.info = {"transformers": transformers.__version__, "attn_implementation": "sdpa"}

    def call(self):
        with torch.inference_mode():
            return self.bert(**self.inputs).last_hidden_state

    def hidden(self):
        return self.call()[self.mask].float()


class OpenVINO(Provider):
    """``ov.convert_model`` of the HF BertModel (once, dynamic shapes), compiled per precision."""

    _models: dict = {}

    def __init__(self, bert, work: Work, precision: str):
        try:
            import openvino as ov
        except Exception as exc:
            raise Skip(f"openvino not importable: {type(exc).__name__}: {exc}") from None
        if "model" not in OpenVINO._models:
            example = hf_inputs(work)
            t0 = time.perf_counter()
            with torch.no_grad():
                OpenVINO._models["model"] = ov.convert_model(bert, example_input=example)
            OpenVINO._models["convert_s"] = round(time.perf_counter() - t0, 1)
            OpenVINO._models["core"] = ov.Core()
        core = OpenVINO._models["core"]
        config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": torch.get_num_threads(),
                  "PERFORMANCE_HINT": "LATENCY"}
        key = ("compiled", precision)
        if key not in OpenVINO._models:
            OpenVINO._models[key] = core.compile_model(OpenVINO._models["model"], "CPU", config)
        self.compiled = OpenVINO._models[key]
        self.request = self.compiled.create_infer_request()
        got = str(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        self.feeds = {k: v.numpy() for k, v in hf_inputs(work).items()}
        self.mask = work.mask
        self.info = {"openvino": ov.__version__, "precision_hint": precision, "precision_compiled": got,
                     "threads": torch.get_num_threads(), "convert_s": OpenVINO._models["convert_s"]}

    def call(self):
        return self.request.infer(self.feeds)

    def hidden(self):
        out = self.request.infer(self.feeds)
        return torch.from_numpy(out[0].copy())[self.mask].float()


class OnnxRuntime(Provider):
    _session: dict = {}

    def __init__(self, model: DM2S2, work: Work):
        try:
            import onnxruntime as ort
        except Exception as exc:
            raise Skip(f"onnxruntime not importable: {type(exc).__name__}: {exc}") from None
        if "session" not in OnnxRuntime._session:
            tmp = tempfile.TemporaryDirectory(prefix="dm2s2_cpu_precision_")
            path = os.path.join(tmp.name, "encoder.onnx")
            args = (work.pad_content, work.pad_positions, work.pad_types, work.mask)
            names = ["content", "positions", "types", "mask"]
            axes = {n: {0: "batch", 1: "seq"} for n in names}
            axes["hidden"] = {0: "batch", 1: "seq"}
            t0 = time.perf_counter()
            try:
                torch.onnx.export(PaddedEncoder(model).eval(), args, path, input_names=names, output_names=["hidden"],
                                  dynamic_axes=axes, dynamo=False, opset_version=17)
            except Exception as exc:
                raise Skip(f"ONNX export failed: {type(exc).__name__}: {str(exc)[:200]}") from None
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = torch.get_num_threads()
            opts.inter_op_num_threads = 1
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            OnnxRuntime._session.update(session=ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"]),
                                        tmp=tmp, export_s=round(time.perf_counter() - t0, 1), version=ort.__version__)
        self.session = OnnxRuntime._session["session"]
        self.feeds = {"content": work.pad_content.numpy(), "positions": work.pad_positions.numpy(),
                      "types": work.pad_types.numpy(), "mask": work.mask.numpy()}
        self.mask = work.mask
        self.info = {"onnxruntime": OnnxRuntime._session["version"], "export_s": OnnxRuntime._session["export_s"],
                     "exporter": "torchscript", "threads": torch.get_num_threads()}

    def call(self):
        return self.session.run(None, self.feeds)[0]

    def hidden(self):
        return torch.from_numpy(self.call())[self.mask].float()


# ---------------------------------------------------------------------------------------------- run

def build(name: str, dtype, model, model_t, bert, work: Work) -> Provider:
    if name.startswith("floor:"):
        return Floor(model_t, work, name.split(":", 1)[1])
    if name == "cpp":
        return Engine(model_t, work)
    if name == "hf":
        return HF(bert, work, dtype)
    if name == "openvino":
        return OpenVINO(bert, work, "f32" if dtype == torch.float32 else "bf16")
    if name == "onnxruntime":
        if dtype != torch.float32:
            raise Skip("ONNX Runtime's CPU execution provider has no bf16 kernels")
        return OnnxRuntime(model, work)
    raise ValueError(name)


def run_size(B: int, precisions, model, bert, args, log) -> dict:
    work = Work(model, B)
    with torch.no_grad():
        ref_hidden = model(work.batch).hidden.float()
    result = {"B": B, "N": work.N, "T": work.T, "padded": work.padded,
              "linear_gflop": linear_flops(model.config, work.N) / 1e9, "precisions": {}}
    for dtype in precisions:
        pname = str(dtype).replace("torch.", "")
        model_t = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype).eval()
        names = ["floor:F.linear", "floor:mkl-packed", "floor:onednn-packed", "cpp", "openvino", "onnxruntime", "hf"]
        names = [n for n in names if n.split(":")[0] in args.providers or n in args.providers]
        rows, providers = {}, {}
        for name in names:
            try:
                prov = build(name, dtype, model, model_t, bert, work)
                with torch.inference_mode():
                    prov.call()
                    h = prov.hidden()
                if h is not None:
                    err = relative_error(h, ref_hidden)
                    prov.info["parity"] = err
                    if not err <= PARITY[dtype]:
                        raise Skip(f"parity {err:.2e} > {PARITY[dtype]:.0e} against the fp32 reference")
                providers[name] = prov
                rows[name] = {"scope": prov.scope, "info": prov.info, "samples_ms": []}
            except Skip as exc:
                rows[name] = {"skipped": str(exc)}
                log(f"B={B} {pname} {name}: skipped: {exc}")
        order = list(providers)
        load_start = os.getloadavg()
        with torch.inference_mode():
            for name in order:  # warm-up
                for _ in range(args.warmup):
                    providers[name].call()
            shares = {name: [] for name in order}
            for r in range(args.rounds):
                k = r % len(order)
                for name in order[k:] + order[:k]:
                    prov = providers[name]
                    prov.call()  # untimed: re-faults what the previous provider's frees unmapped
                    s0 = others_cpu()
                    t0 = time.perf_counter()
                    prov.call()
                    dt = time.perf_counter() - t0
                    s1 = others_cpu()
                    rows[name]["samples_ms"].append(dt * 1e3)
                    share = others_share(s0, s1)
                    if share is not None:
                        shares[name].append(share)
        load_end = os.getloadavg()
        for name in order:
            samples = rows[name]["samples_ms"]
            rows[name]["median_ms"] = statistics.median(samples)
            rows[name]["min_ms"] = min(samples)
            rows[name]["others_cpu_pct"] = round(statistics.median(shares[name]), 1) if shares[name] else None
        floors = {n: rows[n]["median_ms"] for n in order if n.startswith("floor:")}
        if floors:
            best = min(floors, key=floors.get)
            rows["floor"] = {"scope": "linears", "median_ms": floors[best], "library": best.split(":", 1)[1],
                             "gflop_per_s": result["linear_gflop"] / floors[best] * 1e3}
        result["precisions"][pname] = {"rows": rows, "loadavg_start": load_start, "loadavg_end": load_end}
        log(f"B={B} {pname}: " + ", ".join(f"{n} {rows[n]['median_ms']:.2f}" for n in order)
            + (f"; floor = {rows['floor']['library']}" if floors else "") + f"; load {load_start[0]:.1f}->{load_end[0]:.1f}")
    return result


def ratio(a, b):
    return a / b if a and b else None


def targets(results: list[dict]) -> list[tuple[str, str, str]]:
    """(target, measured, met?) for the four targets of issue #14."""
    by_b = {r["B"]: r["precisions"] for r in results}
    out = []

    def med(B, prec, name):
        row = by_b.get(B, {}).get(prec, {}).get("rows", {}).get(name, {})
        return row.get("median_ms")

    if 64 in by_b:
        cpp, ov = med(64, "float32", "cpp"), med(64, "float32", "openvino")
        r = ratio(ov, cpp)
        out.append(("fp32, B=64: ≥ 1.3× faster than OpenVINO f32", f"{r:.2f}× ({cpp:.1f} vs {ov:.1f} ms)" if r else "n/a",
                    "met" if r and r >= 1.3 else "missed"))
    if 1 in by_b:
        cpp = med(1, "float32", "cpp")
        peers = {n: med(1, "float32", n) for n in ("onnxruntime", "openvino")}
        peers = {n: v for n, v in peers.items() if v}
        if cpp and peers:
            best = min(peers, key=peers.get)
            out.append(("fp32, B=1: no slower than the fastest of ONNX Runtime and OpenVINO",
                        f"{cpp:.2f} vs {best} {peers[best]:.2f} ms ({peers[best] / cpp:.2f}×)",
                        "met" if cpp <= peers[best] else "missed"))
    if 64 in by_b and "bfloat16" in by_b[64]:
        cpp, ov = med(64, "bfloat16", "cpp"), med(64, "bfloat16", "openvino")
        floor = by_b[64]["bfloat16"]["rows"].get("floor", {}).get("median_ms")
        r = ratio(ov, cpp)
        out.append(("bf16, B=64: ≥ 1.5× faster than OpenVINO bf16", f"{r:.2f}× ({cpp:.1f} vs {ov:.1f} ms)" if r else "n/a",
                    "met" if r and r >= 1.5 else "missed"))
        f = ratio(cpp, floor)
        out.append(("bf16, B=64: ≤ 1.25× the bf16 floor", f"{f:.2f}× ({cpp:.1f} vs {floor:.1f} ms)" if f else "n/a",
                    "met" if f and f <= 1.25 else "missed"))
    if 1 in by_b and "bfloat16" in by_b[1]:
        cpp, ov = med(1, "bfloat16", "cpp"), med(1, "bfloat16", "openvino")
        if cpp and ov:
            out.append(("bf16, B=1: no slower than OpenVINO bf16", f"{cpp:.2f} vs {ov:.2f} ms ({ov / cpp:.2f}×)",
                        "met" if cpp <= ov else "missed"))
    return out


def render(meta: dict, results: list[dict]) -> str:
    lines = [f"# CPU precision benchmark — {meta['date']}", "",
             f"- CPU: {meta['cpu']} ({meta['cores']} cores, torch threads {meta['threads']})",
             f"- ISA flags: {' '.join(meta['flags']) or 'none of interest'}",
             f"- cpp kernels: table `{meta['cpp']['table']}`; set_attention: "
             + "; ".join(f"{k}: {v}" for k, v in meta["cpp"]["set_attention"].items()),
             f"- torch {meta['torch']}; OpenVINO {meta.get('openvino', '-')}; ONNX Runtime {meta.get('onnxruntime', '-')}; "
             f"transformers {meta.get('transformers', '-')}",
             f"- command: `{meta['command']}`", f"- {meta['rounds']} rounds × (1 untimed + 1 timed call), "
             f"{meta['warmup']} warm-up calls; median ms", ""]
    sizes = [r["B"] for r in results]
    precs = []
    for r in results:
        for p in r["precisions"]:
            if p not in precs:
                precs.append(p)
    for prec in precs:
        lines += [f"## {prec}", "", "| provider | scope | " + " | ".join(f"B={b}" for b in sizes) + " |",
                  "|---|---|" + "---:|" * len(sizes)]
        names = []
        for r in results:
            for n in r["precisions"].get(prec, {}).get("rows", {}):
                if n not in names:
                    names.append(n)
        names = ["floor"] + [n for n in names if n != "floor"]
        for n in names:
            cells, scope = [], ""
            for r in results:
                rows = r["precisions"].get(prec, {}).get("rows", {})
                row = rows.get(n)
                floor = rows.get("floor", {}).get("median_ms")
                if row is None:
                    cells.append("")
                elif "skipped" in row:
                    cells.append("skipped")
                else:
                    scope = row.get("scope", scope)
                    m = row["median_ms"]
                    extra = f" ({m / floor:.2f}×)" if floor and n != "floor" and not n.startswith("floor:") else ""
                    if n == "floor":
                        extra = f" [{row['library']}, {row['gflop_per_s']:.0f} GFLOP/s]"
                    cells.append(f"{m:.2f}{extra}")
            label = {"cpp": "**engine `cpp`**", "openvino": "OpenVINO", "onnxruntime": "ONNX Runtime",
                     "hf": "HF `BertModel` (sdpa)", "floor": "floor (fastest library)"}.get(n, n)
            lines.append(f"| {label} | {scope} | " + " | ".join(cells) + " |")
        lines.append("")
        others = []
        for r in results:
            p = r["precisions"].get(prec)
            if not p:
                continue
            shares = {n: row.get("others_cpu_pct") for n, row in p["rows"].items() if "others_cpu_pct" in row}
            others.append(f"B={r['B']} (N={r['N']} packed, {r['padded']} padded): load {p['loadavg_start'][0]:.1f} → "
                          f"{p['loadavg_end'][0]:.1f}; others' CPU % per row "
                          + ", ".join(f"{n} {v}" for n, v in shares.items()))
        lines += ["Conditions: " + "; ".join(others), ""]
        skipped = [(r["B"], n, row["skipped"]) for r in results
                   for n, row in r["precisions"].get(prec, {}).get("rows", {}).items() if "skipped" in row]
        for B, n, why in skipped:
            lines.append(f"- B={B} {n}: skipped — {why}")
        if skipped:
            lines.append("")
    for prec, why in meta.get("skipped_precisions", {}).items():
        lines += [f"## {prec}", "", f"skipped: {why}", ""]
    lines += ["## Targets (issue #14)", "", "| target | measured | status |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {s} |" for t, m, s in targets(results)]
    lines += ["", "## GEMM libraries the engine chose (cpp backend, measured at first use)", ""]
    for key, plan in meta["cpp"].get("gemm", {}).items():
        lines.append(f"- {key}: rows < 512 → {plan['small']}, otherwise {plan['large']}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,64")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--providers", default="floor,cpp,openvino,onnxruntime,hf")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch, OpenVINO and ONNX Runtime threads (default: torch's, = the cores)")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.providers = args.providers.split(",")
    sizes = [int(s) for s in args.sizes.split(",")]
    flags = cpu_flags()
    precisions, skipped = [], {}
    for p in args.precisions.split(","):
        if p == "fp32":
            precisions.append(torch.float32)
        elif p == "bf16":
            if "avx512_bf16" in flags or "amx_bf16" in flags:
                precisions.append(torch.bfloat16)
            else:
                skipped["bfloat16"] = "this CPU has neither AVX512_BF16 nor AMX-BF16 (bf16 would run at fp32 speed)"
        else:
            raise SystemExit(f"unknown precision {p!r} (fp32, bf16)")
    out_dir = Path(args.out_dir or ROOT / "bench" / "results" / f"{datetime.date.today()}-cpu")
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "run.log"

    def log(msg):
        print(msg, flush=True)
        with open(log_path, "a") as f:
            f.write(msg + "\n")

    model = make_model(torch.device("cpu"), 0)
    bert = None
    if {"hf", "openvino"} & set(args.providers):
        try:
            bert, _ = make_hf_bert(model)
        except Skip as exc:
            log(f"HF BertModel unavailable: {exc}")
    results = []
    for B in sizes:
        results.append(run_size(B, precisions, model, bert, args, log))
    from dm2s2_fast.backends import cpp

    info = cpp.cpu_info()
    meta = {"date": str(datetime.date.today()), "cpu": cpu_model(), "cores": os.cpu_count(), "flags": flags,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "rounds": args.rounds,
            "warmup": args.warmup, "command": " ".join([Path(sys.argv[0]).as_posix()] + (argv or sys.argv[1:])),
            "skipped_precisions": skipped,
            "cpp": {"table": info["table"], "features": info["features"], "set_attention": info["set_attention"],
                    "gemm": {" ".join(map(str, k)): v for k, v in info["gemm"].items()}}}
    for mod in ("openvino", "onnxruntime", "transformers"):
        try:
            meta[mod] = __import__(mod).__version__
        except Exception:
            pass
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
    (out_dir / "results.md").write_text(render(meta, results))
    print(render(meta, results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
