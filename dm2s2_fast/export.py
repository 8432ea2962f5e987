"""Export, package and compile the engine: torch.export with dynamic ragged shapes, AOTInductor
packages, torch.compile (docs/export.md).

A batch's packing plan is host work (numpy), so it stays out of every traced graph: it is built
before the call, and the traced forward (``PackedForward``) takes what the kernels read — the packed
values, per modality the packed row and position of each value, the three offset vectors — plus a
tensor whose *length* is the attention's longest group (a custom op's ``int`` argument would
specialize a symbolic one; a size stays symbolic). Rows N, samples B, segments S, each modality's
row count and that length are dynamic dimensions within declared ranges.

Inside a traced graph the engine calls kernels a graph can hold (``traced_kernel``): the ``cpp``
backend's ``torch.ops.dm2s2_fast.*`` operators themselves (not the MKL packed-weight GEMM the eager
engine takes for small outputs), the ``torch`` backend's references with the padded attention; the
``cuda`` and ``triton`` kernels are operators already and are used as they are.

Nothing here loads the compiled library at import (``import dm2s2_fast`` must not).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import DM2S2Config
from .data import SequenceSet
from .data.sequence_set import config_from_dict, config_to_dict
from .output import DM2S2Output

DEFAULT_MAX_BATCH_SIZE = 1024
OUTPUTS = ("logits", "pooled", "hidden", "intra_weights", "inter_weights", "segment_pooled")
_METADATA_KEY = "dm2s2_fast"


# ---- kernels a traced graph calls -----------------------------------------------------------------
def _set_attention_padded(q, k, v, cu_seqlens, max_seqlen, scale):
    """The torch backend's set_attention in a traced graph: groups padded to ``max_seqlen`` (a
    symbolic size here) with a key mask, as ``ops.set_attention``'s reference — the eager CPU kernel
    loops over the groups on the host. Written with ``bmm``, ``index`` and ``index_put_`` rather than
    sdpa and Python indexing, which guard on sizes being 1 (the program would refuse B=1)."""
    n, heads, dim = q.shape
    groups = cu_seqlens.shape[0] - 1
    cu = cu_seqlens.long()
    rows = torch.arange(n, device=q.device)
    group = torch.searchsorted(cu[1:], rows, right=True)
    position = rows - torch.index_select(cu, 0, group)
    width = torch.sym_max(max_seqlen, 1)

    def pad(t):  # -> [G*H, W, D]
        padded = t.new_zeros(groups, heads, width, dim)
        padded.transpose(1, 2).index_put_((group, position), t)
        return padded.view(groups * heads, width, dim)

    scores = torch.bmm(pad(q), pad(k).transpose(1, 2)).view(groups, heads, width, width) * scale
    keep = torch.arange(width, device=q.device)[None, :] < (cu[1:] - cu[:-1])[:, None]  # [G, W]
    scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).view(groups * heads, width, width)
    out = torch.bmm(probs, pad(v)).view(groups, heads, width, dim).transpose(1, 2)
    return torch.ops.aten.index.Tensor(out, [group, position])


def _embed_layernorm_traced(positions, type_ids, position_table, type_table, weight, bias, eps, ids, table,
                            dense, out, out_rows):
    """``ops.embed_layernorm``'s reference with ``index_put_`` for ``out[out_rows] = y`` (see above)."""
    content = torch.index_select(table, 0, ids) if ids is not None else dense
    e = content + torch.index_select(position_table, 0, positions) + torch.index_select(type_table, 0, type_ids)
    y = F.layer_norm(e, (e.shape[-1],), weight, bias, eps)
    return out.index_put_((out_rows,), y)


def _cpp_set_attention(q, k, v, cu_seqlens, max_seqlen, scale, *, bound: int):
    # The schema's ``int max_seqlen`` would specialize a symbolic one; the CPU kernel takes it only as
    # a bound to check (it sizes its scratch from the offsets), so the config's bound goes instead.
    return torch.ops.dm2s2_fast.set_attention(q, k, v, cu_seqlens, bound, scale)


