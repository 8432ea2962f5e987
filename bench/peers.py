"""The providers the benchmark times, on the same ``ads`` batch and the same weights.

Every provider is built from one reference ``DM2S2`` (seeded) and is a ``Runner``: ``call()`` is
what gets timed, ``hidden()`` returns the encoder's last hidden states packed ``[N, d]`` (sample
major, modalities in config order) so the suite can check it against the fp32 reference before a
single timing counts — a wrong peer cannot look fast.

Scopes (``Runner.scope``):
- ``model``: the whole DM²S² forward on the ``SequenceSet`` (embeddings, encoder, IntraMRA,
  InterMRA, head): ``reference`` and the engine backends ``torch``/``cpp``/``triton``/``cuda``.
- ``encoder``: the peers. They take the per-element *content* (word/category rows, projected image
  patches — computed once, outside the timing) with per-element position and modality ids, and do
  ``LayerNorm(content + P[pos] + T[modality])`` and the 6 encoder layers themselves. The padded
  peers see the batch padded to its longest sample. The MRA pooling and head on top is timed once,
  separately, as the ``pool`` row.
- ``floor``: the encoder's linear layers on the packed tokens with the vendor BLAS (``F.linear``).

Nothing here is a dependency of dm2s2_fast: transformers / onnxruntime / onnx are imported lazily
and a missing one turns into a skip with its reason.
"""
from __future__ import annotations

import copy
import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dm2s2_fast import dispatch
from dm2s2_fast.config import DM2S2Config
from dm2s2_fast.data import SequenceSet
from dm2s2_fast.engine import FastDM2S2
from dm2s2_fast.reference import DM2S2
from dm2s2_fast.tuning import Tuning
from dm2s2_fast.workloads import ads_batch, padded_tokens
from providers import ENGINE_BACKENDS, PEERS, PROVIDERS  # noqa: F401 - re-exported for the suite


DESCRIPTIONS = {
    "floor": "the encoder's linear layers on the packed tokens, vendor BLAS (F.linear)",
    "reference": "dm2s2_fast.reference.DM2S2, padded per modality, masked attention",
    "auto": "FastDM2S2 backend='auto' (per op, the measured choice in dm2s2_fast/auto_order.json, the device's order)",
    "torch": "FastDM2S2 backend='torch' (ragged, plain PyTorch ops)",
    "cpp": "FastDM2S2 backend='cpp' (C++ CPU kernels)",
    "triton": "FastDM2S2 backend='triton'",
    "triton+fastlaunch": "FastDM2S2 backend='triton', tuning=Tuning(triton_fast_launch=True) (launches skip "
                         "JITFunction.run's binding on a launch-cache hit)",
    "cuda": "FastDM2S2 backend='cuda'",
    "auto+graphs": "FastDM2S2 backend='auto', cuda_graphs=True (batch padded to its bucket, one graph replay; per op "
                   "the kernel of least GPU time, auto_order.json's cuda_graphs order; batches of more than "
                   "graph_max_rows=16384 rows run eagerly)",
    "triton+graphs": "FastDM2S2 backend='triton', cuda_graphs=True",
    "cuda+graphs": "FastDM2S2 backend='cuda', cuda_graphs=True",
    "hf": "transformers.BertModel, sdpa attention, padded to the longest sample",
    "nested": "nn.TransformerEncoder fast path (nested tensors from src_key_padding_mask)",
    "onnxruntime": "ONNX Runtime (CPU EP) on the exported padded encoder",
    "flex": "engine encoder with torch.compile'd flex_attention + document block mask (packed)",
    "pool": "IntraMRA + InterMRA + head on the packed hidden states (engine, backend auto)",
}


FP32_TOL = 2e-4  # ‖out − ref‖/‖ref‖ over valid tokens, against the fp32 reference


def percentile(samples, q: float) -> float:
    xs = sorted(samples)
    if not xs:
        return math.nan
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


