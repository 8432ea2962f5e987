"""``write_repository``: a Triton Inference Server model repository that serves a DM²S² model.

Layout (``<out>/<name>/``)::

    config.pbtxt        inputs, output, dynamic batcher, queue policy, instance groups, parameters
    1/model.py          the Python-backend model (``model.py`` of this package, copied verbatim)
    1/dm2s2.pt          the weights: config + state_dict (``checkpoint.save_checkpoint``)

The request schema (``packing.py``): per modality ``m__values`` (``[1, T]`` INT64 ids or
``[1, T, input_dim]`` FP32 features) and ``m__lengths`` (``[1, K]`` INT64); the answer ``scores``
``[1, K, num_outputs]`` FP32. Every input has ``allow_ragged_batch: true``, so the dynamic batcher
groups requests of any K and T into one ``execute()``; the Python backend hands the model the
requests one by one and ``model.py`` concatenates them into one ragged batch itself (Triton's batch
inputs such as ``BATCH_ACCUMULATED_ELEMENT_COUNT_WITH_ZERO`` — our ``cu_seqlens`` — are for backends
that receive Triton's concatenation; the Python backend gets none). The leading dimension is
Triton's batch dimension and is 1: one request is one ranking call, so ``max_batch_size`` and
``preferred_batch_size`` count requests. Every input is required (a modality missing in all K
candidates is sent as K zero lengths and no values): Triton does not batch requests that give
different sets of optional inputs together.

``preferred_batch_size`` is put on the engine's buckets: the CUDA-graph buckets hold a power of two
of samples (``graphs.bucket_for``: ``batch_slots = next_pow2(B)``), so for requests of
``candidates_per_request`` candidates the preferred sizes are the request counts that fill a
power of two of samples: ``2**j // candidates_per_request`` (1, 2, 4, ... for 16 candidates). The
row buckets (4 per octave) follow the sequences' lengths, which a request count cannot target.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ...config import DM2S2Config
from .checkpoint import DTYPES, config_to_dict, model_from_source, save_checkpoint
from .packing import OUTPUT_NAME, input_names

MODEL_TEMPLATE = Path(__file__).with_name("model.py")
WEIGHTS_FILE = "dm2s2.pt"
KINDS = ("cpu", "gpu")


def preferred_batch_sizes(max_batch_size: int, candidates_per_request: int) -> list[int]:
    """Request counts whose candidates fill a power-of-two sample bucket, up to ``max_batch_size``."""
    if candidates_per_request < 1:
        raise ValueError(f"candidates_per_request must be >= 1, got {candidates_per_request}")
    sizes, slots = set(), 1
    while slots // candidates_per_request <= max_batch_size:
        if slots >= candidates_per_request:
            sizes.add(slots // candidates_per_request)
        slots *= 2
    return sorted(sizes)


@dataclass
class RepositoryOptions:
    """What ``config.pbtxt`` says; every field has a CLI flag (``cli.py``)."""

    name: str = "dm2s2"
    kind: str = "cpu"  # instance group: KIND_CPU or KIND_GPU
    instances: int = 1  # model instances (each a Python-backend process with its own engine)
    gpus: tuple[int, ...] = ()  # KIND_GPU: the devices (default: all)
    backend: str = "auto"  # the engine's backend (dm2s2_fast.convert)
    dtype: str = "float32"
    cuda_graphs: bool | None = None  # None: on for KIND_GPU
    num_threads: int = 0  # torch intra-op threads per instance (0: torch's default)
    max_batch_size: int = 32  # requests per execute()
    preferred_batch_sizes: list[int] | None = None  # None: on the buckets; []: none
    candidates_per_request: int = 16  # the typical K the preferred sizes are computed for
    max_queue_delay_us: int = 500
    max_queue_size: int = 256  # requests waiting beyond this are rejected
    queue_timeout_us: int = 2_000_000  # a request queued longer is rejected (0: no timeout)
    truncate: bool = False  # cut sequences beyond max_positions instead of rejecting the request
    extra_parameters: dict = field(default_factory=dict)

    def check(self) -> None:
        if not self.name or any(c in self.name for c in "/\\ \"'"):
            raise ValueError(f"model name must be a plain directory name, got {self.name!r}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        for key in ("instances", "max_batch_size", "candidates_per_request"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {getattr(self, key)!r}")
        for key in ("num_threads", "max_queue_delay_us", "max_queue_size", "queue_timeout_us"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 0:
                raise ValueError(f"{key} must be an integer >= 0, got {getattr(self, key)!r}")
        for size in self.preferred_batch_sizes or ():
            if not 1 <= size <= self.max_batch_size:
                raise ValueError(f"preferred batch size {size} is outside [1, max_batch_size "
                                 f"{self.max_batch_size}]")
        if self.cuda_graphs and self.kind != "gpu":
            raise ValueError("cuda_graphs needs kind='gpu'")


def _pbtxt_value(value) -> str:
    return json.dumps(str(value))  # a quoted protobuf text string


def render_config(config: DM2S2Config, options: RepositoryOptions) -> str:
    """``config.pbtxt`` for ``config``'s inputs and ``options``."""
    options.check()
    inputs = []
    for modality, (values_name, lengths_name) in zip(config.modalities, input_names(config)):
        if modality.kind == "dense":
            values = f'data_type: TYPE_FP32 dims: [ -1, {modality.input_dim} ]'
        else:
            values = "data_type: TYPE_INT64 dims: [ -1 ]"
        inputs.append(f'  {{ name: "{values_name}" {values} allow_ragged_batch: true }}')
        inputs.append(f'  {{ name: "{lengths_name}" data_type: TYPE_INT64 dims: [ -1 ] '
                      f"allow_ragged_batch: true }}")
    preferred = options.preferred_batch_sizes
    if preferred is None:
        preferred = preferred_batch_sizes(options.max_batch_size, options.candidates_per_request)
    cuda_graphs = options.kind == "gpu" if options.cuda_graphs is None else options.cuda_graphs
    parameters = {"weights": WEIGHTS_FILE, "backend": options.backend, "dtype": options.dtype,
                  "cuda_graphs": str(bool(cuda_graphs)).lower(), "num_threads": options.num_threads,
                  "truncate": str(bool(options.truncate)).lower(), **options.extra_parameters}
    if options.kind == "gpu":
        gpus = f" gpus: [ {', '.join(map(str, options.gpus))} ]" if options.gpus else ""
        group = f"  {{ count: {options.instances} kind: KIND_GPU{gpus} }}"
    else:
        group = f"  {{ count: {options.instances} kind: KIND_CPU }}"
    policy = ["    timeout_action: REJECT",
              f"    default_timeout_microseconds: {options.queue_timeout_us}",
              "    allow_timeout_override: true",
              f"    max_queue_size: {options.max_queue_size}"]
    lines = [
        f"# DM²S² ({config.num_modalities} modalities, {config.num_layers} layers, d={config.hidden_size}), "
        "written by `python -m dm2s2_fast triton-repo`.",
        "# One request = one ranking call: per modality <m>__values ([1, T] ids or [1, T, input_dim] "
        "features) and <m>__lengths ([1, K]); answer scores [1, K, num_outputs].",
        f'name: "{options.name}"',
        'backend: "python"',
        f"max_batch_size: {options.max_batch_size}",
        "input [", ",\n".join(inputs), "]",
        "output [",
        f'  {{ name: "{OUTPUT_NAME}" data_type: TYPE_FP32 dims: [ -1, {config.num_outputs} ] }}',
        "]",
        "dynamic_batching {",
    ]
    if preferred:
        lines.append(f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]")
    lines += [f"  max_queue_delay_microseconds: {options.max_queue_delay_us}",
              "  default_queue_policy {", *policy, "  }", "}",
              "instance_group [", group, "]",
              "parameters ["]
    lines.append(",\n".join(f'  {{ key: "{k}" value: {{ string_value: {_pbtxt_value(v)} }} }}'
                            for k, v in parameters.items()))
    lines.append("]")
    return "\n".join(lines) + "\n"


