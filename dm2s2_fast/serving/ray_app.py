"""DM²S² on Ray Serve: a deployment that micro-batches ranking requests by packed rows, and the
builder that scales it out (docs/serving_servers.md).

    serve run dm2s2_fast.serving.ray_app:build_app checkpoint=model.pt num_replicas=2

or in Python::

    from ray import serve
    from dm2s2_fast.serving.ray_app import app
    serve.run(app(checkpoint="model.pt", num_replicas=2), route_prefix="/dm2s2")

One HTTP request is one ranking call (the schema of ``triton/packing.py``, without Triton's batch
dimension): per modality ``m__values`` and ``m__lengths``, as an ``.npz`` body
(``Content-Type: application/x-npz``; ``packing.npz_body`` writes one) or as JSON
(``{"m__values": [...], "m__lengths": [...]}``); a modality left out is missing in every candidate.
The answer is ``{"scores": [[...], ...]}`` (K rows of ``num_outputs``), a malformed request gets
400 with ``{"error": ...}`` naming the modality and candidate, and ``GET <prefix>/stats`` returns
the replica's batching counters.

Each request is validated alone in ``__call__``; ``score_batch`` (``@serve.batch``) then takes the
queued valid ones up to ``max_batch_rows`` packed rows — ``batch_size_fn`` counts rows, not
requests, since rows are what the engine's time and buckets follow — packs them into one ragged
batch, runs the engine once (in the replica's engine thread: its event loop keeps accepting,
validating and queueing requests meanwhile) and answers each with its own rows of the scores. A request larger
than ``max_batch_rows`` runs alone.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import io
import json

import numpy as np
import torch
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from .triton.checkpoint import build_engine, model_from_source
from .triton.packing import BatchScorer, EngineError, RequestError

DEFAULT_MAX_BATCH_ROWS = 16384


def packed_rows(batches: list) -> int:
    """``@serve.batch``'s size of a batch: its packed rows (an empty request counts as one)."""
    return sum(max(1, b.num_elements) for b in batches)


def _parse_body(body: bytes, content_type: str) -> dict:
    if "json" in content_type:
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise RequestError(f"the body is not JSON: {exc}") from None
        if isinstance(data, dict) and isinstance(data.get("inputs"), dict):
            data = data["inputs"]
        return data
    try:
        with np.load(io.BytesIO(body), allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except (ValueError, OSError, EOFError) as exc:
        raise RequestError(f"the body is neither JSON (Content-Type: application/json) nor an .npz "
                           f"archive: {exc}") from None


@serve.deployment(name="DM2S2Ranker", max_ongoing_requests=256, ray_actor_options={"num_cpus": 1})
class DM2S2Ranker:
    """One replica: a FastDM2S2 engine behind a packed-row ``@serve.batch`` queue.

    ``model``: a ``DM2S2``/``FastDM2S2`` object (shipped to the replica through Ray's object
    store) or ``checkpoint``: a path every node can read (``save_checkpoint``'s file, or a BERT
    directory); neither: a seeded random ads model. ``device``: default ``cuda`` when the replica
    was given a GPU (``ray_actor_options={"num_gpus": 1}``), else ``cpu``.
    """

    def __init__(self, model=None, checkpoint: str | None = None, *, backend: str = "auto",
                 device: str | None = None, dtype: str = "float32", cuda_graphs: bool = False,
                 num_threads: int | None = None, max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS,
                 batch_wait_timeout_s: float = 0.002, truncate: bool = False, transport_only: bool = False):
        if device is None:
            import ray

            device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
        reference = model_from_source(model if model is not None else checkpoint)
        engine = build_engine(reference, device=device, dtype=dtype, backend=backend,
                              cuda_graphs=cuda_graphs, num_threads=num_threads)
        self.scorer = BatchScorer(engine, device=device, truncate=truncate, transport_only=transport_only)
        # One thread runs the engine, started (and its intra-op thread count set) here, before any
        # request: the event loop validates with one thread (packing.host_threads) meanwhile.
        self._engine_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dm2s2-engine")
        self._engine_thread.submit(self.scorer.warm_up).result()
        self.max_batch_rows = int(max_batch_rows)
        self.score_batch.set_max_batch_size(self.max_batch_rows)
        self.score_batch.set_batch_wait_timeout_s(float(batch_wait_timeout_s))
        self.solo = 0  # requests larger than max_batch_rows, run alone

    def _score(self, batches: list) -> list:  # in the engine thread: batches and lone requests, one at a time
        try:
            return self.scorer.score_batches(batches)
        except EngineError as exc:
            return [exc] * len(batches)

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_ROWS, batch_wait_timeout_s=0.002,
                 batch_size_fn=packed_rows)
    async def score_batch(self, batches: list) -> list:
        return await asyncio.get_running_loop().run_in_executor(self._engine_thread, self._score, batches)

    async def score(self, inputs: dict) -> torch.Tensor:
        """Scores ``[K, num_outputs]`` of one request's inputs (``{"m__values": ..., "m__lengths":
        ...}``); raises ``RequestError`` or ``EngineError``. For DeploymentHandle callers."""
        batch = self.scorer.parse(inputs)
        if packed_rows([batch]) > self.max_batch_rows:
            self.solo += 1
            result = (await asyncio.get_running_loop().run_in_executor(self._engine_thread, self._score,
                                                                        [batch]))[0]
        else:
            result = await self.score_batch(batch)
        if isinstance(result, Exception):
            raise result
        return result

    def stats(self) -> dict:
        return {**self.scorer.stats.as_dict(), "solo": self.solo, "max_batch_rows": self.max_batch_rows}

    async def __call__(self, request: Request):
        if request.method == "GET" and request.url.path.rstrip("/").endswith("/stats"):
            return JSONResponse(self.stats())
        try:
            inputs = _parse_body(await request.body(), request.headers.get("content-type", ""))
            scores = await self.score(inputs)
        except RequestError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        except EngineError as exc:
            return JSONResponse({"error": str(exc)}, status_code=500)
        return JSONResponse({"scores": scores.tolist()})