def _cpp_embed_layernorm(positions, type_ids, position_table, type_table, weight, bias, eps, ids, table, dense,
                         out, out_rows):
    torch.ops.dm2s2_fast.embed_layernorm(positions, type_ids, position_table, type_table, weight, bias, eps, ids,
                                         table, dense, out, out_rows)
    return out


def _cpp_linear(x, weight, bias):
    return torch.ops.dm2s2_fast.linear(x, weight, bias)


def _cpp_linear_bias_gelu(x, weight, bias):
    return torch.ops.dm2s2_fast.linear_bias_gelu(x, weight, bias)


def _cpp_linear_add_layernorm(x, weight, bias, residual, ln_weight, ln_bias, eps):
    return torch.ops.dm2s2_fast.linear_add_layernorm(x, weight, bias, residual, ln_weight, ln_bias, eps)


def _cpp_mra_pool(h, cu_seqlens_segment, cu_segments_per_sample, W, c, v, U, g, u):
    return torch.ops.dm2s2_fast.mra_pool(h, cu_seqlens_segment, cu_segments_per_sample, W, c, v, U, g, u)


# The engine's ops in a traced graph, cpp backend: the library's operators themselves (the eager
# kernels also send small linear layers to MKL's packed-weight GEMM, which keeps a per-weight cache).
_CPP_TRACED = {"set_attention": _cpp_set_attention, "embed_layernorm": _cpp_embed_layernorm, "linear": _cpp_linear,
               "linear_bias_gelu": _cpp_linear_bias_gelu, "linear_add_layernorm": _cpp_linear_add_layernorm,
               "mra_pool": _cpp_mra_pool}


def max_seqlen_bound(config) -> int:
    """The longest attention group any valid batch of ``config`` can have: every sequence holds at
    most ``max_positions`` elements (validation refuses or truncates longer ones)."""
    return config.max_positions * (config.num_modalities if config.attention == "set" else 1)


def _group_pool(x: torch.Tensor, cu: torch.Tensor, W, c, v):
    """``ops.mra``'s residual softmax pooling with its group sums as ``scatter_reduce`` instead of
    ``index_add_``: Inductor's CPU code for an ``index_add_`` into a one-row result (B=1) fails
    (a vectorized atomic add of a scalar index), while a summing ``scatter_reduce`` falls back to
    ATen's kernel there."""
    groups = cu.shape[0] - 1
    lengths = (cu[1:] - cu[:-1]).long()
    ids = torch.repeat_interleave(torch.arange(groups, device=cu.device), lengths, output_size=x.shape[0])
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32  # fp32 statistics for half inputs
    xa = x.to(acc)
    scores = torch.tanh(xa @ W.to(acc).t() + c.to(acc)) @ v.to(acc)
    group_max = torch.full((groups,), float("-inf"), dtype=acc, device=x.device).scatter_reduce(
        0, ids, scores, reduce="amax", include_self=True)
    e = torch.exp(scores - group_max[ids])
    denom = torch.zeros(groups, dtype=acc, device=x.device).scatter_reduce(0, ids, e, reduce="sum")
    weights = e / denom[ids]
    residual = (1.0 + weights) / (lengths.to(acc) + 1.0)[ids]
    pooled = torch.zeros(groups, x.shape[1], dtype=acc, device=x.device).scatter_reduce(
        0, ids[:, None].expand(-1, x.shape[1]), residual[:, None] * xa, reduce="sum")
    return pooled.to(x.dtype), weights


def _mra_pool_traced(h, cu_seqlens_segment, cu_segments_per_sample, W, c, v, U, g, u):
    z, alpha = _group_pool(h, cu_seqlens_segment, W, c, v)
    r, beta = _group_pool(z, cu_segments_per_sample, U, g, u)
    return z, r, alpha, beta


