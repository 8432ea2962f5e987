"""``Ranker``: micro-batched scoring of concurrent requests by one engine worker.

Each request (a list of candidates, a ``{name: (values, lengths)}`` dict, or a ``SequenceSet``) is
validated alone, in the caller's thread, before it is queued: a malformed request fails there with
its own ``ValueError`` and never reaches a batch. One worker thread owns the engine: it takes the
queued requests in order, packs those that fit ``max_batch_rows`` into one ragged batch (the
per-modality values and lengths concatenated, request after request: no padding, no loop per
element; the concatenation of valid batches is valid, so it is not validated again), runs the
engine once and hands each request its own rows of the output. Model refreshes (``swap_engine``,
``update``) go through the same queue and run between batches, so every batch — and every
response — is computed entirely with one version of the weights.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextvars
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..data import SequenceSet
from ..output import DM2S2Output
from .batching import candidate_message, pack
from .errors import EngineFailed, Overloaded, RankerClosed, RequestTimeout

_DEFAULT = object()  # "the ranker's default" for per-call options


@dataclass(eq=False)
class _Request:
    batch: SequenceSet  # validated, on the host
    rows: int  # packed rows (elements) of the request
    future: concurrent.futures.Future
    submitted: float  # time.monotonic()
    deadline: float | None
    explain: bool
    queued: bool = True  # still counted in the queue's totals (False once taken or cancelled)


@dataclass(eq=False)
class _Control:
    action: Callable[[], Any]
    future: concurrent.futures.Future
    what: str


@dataclass
class _Stats:
    submitted: int = 0  # accepted into the queue
    invalid: int = 0  # refused at submission: ValueError
    overloaded: int = 0  # refused at submission: Overloaded
    served: int = 0
    failed: int = 0  # EngineFailed
    timed_out: int = 0  # dropped in the queue after their deadline
    cancelled: int = 0  # cancelled (or timed out by their caller) before they ran
    closed: int = 0  # failed by close(cancel_pending=True)
    batches: int = 0
    batch_requests: collections.Counter = field(default_factory=collections.Counter)
    rows: int = 0
    max_queue_depth: int = 0
    busy_s: float = 0.0  # worker time inside batches (packing, engine, split)


def _model_of(engine):
    return getattr(engine, "model", None)


def _device_of(engine) -> torch.device:
    model = _model_of(engine)
    if model is not None:
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def _dense_dtype(engine, name: str):
    try:
        return _model_of(engine).embeddings.dense[name].weight.dtype
    except (AttributeError, KeyError, TypeError):
        return None


def _graph_row_cap(engine, cap: int) -> int:
    """On an engine that replays CUDA graphs: the largest batch of at most ``cap`` rows whose row
    bucket it fills (a bucket of b rows holds b - 1 real ones), and no more than the engine replays
    (``graph_max_rows``) — so full batches replay a graph and carry no padding beyond one row."""
    graphs = getattr(engine, "graphs", None)
    if graphs is None:
        return cap
    from ..graphs import geometric_step  # CUDA-graph engines only

    limit = getattr(engine, "graph_max_rows", None)
    if limit is not None:
        cap = min(cap, limit)
    x = cap + 1
    step = geometric_step(x, graphs.bucket_steps)
    return max(1, x // step * step - 1)


class Ranker:
    """Scores concurrent requests with one engine, packing those that arrive together into one
    ragged batch.

    ``engine``: a ``FastDM2S2`` (or any callable taking a ``SequenceSet`` and returning a
    ``DM2S2Output``, with ``.config``). The ranker's worker thread is the only one that calls it.

    ``max_batch_rows``: packed rows (elements, all modalities) per batch at most; a request larger
    than that runs alone. Default 4096 on CPU (batching buys almost no throughput there, and every
    request of a batch waits for all of it) and 16384 on CUDA, cut on an engine with
    ``cuda_graphs=True`` to fill its row buckets and to stay under its ``graph_max_rows``.
    ``max_delay_ms``: how long the worker, finding fewer rows queued than a batch holds, waits for
    more, counted from the first queued request's arrival (default 0 on CPU, 1 ms on CUDA).
    ``max_queue``: requests queued at most; past it ``Overloaded``. Admission control, from the
    measured cost per packed row: ``max_wait_ms`` refuses (``Overloaded``) a request whose
    estimated wait before its batch starts — the queued rows ahead of it, plus what is left of the
    running batch — exceeds it; ``max_latency_ms`` refuses one whose estimated wait plus its own
    scoring time exceeds it (a latency objective: better refused at once than answered late; a
    request is never refused by it when nothing is ahead of it). None: no estimate, only
    ``max_queue``. ``timeout_ms``: the default per-request deadline (None: none).

    The worker runs under the ``contextvars`` context the ranker was created in (a ``Tuning`` made
    current with ``.active()`` applies). Use it as a context manager, or call ``close()``.
    """

    def __init__(self, engine, *, max_batch_rows: int | None = None, max_delay_ms: float | None = None,
                 max_queue: int = 256, max_wait_ms: float | None = None, max_latency_ms: float | None = None,
                 timeout_ms: float | None = None, name: str = "dm2s2-ranker"):
        config = getattr(engine, "config", None)
        if config is None or not callable(engine):
            raise TypeError(f"Ranker takes an engine (dm2s2_fast.convert(model)), got {type(engine).__name__}")
        if max_batch_rows is not None and (not isinstance(max_batch_rows, int) or max_batch_rows < 1):
            raise ValueError(f"max_batch_rows must be a positive integer, got {max_batch_rows!r}")
        if not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"max_queue must be a positive integer, got {max_queue!r}")
        for key, value in (("max_delay_ms", max_delay_ms), ("max_wait_ms", max_wait_ms),
                           ("max_latency_ms", max_latency_ms), ("timeout_ms", timeout_ms)):
            if value is not None and not (isinstance(value, (int, float)) and 0 <= value < float("inf")):
                raise ValueError(f"{key} must be None or a finite number >= 0, got {value!r}")
        self.config = config
        self._engine = engine
        on_cuda = _device_of(engine).type == "cuda"
        self._requested_rows = max_batch_rows
        self.max_batch_rows = self._row_cap(engine)
        self.max_delay_ms = float(max_delay_ms if max_delay_ms is not None else (1.0 if on_cuda else 0.0))
        self.max_queue = max_queue
        self.max_wait_ms = max_wait_ms
        self.max_latency_ms = max_latency_ms
        self.timeout_ms = timeout_ms
        self.model_version = 0  # +1 per swap_engine / update, as the worker applies them

        self._cond = threading.Condition()
        self._queue: collections.deque = collections.deque()
        self._queued_requests = 0
        self._queued_rows = 0
        self._controls_queued = 0
        self._inflight_rows = 0
        self._inflight_since = 0.0
        self._ms_per_row: float | None = None  # measured, EWMA over batches
        self._closed = False
        self._stats = _Stats()
        self._batch_ids = itertools.count(1)
        self._staging = _PinnedStaging() if on_cuda else None
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._loop,), name=name, daemon=True)
        self._thread.start()

    # ---- submitting ---------------------------------------------------------------------------
    def submit(self, request, *, explain: bool = False, timeout_ms=_DEFAULT) -> concurrent.futures.Future:
        """Queue ``request`` (a list of candidate dicts as ``SequenceSet.from_samples`` takes, a
        ``{name: (values, lengths)}`` dict as ``from_jagged`` takes, or a ``SequenceSet``); returns a
        ``concurrent.futures.Future`` of its ``[len, num_outputs]`` host logits (``explain=True``: of
        its ``DM2S2Output`` on the host, with its own layout: α, β, ``element_importance()`` per
        candidate). Raises here, queuing nothing: ``ValueError`` (malformed; names the modality and
        the candidate), ``Overloaded``, ``RankerClosed``. Once resolved, the future's
        ``model_version`` and ``batch_id`` say which weights and which batch scored it. Its done
        callbacks run on the worker thread: keep them short (and never wait on the ranker there)."""
        batch = self._validate(request)
        timeout_ms = self.timeout_ms if timeout_ms is _DEFAULT else timeout_ms
        future: concurrent.futures.Future = concurrent.futures.Future()
        now = time.monotonic()
        if batch.batch_size == 0:  # nothing to score: answered here, never queued
            future.set_running_or_notify_cancel()
            future.model_version, future.batch_id = self.model_version, None
            future.set_result(self._empty_result(batch, explain))
            return future
        deadline = None if timeout_ms is None else now + timeout_ms / 1e3
        req = _Request(batch, batch.num_elements, future, now, deadline, explain)
        with self._cond:
            if self._closed:
                raise RankerClosed("the ranker is closed; it takes no new requests")
            if self._queued_requests >= self.max_queue:
                self._stats.overloaded += 1
                raise Overloaded(f"the queue is full ({self._queued_requests} requests queued, "
                                 f"max_queue={self.max_queue}); retry later")
            if self.max_wait_ms is not None or self.max_latency_ms is not None:
                wait = self._estimated_wait_ms(now)
                own = req.rows * (self._ms_per_row or 0.0)
                if self.max_wait_ms is not None and wait > self.max_wait_ms:
                    self._stats.overloaded += 1
                    raise Overloaded(f"the estimated wait is {wait:.0f} ms ({self._queued_requests} requests, "
                                     f"{self._queued_rows} rows queued), over max_wait_ms={self.max_wait_ms:g}")
                if self.max_latency_ms is not None and wait > 0 and wait + own > self.max_latency_ms:
                    self._stats.overloaded += 1
                    raise Overloaded(f"the estimated latency is {wait + own:.0f} ms ({wait:.0f} waiting behind "
                                     f"{self._queued_requests} queued requests and the running batch, {own:.0f} "
                                     f"its own), over max_latency_ms={self.max_latency_ms:g}")
            self._queue.append(req)
            self._queued_requests += 1
            self._queued_rows += req.rows
            self._stats.submitted += 1
            self._stats.max_queue_depth = max(self._stats.max_queue_depth, self._queued_requests)
            self._cond.notify_all()
        future.add_done_callback(lambda f, r=req: self._on_done(r, f))
        return future

    def score(self, candidates, *, explain: bool = False, timeout_ms=_DEFAULT):
        """Scores of ``candidates`` (a list of sample dicts): a ``[len(candidates), num_outputs]``
        host tensor in their order (``explain=True``: their ``DM2S2Output``). Blocks; raises what
        ``submit`` raises, ``RequestTimeout`` past the deadline, or ``EngineFailed``."""
        timeout_ms = self.timeout_ms if timeout_ms is _DEFAULT else timeout_ms
        future = self.submit(candidates, explain=explain, timeout_ms=timeout_ms)
        return self._wait(future, timeout_ms)

    def score_jagged(self, jagged: dict, *, explain: bool = False, timeout_ms=_DEFAULT):
        """``score`` for ``{name: (values, lengths)}`` input (TorchRec's jagged layout; validated
        and packed without a Python loop over candidates)."""
        if not isinstance(jagged, dict):
            raise ValueError("score_jagged takes a dict {modality name: (values, lengths)}")
        return self.score(jagged, explain=explain, timeout_ms=timeout_ms)

    async def score_async(self, candidates, *, explain: bool = False, timeout_ms=_DEFAULT):
        """``score`` for asyncio servers: validates and queues at once (raising as ``submit``), then
        awaits the worker without blocking the event loop. Cancelling the task cancels the
        request if it has not started."""
        timeout_ms = self.timeout_ms if timeout_ms is _DEFAULT else timeout_ms
        future = self.submit(candidates, explain=explain, timeout_ms=timeout_ms)
        waiting = asyncio.wrap_future(future)
        if timeout_ms is None:
            return await waiting
        try:
            return await asyncio.wait_for(waiting, timeout_ms / 1e3)
        except RequestTimeout:  # the worker's: expired in the queue
            raise
        except asyncio.TimeoutError:
            raise self._timed_out(future, timeout_ms) from None

    def _wait(self, future: concurrent.futures.Future, timeout_ms):
        try:
            return future.result(None if timeout_ms is None else timeout_ms / 1e3)
        except RequestTimeout:  # the worker's: expired in the queue
            raise
        except concurrent.futures.TimeoutError:
            if future.done() and not future.cancelled():  # resolved this instant
                return future.result()
            raise self._timed_out(future, timeout_ms) from None

    def _timed_out(self, future, timeout_ms) -> RequestTimeout:
        started = not future.cancel()  # a queued request is dropped; a running one is abandoned
        return RequestTimeout(f"no scores after {timeout_ms:g} ms (timeout_ms); the request "
                              f"{'was running, its result is dropped' if started else 'never ran'}")

    def _validate(self, request) -> SequenceSet:
        config = self.config
        try:
            if isinstance(request, SequenceSet):
                config.check_batch(request.config)
                batch = request
            elif isinstance(request, dict):
                batch = SequenceSet.from_jagged(config, request)
            elif isinstance(request, (list, tuple)):
                batch = SequenceSet.from_samples(config, request)
            elif type(request).__name__ == "KeyedJaggedTensor":
                from ..data.kjt import from_kjt
                batch = from_kjt(config, request)
            else:
                raise ValueError(f"a request is a list of candidate dicts, a dict {{name: (values, lengths)}}"
                                 f" or a SequenceSet, got {type(request).__name__}")
            if batch.device.type != "cpu":
                batch = batch.to("cpu")  # requests are host data: they are packed on the host
        except (ValueError, TypeError) as exc:
            with self._cond:
                self._stats.invalid += 1
            raise ValueError(f"invalid request: {candidate_message(str(exc))}") from None
        return batch

    def _estimated_wait_ms(self, now: float) -> float:
        if self._ms_per_row is None:
            return 0.0  # nothing measured yet
        running = 0.0
        if self._inflight_rows:
            running = max(0.0, self._inflight_rows * self._ms_per_row - (now - self._inflight_since) * 1e3)
        return running + self._queued_rows * self._ms_per_row

    def _on_done(self, req: _Request, future: concurrent.futures.Future) -> None:
        if future.cancelled():
            with self._cond:
                if req.queued:  # cancelled while queued: free its place now (the worker skips it)
                    req.queued = False
                    self._queued_requests -= 1
                    self._queued_rows -= req.rows
                self._stats.cancelled += 1

    def _empty_result(self, batch: SequenceSet, explain: bool):
        outputs = self.config.num_outputs
        if not explain:
            return torch.zeros(0, outputs)
        d = self.config.hidden_size
        return DM2S2Output(logits=torch.zeros(0, outputs), pooled=torch.zeros(0, d), hidden=torch.zeros(0, d),
                           intra_weights=torch.zeros(0), inter_weights=torch.zeros(0),
                           segment_pooled=torch.zeros(0, d), layout=batch.layout)

    # ---- model refresh ------------------------------------------------------------------------
    def swap_engine(self, engine, *, wait: bool = True, timeout: float | None = None):
        """Serve with ``engine`` from now on: requests queued before this call are scored by the old
        engine, those submitted after it by the new one (the swap runs on the worker between two
        batches). Its config must take the same batches (modalities, vocabulary, positions).
        Returns the new ``model_version`` (``wait=False``: a future of it)."""
        if getattr(engine, "config", None) is None or not callable(engine):
            raise TypeError(f"swap_engine takes an engine, got {type(engine).__name__}")
        engine.config.check_batch(self.config)

        def swap():
            self._engine, self.config = engine, engine.config
            self.max_batch_rows = self._row_cap(engine)
            if self._staging is None and _device_of(engine).type == "cuda":
                self._staging = _PinnedStaging()
            return self._bump()

        return self._control(swap, "swap_engine", wait, timeout)

    def update(self, fn: Callable, *, wait: bool = True, timeout: float | None = None):
        """Run ``fn(model)`` on the worker between two batches, under ``torch.no_grad()``: an
        in-place weight update (``load_state_dict``, ``p.copy_(...)``) that no batch sees half done.
        Requests queued before this call see the old weights, those submitted after it the new ones.
        Every parameter's version counter is bumped afterwards, so that caches keyed by it (the
        ``cpp`` backend's prepacked weights) see writes made through ``.data`` too. If ``fn`` raises,
        its exception is re-raised here (``model_version`` is bumped anyway: the weights may have
        changed). Returns the new ``model_version`` (``wait=False``: a future of it)."""
        if not callable(fn):
            raise TypeError(f"update takes a function of the model, got {type(fn).__name__}")

        def apply():
            model = _model_of(self._engine)
            try:
                with torch.no_grad():
                    fn(model)
            finally:
                if model is not None:
                    for t in itertools.chain(model.parameters(), model.buffers()):
                        try:
                            torch.autograd.graph.increment_version(t)
                        except RuntimeError:  # an inference tensor keeps no version counter
                            pass
                version = self._bump()
            return version

        return self._control(apply, "update", wait, timeout)

    def _bump(self) -> int:
        with self._cond:
            self.model_version += 1
            return self.model_version

    def _control(self, action, what: str, wait: bool, timeout: float | None):
        if threading.current_thread() is self._thread:
            raise RuntimeError(f"{what} called from the ranker's own worker (inside an update?): it would "
                               f"wait for itself")
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._closed:
                raise RankerClosed(f"the ranker is closed; {what} refused")
            self._queue.append(_Control(action, future, what))  # never refused: not a request
            self._controls_queued += 1
            self._cond.notify_all()
        return future.result(timeout) if wait else future

    # ---- closing ------------------------------------------------------------------------------
    def close(self, *, timeout: float | None = None, cancel_pending: bool = False) -> None:
        """Refuse new work (``RankerClosed``), answer what was accepted, stop the worker. With
        ``cancel_pending=True`` the queued requests fail with ``RankerClosed`` instead (the running
        batch still completes). ``timeout``: seconds to wait for the worker (None: until done)."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("close() called from the ranker's own worker: it would wait for itself")
        with self._cond:
            self._closed = True
            if cancel_pending:
                self._fail_queued(lambda: RankerClosed("the ranker was closed before this request ran"),
                                  "closed")
            self._cond.notify_all()
        self._thread.join(timeout)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "Ranker":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _fail_queued(self, make_error, counter: str) -> None:
        """Fail every queued item (under the lock)."""
        while self._queue:
            item = self._queue.popleft()
            if isinstance(item, _Request):
                if item.queued:
                    item.queued = False
                    self._queued_requests -= 1
                    self._queued_rows -= item.rows
                if item.future.set_running_or_notify_cancel():
                    item.future.set_exception(make_error())
                    setattr(self._stats, counter, getattr(self._stats, counter) + 1)
            else:
                self._controls_queued -= 1
                if item.future.set_running_or_notify_cancel():
                    item.future.set_exception(make_error())

    # ---- the worker ---------------------------------------------------------------------------
    @property
    def engine(self):
        """The engine serving now (``swap_engine`` replaces it between batches)."""
        return self._engine

    def stats(self) -> dict:
        """Counters since the start: ``submitted`` (accepted), ``invalid``, ``overloaded`` (refused at
        submission), ``served``, ``failed``, ``timed_out``, ``cancelled``, ``closed``; ``batches``,
        ``batch_requests`` ({requests in a batch: batches}), ``rows``, ``max_queue_depth``,
        ``queue_depth``, ``busy_s``, ``ms_per_row`` (the admission estimate), ``model_version``,
        and the engine's graph counters where it replays CUDA graphs."""
        with self._cond:
            s = self._stats
            out = {k: getattr(s, k) for k in s.__dataclass_fields__}
            out["batch_requests"] = dict(sorted(s.batch_requests.items()))
            out.update(queue_depth=self._queued_requests, ms_per_row=self._ms_per_row,
                       model_version=self.model_version, max_batch_rows=self.max_batch_rows)
        graphs = getattr(self._engine, "graphs", None)
        if graphs is not None:
            out["graphs"] = dict(graphs.stats)
        return out

    def _row_cap(self, engine) -> int:
        on_cuda = _device_of(engine).type == "cuda"
        cap = self._requested_rows or (16384 if on_cuda else 4096)
        return _graph_row_cap(engine, cap)

    def _loop(self) -> None:
        try:
            while True:
                item = self._next()
                if item is None:
                    return
                if isinstance(item, _Control):
                    self._run_control(item)
                elif item:
                    self._run_batch(item)
        finally:  # only reached on close, or if the worker itself broke: nothing is left waiting
            with self._cond:
                self._closed = True
                self._fail_queued(lambda: RankerClosed("the ranker's worker stopped"), "closed")

    def _next(self):
        """The next control item, or the next batch of requests (maybe empty: all were cancelled or
        expired), or None when closed and drained."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            head = self._queue[0]
            if isinstance(head, _Control):
                self._controls_queued -= 1
                return self._queue.popleft()
            cap = self.max_batch_rows
            if self.max_delay_ms > 0:  # wait for company, unless the batch is full or a swap/update waits
                until = head.submitted + self.max_delay_ms / 1e3
                while (not self._closed and self._queued_rows < cap and not self._controls_queued
                       and time.monotonic() < until):
                    self._cond.wait(until - time.monotonic())
            taken, rows = [], 0
            now = time.monotonic()
            while self._queue and isinstance(self._queue[0], _Request):
                req = self._queue[0]
                if req.queued and taken and rows + req.rows > cap:
                    break
                self._queue.popleft()
                if not req.queued:
                    continue  # cancelled while queued: already uncounted
                req.queued = False
                self._queued_requests -= 1
                self._queued_rows -= req.rows
                if req.deadline is not None and now > req.deadline:
                    if req.future.set_running_or_notify_cancel():
                        req.future.set_exception(RequestTimeout(
                            f"the request waited {1e3 * (now - req.submitted):.0f} ms in the queue, past its "
                            f"deadline; it was not run"))
                        self._stats.timed_out += 1
                    continue
                if not req.future.set_running_or_notify_cancel():
                    continue  # cancelled this instant
                taken.append(req)
                rows += req.rows
            self._inflight_rows, self._inflight_since = rows, now
            return taken

    def _run_control(self, item: _Control) -> None:
        if not item.future.set_running_or_notify_cancel():
            return
        try:
            result = item.action()
        except BaseException as exc:  # the caller of swap/update gets it; the worker goes on
            item.future.set_exception(exc)
        else:
            item.future.set_result(result)

    def _run_batch(self, reqs: list[_Request]) -> None:
        engine, version = self._engine, self.model_version
        batch_id = next(self._batch_ids)
        rows = sum(r.rows for r in reqs)
        start = time.perf_counter()
        try:
            results = self._score(engine, reqs)
        except BaseException as exc:
            elapsed = time.perf_counter() - start
            with self._cond:
                self._inflight_rows = 0
                self._stats.failed += len(reqs)
                self._stats.busy_s += elapsed
            for r in reqs:
                error = EngineFailed(f"the engine failed on the batch of {len(reqs)} requests ({rows} rows) "
                                     f"that held this one: {type(exc).__name__}: {exc}")
                error.__cause__ = exc
                r.future.model_version, r.future.batch_id = version, batch_id
                r.future.set_exception(error)
            if not isinstance(exc, Exception):
                raise
            return
        elapsed = time.perf_counter() - start
        with self._cond:
            self._inflight_rows = 0
            per_row = 1e3 * elapsed / max(rows, 1)
            self._ms_per_row = per_row if self._ms_per_row is None else 0.7 * self._ms_per_row + 0.3 * per_row
            s = self._stats
            s.batches += 1
            s.batch_requests[len(reqs)] += 1
            s.rows += rows
            s.served += len(reqs)
            s.busy_s += elapsed
        for r, result in zip(reqs, results):
            r.future.model_version, r.future.batch_id = version, batch_id
            r.future.set_result(result)

    def _score(self, engine, reqs: list[_Request]) -> list:
        """Pack ``reqs`` into one batch, run ``engine``, split its output per request (host)."""
        device = _device_of(engine)
        staging = self._staging if device.type == "cuda" else None
        batch = pack(engine.config, [r.batch for r in reqs], dense_dtype=lambda name: _dense_dtype(engine, name),
                     cat=staging.cat if staging is not None else None)
        try:
            if device.type != "cpu":
                batch = batch.to(device, non_blocking=True)
            out = engine(batch)
            logits = out.logits.detach().to("cpu")
            sizes = [r.batch.batch_size for r in reqs]
            results: list = [t.clone() for t in torch.split(logits, sizes)]
            if any(r.explain for r in reqs):
                plan = out.layout.host
                b0 = 0
                for i, r in enumerate(reqs):
                    b1 = b0 + sizes[i]
                    if r.explain:
                        results[i] = _explain_slice(out, plan, r.batch, b0, b1, results[i])
                    b0 = b1
            return results
        finally:
            if device.type == "cuda":  # the staging buffers are reused by the next batch
                torch.cuda.current_stream(device).synchronize()


def _explain_slice(out: DM2S2Output, plan, batch: SequenceSet, b0: int, b1: int, logits) -> DM2S2Output:
    """Samples ``b0:b1`` of a batch's output: packing is sample-major, so their elements and
    segments are contiguous; the request's own layout maps them back to its candidates."""
    e0, e1 = int(plan.cu_seqlens_set[b0]), int(plan.cu_seqlens_set[b1])
    s0, s1 = int(plan.cu_segments_per_sample[b0]), int(plan.cu_segments_per_sample[b1])

    def host(t):
        return t.detach().to("cpu").clone()

    return DM2S2Output(logits=logits, pooled=host(out.pooled[b0:b1]), hidden=host(out.hidden[e0:e1]),
                       intra_weights=host(out.intra_weights[e0:e1]), inter_weights=host(out.inter_weights[s0:s1]),
                       segment_pooled=host(out.segment_pooled[s0:s1]), layout=batch.layout)


class _PinnedStaging:
    """Page-locked host buffers the worker packs each batch into on CUDA (so that its host→device
    copy is asynchronous and at full bandwidth), grown as needed and reused batch after batch."""

    def __init__(self):
        self._buffers: dict = {}

    def cat(self, key, parts: list[torch.Tensor]) -> torch.Tensor:
        n = sum(int(p.shape[0]) for p in parts)
        tail, dtype = tuple(parts[0].shape[1:]), parts[0].dtype
        buf = self._buffers.get(key)
        if buf is None or buf.shape[0] < n or tuple(buf.shape[1:]) != tail or buf.dtype != dtype:
            old = buf.shape[0] if buf is not None and tuple(buf.shape[1:]) == tail else 0
            buf = torch.empty((max(n, 2 * old, 256),) + tail, dtype=dtype, pin_memory=True)
            self._buffers[key] = buf
        out = buf[:n]
        torch.cat(parts, out=out)
        return out
