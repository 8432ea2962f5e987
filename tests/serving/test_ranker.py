"""dm2s2_fast.serving.Ranker: batching, isolation, back-pressure, ordering, threads, asyncio, refresh.

No test times anything: where an order of events matters, a gate in a wrapper around the engine
holds the worker inside a call (``Gate``), so that requests queue behind it deterministically.
Every wait has a generous bound (``WAIT``) so that a loaded machine slows the tests, not fails them.
"""
from __future__ import annotations

import asyncio
import contextvars
import copy
import random
import threading
import time

import pytest
import torch

import dm2s2_fast as dm
from dm2s2_fast import SequenceSet
from dm2s2_fast.graphs import round_geometric
from dm2s2_fast.serving import EngineFailed, Overloaded, Ranker, RankerClosed, RequestTimeout

from conftest import FP32_TOL, fp64_reference, random_batch, random_model, rel_err, small_config

WAIT = 60.0  # seconds: an upper bound for anything that should happen at once


class Gate:
    """Wraps an engine: counts and records its calls (batch sizes), holds them while closed, and
    raises ``fail`` on the call numbered ``fail_call`` (1-based)."""

    def __init__(self, engine):
        self.engine, self.config, self.model = engine, engine.config, engine.model
        self.open = threading.Event()
        self.open.set()
        self.entered = threading.Semaphore(0)
        self.calls: list[int] = []
        self.fail_call, self.fail = None, None

    def hold(self):  # (call while the worker is idle) the next call waits for release()
        self.entered = threading.Semaphore(0)
        self.open.clear()

    def release(self):
        self.open.set()

    def wait_entered(self):
        assert self.entered.acquire(timeout=WAIT), "the worker never called the engine"

    def __call__(self, batch):
        self.calls.append(batch.batch_size)
        self.entered.release()
        assert self.open.wait(WAIT), "the gate was never released"
        if len(self.calls) == self.fail_call:
            raise self.fail
        return self.engine(batch)


@pytest.fixture(scope="module")
def setup():
    config = small_config()
    model = random_model(config)
    engine = dm.convert(model)
    pool = [random_batch(config, B, seed=100 + i) for i, B in enumerate([1, 3, 5, 8, 2, 12, 7, 4])]
    alone = [engine(b).logits.clone() for b in pool]  # each request scored by itself
    return config, model, engine, pool, alone


def jagged(batch: SequenceSet) -> dict:
    return {name: (batch.values[name], batch.lengths[name]) for name in batch.values}


def samples(batch: SequenceSet) -> list[dict]:
    """The same batch as one dict per candidate (from_samples' input)."""
    out = [dict() for _ in range(batch.batch_size)]
    for name, values in batch.values.items():
        for b, part in enumerate(torch.split(values, batch.lengths[name].tolist())):
            if part.shape[0]:
                out[b][name] = part
    return out


def test_requests_that_arrive_together_are_one_batch_and_score_as_alone(setup):
    config, model, engine, pool, alone = setup
    gate = Gate(engine)
    with Ranker(gate, max_batch_rows=100_000) as ranker:
        gate.hold()
        first = ranker.submit(pool[0])
        gate.wait_entered()  # the worker is inside the engine with the first request
        # Three forms of request, of different sizes, queue behind it.
        futures = [ranker.submit(pool[1]), ranker.submit(samples(pool[3])), ranker.submit(jagged(pool[5])),
                   ranker.submit(pool[2])]
        gate.release()
        results = [f.result(WAIT) for f in futures]
        assert first.result(WAIT).shape == (1, config.num_outputs)
        ids = {f.batch_id for f in futures}
        assert len(ids) == 1 and first.batch_id not in ids, "the queued requests were not batched together"
        assert gate.calls == [1, 3 + 8 + 12 + 5]
        stats = ranker.stats()
        assert stats["batch_requests"] == {1: 1, 4: 1} and stats["served"] == 5
    for i, got in zip([1, 3, 5, 2], results):
        assert got.shape == (pool[i].batch_size, config.num_outputs)
        assert rel_err(got, alone[i]) <= FP32_TOL
        assert rel_err(got, fp64_reference(model, pool[i]).logits) <= FP32_TOL


