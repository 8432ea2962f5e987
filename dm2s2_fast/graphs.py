"""CUDA-graph replay of the engine's forward over shape buckets.

Eagerly, a forward is ~60 kernel launches whose host cost (Python, dispatch, Triton's launcher)
exceeds the GPU time at small batches. A CUDA graph replays them all with one launch, but only for
the shapes it was captured with, and a ragged batch changes shape every call. So each batch is
padded into a *bucket* — a static shape that many batches share — and one graph is kept per bucket
(least recently used evicted past ``max_graphs``).

The padded batch is a valid layout of a larger batch (every op's contract holds as it stands):

- rows: the N real rows, then pad rows up to ``num_elements`` (4 sizes per octave: ≤ 25 % more
  rows, ~10 % on average; the padding is the only extra work that counts, since every GEMM runs
  over it);
- groups (samples): the B real ones, empty ones up to a power of two, then pad samples of at most
  ``PAD_GROUP`` pad rows each (one segment each), then empty ones — so no attention group is larger
  than ``PAD_GROUP`` because of padding;
- segments: the real ones, the pad segments, then zero-length ones up to a fixed count, all owned by
  the last sample (zero-length segments pool to z = 0 on every backend);
- per modality: the real values, then pad entries at position 0 up to a power of two, each
  writing a row of its own past the forward's rows (``embedding_rows``: every op's ``out_rows``
  stay distinct); their ids and features are whatever an earlier batch left there: valid ids and
  finite features, since every batch was validated.

Pad rows start at zero, so everything computed from them stays finite (LayerNorm of a zero row is its bias, with eps > 0, which the config requires): a pad row
can never put a NaN into a real row, even in kernels that mask by multiplying by zero. Real outputs come first in
every output and are sliced out (and copied, since the next replay overwrites the graph's buffers).
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from ._intmath import next_pow2
from .output import DM2S2Output
from .data import HostPlan, SequenceSet

GRAPH_DEVICE_TYPE = "cuda"  # where graphs replay (a CPU test of the engine's dispatch sets "cpu")
PAD_GROUP = 64  # the most pad rows in one pad group/segment; also the floor of the max-length caps


def geometric_step(x: int, bucket_steps: int) -> int:
    """The bucket spacing around ``x``: ``bucket_steps`` sizes per power of two."""
    return max(1, 1 << max(0, x.bit_length() - 1 - int(math.log2(bucket_steps))))


def round_geometric(x: int, bucket_steps: int) -> int:
    step = geometric_step(x, bucket_steps)
    return -(-x // step) * step


@dataclass(frozen=True)
class Bucket:
    """The static shape a graph is captured for; ``bucket_for`` maps a batch to its bucket."""

    num_elements: int  # rows, real + pad (always at least one pad row)
    batch_slots: int  # real + empty samples (a power of two)
    pad_slots: int  # samples that hold the pad rows, PAD_GROUP rows at most each
    modality_rows: tuple[int, ...]  # per modality: entries of its embedding launch
    max_seqlen_set: int
    max_seqlen_segment: int

    @property
    def num_samples(self) -> int:
        return self.batch_slots + self.pad_slots

    @property
    def num_segments(self) -> int:
        return len(self.modality_rows) * self.batch_slots + self.pad_slots

    def fits(self, plan: HostPlan) -> bool:
        N = plan.num_elements
        return (plan.lengths.shape[0] <= self.batch_slots and N < self.num_elements
                and -(-(self.num_elements - N) // PAD_GROUP) <= self.pad_slots
                and all(int(t) <= cap for t, cap in zip(plan.lengths.sum(0), self.modality_rows))
                and _max(plan.totals) <= self.max_seqlen_set
                and _max(plan.segment_lengths) <= self.max_seqlen_segment)


def _max(a: np.ndarray) -> int:
    return int(a.max()) if a.size else 0


def bucket_for(plan: HostPlan, bucket_steps: int = 4) -> Bucket:
    """The bucket of a batch (given its ``layout.host`` plan)."""
    # N + 1 rows at least: the fill always lays out one pad sample.
    num_elements = round_geometric(plan.num_elements + 1, bucket_steps)
    return Bucket(
        num_elements=num_elements,
        batch_slots=next_pow2(plan.lengths.shape[0]),
        # pad rows = num_elements - N <= the step at N + 1 <= the step at num_elements
        pad_slots=-(-geometric_step(num_elements, bucket_steps) // PAD_GROUP),
        modality_rows=tuple(next_pow2(int(t)) for t in plan.lengths.sum(0)),
        max_seqlen_set=max(PAD_GROUP, next_pow2(_max(plan.totals))),
        max_seqlen_segment=max(PAD_GROUP, next_pow2(_max(plan.lengths))),
    )


class PaddedLayout:
    """Static device buffers holding one batch padded into ``bucket``: a ``data.Layout`` (offsets,
    max lengths, ``rows``, ``positions``) plus the padded ``values``. ``fill`` writes a batch in
    place (one host→device copy per index dtype), so a graph captured on these buffers replays on
    every batch of the bucket."""

    def __init__(self, bucket: Bucket, config, value_dtypes: dict, device: torch.device):
        self.bucket = bucket
        self.num_elements = bucket.num_elements
        caps = bucket.modality_rows
        # The rows each modality's pad entries write (its first t of them are never used): after
        # the forward's rows, one range per modality.
        sink_starts = np.cumsum((bucket.num_elements,) + caps)
        self._sinks = tuple(np.arange(start, start + cap) for start, cap in zip(sink_starts, caps))
        self.embedding_rows = int(sink_starts[-1])
        self.max_seqlen_set = bucket.max_seqlen_set
        self.max_seqlen_segment = bucket.max_seqlen_segment
        pin = device.type == "cuda"
        # All int64 index vectors in one buffer, all int32 offsets in another: two copies per fill.
        n64 = 2 * sum(caps)
        n32 = 2 * (bucket.num_samples + 1) + bucket.num_segments + 1
        self._host64 = torch.zeros(n64, dtype=torch.int64, pin_memory=pin)
        self._host32 = torch.zeros(n32, dtype=torch.int32, pin_memory=pin)
        self._dev64 = torch.zeros(n64, dtype=torch.int64, device=device)
        self._dev32 = torch.zeros(n32, dtype=torch.int32, device=device)
        self._copied = torch.cuda.Event() if pin else None  # the staging buffers are free again
        views64 = list(torch.split(self._dev64, [c for c in caps for _ in range(2)]))
        self.rows, self.positions = tuple(views64[0::2]), tuple(views64[1::2])
        self.cu_seqlens_set, self.cu_segments_per_sample, self.cu_seqlens_segment = torch.split(
            self._dev32, [bucket.num_samples + 1, bucket.num_samples + 1, bucket.num_segments + 1])
        self.values = {}
        for modality, cap in zip(config.modalities, caps):
            if modality.kind == "dense":
                self.values[modality.name] = torch.zeros(cap, modality.input_dim, dtype=value_dtypes[modality.name],
                                                         device=device)
            else:
                self.values[modality.name] = torch.zeros(cap, dtype=torch.int64, device=device)

    def fill(self, batch: SequenceSet) -> None:
        plan = batch.layout.host
        bucket = self.bucket
        if not bucket.fits(plan):
            raise ValueError(f"this batch does not fit {bucket}")
        if self._copied is not None:
            self._copied.synchronize()  # the previous fill's copies have read the staging buffers
        n = plan.num_elements
        offset = 0
        host64, host32 = self._host64.numpy(), self._host32.numpy()
        for rows, positions, cap, sink in zip(plan.rows, plan.positions, bucket.modality_rows, self._sinks):
            t = rows.shape[0]
            host64[offset:offset + t] = rows
            host64[offset + t:offset + cap] = sink[t:]
            host64[offset + cap:offset + cap + t] = positions
            host64[offset + cap + t:offset + 2 * cap] = 0
            offset += 2 * cap
        # Pad samples: PAD_GROUP rows each over [n, num_elements), one segment each.
        pad_bounds = np.arange(n, bucket.num_elements, PAD_GROUP)[1:]
        n_pad, B, S = pad_bounds.shape[0] + 1, plan.lengths.shape[0], plan.num_segments
        samples = bucket.num_samples + 1
        cu_set, cu_per_sample, cu_seg = np.split(host32, [samples, 2 * samples])
        cu_set[:B + 1] = plan.cu_seqlens_set
        cu_set[B + 1:bucket.batch_slots + 1] = n
        cu_set[bucket.batch_slots + 1:bucket.batch_slots + n_pad] = pad_bounds
        cu_set[bucket.batch_slots + n_pad:] = bucket.num_elements
        cu_seg[:S + 1] = plan.cu_seqlens_segment
        cu_seg[S + 1:S + n_pad] = pad_bounds
        cu_seg[S + n_pad:] = bucket.num_elements
        cu_per_sample[:B + 1] = plan.cu_segments_per_sample
        cu_per_sample[B + 1:bucket.batch_slots + 1] = S
        cu_per_sample[bucket.batch_slots + 1:bucket.batch_slots + n_pad + 1] = np.arange(S + 1, S + n_pad + 1)
        cu_per_sample[bucket.batch_slots + n_pad + 1:] = S + n_pad
        cu_per_sample[-1] = bucket.num_segments  # the last sample owns the zero-length segments
        self._dev64.copy_(self._host64, non_blocking=True)
        self._dev32.copy_(self._host32, non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        for name, static in self.values.items():
            values = batch.values[name]
            static[:values.shape[0]].copy_(values)

class PackedOutputs:
    """The forward's (logits, r, h, α, β, z) in two flat buffers, the model-dtype tensors and the
    fp32 weights: a call copies its outputs out of a graph in two copies, not six (each copy costs
    a launch of host time, which is what graphs are for saving)."""

    def __init__(self, outputs: tuple[torch.Tensor, ...]):
        logits, r, h, alpha, beta, z = outputs
        self.shapes = tuple(t.shape for t in (logits, r, h, z))
        self.num_alpha = alpha.numel()
        self.values = torch.cat([t.reshape(-1) for t in (logits, r, h, z)])
        self.weights = torch.cat([alpha, beta])

    def result(self, batch: SequenceSet, copy: bool) -> DM2S2Output:
        """The real part, as the unpadded forward returns it (copied when ``copy``: a graph
        overwrites these buffers at its next replay)."""
        values, weights = (self.values.clone(), self.weights.clone()) if copy else (self.values, self.weights)
        layout = batch.layout
        B, N, S = layout.batch_size, layout.num_elements, layout.num_segments
        pieces = torch.split(values, [math.prod(shape) for shape in self.shapes])
        logits, r, h, z = (piece.view(shape)[:n] for piece, shape, n in zip(pieces, self.shapes, (B, B, N, S)))
        return DM2S2Output(logits=logits, pooled=r, hidden=h, intra_weights=weights[:N],
                           inter_weights=weights[self.num_alpha:self.num_alpha + S], segment_pooled=z,
                           layout=layout)


def run_padded(engine, batch: SequenceSet, bucket: Bucket | None = None) -> DM2S2Output:
    """The engine's forward on ``batch`` padded into ``bucket`` (its own by default), eagerly: what
    a captured graph computes, on any device (tests compare it with the unpadded forward)."""
    bucket = bucket or bucket_for(batch.layout.host)
    padded = PaddedLayout(bucket, engine.config, _value_dtypes(engine), batch.device)
    padded.fill(batch)
    with torch.inference_mode():
        return PackedOutputs(engine._run(padded.values, padded, zero_rows=True)).result(batch, copy=False)


def _value_dtypes(engine) -> dict:
    emb = engine.model.embeddings
    return {m.name: emb.dense[m.name].weight.dtype for m in engine.config.modalities if m.kind == "dense"}


@dataclass
class _Graph:
    padded: PaddedLayout
    graph: "torch.cuda.CUDAGraph"
    outputs: PackedOutputs


def check_options(max_graphs: int, bucket_steps: int, graph_max_rows: int | None = None) -> None:
    """The graph options of ``FastDM2S2``, checked whether or not graphs are on."""
    if not isinstance(max_graphs, int) or max_graphs < 1:
        raise ValueError(f"max_graphs must be an integer >= 1, got {max_graphs!r}")
    if bucket_steps not in (1, 2, 4, 8, 16):
        raise ValueError(f"bucket_steps must be 1, 2, 4, 8 or 16, got {bucket_steps!r}")
    if graph_max_rows is not None and (isinstance(graph_max_rows, bool) or not isinstance(graph_max_rows, int)
                                       or graph_max_rows < 1):
        raise ValueError(f"graph_max_rows must be None or an integer >= 1, got {graph_max_rows!r}")


# Bumped whenever any module anywhere (re)registers a parameter, buffer or submodule (``model.head =
# ...``, ``load_state_dict(assign=True)``): the runners then re-collect their model's tensors. Moves
# that keep the Parameter objects (``.to()``, ``.half()``) show in their data pointers instead.
_registrations = 0


def _registered(*_args):
    global _registrations
    _registrations += 1


def _watch_registrations() -> None:
    """Install the global hooks that count registrations (once, when the first runner is made)."""
    global _watching
    if not _watching:
        hooks = torch.nn.modules.module
        hooks.register_module_parameter_registration_hook(_registered)
        hooks.register_module_buffer_registration_hook(_registered)
        hooks.register_module_module_registration_hook(_registered)
        _watching = True


_watching = False
# torch.cuda.graph captures on one process-wide side stream: one capture at a time, all runners.
_CAPTURE_LOCK = threading.Lock()


class CUDAGraphRunner:
    """Runs ``engine`` by graph replay, one graph per bucket (LRU, at most ``max_graphs``).

    All graphs share one memory pool: they run one at a time on the current stream, so each one's
    intermediates may reuse another's. A graph holds the parameters' addresses: in-place updates
    (``load_state_dict``, ``copy_``) are seen by the next replay; when any parameter or buffer moves
    or is replaced (``.to()``, ``.half()`` of a submodule, a new ``nn.Parameter``) every graph is
    dropped and recaptured; ``clear()`` drops them by hand. Calls may come from several threads and
    streams: they run one at a time, each on its caller's stream after the previous call's work, on
    the model's device whatever the current one. ``stats`` counts captures, replays and evictions.
    """

    def __init__(self, engine, max_graphs: int = 32, bucket_steps: int = 4):
        check_options(max_graphs, bucket_steps)
        _watch_registrations()
        self.engine = engine
        self.max_graphs = max_graphs
        self.bucket_steps = bucket_steps
        self.stats = {"captures": 0, "replays": 0, "evictions": 0}
        self._graphs: OrderedDict[Bucket, _Graph] = OrderedDict()
        self._pool = None
        self._tensors: list = []  # the model's parameters and buffers, as of ``_seen``
        self._seen = -1
        self._captured_on = None  # their addresses when the graphs were captured
        self._lock = threading.RLock()
        self._done = None  # an event: the last call's work, output copies included, is queued

    def clear(self) -> None:
        """Drop every graph (and their memory pool); the next batches capture anew."""
        with self._lock:
            self._drop_wait()
            self._graphs.clear()
            self._pool = None

    def _drop_wait(self) -> None:
        # Replays queued on other streams may still read the buffers about to be freed.
        if self._done is not None:
            self._done.synchronize()

    def _addresses(self) -> list:
        if self._seen != _registrations:
            model = self.engine.model
            self._tensors = list(model.parameters()) + list(model.buffers())
            self._seen = _registrations
        return [t.data_ptr() for t in self._tensors]  # a new dtype or device is a new allocation

    def __call__(self, batch: SequenceSet) -> DM2S2Output:
        device = batch.device  # the model's, on CUDA: the engine checked
        # One call at a time (the buffers are shared), and on the device after the previous call's
        # output copies, whichever thread and stream that call came from.
        with self._lock, torch.cuda.device(device):
            stream = torch.cuda.current_stream(device)
            where = self._addresses()
            if where != self._captured_on:
                self.clear()  # waits for the last call's work; the model may be on another device now
                self._done = torch.cuda.Event()
                self._captured_on = where
            stream.wait_event(self._done)
            bucket = bucket_for(batch.layout.host, self.bucket_steps)
            entry = self._graphs.get(bucket)
            if entry is None:
                entry = self._capture(bucket, batch)
            else:
                self._graphs.move_to_end(bucket)
                entry.padded.fill(batch)
            entry.graph.replay()
            self.stats["replays"] += 1
            out = entry.outputs.result(batch, copy=True)
            self._done.record(stream)
            return out

    def _capture(self, bucket: Bucket, batch: SequenceSet) -> _Graph:
        engine = self.engine
        caller = torch.cuda.current_stream()
        padded = PaddedLayout(bucket, engine.config, _value_dtypes(engine), batch.device)
        padded.fill(batch)
        # Warm up off the capture: Triton compiles, cuBLAS picks its kernels and workspace.
        side = torch.cuda.Stream()
        side.wait_stream(caller)
        with torch.cuda.stream(side):
            engine._run(padded.values, padded, zero_rows=True)
        caller.wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: other threads of a server may keep using the GPU while this one captures.
            with _CAPTURE_LOCK, torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                outputs = PackedOutputs(engine._run(padded.values, padded, zero_rows=True))
        except Exception as exc:
            # The graphs already captured stay; this bucket is tried again on its next batch. If the
            # capture's end failed, torch.cuda.graph left this thread on its capture stream.
            torch.cuda.set_stream(caller)
            raise RuntimeError(f"CUDA-graph capture failed for {bucket} (the {len(self._graphs)} graphs "
                               f"captured before are kept): {type(exc).__name__}: {exc}") from exc
        # Evict only now, so that a bucket whose capture fails (out of memory) costs no healthy graph.
        if len(self._graphs) >= self.max_graphs:
            self._drop_wait()
            while len(self._graphs) >= self.max_graphs:
                self._graphs.popitem(last=False)
                self.stats["evictions"] += 1
        entry = self._graphs[bucket] = _Graph(padded, graph, outputs)
        self.stats["captures"] += 1
        return entry
