"""The server-independent parts of the Triton repository and the Ray app: the request schema, the
isolation and packing of a server's batch, the repository's files, the CLI, and the Python-backend
model.py run against a stand-in of Triton's ``triton_python_backend_utils`` (no server needed)."""
from __future__ import annotations

import importlib.util
import json
import sys
import types

import numpy as np
import pytest
import torch

from conftest import FP32_TOL, fp64_reference, random_batch, random_model, rel_err, small_config

from dm2s2_fast import convert
from dm2s2_fast.serving.triton import (BatchScorer, EngineError, RepositoryOptions, RequestError, load_checkpoint,
                                       parse_request, preferred_batch_sizes, render_config, save_checkpoint,
                                       write_repository)
from dm2s2_fast.serving.triton.cli import main as cli_main
from dm2s2_fast.serving.triton.packing import npz_body, request_arrays


@pytest.fixture(scope="module")
def model():
    return random_model(small_config(), seed=5)


def test_preferred_sizes_fill_power_of_two_sample_buckets():
    assert preferred_batch_sizes(32, 16) == [1, 2, 4, 8, 16, 32]
    assert preferred_batch_sizes(32, 10) == [1, 3, 6, 12, 25]  # 10, 30, 60, 120, 250 of 16..256 slots
    assert preferred_batch_sizes(8, 1) == [1, 2, 4, 8]


def test_config_pbtxt(model):
    text = render_config(model.config, RepositoryOptions(max_batch_size=16, max_queue_delay_us=700,
                                                         max_queue_size=9, queue_timeout_us=1234))
    assert 'name: "image__values" data_type: TYPE_FP32 dims: [ -1, 6 ] allow_ragged_batch: true' in text
    assert 'name: "tags__values" data_type: TYPE_INT64 dims: [ -1 ] allow_ragged_batch: true' in text
    assert text.count("allow_ragged_batch: true") == 2 * model.config.num_modalities
    assert "optional" not in text  # Triton would not batch requests giving different optional inputs
    assert 'name: "scores" data_type: TYPE_FP32 dims: [ -1, 2 ]' in text
    for line in ("max_batch_size: 16", "preferred_batch_size: [ 1, 2, 4, 8, 16 ]",
                 "max_queue_delay_microseconds: 700", "max_queue_size: 9",
                 "default_timeout_microseconds: 1234", "timeout_action: REJECT", "kind: KIND_CPU"):
        assert line in text, line
    gpu = render_config(model.config, RepositoryOptions(kind="gpu", gpus=(0, 1), instances=2,
                                                        preferred_batch_sizes=[]))
    assert "{ count: 2 kind: KIND_GPU gpus: [ 0, 1 ] }" in gpu and "preferred_batch_size" not in gpu
    assert 'key: "cuda_graphs" value: { string_value: "true" }' in gpu
    with pytest.raises(ValueError, match="kind"):
        render_config(model.config, RepositoryOptions(kind="tpu"))
    with pytest.raises(ValueError, match="preferred batch size 64"):
        render_config(model.config, RepositoryOptions(max_batch_size=32, preferred_batch_sizes=[64]))


