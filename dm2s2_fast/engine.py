"""FastDM2S2: the ragged engine — the reference model's parameters run through the ops (docs/ops.md)."""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn

from . import dispatch
from . import graphs as graph_replay
from .data import Layout, PackedLayout, SequenceSet
from .data.validation import check_model_range
from .export import layout_outside_graph, traced_kernel
from .output import DM2S2Output
from .reference import DM2S2
from .tuning import Tuning


class FastDM2S2(nn.Module):
    """Inference-only DM²S² over packed, unpadded batches.

    Shares (does not copy) the parameters of a reference ``DM2S2``; takes the same ``SequenceSet``
    and returns the same ``DM2S2Output``. Runs under ``torch.inference_mode``: nothing it returns
    carries gradients — train the reference model instead. ``backend`` is ``"auto"`` (per op, the
    fastest backend available for the tensors' device) or one of ``torch``, ``triton``, ``cpp``,
    ``cuda`` (raises ``BackendUnavailable`` with the reasons when it cannot run). ``tuning`` (a
    ``dm2s2_fast.Tuning``) forces kernel choices; every forward runs under it (None: under the
    caller's current one, ``tuning.current()``).

    ``cuda_graphs=True`` (model on CUDA) replays each batch as one CUDA graph per shape bucket
    (``dm2s2_fast.graphs``): the host cost of ~60 launches goes, at the price of padding each batch
    to its bucket (``bucket_steps`` row counts per octave: ≤ 1/bucket_steps more rows) and one capture
    per new bucket (at most ``max_graphs`` kept). Batches of more than ``graph_max_rows`` rows run
    eagerly instead (``None``: never): there the GPU time exceeds the launches' host cost, so a graph
    saves nothing and the padding costs ~10 % (H200, ads bf16: B=64, 7k rows, 0.98 ms by graph vs
    1.14 eager; B=256, 26k rows, 2.80 vs 2.40).
    """

    def __init__(self, model: DM2S2, backend: str = "auto", *, tuning: Tuning | None = None,
                 cuda_graphs: bool = False, max_graphs: int = 32, bucket_steps: int = 4,
                 graph_max_rows: int | None = 16384):
        super().__init__()
        if not isinstance(model, DM2S2):
            raise TypeError(f"convert takes a dm2s2_fast.reference.DM2S2, got {type(model).__name__}")
        if tuning is not None and not isinstance(tuning, Tuning):
            raise TypeError(f"tuning must be a dm2s2_fast.Tuning, got {type(tuning).__name__}")
        self.model = model
        self.config = model.config
        self.backend = backend
        self.tuning = tuning
        self.last_backends: dict[str, str] = {}  # op -> backend that ran it in the last forward
        device = next(model.parameters()).device
        dispatch.check_backend(backend, device)
        self.graphs = None
        graph_replay.check_options(max_graphs, bucket_steps, graph_max_rows)
        self.graph_max_rows = graph_max_rows
        if cuda_graphs:
            if device.type != "cuda":
                raise ValueError(f"cuda_graphs=True needs the model on a CUDA device; it is on {device}")
            self.graphs = graph_replay.CUDAGraphRunner(self, max_graphs=max_graphs, bucket_steps=bucket_steps)
        super().train(False)

    def train(self, mode: bool = True) -> "FastDM2S2":
        if mode:
            raise RuntimeError("FastDM2S2 is inference-only; train dm2s2_fast.reference.DM2S2 and convert it")
        return super().train(False)

    def _op(self, op: str, *args, graph_order: bool):
        # in a graph, auto takes the kernel of least GPU time (auto_order.json's cuda_graphs)
        name, fn = dispatch.resolve(op, self.backend, args[0].device, args, graphs=graph_order)
        self.last_backends[op] = name
        if torch.compiler.is_compiling():  # torch.compile / torch.export: kernels a graph can hold
            fn = traced_kernel(name, op, self.config, fn)
        return fn(*args)

    def forward(self, batch: SequenceSet) -> DM2S2Output:
        if not isinstance(batch, SequenceSet):
            raise TypeError(f"FastDM2S2 takes a SequenceSet, got {type(batch).__name__}")
        self.config.check_batch(batch.config)
        if any(v.requires_grad for v in batch.values.values()):
            raise RuntimeError("FastDM2S2 is inference-only and cannot give gradients; use "
                               "dm2s2_fast.reference.DM2S2 for training")
        # Compiled, no_grad: Inductor's wrappers cannot make views of the inputs in inference mode.
        no_grad = torch.no_grad() if torch.compiler.is_compiling() else torch.inference_mode()
        with no_grad, (self.tuning.active() if self.tuning else contextlib.nullcontext()):
            return self._forward(batch)

    def _forward(self, batch: SequenceSet) -> DM2S2Output:
        weight = self.model.embeddings.word.weight
        if batch.device != weight.device:
            raise ValueError(f"the batch is on {batch.device} but the model is on {weight.device}; "
                             f"move one with .to()")
        # a float16 model: features beyond ±65504 would become inf at the cast (docs/reliability.md)
        check_model_range(batch.values, batch.lengths,
                          {name: layer.weight.dtype for name, layer in self.model.embeddings.dense.items()})
        if self.graphs is not None and batch.batch_size:
            if weight.device.type != graph_replay.GRAPH_DEVICE_TYPE:  # large batches included: one rule for all
                raise ValueError(f"this engine replays CUDA graphs but its model is now on {weight.device}; "
                                 "convert it again without cuda_graphs=True to run it there")
            if self.graph_max_rows is None or batch.num_elements <= self.graph_max_rows:
                return self.graphs(batch)
        layout = batch.layout if not torch.compiler.is_compiling() else layout_outside_graph(batch)
        logits, r, h, alpha, beta, z = self._run(batch.values, layout, graph_order=False)
        return DM2S2Output(logits=logits, pooled=r, hidden=h, intra_weights=alpha, inter_weights=beta,
                           segment_pooled=z, layout=layout)

    def _run(self, batch_values: dict[str, torch.Tensor], layout: Layout, zero_rows: bool = False,
             graph_order: bool | None = None) -> tuple[torch.Tensor, ...]:
        """The forward on packed values and a ``Layout`` (a batch's ``PackedLayout``, or the graph
        runner's ``PaddedLayout``). ``zero_rows`` starts rows no embedding writes (a padded batch's)
        at zero; ``graph_order`` picks auto's kernels for graph replay (default: when this engine
        replays graphs). Returns (logits, r, h, α, β, z)."""
        if graph_order is None:
            graph_order = self.graphs is not None
        op = functools.partial(self._op, graph_order=graph_order)
        cfg, model = self.config, self.model
        emb = model.embeddings
        weight = emb.word.weight
        N, d = layout.num_elements, cfg.hidden_size
        # Traced (torch.compile / torch.export), a modality's row count is symbolic: no branch on it
        # (the kernels take zero rows), and a packed batch's N is their sum, not a specialized int.
        tracing = torch.compiler.is_compiling()
        if tracing and isinstance(layout, PackedLayout):
            N = sum(rows.shape[0] for rows in layout.rows)
        rows_written = N if tracing else layout.embedding_rows
        h = (torch.zeros if zero_rows else torch.empty)(rows_written, d, dtype=weight.dtype, device=weight.device)
        for m, modality in enumerate(cfg.modalities):
            rows = layout.rows[m]
            if not tracing and rows.numel() == 0:
                continue
            values = batch_values[modality.name]
            type_ids = torch.full_like(rows, m)
            if modality.kind == "dense":
                ids, table = None, None
                dense = emb.content(modality, values)
            else:
                ids, table, dense = values, emb.table(modality).weight, None
            op("embed_layernorm", layout.positions[m], type_ids, emb.position.weight,
               emb.token_type.weight, emb.layer_norm.weight, emb.layer_norm.bias,
               emb.layer_norm.eps, ids, table, dense, h, rows)
        h = h[:N]  # a padded layout's pad entries wrote rows past the forward's

        if cfg.attention == "set":
            cu, max_len = layout.cu_seqlens_set, layout.max_seqlen_set
        else:
            cu, max_len = layout.cu_seqlens_segment, layout.max_seqlen_segment
        H, D = cfg.num_heads, cfg.head_dim
        scale = D ** -0.5
        for layer in model.layers:
            qkv = op("linear", h, layer.qkv.weight, layer.qkv.bias).view(N, 3, H, D)
            context = op("set_attention", qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, max_len, scale)
            out, norm = layer.attention_output, layer.attention_norm
            h = op("linear_add_layernorm", context.reshape(N, d), out.weight, out.bias, h,
                   norm.weight, norm.bias, norm.eps)
            inner = op("linear_bias_gelu", h, layer.intermediate.weight, layer.intermediate.bias)
            out, norm = layer.output, layer.output_norm
            h = op("linear_add_layernorm", inner, out.weight, out.bias, h, norm.weight, norm.bias,
                   norm.eps)

        intra, inter = model.intra_mra, model.inter_mra
        z, r, alpha, beta = op("mra_pool", h, layout.cu_seqlens_segment, layout.cu_segments_per_sample,
                               intra.proj.weight, intra.proj.bias, intra.score,
                               inter.proj.weight, inter.proj.bias, inter.score)
        head = model.head
        hidden = op("linear_bias_gelu", r, head.hidden.weight, head.hidden.bias)
        logits = F.linear(hidden, head.out.weight, head.out.bias)
        return logits, r, h, alpha, beta, z


def convert(model: DM2S2, backend: str = "auto", **options) -> FastDM2S2:
    """The drop-in replacement: a FastDM2S2 sharing ``model``'s parameters (no copy); ``options``
    are FastDM2S2's (``tuning``, ``cuda_graphs``, ``max_graphs``, ``bucket_steps``, ``graph_max_rows``)."""
    return FastDM2S2(model, backend=backend, **options)