def app(model=None, checkpoint: str | None = None, *, num_replicas: int | str | None = None,
        autoscaling_config: dict | None = None, num_cpus: float = 1, num_gpus: float = 0,
        max_ongoing_requests: int = 256, max_queued_requests: int = -1, **options):
    """The bound application: ``serve.run(app(...))``. ``num_replicas`` (or ``"auto"``) and
    ``autoscaling_config`` (``min_replicas``, ``max_replicas``, ``target_ongoing_requests``, ...)
    scale it out; ``num_cpus``/``num_gpus`` are each replica's resources; ``max_ongoing_requests``
    bounds the requests a replica holds (queued for a batch or running), ``max_queued_requests``
    those waiting for a replica beyond that (-1: unbounded; past it Serve answers 503 at once:
    the back-pressure that Triton's ``max_queue_size`` gives); ``options`` go to
    ``DM2S2Ranker`` (``backend``, ``device``, ``dtype``, ``cuda_graphs``, ``num_threads``,
    ``max_batch_rows``, ``batch_wait_timeout_s``, ``truncate``; ``transport_only`` answers zeros
    without the engine, to measure the server's own cost — never for rankings)."""
    deployment_options = {"ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus},
                          "max_ongoing_requests": max_ongoing_requests,
                          "max_queued_requests": max_queued_requests}
    if autoscaling_config is not None:
        deployment_options["autoscaling_config"] = autoscaling_config
    elif num_replicas is not None:
        deployment_options["num_replicas"] = num_replicas
    return DM2S2Ranker.options(**deployment_options).bind(model, checkpoint, **options)


_INT = ("num_threads", "max_batch_rows", "max_ongoing_requests", "max_queued_requests", "min_replicas",
        "max_replicas")
_FLOAT = ("num_cpus", "num_gpus", "batch_wait_timeout_s", "target_ongoing_requests")
_BOOL = ("cuda_graphs", "truncate", "transport_only")


def build_app(args: dict):
    """``serve run dm2s2_fast.serving.ray_app:build_app key=value ...``: ``checkpoint``, ``backend``,
    ``device``, ``dtype``, ``cuda_graphs``, ``num_threads``, ``max_batch_rows``,
    ``batch_wait_timeout_s``, ``truncate``, ``num_replicas`` (a number or ``auto``), ``num_cpus``,
    ``num_gpus``, and autoscaling: ``min_replicas``, ``max_replicas``, ``target_ongoing_requests``."""
    args = dict(args)
    for key, value in list(args.items()):
        if not isinstance(value, str):
            continue
        if key in _FLOAT:
            args[key] = float(value)
        elif key in _INT:
            args[key] = int(value)
        elif key in _BOOL:
            args[key] = value.lower() in ("1", "true", "yes")
    if args.get("num_replicas") not in (None, "auto"):
        args["num_replicas"] = int(args["num_replicas"])
    scaling = {k: args.pop(k) for k in ("min_replicas", "max_replicas", "target_ongoing_requests") if k in args}
    if scaling:
        args["autoscaling_config"] = scaling
        args.pop("num_replicas", None)
    return app(args.pop("model", None), args.pop("checkpoint", None), **args)
