"""DM²S² on NVIDIA Triton Inference Server (docs/serving_servers.md).

    from dm2s2_fast.serving.triton import write_repository, TritonServer
    write_repository("models", engine_or_checkpoint, kind="cpu", max_queue_delay_us=500)
    with TritonServer("models") as server:       # the nvidia-pytriton wheel's tritonserver
        ...                                      # tritonclient on server.http_url / server.grpc_url

CLI: ``python -m dm2s2_fast triton-repo --out models [--checkpoint PATH] [--serve]``. The request
schema and the packing of a batch of requests are in ``packing.py`` (shared with the Ray Serve app,
``dm2s2_fast.serving.ray_app``); ``model.py`` is the Python-backend model the repository runs.
Importing this package needs neither Triton nor its client.
"""
from .checkpoint import build_engine, load_checkpoint, save_checkpoint
from .packing import (LENGTHS_SUFFIX, OUTPUT_NAME, VALUES_SUFFIX, BatchScorer, EngineError, RequestError,
                      input_names, parse_request)
from .repository import RepositoryOptions, preferred_batch_sizes, render_config, write_repository
from .server import TritonNotFound, TritonServer, find_tritonserver

__all__ = ["BatchScorer", "EngineError", "LENGTHS_SUFFIX", "OUTPUT_NAME", "RepositoryOptions", "RequestError",
           "TritonNotFound", "TritonServer", "VALUES_SUFFIX", "build_engine", "find_tritonserver", "input_names",
           "load_checkpoint", "parse_request", "preferred_batch_sizes", "render_config", "save_checkpoint",
           "write_repository"]
