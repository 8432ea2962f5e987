"""Serving: ``Ranker``, micro-batched scoring of concurrent ranking requests by one engine worker.

    from dm2s2_fast.serving import Ranker
    with Ranker(engine, max_batch_rows=4096, max_queue=64) as ranker:
        scores = ranker.score(candidates)               # [len(candidates), num_outputs], host
        scores = await ranker.score_async(candidates)   # asyncio
        scores = ranker.score_jagged({name: (values, lengths)})
"""
from .errors import EngineFailed, Overloaded, RankerClosed, RequestTimeout
from .ranker import Ranker

__all__ = ["EngineFailed", "Overloaded", "Ranker", "RankerClosed", "RequestTimeout"]
