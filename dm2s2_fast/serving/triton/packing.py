"""Requests in, scores out: the request schema both servers share, and the packing of a server's
batch of requests into one ragged ``SequenceSet``.

One request is one ranking call with K candidates. Per modality ``m`` of the model's config it
carries ``m__values`` (ids ``[T]`` int64, or features ``[T, input_dim]`` float32: the K candidates'
sequences back to back) and ``m__lengths`` (``[K]`` int64) — TorchRec's jagged layout, the same as
``SequenceSet.from_jagged``. On Triton every tensor has a leading batch dimension of 1 (``[1, T]``,
``[1, K]``; see ``repository.py``). The answer is ``scores``, ``[K, num_outputs]`` float32, in the
candidates' order.

Each request is validated alone (``parse_request``): a malformed one gets its own ``RequestError``
naming the input, modality and candidate, and never reaches the batch. The valid ones are packed by
concatenating their values and lengths, modality by modality (``pack``: no padding between requests;
the concatenation of valid batches is valid, so it is not validated again), run through the engine
once, and the scores are split back per request (``BatchScorer``).
"""
from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from ...config import DM2S2Config
from ...data import SequenceSet
from ..batching import candidate_message, pack

VALUES_SUFFIX = "__values"
LENGTHS_SUFFIX = "__lengths"
OUTPUT_NAME = "scores"


class RequestError(ValueError):
    """A malformed request; only that request fails."""


class EngineError(RuntimeError):
    """The engine raised on a batch; every request of that batch gets this error (with the cause)."""


def input_names(config: DM2S2Config) -> list[tuple[str, str]]:
    """``[(values name, lengths name)]`` per modality, in config order."""
    return [(m.name + VALUES_SUFFIX, m.name + LENGTHS_SUFFIX) for m in config.modalities]


def _as_tensor(name: str, array) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array
    try:
        if isinstance(array, np.ndarray):
            if array.dtype == object:
                raise TypeError("object arrays are not tensors")
            with warnings.catch_warnings():  # read-only buffers (np.load, Triton): never written to
                warnings.simplefilter("ignore", UserWarning)
                return torch.as_tensor(array)
        return torch.as_tensor(array)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise RequestError(f"input {name!r}: cannot make a tensor of it: {exc}") from None


def parse_request(config: DM2S2Config, inputs: dict, *, batch_dim: bool = False,
                  truncate: bool = False) -> SequenceSet:
    """One request's inputs (``{"m__values": ..., "m__lengths": ...}``; tensors, numpy arrays or
    nested lists) validated into a ``SequenceSet`` of its K candidates. A modality left out entirely
    is missing in every candidate; at least one must be given. ``batch_dim``: every input carries
    Triton's leading batch dimension, which must be 1 (one ranking call per request)."""
    if not isinstance(inputs, dict):
        raise RequestError("a request is a mapping of input name -> tensor")
    expected = {n for pair in input_names(config) for n in pair}
    unknown = sorted(set(inputs) - expected)
    if unknown:
        raise RequestError(f"unknown input {unknown[0]!r}; the model takes {sorted(expected)}")
    jagged = {}
    for modality, (values_name, lengths_name) in zip(config.modalities, input_names(config)):
        has_values, has_lengths = values_name in inputs, lengths_name in inputs
        if not has_values and not has_lengths:
            continue
        if has_values != has_lengths:
            missing = lengths_name if has_values else values_name
            raise RequestError(f"modality {modality.name!r}: input {missing!r} is missing "
                               f"(send {values_name!r} and {lengths_name!r} together)")
        values = _as_tensor(values_name, inputs[values_name])
        lengths = _as_tensor(lengths_name, inputs[lengths_name])
        if batch_dim:
            for name, t in ((values_name, values), (lengths_name, lengths)):
                if t.dim() == 0 or t.shape[0] != 1:
                    raise RequestError(f"input {name!r}: the batch dimension must be 1 (one ranking "
                                       f"call per request), got shape {tuple(t.shape)}")
            values, lengths = values[0], lengths[0]
        if modality.kind == "dense" and values.numel() == 0 and values.dim() == 1:
            values = values.reshape(0, modality.input_dim)  # JSON's [] for "no features"
        jagged[modality.name] = (values, lengths)
    if not jagged:
        raise RequestError(f"the request gives no modality; the model takes {sorted(expected)}")
    try:
        return SequenceSet.from_jagged(config, jagged, truncate=truncate)
    except ValueError as exc:
        raise RequestError(candidate_message(str(exc))) from None


def request_arrays(batch: SequenceSet, *, batch_dim: bool = False) -> dict[str, np.ndarray]:
    """A client's side: the inputs of one request scoring ``batch``'s candidates (ids int64, features
    float32; ``batch_dim``: with Triton's leading batch dimension of 1)."""
    arrays = {}
    for modality, (values_name, lengths_name) in zip(batch.config.modalities, input_names(batch.config)):
        values = batch.values[modality.name].detach().cpu()
        values = values.float() if modality.kind == "dense" else values.long()
        lengths = batch.lengths[modality.name].detach().cpu().long()
        arrays[values_name], arrays[lengths_name] = values.numpy(), lengths.numpy()
    if batch_dim:
        arrays = {name: a[None] for name, a in arrays.items()}
    return arrays