def test_batches_respect_max_batch_rows_and_order(setup):
    config, model, engine, pool, alone = setup
    gate = Gate(engine)
    rows = [b.num_elements for b in pool]
    cap = rows[1] + rows[2]  # exactly two of the queued ones fit
    with Ranker(gate, max_batch_rows=cap) as ranker:
        gate.hold()
        first = ranker.submit(pool[0])
        gate.wait_entered()
        futures = [ranker.submit(pool[i]) for i in (1, 2, 3)]
        gate.release()
        for i, f in zip((1, 2, 3), futures):
            assert rel_err(f.result(WAIT), alone[i]) <= FP32_TOL
        first.result(WAIT)
    assert futures[0].batch_id == futures[1].batch_id != futures[2].batch_id
    assert gate.calls == [1, 3 + 5, 8]  # in submission order; the third did not fit


def test_a_request_larger_than_a_batch_runs_alone(setup):
    config, model, engine, pool, alone = setup
    with Ranker(engine, max_batch_rows=1) as ranker:
        assert rel_err(ranker.score(pool[5]), alone[5]) <= FP32_TOL


def test_scores_come_back_in_the_request_order(setup):
    config, model, engine, pool, alone = setup
    candidates = samples(pool[5])
    order = list(range(len(candidates)))
    random.Random(0).shuffle(order)
    with Ranker(engine) as ranker:
        straight = ranker.score(candidates)
        shuffled = ranker.score([candidates[i] for i in order])
        single = torch.cat([ranker.score([c]) for c in candidates])
    assert rel_err(straight, alone[5]) <= FP32_TOL
    assert rel_err(shuffled, straight[order]) <= FP32_TOL
    assert rel_err(single, straight) <= FP32_TOL


def test_a_malformed_request_fails_alone_at_submission(setup):
    config, model, engine, pool, alone = setup
    gate = Gate(engine)
    good = samples(pool[3])
    bad_cases = {
        "id out of range": ([dict(good[0]), {"title": [3, 101]}], ["'title'", "candidate 1", "out of range"]),
        "NaN feature": ([{"image": torch.full((2, 6), float("nan"))}], ["'image'", "candidate 0", "finite"]),
        "feature width": ([{"title": [1]}, {"title": [2]}, {"image": torch.zeros(3, 5)}], ["'image'", "candidate 2"]),
        "unknown modality": ([{"title": [1]}, {"audio": [1]}], ["candidate 1", "'audio'"]),
        "not a request": (42, ["int"]),
        "jagged lengths": ({"title": (torch.tensor([1, 2, 3]), torch.tensor([1, 1]))}, ["'title'", "sum to 2"]),
    }
    with Ranker(gate) as ranker:
        gate.hold()
        held = ranker.submit(pool[0])
        gate.wait_entered()
        queued = ranker.submit(good)
        for label, (request, words) in bad_cases.items():
            with pytest.raises(ValueError) as info:
                ranker.submit(request)
            for word in words:
                assert word in str(info.value), (label, str(info.value))
        gate.release()
        assert rel_err(queued.result(WAIT), alone[3]) <= FP32_TOL
        held.result(WAIT)
        stats = ranker.stats()
    assert stats["invalid"] == len(bad_cases) and stats["submitted"] == 2 and stats["served"] == 2
    assert gate.calls == [1, 8]  # no malformed request reached the engine


def test_an_engine_exception_fails_only_its_batch_and_the_worker_goes_on(setup):
    config, model, engine, pool, alone = setup
    gate = Gate(engine)
    boom = RuntimeError("boom")
    gate.fail_call, gate.fail = 2, boom
    with Ranker(gate) as ranker:
        gate.hold()
        before = ranker.submit(pool[0])
        gate.wait_entered()
        doomed = [ranker.submit(pool[1]), ranker.submit(pool[2])]  # one batch: call 2, which fails
        gate.release()
        assert rel_err(before.result(WAIT), alone[0]) <= FP32_TOL
        for f in doomed:
            with pytest.raises(EngineFailed, match="boom") as info:
                f.result(WAIT)
            assert info.value.__cause__ is boom
        after = ranker.score(pool[4])  # the worker is still serving
        assert rel_err(after, alone[4]) <= FP32_TOL
        stats = ranker.stats()
    assert stats["failed"] == 2 and stats["served"] == 2