class CpuContention:
    """CPU time the *other* processes of this machine used while we timed, in % of all CPUs.

    On a shared box this is what makes a CPU number noisy; 0 means we had the machine to ourselves.
    Reads /proc/stat and /proc/self/stat (Linux); elsewhere it reports None."""

    def __init__(self):
        self.start = self._read()

    @staticmethod
    def _read():
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
            busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # minus idle, iowait
            with open("/proc/self/stat") as f:
                own = f.read().rsplit(")", 1)[1].split()
            return time.perf_counter(), busy, int(own[11]) + int(own[12])  # utime + stime
        except (OSError, ValueError, IndexError):
            return None

    def stop(self):
        end = self._read()
        if self.start is None or end is None:
            return None
        hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        wall = end[0] - self.start[0]
        others = (end[1] - self.start[1]) - (end[2] - self.start[2])
        if wall <= 0:
            return None
        return round(max(0.0, 100.0 * others / hz / wall / (os.cpu_count() or 1)), 1)


def append_partial(record: dict) -> None:
    """One JSON line per finished row / skip / failure to $DM2S2_BENCH_PARTIAL (report.py sets it),
    so a run killed by an outer time limit still leaves what it measured."""
    path = os.environ.get("DM2S2_BENCH_PARTIAL")
    if not path:
        return
    try:
        import json

        with open(path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
    except OSError:
        pass


class Skip(Exception):
    """This provider cannot run here; the message says why."""


# ---------------------------------------------------------------------------------------------
# Models and workloads
# ---------------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_model(device: torch.device, seed: int = 0) -> DM2S2:
    """The benchmark's DM²S²: the ``ads`` config (docs/workloads.md), BERT-initialised from ``seed``, fp32."""
    torch.manual_seed(seed)
    model = DM2S2(DM2S2Config.default_ads())
    # BERT init gives zero biases and unit LayerNorms; randomise them so that a peer that drops a
    # bias or a LayerNorm affine cannot pass the parity check.
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
    return model.to(device).eval()


def cast_model(model: DM2S2, dtype: torch.dtype) -> DM2S2:
    return model if dtype == torch.float32 else copy.deepcopy(model).to(dtype).eval()


@dataclass
class Workload:
    """One seeded ``ads`` batch in every form the providers take."""

    B: int
    batch: SequenceSet
    N: int  # packed elements
    T: int  # the longest sample: the padded width
    padded: int  # B * T
    group_sizes: list[int]  # elements per sample
    # packed [N, ...], fp32 (``content``) or the bench dtype (``content_t``)
    content: torch.Tensor
    content_t: torch.Tensor
    positions: torch.Tensor
    types: torch.Tensor
    samples: torch.Tensor
    # padded [B, T, ...]
    mask: torch.Tensor
    pad_content: torch.Tensor
    pad_content_t: torch.Tensor
    pad_positions: torch.Tensor
    pad_types: torch.Tensor
    flops: dict = field(default_factory=dict)


@torch.no_grad()
def make_workload(model: DM2S2, B: int, dtype: torch.dtype, seed: int = 0) -> Workload:
    cfg = model.config
    device = model.embeddings.word.weight.device
    batch = ads_batch(B, cfg, seed=seed).to(device)
    layout = batch.layout  # built once here; cached on the batch (the engine reuses it)
    N, d = layout.num_elements, cfg.hidden_size
    emb = model.embeddings
    content = torch.empty(N, d, device=device)
    positions = torch.empty(N, dtype=torch.long, device=device)
    types = torch.empty(N, dtype=torch.long, device=device)
    for m, modality in enumerate(cfg.modalities):
        rows = layout.rows[m]
        if rows.numel() == 0:
            continue
        content[rows] = emb.content(modality, batch.values[modality.name]).float()
        positions[rows] = layout.positions[m]
        types[rows] = m
    samples = layout.element_sample
    cu = layout.cu_seqlens_set.long()
    within = torch.arange(N, device=device) - cu[samples]
    T = max(layout.max_seqlen_set, 1)
    mask = torch.zeros(B, T, dtype=torch.bool, device=device)
    mask[samples, within] = True

    def pad(x, fill=0):
        out = torch.full((B, T) + tuple(x.shape[1:]), fill, dtype=x.dtype, device=device)
        out[samples, within] = x
        return out

    sizes = (cu[1:] - cu[:-1]).tolist()
    work = Workload(
        B=B, batch=batch, N=N, T=T, padded=padded_tokens(batch), group_sizes=sizes,
        content=content, content_t=content.to(dtype), positions=positions, types=types,
        samples=samples, mask=mask, pad_content=pad(content), pad_content_t=pad(content).to(dtype),
        pad_positions=pad(positions), pad_types=pad(types))
    work.flops = count_flops(cfg, work)
    return work


def count_flops(cfg: DM2S2Config, work: Workload) -> dict:
    """Model FLOPs (multiply-add = 2) on the packed tokens; the padded encoder's for comparison."""
    d, I, L, N = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, work.N
    linear = 2 * N * (4 * d * d + 2 * d * I) * L
    if cfg.attention == "set":
        pairs = sum(n * n for n in work.group_sizes)
    else:
        lens = work.batch.layout.cu_seqlens_segment.cpu().long()
        pairs = int(((lens[1:] - lens[:-1]) ** 2).sum())
    attention = 4 * pairs * d * L  # QK^T and PV
    dense = sum(2 * int(work.batch.lengths[m.name].sum()) * m.input_dim * d
                for m in cfg.modalities if m.kind == "dense")
    S, B, a, c = work.batch.layout.num_segments, work.B, cfg.mra_dim, cfg.classifier_dim
    pool = 2 * N * d * a + 2 * N * a + 2 * S * d * a + 2 * S * a + 2 * B * (d * c + c * cfg.num_outputs)
    encoder = linear + attention
    padded = 2 * work.padded * (4 * d * d + 2 * d * I) * L + 4 * B * work.T ** 2 * d * L
    return {"linear": linear, "attention": attention, "encoder": encoder, "embed": dense,
            "pool": pool, "model": encoder + dense + pool, "padded_encoder": padded}


# ---------------------------------------------------------------------------------------------
# Runners
# ---------------------------------------------------------------------------------------------

class Runner:
    """``call()`` is timed; ``hidden(timed)`` gives packed [N, d] hidden states for the parity
    check: from the fp32 copy of the provider (``timed=False``) or from the very object ``call()``
    runs, in the bench dtype (``timed=True``)."""

    scope = "encoder"
    check = True  # compare hidden() with the fp32 reference
    fp32_check = True  # False: only the timed object is checked (flex: one compile per shape)
    info: dict

    def call(self):
        raise NotImplementedError

    def hidden(self, timed: bool = False) -> torch.Tensor:
        raise NotImplementedError


def _layernorm_embed(x, positions, types, emb):
    """``LayerNorm(content + P[pos] + T[type])``: BERT's embedding epilogue, any leading shape."""
    e = x + F.embedding(positions, emb.position.weight) + F.embedding(types, emb.token_type.weight)
    ln = emb.layer_norm
    return F.layer_norm(e, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


class FloorRunner(Runner):
    scope = "floor"
    check = False

    def __init__(self, model: DM2S2, work: Workload, dtype):
        device = work.content.device
        cfg = model.config
        g = torch.Generator(device="cpu").manual_seed(1)
        self.x = torch.randn(work.N, cfg.hidden_size, generator=g).to(device, dtype)
        self.ctx = torch.randn(work.N, cfg.hidden_size, generator=g).to(device, dtype)
        self.inner = torch.randn(work.N, cfg.intermediate_size, generator=g).to(device, dtype)
        self.layers = model.layers
        self.info = {}

    def call(self):
        x, ctx, inner = self.x, self.ctx, self.inner
        for layer in self.layers:  # the GEMMs FastDM2S2 runs, same shapes, same order
            F.linear(x, layer.qkv.weight, layer.qkv.bias)
            F.linear(ctx, layer.attention_output.weight, layer.attention_output.bias)
            F.linear(x, layer.intermediate.weight)
            F.linear(inner, layer.output.weight, layer.output.bias)


class ReferenceRunner(Runner):
    scope = "model"

    def __init__(self, model: DM2S2, model32: DM2S2, work: Workload):
        self.model, self.model32, self.batch = model, model32, work.batch
        self.info = {}

    def call(self):
        return self.model(self.batch)

    def hidden(self, timed=False):
        return (self.model if timed else self.model32)(self.batch).hidden


class EngineRunner(Runner):
    scope = "model"

    def __init__(self, provider: str, model: DM2S2, model32: DM2S2, work: Workload):
        device = work.content.device
        name, *flags = provider.split("+")
        unknown = sorted(set(flags) - {"graphs", "fastlaunch"})
        if unknown:
            raise Skip(f"unknown engine flags {unknown} in {provider!r} (known: +graphs, +fastlaunch)")
        graphs = "graphs" in flags
        # The engine runs every forward (and its graph captures) under its own tuning.
        tuning = Tuning(triton_fast_launch=True) if "fastlaunch" in flags else None
        if graphs and device.type != "cuda":
            raise Skip("CUDA graphs need a CUDA device")
        if name == "auto":
            reason = "auto on CPU is the cpp row" if device.type == "cpu" else None
        else:
            reason = "; ".join(dispatch.reasons(name, "set_attention", device)) or None
        if reason is None and name == "triton" and device.type == "cpu":
            reason = "triton on CPU runs only in the interpreter (TRITON_INTERPRET=1): a test mode, not a benchmark"
        if reason is not None:
            raise Skip(reason)
        try:
            self.engine = FastDM2S2(model, backend=name, tuning=tuning, cuda_graphs=graphs)
            self.engine32 = (FastDM2S2(model32, backend=name, tuning=tuning) if model32 is not model
                             else self.engine)
        except dispatch.BackendUnavailable as exc:
            raise Skip(str(exc)) from None
        self.batch = work.batch
        self.info = {} if tuning is None else {"tuning": {"triton_fast_launch": True}}

    def call(self):
        return self.engine(self.batch)

    def hidden(self, timed=False):
        engine = self.engine if timed else self.engine32
        out = engine(self.batch)
        self.info["ops"] = dict(engine.last_backends)
        return out.hidden


class PoolRunner(Runner):
    """IntraMRA + InterMRA + head on packed hidden states: the engine's ops (backend auto), called
    the way FastDM2S2 calls them (resolved kernel, no re-validation)."""

    scope = "pool"
    check = False

    def __init__(self, model: DM2S2, work: Workload, hidden: torch.Tensor):
        intra, inter, layout = model.intra_mra, model.inter_mra, work.batch.layout
        self.args = (hidden, layout.cu_seqlens_segment, layout.cu_segments_per_sample, intra.proj.weight,
                     intra.proj.bias, intra.score, inter.proj.weight, inter.proj.bias, inter.score)
        self.head = model.head
        name, self.pool = dispatch.resolve("mra_pool", "auto", hidden.device, self.args)
        gelu_args = (torch.empty(1, self.head.hidden.weight.shape[0], device=hidden.device, dtype=hidden.dtype),
                     self.head.hidden.bias)
        gname, self.bias_gelu = dispatch.resolve("bias_gelu", "auto", hidden.device, gelu_args)
        self.info = {"ops": {"mra_pool": name, "bias_gelu": gname}}

    def call(self):
        z, r, alpha, beta = self.pool(*self.args)
        head = self.head
        hidden = self.bias_gelu(F.linear(r, head.hidden.weight), head.hidden.bias)
        return F.linear(hidden, head.out.weight, head.out.bias)


# ---- Hugging Face BertModel -------------------------------------------------------------------

def make_hf_bert(model: DM2S2):
    """A ``transformers.BertModel`` (sdpa, no pooler) holding ``model``'s embedding and encoder weights."""
    try:
        from transformers import BertConfig, BertModel
    except Exception as exc:  # optional extra
        raise Skip(f"transformers not importable: {type(exc).__name__}: {exc}") from None
    cfg = model.config
    if cfg.attention != "set":
        raise Skip("BertModel has no per-modality attention mask")
    if cfg.embedding_layer_norm_eps != cfg.layer_norm_eps:
        raise Skip("BertModel uses one layer_norm_eps for embeddings and layers")
    hf_cfg = BertConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                        intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_positions,
                        type_vocab_size=cfg.num_modalities, hidden_act="gelu",
                        layer_norm_eps=cfg.layer_norm_eps, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, attn_implementation="sdpa")
    try:
        hf_cfg._attn_implementation = "sdpa"
    except Exception:
        pass
    bert = BertModel(hf_cfg, add_pooling_layer=False)
    emb = model.embeddings
    state = {
        "embeddings.word_embeddings.weight": emb.word.weight,
        "embeddings.position_embeddings.weight": emb.position.weight,
        "embeddings.token_type_embeddings.weight": emb.token_type.weight,
        "embeddings.LayerNorm.weight": emb.layer_norm.weight,
        "embeddings.LayerNorm.bias": emb.layer_norm.bias,
    }
    for i, layer in enumerate(model.layers):
        p = f"encoder.layer.{i}."
        for j, name in enumerate(("query", "key", "value")):
            state[p + f"attention.self.{name}.weight"] = layer.qkv.weight.chunk(3)[j]
            state[p + f"attention.self.{name}.bias"] = layer.qkv.bias.chunk(3)[j]
        for module, name in ((layer.attention_output, "attention.output.dense"),
                             (layer.attention_norm, "attention.output.LayerNorm"),
                             (layer.intermediate, "intermediate.dense"),
                             (layer.output, "output.dense"), (layer.output_norm, "output.LayerNorm")):
            state[p + name + ".weight"] = module.weight
            state[p + name + ".bias"] = module.bias
    params = dict(bert.named_parameters())
    missing = sorted(set(params) - set(state))
    unknown = sorted(set(state) - set(params))
    if missing or unknown:
        raise RuntimeError(f"BertModel parameter names changed: missing {missing[:4]}, unknown {unknown[:4]}")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v.detach().to(params[k].dtype))
    device = emb.word.weight.device
    bert = bert.to(device).eval()
    return bert, getattr(bert.config, "_attn_implementation", "?")