_TORCH_TRACED = {"set_attention": _set_attention_padded, "mra_pool": _mra_pool_traced,
                 "embed_layernorm": _embed_layernorm_traced}


def traced_kernel(backend: str, op: str, config: DM2S2Config, kernel: Callable) -> Callable:
    """The kernel a traced graph (torch.compile, torch.export) calls for ``op`` of ``backend``, in
    place of the eager ``kernel``: the cpp backend's operators (``torch.ops.dm2s2_fast.*``), the torch
    backend's references with the padded attention; any other backend's own kernel."""
    if backend == "cpp":
        if op == "set_attention":
            return functools.partial(_cpp_set_attention, bound=max_seqlen_bound(config))
        return _CPP_TRACED.get(op, kernel)
    if backend == "torch":
        return _TORCH_TRACED.get(op, kernel)
    return kernel


def _build_layout(batch):
    return batch.layout


def layout_outside_graph(batch):
    """A batch's layout in a torch.compile'd forward: the one built before the call, else built now
    outside the graph. Building it is host work with numpy that Dynamo cannot trace, so that is a
    graph break, and under ``fullgraph=True`` an error: build ``batch.layout`` before the call."""
    layout = batch.__dict__.get("layout")
    if layout is None:  # a graph break; with fullgraph=True Dynamo stops on the next line (it shows it)
        build_batch_layout_before_a_fullgraph_call = torch.compiler.disable(_build_layout, reason=_LAYOUT_REASON)
        layout = build_batch_layout_before_a_fullgraph_call(batch)
    return layout


_LAYOUT_REASON = ("the batch's layout is host work (numpy) built outside the graph; with fullgraph=True "
                  "build it before the compiled call (batch.layout)")


# ---- the traced forward on packed inputs --------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TracedLayout:
    """The ``data.Layout`` a traced forward runs on, made of its inputs: N is the sum of the
    modalities' row counts and the longest attention group the length of ``max_seqlen``, so both
    are symbolic sizes, not ints fixed at trace time."""

    rows: tuple[torch.Tensor, ...]
    positions: tuple[torch.Tensor, ...]
    cu_seqlens_set: torch.Tensor
    cu_seqlens_segment: torch.Tensor
    cu_segments_per_sample: torch.Tensor
    max_seqlen_set: int
    max_seqlen_segment: int

    @property
    def num_elements(self):
        return sum(r.shape[0] for r in self.rows)

    @property
    def embedding_rows(self):
        return self.num_elements


class PackedForward(nn.Module):
    """``engine``'s forward on packed inputs, as torch.export traces it (``packed_inputs`` makes
    them from a batch). Inputs, flattened in this order (what a C++ caller of the package passes):
    the values of each modality (config order), the packed row of each of their values (int64), the
    position of each inside its sequence (int64), ``cu_seqlens_set`` [B+1], ``cu_seqlens_segment``
    [S+1], ``cu_segments_per_sample`` [B+1] (int32), and ``max_seqlen``: a uint8 tensor whose length
    is the attention's longest group (its values are not read). Returns (logits, pooled, hidden,
    intra_weights, inter_weights, segment_pooled)."""

    def __init__(self, engine):
        super().__init__()
        from .engine import FastDM2S2

        if not isinstance(engine, FastDM2S2):
            raise TypeError(f"export takes a dm2s2_fast.FastDM2S2 (dm2s2_fast.convert(model)), got "
                            f"{type(engine).__name__}")
        if engine.graphs is not None:
            raise ValueError("export a FastDM2S2 made without cuda_graphs=True: a traced program replaces "
                             "the CUDA-graph replay")
        self.engine = engine
        self.config = engine.config

    def forward(self, values: tuple, rows: tuple, positions: tuple, cu_seqlens_set: torch.Tensor,
                cu_seqlens_segment: torch.Tensor, cu_segments_per_sample: torch.Tensor,
                max_seqlen: torch.Tensor) -> tuple[torch.Tensor, ...]:
        longest = max_seqlen.shape[0]
        layout = TracedLayout(tuple(rows), tuple(positions), cu_seqlens_set, cu_seqlens_segment,
                              cu_segments_per_sample, longest, longest)
        names = [m.name for m in self.config.modalities]
        engine = self.engine
        tuning = engine.tuning.active() if engine.tuning else contextlib.nullcontext()
        with torch.no_grad(), tuning:
            return tuple(engine._run(dict(zip(names, values)), layout, graph_order=False))


