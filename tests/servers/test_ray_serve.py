"""The Ray Serve app on a local Ray instance (2 CPUs, no dashboard), through Serve's HTTP proxy on
loopback: every score of concurrent requests against the fp64 reference, batching seen in the
replica's counters, and a malformed request failing alone (HTTP 400) while the others succeed."""
from __future__ import annotations

import concurrent.futures
import json
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from conftest import random_batch, random_model, skip_unless_required, small_config

from servers_common import CONCURRENCY, check_scores, make_requests, malformed_arrays

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def ray_app():
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        skip_unless_required("ray[serve]", str(exc))
    from dm2s2_fast.serving.ray_app import app
    from dm2s2_fast.serving.triton.server import free_ports

    model = random_model(small_config(), seed=4)
    port = free_ports(1)[0]
    ray.init(num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # a wait long enough for the concurrent requests to gather into batches
        serve.run(app(model, num_cpus=1, num_threads=1, batch_wait_timeout_s=0.05, max_batch_rows=4096),
                  name="dm2s2", route_prefix="/dm2s2")
        yield f"http://127.0.0.1:{port}/dm2s2", model
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def _post(url: str, body: bytes, content_type: str):
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_concurrent_requests_match_the_reference_and_are_batched(ray_app):
    from dm2s2_fast.serving.triton.packing import npz_body, request_arrays

    url, model = ray_app
    requests = make_requests(model, 32, seed=300)
    jobs = []  # (what, body, content type, reference or None for the malformed ones)
    for i, (batch, reference) in enumerate(requests):
        arrays = request_arrays(batch)
        if i % 4 == 1:  # some as JSON
            body = json.dumps({k: a.tolist() for k, a in arrays.items()}).encode()
            jobs.append((f"request {i} (json, K={batch.batch_size})", body, "application/json", reference))
        else:
            jobs.append((f"request {i} (npz, K={batch.batch_size})", npz_body(arrays), "application/x-npz", reference))
    bad = malformed_arrays(request_arrays(requests[5][0]), model.config)
    jobs.insert(7, ("malformed (npz)", npz_body(bad), "application/x-npz", None))
    jobs.insert(20, ("malformed (json)", json.dumps({k: a.tolist() for k, a in bad.items()}).encode(),
                     "application/json", None))

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
        futures = [pool.submit(_post, url, body, ctype) for _, body, ctype, _ in jobs]
        concurrent.futures.wait(futures, timeout=120)
    elapsed = time.perf_counter() - start
    for (what, _, _, reference), future in zip(jobs, futures):
        status, answer = future.result(timeout=0)
        if reference is None:
            assert status == 400, (what, status, answer)
            assert "modality 'tags', candidate" in answer["error"] and "out of range" in answer["error"], answer
        else:
            assert status == 200, (what, status, answer)
            check_scores(np.asarray(answer["scores"], dtype=np.float32), reference, what)  # fp32 exactly

    with urllib.request.urlopen(url + "/stats", timeout=10) as r:
        stats = json.loads(r.read())
    print(f"{len(jobs)} requests in {elapsed:.2f} s: {stats}")
    assert stats["requests"] == len(requests) and stats["invalid"] == 2, stats
    assert stats["batches"] < stats["requests"], f"no batching: {stats}"


def test_build_app_takes_serve_run_arguments():
    try:
        import ray.serve  # noqa: F401
    except ImportError as exc:
        skip_unless_required("ray[serve]", str(exc))
    from ray.serve import Application

    from dm2s2_fast.serving.ray_app import build_app, packed_rows

    assert isinstance(build_app({"checkpoint": "m.pt", "num_replicas": "2", "max_batch_rows": "100",
                                 "batch_wait_timeout_s": "0.01", "transport_only": "false"}), Application)
    assert isinstance(build_app({"min_replicas": "1", "max_replicas": "4", "target_ongoing_requests": "8"}),
                      Application)
    batch = random_batch(small_config(), 3, seed=1)
    assert packed_rows([batch, batch]) == 2 * batch.num_elements