class HFRunner(Runner):
    def __init__(self, bert32, bert_t, attn: str, work: Workload):
        import transformers

        self.bert32, self.bert, self.work = bert32, bert_t, work
        self.mask = work.mask.long()
        self.info = {"attn_implementation": attn, "transformers": transformers.__version__,
                     "inputs": "inputs_embeds=content, position_ids, token_type_ids=modality, attention_mask"}

    def _run(self, bert, content):
        w = self.work
        return bert(inputs_embeds=content, attention_mask=self.mask, token_type_ids=w.pad_types,
                    position_ids=w.pad_positions).last_hidden_state

    def call(self):
        return self._run(self.bert, self.work.pad_content_t)

    def hidden(self, timed=False):
        if timed:
            return self._run(self.bert, self.work.pad_content_t)[self.work.mask]
        return self._run(self.bert32, self.work.pad_content)[self.work.mask]


# ---- nn.TransformerEncoder nested-tensor fast path --------------------------------------------

class NestedEncoder(nn.Module):
    """``nn.TransformerEncoder`` holding ``model``'s encoder weights (in ``model``'s dtype), behind
    the same embedding epilogue."""

    def __init__(self, model: DM2S2):
        super().__init__()
        import warnings

        cfg = model.config
        weight = model.embeddings.word.weight
        self.embeddings = model.embeddings
        layer = nn.TransformerEncoderLayer(cfg.hidden_size, cfg.num_heads, cfg.intermediate_size,
                                           dropout=0.0, activation="gelu", layer_norm_eps=cfg.layer_norm_eps,
                                           batch_first=True, norm_first=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            encoder = nn.TransformerEncoder(layer, cfg.num_layers, enable_nested_tensor=True)
        self.warnings = [str(w.message) for w in caught]
        encoder = encoder.to(weight.device, weight.dtype)
        with torch.no_grad():
            for ours, theirs in zip(model.layers, encoder.layers):
                pairs = ((theirs.self_attn.in_proj_weight, ours.qkv.weight),
                         (theirs.self_attn.in_proj_bias, ours.qkv.bias),
                         (theirs.self_attn.out_proj.weight, ours.attention_output.weight),
                         (theirs.self_attn.out_proj.bias, ours.attention_output.bias),
                         (theirs.linear1.weight, ours.intermediate.weight),
                         (theirs.linear1.bias, ours.intermediate.bias),
                         (theirs.linear2.weight, ours.output.weight),
                         (theirs.linear2.bias, ours.output.bias),
                         (theirs.norm1.weight, ours.attention_norm.weight),
                         (theirs.norm1.bias, ours.attention_norm.bias),
                         (theirs.norm2.weight, ours.output_norm.weight),
                         (theirs.norm2.bias, ours.output_norm.bias))
                for dst, src in pairs:
                    dst.copy_(src)
        self.encoder = encoder.eval()
        self.eval()

    def forward(self, content, positions, types, mask):
        x = _layernorm_embed(content, positions, types, self.embeddings)
        return self.encoder(x, src_key_padding_mask=~mask)


class NestedRunner(Runner):
    def __init__(self, enc32: NestedEncoder, enc_t: NestedEncoder, work: Workload):
        self.enc32, self.enc, self.work = enc32, enc_t, work
        self.info = {"use_nested_tensor": bool(getattr(enc_t.encoder, "use_nested_tensor", False)),
                     "warnings": enc_t.warnings[:2]}

    def call(self):
        w = self.work
        return self.enc(w.pad_content_t, w.pad_positions, w.pad_types, w.mask)

    def hidden(self, timed=False):
        w = self.work
        if timed:
            out = self.enc(w.pad_content_t, w.pad_positions, w.pad_types, w.mask)
        else:
            out = self.enc32(w.pad_content, w.pad_positions, w.pad_types, w.mask)
        if out.is_nested:  # older releases hand the nested tensor back
            out = out.to_padded_tensor(0.0, (w.B, w.T, out.size(-1)))
        return out[w.mask]


# ---- ONNX Runtime -----------------------------------------------------------------------------

class PaddedEncoder(nn.Module):
    """The reference's padded encoder (embedding epilogue + layers) as one exportable module."""

    def __init__(self, model: DM2S2):
        super().__init__()
        self.embeddings = model.embeddings
        self.layers = model.layers

    def forward(self, content, positions, types, mask):
        x = _layernorm_embed(content, positions, types, self.embeddings)
        allowed = mask[:, None, :]
        for layer in self.layers:
            x = layer(x, allowed)
        return x


def export_onnx(model: DM2S2, work: Workload, directory: str) -> tuple[str, dict]:
    """Export the padded fp32 encoder with dynamic batch/sequence axes; the exporter that worked."""
    module = PaddedEncoder(model).eval()
    args = (work.pad_content.cpu(), work.pad_positions.cpu(), work.pad_types.cpu(), work.mask.cpu())
    names = ["content", "positions", "types", "mask"]
    path = os.path.join(directory, "encoder.onnx")
    errors = []
    t0 = time.perf_counter()
    try:  # the dynamo exporter (torch >= 2.5 default)
        from torch.export import Dim

        batch, seq = Dim("batch", min=1, max=4096), Dim("seq", min=2, max=model.config.max_positions * 4)
        shapes = ({0: batch, 1: seq},) * 2 + ({0: batch, 1: seq},) * 2
        torch.onnx.export(module, args, path, input_names=names, output_names=["hidden"],
                          dynamic_shapes=shapes, dynamo=True, external_data=False)
        return path, {"exporter": "dynamo", "export_s": round(time.perf_counter() - t0, 1)}
    except Exception as exc:
        errors.append(f"dynamo: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
    t0 = time.perf_counter()
    try:  # the TorchScript exporter
        axes = {n: {0: "batch", 1: "seq"} for n in names}
        axes["hidden"] = {0: "batch", 1: "seq"}
        torch.onnx.export(module, args, path, input_names=names, output_names=["hidden"],
                          dynamic_axes=axes, dynamo=False, opset_version=17)
        return path, {"exporter": "torchscript", "export_s": round(time.perf_counter() - t0, 1),
                      "dynamo_error": errors[0]}
    except Exception as exc:
        errors.append(f"torchscript: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
    raise Skip("ONNX export failed: " + " | ".join(errors))


class OnnxSession:
    """One exported encoder + InferenceSession per benchmark session (dynamic axes serve every B)."""

    def __init__(self, model: DM2S2, work: Workload):
        try:
            import onnxruntime as ort
        except Exception as exc:
            raise Skip(f"onnxruntime not importable: {type(exc).__name__}: {exc}") from None
        self.tmp = tempfile.TemporaryDirectory(prefix="dm2s2_bench_onnx_")
        path, self.info = export_onnx(model, work, self.tmp.name)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        self.info.update({"onnxruntime": ort.__version__, "ort_threads": opts.intra_op_num_threads,
                          "ort_providers": self.session.get_providers()})


class OnnxRunner(Runner):
    def __init__(self, sess: OnnxSession, work: Workload):
        self.session = sess.session
        self.work = work
        self.feeds = {"content": work.pad_content.cpu().numpy(), "positions": work.pad_positions.cpu().numpy(),
                      "types": work.pad_types.cpu().numpy(), "mask": work.mask.cpu().numpy()}
        self.info = dict(sess.info)

    def call(self):
        return self.session.run(None, self.feeds)[0]

    def hidden(self, timed=False):
        return torch.from_numpy(self.call())[self.work.mask.cpu()]


# ---- flex_attention (packed, document mask) ---------------------------------------------------

_FLEX = {}


def _compiled_flex():
    if "fn" not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


class FlexRunner(Runner):
    """The engine's encoder math over the packed tokens, attention by flex_attention with a
    document (same-sample) mask over one [1, H, N, D] sequence. The block mask is built once per
    batch, outside the timing (as the engine's layout is); its build time is in extra_info."""

    def __init__(self, model_t: DM2S2, model32: DM2S2, work: Workload):
        try:
            from torch.nn.attention.flex_attention import create_block_mask
        except Exception as exc:
            raise Skip(f"torch.nn.attention.flex_attention not importable: {exc}") from None
        self.model_t, self.model32, self.work = model_t, model32, work
        # fp32 parity would compile flex a second time per shape: on low precision only the timed
        # object is checked (against the fp32 reference, with the low-precision tolerance).
        self.fp32_check = model_t is model32
        device = work.content.device
        doc = work.samples.to(torch.int32)

        def same_sample(b, h, q, kv):
            return doc[q] == doc[kv]

        t0 = time.perf_counter()
        self.block_mask = create_block_mask(same_sample, None, None, work.N, work.N, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        self.flex = _compiled_flex()
        cfg = model_t.config
        self.H, self.D = cfg.num_heads, cfg.head_dim
        self.info = {"block_mask_ms": round(1e3 * (time.perf_counter() - t0), 2),
                     "block_mask_sparsity": round(float(self.block_mask.sparsity()), 1)
                     if hasattr(self.block_mask, "sparsity") else None}

    def _run(self, model, content):
        w, H, D = self.work, self.H, self.D
        N, d = content.shape
        h = _layernorm_embed(content, w.positions, w.types, model.embeddings)
        for layer in model.layers:
            qkv = F.linear(h, layer.qkv.weight, layer.qkv.bias).view(N, 3, H, D)
            q, k, v = (qkv[:, i].transpose(0, 1).unsqueeze(0) for i in range(3))  # [1, H, N, D]
            ctx = self.flex(q, k, v, block_mask=self.block_mask, scale=D ** -0.5)
            ctx = ctx.squeeze(0).transpose(0, 1).reshape(N, d)
            a = F.linear(ctx, layer.attention_output.weight, layer.attention_output.bias)
            ln = layer.attention_norm
            h = F.layer_norm(h + a, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
            f = F.linear(F.gelu(F.linear(h, layer.intermediate.weight, layer.intermediate.bias)),
                         layer.output.weight, layer.output.bias)
            ln = layer.output_norm
            h = F.layer_norm(h + f, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
        return h

    def call(self):
        return self._run(self.model_t, self.work.content_t)

    def hidden(self, timed=False):
        if timed:
            return self._run(self.model_t, self.work.content_t)
        return self._run(self.model32, self.work.content)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if out.shape != ref.shape:
        return math.inf
    if not torch.isfinite(out).all():
        return math.nan
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))