def test_timeouts(setup):
    config, model, engine, pool, alone = setup
    gate = Gate(engine)
    with Ranker(gate, timeout_ms=None) as ranker:
        gate.hold()
        held = ranker.submit(pool[0])
        gate.wait_entered()
        # A caller that waits gives up at its deadline; its request, still queued, is cancelled.
        with pytest.raises(RequestTimeout, match="never ran"):
            ranker.score(pool[1], timeout_ms=50)
        # A future nobody waits on expires in the queue: the worker drops it without running it.
        expired = ranker.submit(pool[2], timeout_ms=1)
        time.sleep(0.05)
        kept = ranker.submit(pool[3], timeout_ms=WAIT * 1e3)
        gate.release()
        with pytest.raises(RequestTimeout, match="not run"):
            expired.result(WAIT)
        assert rel_err(kept.result(WAIT), alone[3]) <= FP32_TOL
        held.result(WAIT)
        stats = ranker.stats()
    assert gate.calls == [1, 8], "a timed-out request reached the engine"
    assert stats["timed_out"] == 1 and stats["cancelled"] == 1 and stats["served"] == 2


def test_a_running_request_past_its_deadline_times_out_for_its_caller(setup):
    config, model, engine, pool, alone = setup
    gate = Gate(engine)
    outcome = {}

    def caller():
        try:
            ranker.score(pool[1], timeout_ms=1000)
        except RequestTimeout as exc:
            outcome["error"], outcome["at"] = exc, time.monotonic()

    with Ranker(gate) as ranker:
        gate.hold()
        thread = threading.Thread(target=caller)
        thread.start()
        gate.wait_entered()  # the worker runs the request (and holds it)
        entered = time.monotonic()
        thread.join(WAIT)
        if entered < outcome["at"] - 0.5:  # (a loaded machine may take the worker past the deadline)
            assert "was running" in str(outcome["error"])
        gate.release()
        assert rel_err(ranker.score(pool[2]), alone[2]) <= FP32_TOL
        assert ranker.stats()["served"] == 2  # the abandoned request still ran to completion


def test_a_full_queue_raises_overloaded(setup):
    config, model, engine, pool, alone = setup
    gate = Gate(engine)
    with Ranker(gate, max_queue=2) as ranker:
        gate.hold()
        held = ranker.submit(pool[0])
        gate.wait_entered()
        queued = [ranker.submit(pool[1]), ranker.submit(pool[2])]
        with pytest.raises(Overloaded, match="queue is full"):
            ranker.submit(pool[3])
        gate.release()
        for i, f in zip((1, 2), queued):
            assert rel_err(f.result(WAIT), alone[i]) <= FP32_TOL
        held.result(WAIT)
        assert rel_err(ranker.score(pool[3]), alone[3]) <= FP32_TOL  # room again
        assert ranker.stats()["overloaded"] == 1


def test_admission_control_refuses_a_request_whose_estimated_wait_is_over_budget(setup):
    config, model, engine, pool, alone = setup
    gate = Gate(engine)
    with Ranker(gate, max_wait_ms=0.0) as ranker:
        ranker.score(pool[0])  # measures the cost per row
        gate.hold()
        held = ranker.submit(pool[1])  # an idle worker: no wait, accepted
        gate.wait_entered()
        accepted, refused = [], []
        for i in (2, 3, 4):
            try:
                accepted.append((i, ranker.submit(pool[i])))
            except Overloaded as exc:
                refused.append((i, str(exc)))
        # Once one request is queued, the next one's estimated wait is > 0: refused.
        assert refused and refused[-1][0] == 4 and "estimated wait" in refused[-1][1], refused
        gate.release()
        for i, f in accepted:
            assert rel_err(f.result(WAIT), alone[i]) <= FP32_TOL
        held.result(WAIT)


