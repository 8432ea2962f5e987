"""CUDA-graph buckets (dm2s2_fast.graphs).

On CPU: the bucket arithmetic, the padded layout's contract, and the padded forward — what a
captured graph computes — against the unpadded forward, including a buffer refilled with a second
batch. On CUDA: graph replay against the eager engine, buffer reuse across batches of one bucket,
outputs that survive the next replay, and LRU eviction.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import types

import pytest
import torch

import harness
from dm2s2_fast import convert, dispatch, graphs
from dm2s2_fast.data import Layout
from dm2s2_fast.graphs import (PAD_GROUP, Bucket, CUDAGraphRunner, PackedOutputs, PaddedLayout, bucket_for,
                               round_geometric, run_padded)
from dm2s2_fast.ops._checks import check_offsets, max_group
from helpers import (FP32_TOL, fp64_reference, random_batch, random_model, rel_err, require_backend, skip_unless_cuda,
                     small_config)

FIELDS = ("logits", "pooled", "hidden", "intra_weights", "inter_weights", "segment_pooled")


def _plan(batch):
    return batch.layout.host


def _roomier(bucket: Bucket, rows: int = 300) -> Bucket:
    """A bucket that fits ``bucket``'s batches and any smaller ones, with ``rows`` more pad rows."""
    num_elements = bucket.num_elements + rows
    return dataclasses.replace(
        bucket, num_elements=num_elements, batch_slots=2 * bucket.batch_slots,
        pad_slots=-(-num_elements // PAD_GROUP), modality_rows=tuple(2 * c for c in bucket.modality_rows),
        max_seqlen_set=2 * bucket.max_seqlen_set, max_seqlen_segment=2 * bucket.max_seqlen_segment)


# ------------------------------------------------------------------------------ bucket arithmetic

@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_round_geometric_bounds_the_padding(steps):
    previous = 0
    for x in range(1, 5000):
        cap = round_geometric(x, steps)
        assert x <= cap <= x + x / steps, (x, cap)  # at most 1/steps more
        assert cap >= previous  # monotone: a bigger batch never gets a smaller bucket
        assert round_geometric(cap, steps) == cap  # caps are fixed points
        previous = cap
    assert len({round_geometric(x, steps) for x in range(1025, 2049)}) == steps


def test_bucket_fits_its_batches():
    config = small_config()
    for seed in range(40):
        B = 1 + seed % 13
        batch = random_batch(config, B, seed, max_len=8 + seed)
        bucket = bucket_for(_plan(batch))
        padded = PaddedLayout(bucket, config, {"image": torch.float32}, torch.device("cpu"))
        padded.fill(batch)  # raises if the batch does not fit
        assert bucket.batch_slots >= B and bucket.num_elements > batch.layout.num_elements
        assert bucket.max_seqlen_set >= max(PAD_GROUP, batch.layout.max_seqlen_set)


def test_padded_layout_keeps_every_op_contract():
    config = small_config()
    batch = random_batch(config, 7, 3, max_len=30)
    big = _roomier(bucket_for(_plan(batch)))  # many pad rows and groups
    padded = PaddedLayout(big, config, {"image": torch.float32}, torch.device("cpu"))
    padded.fill(batch)
    assert isinstance(padded, Layout) and isinstance(batch.layout, Layout)  # the protocol the engine runs on
    n = padded.num_elements
    assert n - batch.layout.num_elements > 2 * PAD_GROUP
    like = torch.empty(0)
    assert check_offsets("cu_seqlens_set", padded.cu_seqlens_set, n, like) == big.num_samples
    assert check_offsets("cu_seqlens_segment", padded.cu_seqlens_segment, n, like) == big.num_segments
    assert check_offsets("cu_segments_per_sample", padded.cu_segments_per_sample, big.num_segments, like) == \
        big.num_samples
    assert max_group(padded.cu_seqlens_set) <= padded.max_seqlen_set
    assert max_group(padded.cu_seqlens_segment) <= padded.max_seqlen_segment
    # Pad rows sit in groups of at most PAD_GROUP: padding never makes a long attention group.
    pad_groups = padded.cu_seqlens_set[big.batch_slots:]
    assert max_group(pad_groups) <= PAD_GROUP
    written = torch.cat(padded.rows)
    assert int(written.min()) >= 0 and int(written.max()) < padded.embedding_rows
    # Every real row is written exactly once by its modality; pad entries write distinct rows of
    # their own past the forward's n rows (every embed_layernorm call's out_rows are distinct).
    assert written.unique().numel() == written.numel()
    real = written[written < batch.layout.num_elements]
    assert torch.equal(real.sort().values, torch.arange(batch.layout.num_elements))
    assert int(written[written >= batch.layout.num_elements].min()) >= n
    for positions in padded.positions:
        assert positions.numel() == 0 or int(positions.max()) < config.max_positions


def test_bucket_errors():
    config = small_config()
    small = random_batch(config, 2, 0, max_len=8)
    large = random_batch(config, 30, 1, max_len=40)
    padded = PaddedLayout(bucket_for(_plan(small)), config, {"image": torch.float32}, torch.device("cpu"))
    with pytest.raises(ValueError, match="does not fit"):
        padded.fill(large)
    model = random_model(config)
    with pytest.raises(ValueError, match="cuda_graphs=True needs the model on a CUDA device"):
        convert(model, "torch", cuda_graphs=True)
    with pytest.raises(ValueError, match="max_graphs"):
        CUDAGraphRunner(object(), max_graphs=0)
    with pytest.raises(ValueError, match="bucket_steps"):
        CUDAGraphRunner(object(), bucket_steps=3)
    # The options are checked whether or not graphs are on.
    with pytest.raises(ValueError, match="bucket_steps must be 1, 2, 4, 8 or 16, got 3"):
        convert(model, "torch", bucket_steps=3)
    with pytest.raises(ValueError, match="max_graphs must be an integer >= 1, got 0"):
        convert(model, "torch", max_graphs=0)
    for bad in (0, -1, 1.5, True, "8"):
        with pytest.raises(ValueError, match="graph_max_rows must be None or an integer >= 1"):
            convert(model, "torch", graph_max_rows=bad)


def test_batches_past_graph_max_rows_run_eagerly(monkeypatch):
    """A graph saves launches, not GPU time: batches of more than ``graph_max_rows`` rows skip the
    runner (no padding) and pick auto's eager kernels; smaller ones replay; None replays all."""
    config = small_config()
    model = random_model(config, 2)
    small, large = random_batch(config, 2, 0, max_len=8), random_batch(config, 30, 1, max_len=40)
    assert small.num_elements < 100 < large.num_elements
    engine = convert(model, "auto", graph_max_rows=100)
    with pytest.raises(ValueError, match="replays CUDA graphs but its model is now on cpu"):
        engine.graphs = lambda batch: None
        engine(large)  # large batches included
    monkeypatch.setattr(graphs, "GRAPH_DEVICE_TYPE", "cpu")  # as if this CPU model were on CUDA
    replayed = []
    engine.graphs = lambda batch: replayed.append(batch) or "replayed"  # a runner that records
    orders = []
    resolve = dispatch.resolve
    monkeypatch.setattr(dispatch, "resolve", lambda *a, **k: orders.append(k["graphs"]) or resolve(*a, **k))
    assert engine(small) == "replayed" and replayed == [small] and not orders
    out = engine(large)
    assert replayed == [small] and orders and not any(orders)  # eager, with the eager order
    expected = convert(model, "auto")(large)
    for f in FIELDS:
        assert torch.equal(getattr(out, f), getattr(expected, f)), f
    engine.graph_max_rows = None
    assert engine(large) == "replayed" and replayed == [small, large]


class _FakeCuda:
    """torch.cuda as the runner sees it, on CPU: a 'capture' runs the forward eagerly and a replay
    does nothing, so only the runner's own logic is exercised (buckets, LRU, failures, streams)."""

    def __init__(self):
        self.current, self.fail_capture, self.calls = "caller", False, []
        fake = self

        class Event:
            def record(self, stream=None): fake.calls.append("record")
            def synchronize(self): fake.calls.append("synchronize")

        class Graph:
            def replay(self): fake.calls.append("replay")

        self.Event, self.CUDAGraph = Event, Graph

    @staticmethod
    def _stream(name):
        return types.SimpleNamespace(wait_event=lambda e: None, wait_stream=lambda s: None, name=name)

    def Stream(self):  # noqa: N802 - torch.cuda's name
        return self._stream("side")

    def current_stream(self, device=None):
        return self._stream(self.current)

    def graph_pool_handle(self):
        return object()

    @contextlib.contextmanager
    def stream(self, s):
        yield

    @contextlib.contextmanager
    def device(self, d):
        self.calls.append(f"device {d}")
        yield

    @contextlib.contextmanager
    def graph(self, g, pool=None, capture_error_mode=None):
        self.current = "capture"  # torch.cuda.graph moves the thread to its capture stream
        yield
        if self.fail_capture:  # as if capture_end failed: torch leaves the capture stream current
            raise RuntimeError("capture failed")
        self.current = "caller"

    def set_stream(self, s):
        self.current = s.name


def test_runner_logic_with_a_simulated_cuda(monkeypatch):
    """The GPU-only runner logic, run here: one capture per new bucket, LRU eviction only after a
    capture succeeds, a failed capture keeps the other graphs and restores the caller's stream, a
    replaced parameter drops every graph, and every call runs under the model's device."""
    import dm2s2_fast.graphs as G
    fake = _FakeCuda()
    monkeypatch.setattr(G, "torch", types.SimpleNamespace(**{**{k: getattr(torch, k) for k in dir(torch)
                                                                if not k.startswith("__")}, "cuda": fake}))
    config = small_config()
    model = random_model(config, 1)
    runner = G.CUDAGraphRunner(convert(model, "torch"), max_graphs=2)
    batches = [random_batch(config, B, B, max_len=30) for B in (2, 9, 40)]
    with torch.inference_mode():
        for i in (0, 1, 0, 2):
            runner(batches[i])
        assert runner.stats == {"captures": 3, "replays": 4, "evictions": 1}, runner.stats
        assert f"device {batches[0].device}" in fake.calls
        kept = list(runner._graphs)
        fake.fail_capture = True
        with pytest.raises(RuntimeError, match="CUDA-graph capture failed for Bucket"):
            runner(batches[1])  # evicted above: a new capture, which fails
        assert list(runner._graphs) == kept and runner.stats["evictions"] == 1
        assert fake.current == "caller"
        fake.fail_capture = False
        runner(batches[1])
        assert runner.stats["captures"] == 4 and runner.stats["evictions"] == 2  # the failure is no capture
        model.head.out.weight = torch.nn.Parameter(model.head.out.weight.detach().clone())
        runner(batches[1])  # every graph dropped, this one captured again
        assert runner.stats["captures"] == 5 and len(runner._graphs) == 1


def test_runner_sees_every_parameter_that_moves_or_is_replaced():
    """Graphs hold addresses: a runner drops them when any parameter's storage changes (a moved
    submodule, a new Parameter object, a new submodule), not when values change in place."""
    model = random_model(small_config(), 3)
    runner = CUDAGraphRunner(convert(model, "torch"))  # no CUDA work until a call
    before = runner._addresses()
    assert len(before) == len(list(model.parameters())) + len(list(model.buffers()))
    with torch.no_grad():
        model.head.out.weight.mul_(2.0)  # in place: the graphs read the new values
    assert runner._addresses() == before
    model.embeddings.dense["image"].double()  # one submodule's storage only
    moved = runner._addresses()
    assert moved != before
    model.head.out.weight = torch.nn.Parameter(model.head.out.weight.detach().clone())
    replaced = runner._addresses()
    assert replaced != moved
    model.head.hidden = torch.nn.Linear(model.head.hidden.in_features, model.head.hidden.out_features)
    assert runner._addresses() != replaced


# ------------------------------------------------------------------------------ padded forward

CPU_BACKENDS = [name for name in ("torch", "cpp", "triton") if "cpu" in harness.devices_of(name)]


def _assert_matches(out, ref, tol, what):
    for field in FIELDS:
        a, b = getattr(out, field), getattr(ref, field)
        assert a.shape == b.shape, (what, field, tuple(a.shape), tuple(b.shape))
        err = rel_err(a.float().cpu(), b.double().cpu())
        assert err <= tol, f"{what} {field}: {err:.2e} > {tol:.1e}"


def _assert_as_accurate(out, eager, oracle, what):
    """docs/numerics.md with the eager engine as the in-dtype reference: each field of ``out`` (a graph
    replay) within 2x the eager forward's own error against the fp64 oracle (1e-5 at least, 2e-2
    at most)."""
    for field in FIELDS:
        a, b, ref = (getattr(o, field) for o in (out, eager, oracle))
        assert a.shape == b.shape == ref.shape, (what, field, tuple(a.shape), tuple(b.shape), tuple(ref.shape))
        bound = min(2e-2, max(FP32_TOL, 2 * rel_err(b.float(), ref)))
        err = rel_err(a.float(), ref)
        assert err <= bound, f"{what} {field}: {err:.2e} > {bound:.2e} (2x the eager forward's error)"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("attention", ["set", "modality"])
def test_padded_forward_matches_unpadded(backend, attention):
    require_backend(backend, "cpu", "set_attention")
    config = small_config(attention)
    engine = convert(random_model(config, 5), backend)
    batch = random_batch(config, 6, 5, max_len=24)
    ref = engine(batch)
    _assert_matches(run_padded(engine, batch), ref, FP32_TOL, f"{backend}/{attention} own bucket")
    roomy = _roomier(bucket_for(_plan(batch)))
    _assert_matches(run_padded(engine, batch, roomy), ref, FP32_TOL, f"{backend}/{attention} larger bucket")


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_padded_buffers_refilled_with_another_batch(backend):
    """What a graph replay relies on: a second fill leaves nothing of the first batch behind."""
    require_backend(backend, "cpu", "set_attention")
    config = small_config()
    engine = convert(random_model(config, 8), backend)
    first = random_batch(config, 9, 8, max_len=30)
    second = random_batch(config, 5, 9, max_len=30)
    bucket = _roomier(bucket_for(_plan(first)))
    padded = PaddedLayout(bucket, config, {"image": torch.float32}, torch.device("cpu"))
    for batch in (first, second):
        padded.fill(batch)
        with torch.inference_mode():
            static = engine._run(padded.values, padded, zero_rows=True)
        for t in static:  # pad rows included: nothing non-finite anywhere, so nothing can leak
            assert torch.isfinite(t).all()
        packed = PackedOutputs(static)
        got = packed.result(batch, copy=True)
        _assert_matches(got, engine(batch), FP32_TOL, backend)
        # copies: the next replay may overwrite the packed buffers
        assert got.hidden.untyped_storage().data_ptr() != packed.values.untyped_storage().data_ptr()
        assert got.intra_weights.untyped_storage().data_ptr() != packed.weights.untyped_storage().data_ptr()


def test_padded_forward_of_empty_samples():
    config = small_config()
    engine = convert(random_model(config, 2), "torch")
    lengths = torch.zeros(3, config.num_modalities, dtype=torch.int64)
    lengths[1, 0] = 1
    batch = random_batch(config, 3, 2, lengths=lengths)
    _assert_matches(run_padded(engine, batch), engine(batch), FP32_TOL, "one element in three samples")
    empty = random_batch(config, 2, 2, lengths=torch.zeros(2, config.num_modalities, dtype=torch.int64))
    _assert_matches(run_padded(engine, empty), engine(empty), FP32_TOL, "no elements")


# ------------------------------------------------------------------------------ CUDA graphs

def _gpu_cases():
    for backend in ("cuda", "triton", "torch"):
        for dtype in (torch.float32, torch.bfloat16):
            yield pytest.param(backend, dtype, marks=pytest.mark.cuda, id=f"{backend}-{str(dtype)[6:]}")


@pytest.mark.parametrize("backend,dtype", list(_gpu_cases()))
@pytest.mark.parametrize("attention", ["set", "modality"])
def test_graph_replay_matches_eager(backend, dtype, attention):
    require_backend(backend, "cuda", "set_attention")
    config = small_config(attention)
    model = copy.deepcopy(random_model(config, 11)).to(device="cuda", dtype=dtype)
    eager = convert(model, backend)
    graphed = convert(model, backend, cuda_graphs=True, max_graphs=2)
    first = random_batch(config, 9, 11, max_len=30).to("cuda")
    # Same bucket, other layout and values: the samples' lengths shuffled, fresh values.
    shuffled = first.layout.lengths[torch.randperm(9, generator=torch.Generator().manual_seed(0))]
    same_bucket = random_batch(config, 9, 12, lengths=shuffled)
    assert bucket_for(_plan(same_bucket)) == bucket_for(_plan(first))
    assert not torch.equal(same_bucket.layout.lengths, first.layout.lengths)
    other = random_batch(config, 3, 13, max_len=10).to("cuda")
    kept = graphed(first)
    kept_copy = {f: getattr(kept, f).clone() for f in FIELDS}
    for batch in (first, same_bucket.to("cuda"), other, first):
        _assert_as_accurate(graphed(batch), eager(batch), fp64_reference(model, batch), f"graph {backend}/{dtype}")
    for f in FIELDS:  # later replays did not overwrite what the first call returned
        assert torch.equal(getattr(kept, f), kept_copy[f]), f
    stats = graphed.graphs.stats
    assert stats["captures"] == 2 and stats["replays"] == 5 and stats["evictions"] == 0, stats
    third = random_batch(config, 40, 14, max_len=40).to("cuda")
    _assert_as_accurate(graphed(third), eager(third), fp64_reference(model, third), "third bucket")
    assert graphed.graphs.stats["evictions"] == 1 and len(graphed.graphs._graphs) == 2
    with torch.no_grad():  # in place: the captured graphs see the new values
        model.layers[0].intermediate.weight.mul_(0.5)
    _assert_as_accurate(graphed(third), eager(third), fp64_reference(model, third), "after an in-place update")
    captures = graphed.graphs.stats["captures"]
    moved = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
    model.to(moved)  # new storage for every parameter: the graphs must be recaptured
    _assert_as_accurate(graphed(third), eager(third), fp64_reference(model, third), "after .to()")
    assert graphed.graphs.stats["captures"] == captures + 1
    model.cpu()  # graphs cannot follow it there: a clear error, not a stale replay
    with pytest.raises(ValueError, match="replays CUDA graphs but its model is now on cpu"):
        graphed(third.to("cpu"))


def test_graph_replay_on_the_ads_batch():
    skip_unless_cuda()
    from dm2s2_fast import DM2S2Config
    from dm2s2_fast.reference import DM2S2
    from dm2s2_fast.workloads import ads_batch

    config = DM2S2Config.default_ads()
    torch.manual_seed(0)
    model = DM2S2(config).eval().to(device="cuda", dtype=torch.bfloat16)
    # graph_max_rows=None: B=256 (27k rows) replays too, where by default it runs eagerly
    eager, graphed = convert(model), convert(model, cuda_graphs=True, graph_max_rows=None)
    for B in (1, 64, 256):
        batch = ads_batch(B, config, seed=B).to("cuda")
        _assert_as_accurate(graphed(batch), eager(batch), fp64_reference(model, batch), f"ads B={B}")
    assert graphed.graphs.stats["replays"] == 3
    default = convert(model, cuda_graphs=True)
    default(batch)
    assert batch.num_elements > default.graph_max_rows and default.graphs.stats["replays"] == 0
    assert default.last_backends == eager.last_backends  # the eager kernels, not the graph order
    # auto under graphs takes the kernels of least GPU time (auto_order.json's cuda_graphs order)
    for op in graphed.last_backends:
        want = dispatch.resolve(op, "auto", "cuda", graphs=True)[0]
        assert graphed.last_backends[op] == want, (op, graphed.last_backends)
        assert eager.last_backends[op] == dispatch.resolve(op, "auto", "cuda")[0], (op, eager.last_backends)
    if not dispatch.reasons("triton", "set_attention", "cuda"):
        assert graphed.last_backends["set_attention"] == "triton"


def test_graph_replay_across_streams_and_threads():
    """Calls from other streams and threads run one at a time, after the previous call's work."""
    skip_unless_cuda()
    import threading

    config = small_config()
    model = copy.deepcopy(random_model(config, 15)).to(device="cuda", dtype=torch.bfloat16)
    eager, graphed = convert(model), convert(model, cuda_graphs=True)
    batches = [random_batch(config, 9, seed, max_len=30).to("cuda") for seed in range(16, 22)]
    expected = [eager(b) for b in batches]
    oracles = [fp64_reference(model, b) for b in batches]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for i, batch in enumerate(batches):  # one thread, alternating streams, no syncs in between
        with torch.cuda.stream(streams[i % 2]):
            out = graphed(batch)
        torch.cuda.current_stream().wait_stream(streams[i % 2])
        _assert_as_accurate(out, expected[i], oracles[i], f"stream {i % 2}, batch {i}")
    results, errors = {}, []

    def worker(k):
        try:
            with torch.cuda.stream(torch.cuda.Stream()):
                for rep in range(3):
                    for i in range(k, len(batches), 2):
                        results[(k, rep, i)] = graphed(batches[i])
                torch.cuda.current_stream().synchronize()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 3 * len(batches)
    for (k, rep, i), out in results.items():
        _assert_as_accurate(out, expected[i], oracles[i], f"thread {k}, round {rep}, batch {i}")


@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
def test_forward_never_waits_for_the_gpu(backend):
    """With the layout built, an eager forward queues its work without one host-device sync (what
    lets the host run ahead, and what graph capture needs)."""
    require_backend(backend, "cuda", "set_attention")
    config = small_config()
    model = copy.deepcopy(random_model(config, 17)).to(device="cuda", dtype=torch.bfloat16)
    engine = convert(model, backend)
    batch = random_batch(config, 7, 17, max_len=30).to("cuda")
    engine(batch)  # compiles, builds the layout
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        engine(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