def input_names(config: DM2S2Config) -> list[str]:
    """The flattened inputs of an exported forward, in order (docs/export.md#what-a-traced-forward-takes)."""
    names = [m.name for m in config.modalities]
    return ([f"values[{n}]" for n in names] + [f"rows[{n}]" for n in names] + [f"positions[{n}]" for n in names]
            + ["cu_seqlens_set", "cu_seqlens_segment", "cu_segments_per_sample", "max_seqlen"])


def packed_inputs(batch: SequenceSet) -> tuple:
    """The inputs of an exported forward for ``batch`` (its layout is built here, on the host, if it
    was not): ``(values, rows, positions, cu_seqlens_set, cu_seqlens_segment, cu_segments_per_sample,
    max_seqlen)``, the first three tuples in config order."""
    config, layout = batch.config, batch.layout
    longest = layout.max_seqlen_set if config.attention == "set" else layout.max_seqlen_segment
    values = tuple(batch.values[m.name] for m in config.modalities)
    return (values, tuple(layout.rows), tuple(layout.positions), layout.cu_seqlens_set, layout.cu_seqlens_segment,
            layout.cu_segments_per_sample, torch.empty(longest, dtype=torch.uint8, device=batch.device))


# ---- declared ranges ------------------------------------------------------------------------------
def _max_rows(config: DM2S2Config, max_batch_size: int) -> int:
    return min(max_batch_size * config.num_modalities * config.max_positions, 2**31 - 1)


def _check_ranges(config: DM2S2Config, max_batch_size: int, max_rows: int | None) -> int:
    if not isinstance(max_batch_size, int) or isinstance(max_batch_size, bool) or not 2 <= max_batch_size < 2**31:
        raise ValueError(f"max_batch_size must be an integer in [2, 2**31), got {max_batch_size!r}")
    if max_rows is None:
        return _max_rows(config, max_batch_size)
    if not isinstance(max_rows, int) or isinstance(max_rows, bool) or not 2 <= max_rows < 2**31:
        raise ValueError(f"max_rows must be an integer in [2, 2**31) (the offsets are int32), got {max_rows!r}")
    return max_rows


def dynamic_shapes(config: DM2S2Config, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                   max_rows: int | None = None) -> tuple:
    """torch.export's ``dynamic_shapes`` for ``PackedForward``: B in [1, max_batch_size], each
    modality's rows in [0, max_rows], segments S in [0, max_batch_size × modalities], the longest
    attention group in [0, ``max_seqlen_bound(config)``]."""
    from torch.export import Dim

    max_rows = _check_ranges(config, max_batch_size, max_rows)
    M = config.num_modalities
    batch = Dim("batch", min=1, max=max_batch_size)
    segments = Dim("segments", min=0, max=max_batch_size * M)
    longest = Dim("max_seqlen", min=0, max=max_seqlen_bound(config))
    rows = [Dim(f"rows_{m}", min=0, max=max_rows) for m in range(M)]
    per_modality = tuple({0: r} for r in rows)
    return (per_modality, per_modality, per_modality, {0: batch + 1}, {0: segments + 1}, {0: batch + 1},
            {0: longest})