def test_a_latency_objective_refuses_what_would_finish_late(setup):
    config, model, engine, pool, alone = setup
    gate = Gate(engine)
    tiny = [{"title": [1, 2, 3]}]
    with Ranker(gate) as ranker:
        ranker.score(pool[0])  # measures the cost per row
        m = ranker.stats()["ms_per_row"]
        rows = {i: pool[i].num_elements for i in (0, 3, 5)}
        # B (pool[3]) queued behind A (pool[5]) is estimated at >= (rows A + rows B) x m: refused.
        # A itself, and a tiny request behind A, fit whatever is left of the running batch (pool[0]).
        ranker.max_latency_ms = (rows[5] + rows[3] - 1) * m
        assert rows[0] + 3 < rows[3] - 1
        gate.hold()
        held = ranker.submit(pool[0])
        gate.wait_entered()
        a = ranker.submit(pool[5])
        with pytest.raises(Overloaded, match="estimated latency"):
            ranker.submit(pool[3])
        c = ranker.submit(tiny)
        gate.release()
        assert rel_err(a.result(WAIT), alone[5]) <= FP32_TOL
        assert c.result(WAIT).shape == (1, config.num_outputs)
        held.result(WAIT)
        ranker.max_latency_ms = 1e-9  # nothing ahead: never refused, however large
        assert rel_err(ranker.score(pool[5]), alone[5]) <= FP32_TOL


def test_close_while_busy_drains_what_was_accepted(setup):
    config, model, engine, pool, alone = setup
    gate = Gate(engine)
    ranker = Ranker(gate)
    gate.hold()
    held = ranker.submit(pool[0])
    gate.wait_entered()
    queued = [ranker.submit(pool[i]) for i in (1, 2, 3)]
    closer = threading.Thread(target=ranker.close)
    closer.start()
    deadline = time.monotonic() + WAIT
    while not ranker.closed and time.monotonic() < deadline:
        time.sleep(0.001)
    with pytest.raises(RankerClosed):
        ranker.submit(pool[4])
    with pytest.raises(RankerClosed):
        ranker.update(lambda m: None)
    gate.release()
    closer.join(WAIT)
    assert not closer.is_alive() and not ranker._thread.is_alive()
    for i, f in zip((1, 2, 3), queued):
        assert rel_err(f.result(0), alone[i]) <= FP32_TOL
    assert held.result(0).shape == (1, config.num_outputs)
    ranker.close()  # idempotent


def test_close_can_cancel_what_is_queued(setup):
    config, model, engine, pool, alone = setup
    gate = Gate(engine)
    ranker = Ranker(gate)
    gate.hold()
    held = ranker.submit(pool[0])
    gate.wait_entered()
    queued = [ranker.submit(pool[i]) for i in (1, 2)]
    closer = threading.Thread(target=ranker.close, kwargs=dict(cancel_pending=True))
    closer.start()
    for f in queued:
        with pytest.raises(RankerClosed):
            f.result(WAIT)
    gate.release()
    closer.join(WAIT)
    assert rel_err(held.result(WAIT), alone[0]) <= FP32_TOL  # the running batch completes
    assert gate.calls == [1] and ranker.stats()["closed"] == 2