def test_checkpoint_round_trip(model, tmp_path):
    path = save_checkpoint(model, tmp_path / "m.pt")
    loaded = load_checkpoint(path)
    assert loaded.config == model.config
    batch = random_batch(model.config, 5, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch).logits, model(batch).logits, rtol=0, atol=0)
    torch.save({"not": "a checkpoint"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a dm2s2_fast checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_write_repository_and_cli(model, tmp_path):
    model_dir = write_repository(tmp_path / "repo", convert(model, "torch"))
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "config.pbtxt", "dm2s2_config.json"]
    assert sorted(p.name for p in (model_dir / "1").iterdir()) == ["dm2s2.pt", "model.py"]
    assert 'key: "backend" value: { string_value: "torch" }' in (model_dir / "config.pbtxt").read_text()
    assert json.loads((model_dir / "dm2s2_config.json").read_text())["num_outputs"] == 2
    with pytest.raises(FileExistsError):
        write_repository(tmp_path / "repo", model)

    checkpoint = save_checkpoint(model, tmp_path / "m.pt")
    assert cli_main(["--out", str(tmp_path / "cli"), "--checkpoint", str(checkpoint), "--max-queue-delay-us",
                     "250", "--preferred-batch-sizes", "none", "--kind", "gpu", "--name", "ranker"]) == 0
    text = (tmp_path / "cli" / "ranker" / "config.pbtxt").read_text()
    assert "max_queue_delay_microseconds: 250" in text and "KIND_GPU" in text and "preferred" not in text
    assert cli_main(["--out", str(tmp_path / "cli"), "--checkpoint", str(checkpoint), "--name", "ranker"]) == 2


def _requests(model, sizes, seed=10):
    batches = [random_batch(model.config, k, seed=seed + i, max_len=10) for i, k in enumerate(sizes)]
    return batches, [fp64_reference(model, b).logits for b in batches]


def test_scorer_packs_requests_and_isolates_a_bad_one(model):
    scorer = BatchScorer(convert(model))
    batches, references = _requests(model, [3, 1, 7, 2])
    inputs = [request_arrays(b, batch_dim=True) for b in batches]
    bad = dict(inputs[1])
    bad["title__lengths"] = bad["title__lengths"] + 100  # lengths beyond the values
    results = scorer.score_requests(inputs[:2] + [bad] + inputs[2:], batch_dim=True)
    assert isinstance(results[2], RequestError) and "modality 'title', candidate 0" in str(results[2])
    for scores, reference in zip(results[:2] + results[3:], references):
        assert scores.dtype == torch.float32 and rel_err(scores, reference) <= FP32_TOL
    assert scorer.stats.batches == 1 and scorer.stats.requests == 4 and scorer.stats.invalid == 1


@pytest.mark.parametrize("change, message", [
    (lambda a: {**a, "title__values": np.concatenate([a["title__values"]] * 2)}, "batch dimension must be 1"),
    (lambda a: {k: v for k, v in a.items() if k != "body__lengths"}, "'body__lengths' is missing"),
    (lambda a: {**a, "colour__values": a["title__values"]}, "unknown input 'colour__values'"),
    (lambda a: {}, "gives no modality"),
    (lambda a: {**a, "image__values": a["image__values"][:, :, :5]}, "dense features must be 2-D"),
])
def test_malformed_requests(model, change, message):
    batch = random_batch(model.config, 4, seed=2)
    with pytest.raises(RequestError, match=message):
        parse_request(model.config, change(request_arrays(batch, batch_dim=True)), batch_dim=True)


def test_json_and_npz_shapes_and_empty_request(model):
    batch = random_batch(model.config, 3, seed=4)
    arrays = request_arrays(batch)
    as_json = {k: a.tolist() for k, a in arrays.items()}
    as_json["image__values"], as_json["image__lengths"] = [], [0, 0, 0]  # no features: JSON's []
    parsed = parse_request(model.config, as_json)
    assert parsed.batch_size == 3 and parsed.values["image"].shape == (0, 6)
    with np.load(__import__("io").BytesIO(npz_body(arrays))) as npz:
        assert sorted(npz.files) == sorted(arrays)
    scorer = BatchScorer(convert(model))
    empty = {k: a[:0] for k, a in arrays.items()}
    results = scorer.score_requests([empty, arrays])
    assert results[0].shape == (0, 2) and results[1].shape == (3, 2)


def test_an_engine_failure_fails_its_batch_only(model):
    engine = convert(model)
    calls = []

    def flaky(batch):
        calls.append(batch.batch_size)
        if len(calls) == 1:
            raise RuntimeError("device lost")
        return engine(batch)

    flaky.config = engine.config
    scorer = BatchScorer(flaky, device="cpu")
    batches, references = _requests(model, [2, 3])
    inputs = [request_arrays(b) for b in batches]
    failed = scorer.score_requests(inputs)
    assert all(isinstance(r, EngineError) and "device lost" in str(r) for r in failed)
    again = scorer.score_requests(inputs)
    assert all(rel_err(s, ref) <= FP32_TOL for s, ref in zip(again, references))


class _FakeTensor:
    def __init__(self, name, array):
        self.name, self.array = name, array

    def to_dlpack(self):
        return torch.from_numpy(np.ascontiguousarray(self.array)).__dlpack__()

    @classmethod
    def from_dlpack(cls, name, tensor):
        return cls(name, torch.from_dlpack(tensor).numpy())


def _fake_pb_utils():
    pb = types.ModuleType("triton_python_backend_utils")

    class TritonError(Exception):
        INVALID_ARG, INTERNAL = 3, 13

        def __init__(self, message, code=0):
            super().__init__(message)
            self.code = code

    class InferenceResponse:
        def __init__(self, output_tensors, error=None):
            self.output_tensors, self.error = output_tensors, error

    pb.TritonError, pb.InferenceResponse, pb.Tensor = TritonError, InferenceResponse, _FakeTensor
    pb.Logger = types.SimpleNamespace(log_info=lambda message: None)
    pb.get_input_tensor_by_name = lambda request, name: (
        _FakeTensor(name, request[name]) if name in request else None)
    return pb


def test_model_py_against_a_stand_in_python_backend(model, tmp_path, monkeypatch):
    model_dir = write_repository(tmp_path, model, backend="auto")
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils())
    spec = importlib.util.spec_from_file_location("dm2s2_triton_model", model_dir / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = {"parameters": {}}
    for line in (model_dir / "config.pbtxt").read_text().splitlines():
        if line.strip().startswith("{ key:"):
            key, value = line.split('"')[1], line.split('"')[3]
            config["parameters"][key] = {"string_value": value}
    triton_model = module.TritonPythonModel()
    triton_model.initialize({"model_config": json.dumps(config), "model_instance_kind": "CPU",
                             "model_instance_device_id": "0", "model_instance_name": "dm2s2_0_0",
                             "model_repository": str(model_dir), "model_version": "1"})
    batches, references = _requests(model, [4, 1, 6], seed=40)
    requests = [request_arrays(b, batch_dim=True) for b in batches]
    bad = dict(requests[0])
    bad["tags__values"] = bad["tags__values"] + 1000
    responses = triton_model.execute(requests[:1] + [bad] + requests[1:])
    assert responses[1].error is not None and responses[1].error.code == 3
    assert "modality 'tags', candidate" in str(responses[1].error)
    for response, reference in zip(responses[:1] + responses[2:], references):
        assert response.error is None
        (scores,) = response.output_tensors
        assert scores.name == "scores" and scores.array.shape == (1,) + tuple(reference.shape)
        assert rel_err(torch.from_numpy(scores.array[0]), reference) <= FP32_TOL
    triton_model.finalize()