def _example(engine, example_batch: SequenceSet | None) -> SequenceSet:
    """The batch traced: ``example_batch`` where torch.export can trace on it, else one of the same
    device and dtypes whose sizes are all at least 2 (and differ from each other): export
    specializes a size of 0 or 1, and may tie equal sizes together."""
    config = engine.config
    weight = engine.model.embeddings.word.weight
    device, dtype = weight.device, weight.dtype
    if example_batch is not None:
        if not isinstance(example_batch, SequenceSet):
            raise TypeError(f"example_batch must be a SequenceSet, got {type(example_batch).__name__}")
        config.check_batch(example_batch.config)
        device = example_batch.device
        dense = [example_batch.values[m.name].dtype for m in config.modalities if m.kind == "dense"]
        dtype = dense[0] if dense else dtype
    M, cap = config.num_modalities, config.max_positions
    # sample 0: 2 + m elements of modality m, sample 1: 3 + 2m, sample 2: empty (capped at max_positions)
    lengths = torch.tensor([[min(2 + m, cap) for m in range(M)], [min(3 + 2 * m, cap) for m in range(M)],
                            [0] * M], dtype=torch.int64)
    g = torch.Generator().manual_seed(0)
    jagged = {}
    for m, modality in enumerate(config.modalities):
        total = int(lengths[:, m].sum())
        if modality.kind == "dense":
            values = torch.randn(total, modality.input_dim, generator=g).to(dtype)
        else:
            high = config.vocab_size if modality.kind == "tokens" else modality.num_embeddings
            values = torch.randint(0, high, (total,), generator=g)
        jagged[modality.name] = (values.to(device), lengths[:, m].to(device))
    return SequenceSet.from_jagged(config, jagged)


# ---- export, package, load ------------------------------------------------------------------------
def export(engine, example_batch: SequenceSet | None = None, *, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
           max_rows: int | None = None) -> "torch.export.ExportedProgram":
    """``engine``'s forward as a ``torch.export.ExportedProgram`` with dynamic ragged shapes.

    The program is ``PackedForward``: it takes ``packed_inputs(batch)`` and returns the six output
    tensors (``ExportedEngine.from_program(program)`` runs it on a SequenceSet and returns a
    DM2S2Output). Dynamic within: B in [1, ``max_batch_size``], each modality's packed rows in
    [0, ``max_rows``] (default ``max_batch_size × modalities × max_positions``, at most 2**31 - 1),
    segments and the longest attention group in all the range such batches can have.
    ``example_batch`` gives the device and the dense features' dtype (default: the model's); the
    trace itself runs on a batch of that device whose sizes are all at least 2 (torch.export would
    specialize a 0 or a 1). With the ``cpp`` backend the graph holds ``torch.ops.dm2s2_fast.*``
    operators (the compiled library must be loaded wherever it runs); with ``torch``, ATen ops only.
    """
    module = PackedForward(engine)
    shapes = dynamic_shapes(engine.config, max_batch_size, max_rows)
    # cloned: the layout's tensors are views of one buffer, which torch.export.save cannot store
    args = torch.utils._pytree.tree_map(torch.clone, packed_inputs(_example(engine, example_batch)))
    with torch.no_grad(), _size_oblivious():
        return torch.export.export(module, args, dynamic_shapes=shapes, strict=False)


def _size_oblivious():
    """Trace sizes obliviously: a check such as ``size == 1`` inside an op's meta function is
    assumed false without a guard, else the program would refuse B=1, one segment, or a modality
    with a single row (torch.export traces a dynamic size as at least 2)."""
    try:
        from torch.fx.experimental import _config

        return _config.patch(backed_size_oblivious=True)
    except (ImportError, AttributeError, KeyError):  # an older torch: 0/1 sizes may be refused
        return contextlib.nullcontext()


