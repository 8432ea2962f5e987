"""The errors a ``Ranker`` answers with (besides ``ValueError`` for a malformed request)."""
from __future__ import annotations


class Overloaded(RuntimeError):
    """The request was refused at submission: the queue is full (``max_queue``) or its estimated
    wait exceeds the budget (``max_wait_ms``). Nothing of it was queued; retry later or elsewhere."""


class RankerClosed(RuntimeError):
    """The ranker is closed (or closing): it takes no new work. Work accepted before ``close()`` is
    still answered, unless ``close(cancel_pending=True)`` failed it with this error."""


class RequestTimeout(TimeoutError):
    """The request's deadline (``timeout_ms``) passed before its scores were ready. A request whose
    deadline passes while it is queued is dropped without running."""


class EngineFailed(RuntimeError):
    """The engine raised on the batch that held this request; ``__cause__`` is the engine's
    exception. Only that batch's requests get it: the worker goes on serving."""