def npz_body(arrays: dict) -> bytes:
    """An HTTP body of ``arrays`` for the Ray Serve app (``Content-Type: application/x-npz``)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


@contextlib.contextmanager
def host_threads(count: int | None):
    """Run the block with ``count`` intra-op threads in this thread (None: as it is). Validation and
    packing are a few small torch ops per request; with several threads each parallel region costs a
    wake-up, a barrier and the workers' spinning — on a loaded 2-core machine, one request's
    validation took 28 ms with 2 threads and 0.17 ms with 1, and the Triton stub's CPU time per
    request fell from 6.5 to 0.9 ms. ATen's thread count is per thread once a thread has used it,
    so an engine running in another (already started) thread keeps its own."""
    before = torch.get_num_threads()
    if not count or count == before:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class ScorerStats:
    requests: int = 0  # answered with scores
    invalid: int = 0  # RequestError
    failed: int = 0  # EngineError
    batches: int = 0  # engine calls
    candidates: int = 0
    rows: int = 0
    batch_requests: dict = field(default_factory=dict)  # requests per engine call -> count

    def as_dict(self) -> dict:
        return {**{k: v for k, v in self.__dict__.items() if k != "batch_requests"},
                "batch_requests": {str(k): v for k, v in sorted(self.batch_requests.items())}}


class BatchScorer:
    """Scores a server's batch of requests with one engine call, each request isolated.

    ``engine`` is a ``FastDM2S2`` (or anything taking a ``SequenceSet`` and returning an output with
    ``logits``); batches are validated on the host and moved to ``device``. ``score_requests`` takes
    raw inputs and answers, per request, a ``[K, num_outputs]`` float32 tensor or the exception that
    request gets (``RequestError`` alone; ``EngineError`` for every request of a failed batch).
    ``transport_only`` skips the engine and answers zeros (validation, packing and the copy to the
    device still run): it measures what a server adds around the engine (``bench/servers_load.py``);
    never serve rankings with it.
    """

    def __init__(self, engine, *, device: str | torch.device | None = None, truncate: bool = False,
                 transport_only: bool = False, host_threads: int | None = 1):
        self.engine = engine
        self.host_threads = host_threads  # intra-op threads for validation and packing (None: the caller's)
        self.transport_only = transport_only  # answer zeros without the engine: a server's own cost
        self.config: DM2S2Config = engine.config
        if device is None:
            model = getattr(engine, "model", None)
            device = next(model.parameters()).device if model is not None else "cpu"
        self.device = torch.device(device)
        self.truncate = truncate
        self.stats = ScorerStats()

    def parse(self, inputs: dict, *, batch_dim: bool = False) -> SequenceSet:
        """One request validated alone (``parse_request``); a ``RequestError`` is counted."""
        try:
            with host_threads(self.host_threads):
                return parse_request(self.config, inputs, batch_dim=batch_dim, truncate=self.truncate)
        except RequestError:
            self.stats.invalid += 1
            raise

    def score_batches(self, batches: list[SequenceSet]) -> list[torch.Tensor]:
        """Scores of validated requests, one engine call for all; raises ``EngineError``."""
        sizes = [b.batch_size for b in batches]
        live = [b for b in batches if b.batch_size]
        num_outputs = self.config.num_outputs
        if not live:
            return [torch.zeros(0, num_outputs) for _ in batches]
        with host_threads(self.host_threads):
            packed = pack(self.config, live)
        try:
            if packed.device != self.device:
                packed = packed.to(self.device, non_blocking=self.device.type == "cuda")
            if self.transport_only:
                logits = torch.zeros(packed.batch_size, num_outputs)
            else:
                logits = self.engine(packed).logits.float().cpu()
        except Exception as exc:
            self.stats.failed += len(batches)
            raise EngineError(f"the engine failed on a batch of {len(live)} request(s): "
                              f"{type(exc).__name__}: {exc}") from exc
        self.stats.batches += 1
        self.stats.batch_requests[len(live)] = self.stats.batch_requests.get(len(live), 0) + 1
        self.stats.requests += len(batches)
        self.stats.candidates += packed.batch_size
        self.stats.rows += packed.num_elements
        parts = iter(logits.split([b.batch_size for b in live]))
        return [next(parts) if k else torch.zeros(0, num_outputs) for k in sizes]

    def score_requests(self, requests: list[dict], *, batch_dim: bool = False) -> list:
        results: list = [None] * len(requests)
        valid = []
        for i, inputs in enumerate(requests):
            try:
                valid.append((i, self.parse(inputs, batch_dim=batch_dim)))
            except RequestError as exc:
                results[i] = exc
        if valid:
            try:
                scores = self.score_batches([b for _, b in valid])
            except EngineError as exc:
                scores = [exc] * len(valid)
            for (i, _), s in zip(valid, scores):
                results[i] = s
        return results

    def warm_up(self) -> None:
        """One small batch through the engine (first-call allocations, library loads, kernel picks)."""
        jagged = {}
        for m in self.config.modalities:
            if m.kind == "dense":
                values = torch.zeros(1, m.input_dim)
            else:
                values = torch.zeros(1, dtype=torch.int64)
            jagged[m.name] = (values, torch.ones(1, dtype=torch.int64))
        self.engine(SequenceSet.from_jagged(self.config, jagged).to(self.device))
