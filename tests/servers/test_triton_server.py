"""The Triton model repository on the real tritonserver (the nvidia-pytriton wheel's binary), on CPU,
bound to loopback: every score of concurrent HTTP and gRPC requests against the fp64 reference,
batching seen in the server's metrics, and a malformed request failing alone."""
from __future__ import annotations

import concurrent.futures
import re
import urllib.request

import numpy as np
import pytest

from conftest import random_model, skip_unless_required, small_config

from servers_common import CONCURRENCY, check_scores, make_requests, malformed_arrays

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    try:
        import tritonclient.grpc  # noqa: F401
        import tritonclient.http  # noqa: F401
    except ImportError as exc:
        skip_unless_required("tritonclient[http,grpc]", str(exc))
    from dm2s2_fast.serving.triton import TritonNotFound, TritonServer, find_tritonserver, write_repository

    try:
        find_tritonserver()
    except TritonNotFound as exc:
        skip_unless_required("tritonserver (nvidia-pytriton)", str(exc))
    model = random_model(small_config(), seed=3)
    repo = tmp_path_factory.mktemp("triton_repo")
    # no preferred sizes and a long delay: the batcher waits for the concurrent requests to gather
    write_repository(repo, model, max_batch_size=16, preferred_batch_sizes=[],
                     max_queue_delay_us=50_000, num_threads=1)
    srv = TritonServer(repo, workdir=str(tmp_path_factory.mktemp("triton_server")))
    try:
        srv.start(timeout=120)
        yield srv, model
    finally:
        srv.stop()
        print(f"tritonserver log (tail):\n{srv.log(6000)}")


def _infer(url: str, protocol: str, arrays: dict):
    if protocol == "http":
        import tritonclient.http as client
    else:
        import tritonclient.grpc as client
    c = client.InferenceServerClient(url, **({"network_timeout": 120.0} if protocol == "http" else {}))
    inputs = []
    for name, array in arrays.items():
        i = client.InferInput(name, list(array.shape), "FP32" if array.dtype == np.float32 else "INT64")
        i.set_data_from_numpy(array)
        inputs.append(i)
    try:
        return c.infer("dm2s2", inputs, **({"client_timeout": 120} if protocol == "grpc" else {})).as_numpy("scores")
    finally:
        c.close()


def _metric(text: str, name: str) -> float:
    found = re.search(rf'^{name}{{model="dm2s2",version="1"}} (\S+)$', text, re.M)
    assert found, f"{name} not in the metrics:\n{text[:2000]}"
    return float(found.group(1))


def test_concurrent_requests_match_the_reference_and_are_batched(server):
    from dm2s2_fast.serving.triton.packing import request_arrays

    srv, model = server
    requests = make_requests(model, 32)
    jobs = []  # (what, protocol, arrays, reference or None for the malformed one)
    for i, (batch, reference) in enumerate(requests):
        protocol = "http" if i % 2 else "grpc"
        jobs.append((f"request {i} ({protocol}, K={batch.batch_size})", protocol,
                     request_arrays(batch, batch_dim=True), reference))
    bad = malformed_arrays(request_arrays(requests[5][0], batch_dim=True), model.config)
    jobs.insert(7, ("malformed (http)", "http", bad, None))
    jobs.insert(20, ("malformed (grpc)", "grpc", bad, None))

    url = {"http": srv.http_url, "grpc": srv.grpc_url}
    with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
        futures = [pool.submit(_infer, url[protocol], protocol, arrays) for _, protocol, arrays, _ in jobs]
        concurrent.futures.wait(futures, timeout=120)
    for (what, _, _, reference), future in zip(jobs, futures):
        if reference is None:
            with pytest.raises(Exception, match=r"modality 'tags', candidate \d+: id \d+ is out of range"):
                future.result(timeout=0)
        else:
            check_scores(future.result(timeout=0)[0], reference, what)

    with urllib.request.urlopen(srv.metrics_url, timeout=10) as r:
        metrics = r.read().decode()
    count, executions = _metric(metrics, "nv_inference_count"), _metric(metrics, "nv_inference_exec_count")
    assert count >= len(jobs), (count, executions)
    assert executions < count, f"no batching: {executions} executions for {count} inferences"
    print(f"{count:.0f} inferences in {executions:.0f} executions")