def test_many_threads_each_get_their_own_scores(setup):
    config, model, engine, pool, alone = setup
    outcomes, errors = [], []

    def client(seed):
        rng = random.Random(seed)
        try:
            for _ in range(10):
                i = rng.randrange(len(pool))
                form = rng.choice([lambda b: b, jagged, samples])
                outcomes.append((i, ranker.score(form(pool[i]), timeout_ms=WAIT * 1e3)))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    with Ranker(engine, max_delay_ms=2.0) as ranker:
        threads = [threading.Thread(target=client, args=(s,)) for s in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        stats = ranker.stats()
    assert not errors, errors
    assert len(outcomes) == 60 and stats["served"] == 60 and stats["submitted"] == 60
    assert sum(k * n for k, n in stats["batch_requests"].items()) == 60
    for i, got in outcomes:
        assert rel_err(got, alone[i]) <= FP32_TOL


def test_asyncio(setup):
    config, model, engine, pool, alone = setup
    gate = Gate(engine)

    async def main(ranker):
        results = await asyncio.gather(*(ranker.score_async(pool[i % len(pool)]) for i in range(12)))
        for i, got in enumerate(results):
            assert rel_err(got, alone[i % len(pool)]) <= FP32_TOL
        # A timeout, and a cancelled task, while the worker is held: neither request runs.
        gate.hold()
        held = asyncio.ensure_future(ranker.score_async(pool[0]))
        await asyncio.get_running_loop().run_in_executor(None, gate.wait_entered)
        with pytest.raises(RequestTimeout):
            await ranker.score_async(pool[1], timeout_ms=50)
        task = asyncio.ensure_future(ranker.score_async(pool[2]))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gate.release()
        assert rel_err(await held, alone[0]) <= FP32_TOL
        with pytest.raises(ValueError, match="candidate 0"):
            await ranker.score_async([{"title": [-1]}])

    with Ranker(gate) as ranker:
        asyncio.run(main(ranker))
        calls_before = len(gate.calls)
        assert rel_err(ranker.score(pool[3]), alone[3]) <= FP32_TOL
        # The held request ran; the timed-out and the cancelled ones did not.
        assert len(gate.calls) == calls_before + 1 and gate.calls[-2:] == [1, 8]


def test_explain_returns_the_request_slice_of_the_output(setup):
    config, model, engine, pool, alone = setup
    gate = Gate(engine)
    with Ranker(gate) as ranker:
        gate.hold()
        held = ranker.submit(pool[0])
        gate.wait_entered()
        f_plain = ranker.submit(pool[1])
        f_explain = ranker.submit(pool[5], explain=True)
        gate.release()
        out = f_explain.result(WAIT)
        assert f_plain.batch_id == f_explain.batch_id
        held.result(WAIT)
    ref = engine(pool[5])
    assert isinstance(out, dm.DM2S2Output)
    for name in ("logits", "pooled", "hidden", "intra_weights", "inter_weights", "segment_pooled"):
        assert rel_err(getattr(out, name), getattr(ref, name)) <= FP32_TOL, name
    assert torch.equal(out.element_sample, ref.element_sample.cpu())
    per_candidate = torch.zeros(pool[5].batch_size, dtype=torch.float64).index_add_(
        0, out.element_sample, out.element_importance().double())
    nonempty = ~out.empty_samples
    assert torch.allclose(per_candidate[nonempty], torch.ones(int(nonempty.sum()), dtype=torch.float64))


def test_empty_request_is_answered_without_the_engine(setup):
    config, model, engine, pool, alone = setup
    gate = Gate(engine)
    with Ranker(gate) as ranker:
        assert ranker.score([]).shape == (0, config.num_outputs)
        assert ranker.score_jagged({"title": (torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))}).shape == (0, 2)
        assert ranker.score([], explain=True).logits.shape == (0, 2)
    assert gate.calls == []


def test_options_are_checked():
    config = small_config()
    engine = dm.convert(random_model(config))
    for bad in (dict(max_batch_rows=0), dict(max_queue=0), dict(max_delay_ms=-1), dict(timeout_ms=float("inf")),
                dict(max_wait_ms="1")):
        with pytest.raises(ValueError):
            Ranker(engine, **bad)
    with pytest.raises(TypeError):
        Ranker(object())
    with Ranker(engine) as ranker:
        other = dm.convert(random_model(small_config(vocab_size=50)))
        with pytest.raises(ValueError, match="vocab_size"):
            ranker.swap_engine(other)
        with pytest.raises(ZeroDivisionError):
            ranker.update(lambda m: 1 / 0)  # the updater gets its own error; the worker goes on
        assert ranker.score([{"title": [1, 2]}]).shape == (1, 2)


def test_the_worker_runs_in_the_creators_context(setup):
    config, model, engine, pool, alone = setup
    var = contextvars.ContextVar("var", default="unset")
    seen = []

    class Probe(Gate):
        def __call__(self, batch):
            seen.append(var.get())
            return super().__call__(batch)

    token = var.set("creator's")
    try:
        ranker = Ranker(Probe(engine))
    finally:
        var.reset(token)
    with ranker:
        ranker.score(pool[0])
    assert seen == ["creator's"]


def test_on_a_graph_engine_full_batches_fill_a_row_bucket():
    class GraphEngine:  # what the ranker reads of a cuda_graphs=True engine (CPU-testable)
        def __init__(self, steps, graph_max_rows):
            self.config = small_config()
            self.model = random_model(self.config)
            self.graphs = type("Runner", (), {"bucket_steps": steps, "stats": {}})()
            self.graph_max_rows = graph_max_rows

        def __call__(self, batch):
            raise AssertionError("not called")

    for steps, limit, asked in ((4, 16384, None), (4, 16384, 5000), (8, 3000, 100_000), (1, None, 1000),
                                (16, 16384, 777)):
        with Ranker(GraphEngine(steps, limit), max_batch_rows=asked) as ranker:
            cap = ranker.max_batch_rows
        wanted = min(asked or 4096, limit or 1 << 40)  # 4096: the default on CPU
        assert cap <= wanted and round_geometric(cap + 1, steps) == cap + 1, (steps, limit, asked, cap)
        assert cap + 1 > wanted // 2, (steps, limit, asked, cap)  # the largest such bucket, not a small one