def aoti_package(engine, example_batch: SequenceSet | None, path: str | os.PathLike, *,
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, max_rows: int | None = None,
                 inductor_configs: dict | None = None) -> str:
    """Export ``engine`` (as ``export``) and compile it with AOTInductor into the ``.pt2`` package
    ``path``; returns the path. The package records the config, the declared ranges and the input
    order in its metadata (``load_package`` reads them). Loading it needs the compiled library of
    ``dm2s2_fast`` in the process (``import dm2s2_fast`` and ``load_package`` do it; see
    docs/export.md for C++)."""
    program = export(engine, example_batch, max_batch_size=max_batch_size, max_rows=max_rows)
    dtypes = {name: str(dtype).replace("torch.", "") for name, dtype in
              program_value_dtypes(program, engine.config).items()}
    meta = {"config": config_to_dict(engine.config), "ranges": program_ranges(program, engine.config),
            "value_dtypes": dtypes, "inputs": input_names(engine.config), "outputs": list(OUTPUTS),
            "backend": engine.backend, "device": str(next(engine.model.parameters()).device), "format": 1}
    configs = dict(inductor_configs or {})
    configs["aot_inductor.metadata"] = {**configs.get("aot_inductor.metadata", {}), _METADATA_KEY: json.dumps(meta)}
    from torch._inductor import aoti_compile_and_package

    with torch.no_grad():
        return aoti_compile_and_package(program, package_path=os.fspath(path), inductor_configs=configs)


def load_package(path: str | os.PathLike, config: DM2S2Config | None = None, *,
                 run_single_threaded: bool = False) -> "ExportedEngine":
    """Load an ``aoti_package`` ``.pt2``: an ``ExportedEngine`` that takes a SequenceSet and returns a
    DM2S2Output. Loads the compiled library first (the package calls its operators). ``config``, if
    given, must equal the package's."""
    from . import _extension

    reason = _extension.load()
    from torch._inductor import aoti_load_package

    try:
        compiled = aoti_load_package(os.fspath(path), run_single_threaded=run_single_threaded)
    except Exception as exc:
        hint = f" (the dm2s2_fast library is not loaded: {reason})" if reason else ""
        raise RuntimeError(f"cannot load the AOTInductor package {os.fspath(path)!r}{hint}: {exc}") from exc
    raw = compiled.get_metadata().get(_METADATA_KEY)
    if raw is None:
        raise ValueError(f"{os.fspath(path)!r} is not a dm2s2_fast package (no {_METADATA_KEY!r} metadata)")
    meta = json.loads(raw)
    stored = config_from_dict(meta["config"])
    if config is not None and config != stored:
        raise ValueError(f"the package was built for another config than the one given:\n  package: {stored}\n"
                         f"  given:   {config}")
    ranges = {k: tuple(v) for k, v in meta["ranges"].items()}
    dtypes = {k: getattr(torch, v) for k, v in meta["value_dtypes"].items()}
    return ExportedEngine(compiled, stored, ranges, torch.device(meta["device"]), dtypes)


def _upper(size, constraints) -> int:
    from torch.utils._sympy.value_ranges import bound_sympy

    if isinstance(size, int):
        return size
    upper = bound_sympy(size.node.expr, constraints).upper
    return int(upper) if upper.is_finite else 2**63 - 1


def _user_input_values(program) -> list:
    by_name = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    return [by_name[name].meta["val"] for name in program.graph_signature.user_inputs]


def program_value_dtypes(program, config: DM2S2Config) -> dict[str, torch.dtype]:
    """Modality name → the dtype of the values the program takes."""
    vals = _user_input_values(program)
    return {m.name: vals[i].dtype for i, m in enumerate(config.modalities)}


