"""``python -m dm2s2_fast triton-repo --out DIR [--checkpoint PATH] [...] [--serve]``.

Writes a Triton model repository (``repository.write_repository``); with ``--serve`` it then runs
the tritonserver of the nvidia-pytriton wheel on it in the foreground (Ctrl-C stops it).
"""
from __future__ import annotations

import argparse
import sys
import time

from .repository import RepositoryOptions, write_repository


def _sizes(text: str) -> list[int]:
    if text.strip().lower() in ("", "none"):
        return []
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers or 'none', got {text!r}") from None


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The triton-repo options (on ``parser`` if given: a subcommand's)."""
    d = RepositoryOptions()
    p = parser or argparse.ArgumentParser(prog="python -m dm2s2_fast triton-repo",
                                          description="write a Triton model repository serving DM²S²")
    p.add_argument("--out", required=True, metavar="DIR", help="the repository (created if absent)")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="a dm2s2_fast checkpoint file (dm2s2_fast.serving.triton.save_checkpoint) or a "
                        "Hugging Face BERT directory; default: a seeded random ads model (for trying it out)")
    p.add_argument("--name", default=d.name, help="model name (default %(default)s)")
    p.add_argument("--backend", default=d.backend, help="engine backend (default %(default)s)")
    p.add_argument("--kind", choices=("cpu", "gpu"), default=d.kind, help="instance kind (default %(default)s)")
    p.add_argument("--instances", type=int, default=d.instances, help="model instances (default %(default)s)")
    p.add_argument("--gpus", type=_sizes, default=[], metavar="IDS", help="KIND_GPU devices, e.g. 0,1 (default: all)")
    p.add_argument("--dtype", default=d.dtype, help="float32 | bfloat16 | float16 (default %(default)s)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--cuda-graphs", dest="cuda_graphs", action="store_true", default=None,
                   help="replay CUDA graphs (default: on for --kind gpu)")
    g.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false")
    p.add_argument("--num-threads", type=int, default=d.num_threads,
                   help="torch threads per instance (default: torch's)")
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size,
                   help="requests per execute() (default %(default)s)")
    p.add_argument("--preferred-batch-sizes", type=_sizes, default=None, metavar="N,N,...|none",
                   help="default: the request counts that fill the engine's power-of-two sample buckets")
    p.add_argument("--candidates-per-request", type=int, default=d.candidates_per_request,
                   help="typical K, for the default preferred sizes (default %(default)s)")
    p.add_argument("--max-queue-delay-us", type=int, default=d.max_queue_delay_us,
                   help="dynamic batcher's wait for more requests (default %(default)s)")
    p.add_argument("--max-queue-size", type=int, default=d.max_queue_size,
                   help="queued requests beyond this are rejected (default %(default)s)")
    p.add_argument("--queue-timeout-us", type=int, default=d.queue_timeout_us,
                   help="requests queued longer are rejected; 0: never (default %(default)s)")
    p.add_argument("--truncate", action="store_true", help="cut sequences beyond max_positions")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model directory")
    p.add_argument("--serve", action="store_true",
                   help="then run tritonserver (from the nvidia-pytriton wheel) on the repository")
    p.add_argument("--host", default="127.0.0.1", help="--serve: the address to bind (default %(default)s)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    return p


def run(args: argparse.Namespace) -> int:
    options = RepositoryOptions(
        name=args.name, kind=args.kind, instances=args.instances, gpus=tuple(args.gpus),
        backend=args.backend, dtype=args.dtype, cuda_graphs=args.cuda_graphs,
        num_threads=args.num_threads, max_batch_size=args.max_batch_size,
        preferred_batch_sizes=args.preferred_batch_sizes,
        candidates_per_request=args.candidates_per_request,
        max_queue_delay_us=args.max_queue_delay_us, max_queue_size=args.max_queue_size,
        queue_timeout_us=args.queue_timeout_us, truncate=args.truncate)
    if args.checkpoint is None:
        print("no --checkpoint: serving a seeded random ads model (for trying the server out)", file=sys.stderr)
    try:
        model_dir = write_repository(args.out, args.checkpoint, options=options, overwrite=args.overwrite)
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"triton-repo: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {model_dir} (config.pbtxt, 1/model.py, 1/dm2s2.pt)")
    if not args.serve:
        print(f"serve it: python -m dm2s2_fast triton-repo --out {args.out} --overwrite --serve, or "
              f"tritonserver --model-repository={args.out} (its Python backend must import torch and "
              "dm2s2_fast; docs/serving_servers.md)")
        return 0
    from .server import TritonNotFound, TritonServer

    server = TritonServer(args.out, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port)
    try:
        server.start()
    except (TritonNotFound, RuntimeError) as exc:
        print(f"triton-repo --serve: {exc}", file=sys.stderr)
        server.cleanup()
        return 1
    print(f"tritonserver ready: HTTP {server.http_url}, gRPC {server.grpc_url}, metrics {server.metrics_url}; "
          f"log {server.log_path} (removed at exit); Ctrl-C stops it", flush=True)
    try:
        while server.process is not None and server.process.poll() is None:
            time.sleep(0.5)
        print(f"tritonserver exited; its log:\n{server.log(4000)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()
        server.cleanup()


def main(argv=None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