def write_repository(out_dir: str | os.PathLike, engine_or_checkpoint=None, *,
                     options: RepositoryOptions | None = None, overwrite: bool = False,
                     **option_fields) -> Path:
    """Write a Triton model repository serving ``engine_or_checkpoint`` and return the model's
    directory (``<out_dir>/<name>``).

    ``engine_or_checkpoint``: a ``FastDM2S2`` (its reference model's weights; its backend unless
    ``backend=`` is given), a ``DM2S2``, a checkpoint file (``save_checkpoint``), a Hugging Face BERT
    directory, or None (a seeded random ads model, for trying the server out). ``options`` or keyword
    fields of ``RepositoryOptions`` (``kind``, ``max_batch_size``, ``max_queue_delay_us``, ...).
    An existing model directory is replaced only with ``overwrite=True``.
    """
    from ...engine import FastDM2S2

    if options is None:
        if isinstance(engine_or_checkpoint, FastDM2S2) and "backend" not in option_fields:
            option_fields["backend"] = engine_or_checkpoint.backend
        options = RepositoryOptions(**option_fields)
    elif option_fields:
        raise TypeError("give either options= or option fields, not both")
    model = model_from_source(engine_or_checkpoint)
    config_text = render_config(model.config, options)  # checks the options before writing
    model_dir = Path(out_dir) / options.name
    if model_dir.exists():
        if not overwrite:
            raise FileExistsError(f"{model_dir} exists; pass overwrite=True (--overwrite) to replace it")
        shutil.rmtree(model_dir)
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(config_text)
    shutil.copyfile(MODEL_TEMPLATE, version_dir / "model.py")
    save_checkpoint(model, version_dir / WEIGHTS_FILE)
    (model_dir / "dm2s2_config.json").write_text(json.dumps(config_to_dict(model.config), indent=1) + "\n")
    return model_dir