def program_ranges(program, config: DM2S2Config) -> dict[str, tuple[int, int]]:
    """The sizes a program ``export`` made takes: ``batch_size``, ``segments``, ``max_seqlen`` and
    ``rows[<modality>]`` → (lowest, highest). The highest are read off the program; the lowest are
    ``export``'s (1 sample, else 0: the program is traced size-obliviously, so its recorded ranges
    start at 2 where the sizes 0 and 1 run as well)."""
    shapes = [v.shape for v in _user_input_values(program)]
    M = config.num_modalities
    if len(shapes) != 3 * M + 4:
        raise ValueError(f"the program takes {len(shapes)} inputs, not the {3 * M + 4} of a dm2s2_fast.export "
                         f"of this config")
    c = program.range_constraints
    ranges = {"batch_size": (1, _upper(shapes[3 * M][0], c) - 1),
              "segments": (0, _upper(shapes[3 * M + 1][0], c) - 1),
              "max_seqlen": (0, _upper(shapes[3 * M + 3][0], c))}
    for m, modality in enumerate(config.modalities):
        ranges[f"rows[{modality.name}]"] = (0, _upper(shapes[m][0], c))
    return ranges


class ExportedEngine:
    """A compiled forward (an AOTInductor package, or an exported program) run on SequenceSets.

    ``engine(batch)`` checks the batch (config, device, the program's ranges: a ``ValueError`` naming
    the range it is past), builds its layout on the host if it is not built, runs the program on
    ``packed_inputs(batch)`` — dense features cast to the dtype the program takes, as the engine
    casts them to its model's — under ``torch.inference_mode()``, and returns a DM2S2Output with the
    batch's layout."""

    def __init__(self, program: Callable, config: DM2S2Config, ranges: dict[str, tuple[int, int]],
                 device: torch.device, value_dtypes: dict[str, torch.dtype] | None = None):
        self.program = program
        self.config = config
        self.ranges = dict(ranges)
        self.device = torch.device(device)
        self.value_dtypes = dict(value_dtypes or {})

    @classmethod
    def from_program(cls, program, config: DM2S2Config) -> "ExportedEngine":
        """Run a program ``export`` made (``config``: the exported engine's)."""
        ranges = program_ranges(program, config)
        params = list(program.state_dict.values())
        device = params[0].device if params else torch.device("cpu")
        return cls(program.module(), config, ranges, device, program_value_dtypes(program, config))

    def check(self, batch: SequenceSet) -> None:
        """Raise ValueError unless the program takes ``batch``."""
        if not isinstance(batch, SequenceSet):
            raise TypeError(f"an exported DM2S2 forward takes a SequenceSet, got {type(batch).__name__}")
        self.config.check_batch(batch.config)
        if batch.device.type != self.device.type or (self.device.index is not None and batch.device != self.device):
            raise ValueError(f"the batch is on {batch.device} but the program was compiled for {self.device}; "
                             "move it with .to()")
        layout = batch.layout
        longest = layout.max_seqlen_set if self.config.attention == "set" else layout.max_seqlen_segment
        sizes = {"batch_size": batch.batch_size, "segments": layout.num_segments, "max_seqlen": longest}
        sizes.update({f"rows[{m.name}]": int(batch.values[m.name].shape[0]) for m in self.config.modalities})
        for name, size in sizes.items():
            lo, hi = self.ranges[name]
            if not lo <= size <= hi:
                raise ValueError(f"{name} {size} is outside the range the program was exported for, "
                                 f"[{lo}, {hi}]; export with a larger max_batch_size / max_rows, or split "
                                 f"the batch")

    def inputs(self, batch: SequenceSet) -> tuple:
        """``packed_inputs(batch)``, dense features in the program's dtype."""
        values, *rest = packed_inputs(batch)
        values = tuple(v.to(self.value_dtypes[m.name]) if m.kind == "dense" and m.name in self.value_dtypes else v
                       for m, v in zip(self.config.modalities, values))
        return (values, *rest)

    def __call__(self, batch: SequenceSet) -> DM2S2Output:
        self.check(batch)
        with torch.inference_mode():
            outputs = self.program(*self.inputs(batch))
        return DM2S2Output(**dict(zip(OUTPUTS, outputs)), layout=batch.layout)

    def __repr__(self) -> str:
        return f"ExportedEngine(device={self.device}, ranges={self.ranges})"