def test_an_update_waits_for_the_running_batch_and_applies_to_the_next(setup):
    config, _, _, pool, _ = setup
    model = random_model(config, seed=3)
    old = dm.convert(copy.deepcopy(model))
    gate = Gate(dm.convert(model))
    with Ranker(gate) as ranker:
        gate.hold()
        running = ranker.submit(pool[3])
        gate.wait_entered()  # the worker holds this batch; its weights must stay the old ones
        updated = ranker.update(lambda m: m.head.out.bias.add_(1.0), wait=False)
        after = ranker.submit(pool[3])
        assert not updated.done()
        gate.release()
        assert updated.result(WAIT) == 1
        before_scores, after_scores = running.result(WAIT), after.result(WAIT)
    assert (running.model_version, after.model_version) == (0, 1)
    reference = old(pool[3]).logits
    assert rel_err(before_scores, reference) <= FP32_TOL
    assert rel_err(after_scores, reference + 1.0) <= FP32_TOL


def test_refresh_under_load_every_response_has_one_version(setup):
    """Threads submit continuously while the weights change six times — three in-place updates (one
    through ``.data``, which only the version bump makes visible to the cpp backend's prepacked
    weights) and three engine swaps. Every response must equal the request's scores under exactly
    one version's weights (the one its future names), every version must have answered, nothing
    may be lost. (Each version's scores: a fresh engine of its weights, each request alone; the
    engine against the fp64 oracle is the first test's and tests/model/test_engine.py's business.)"""
    config, _, _, pool, _ = setup
    base = random_model(config, seed=1)
    states = [copy.deepcopy(base.state_dict())]
    g = torch.Generator().manual_seed(7)
    for _ in range(6):
        states.append({k: v + 0.2 * torch.randn(v.shape, generator=g) * v.std().clamp_min(0.05)
                       if v.is_floating_point() else v for k, v in states[0].items()})

    def model_at(version):
        model = copy.deepcopy(base)
        model.load_state_dict(states[version])
        return model

    def load(version, through_data=False):
        def fn(model):
            if through_data:
                for name, p in model.named_parameters():
                    p.data.copy_(states[version][name])
            else:
                model.load_state_dict(states[version])
        return fn

    results, errors, submitted = [], [], [0]
    stop = threading.Event()
    lock = threading.Lock()

    def client(seed):
        rng = random.Random(seed)
        while not stop.is_set():
            i = rng.randrange(len(pool))
            with lock:
                submitted[0] += 1
            try:
                f = ranker.submit(pool[i])
                results.append((i, f.result(WAIT), f.model_version))
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

    def grow(n):  # wait for n more responses
        target = len(results) + n
        deadline = time.monotonic() + WAIT
        while len(results) < target and time.monotonic() < deadline:
            time.sleep(0.002)

    with Ranker(dm.convert(copy.deepcopy(base)), max_delay_ms=1.0) as ranker:
        threads = [threading.Thread(target=client, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        grow(8)
        for version in range(1, 7):
            if version % 2:
                assert ranker.update(load(version, through_data=version == 3), timeout=WAIT) == version
            else:
                assert ranker.swap_engine(dm.convert(model_at(version)), timeout=WAIT) == version
            grow(8)
        stop.set()
        for t in threads:
            t.join(WAIT)
        stats = ranker.stats()
    assert not errors, errors
    assert len(results) == submitted[0] == stats["served"]
    # Each version's own scores: a fresh engine on that version's weights, each request alone.
    refs = [[dm.convert(model_at(v))(b).logits for b in pool] for v in range(7)]
    seen = set()
    for i, got, version in results:
        matches = [v for v in range(7) if rel_err(got, refs[v][i]) <= FP32_TOL]
        assert matches == [version], (i, version, [rel_err(got, refs[v][i]) for v in range(7)])
        seen.add(version)
    assert seen == set(range(7)), seen
