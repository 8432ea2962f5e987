"""TorchRec interop: a ``SequenceSet`` from and to a ``KeyedJaggedTensor`` (docs/data.md).

A ``SequenceSet`` already has TorchRec's jagged layout (per key: packed values + per-sample lengths),
so the conversion copies nothing but the split of the KJT's one values tensor per key. A KJT holds
1-D values of one dtype for all its keys, so it carries the id modalities (``tokens``,
``categorical``); dense modalities (``[rows, input_dim]`` feature vectors) travel beside it as
``{name: (values, lengths)}`` pairs (``dense_jagged``).

TorchRec is optional (``INSTALL_HINT`` says how to install it without replacing torch); it is imported
only when these functions run, never by ``import dm2s2_fast``.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch

from ..config import DM2S2Config
from .sequence_set import SequenceSet

if TYPE_CHECKING:  # pragma: no cover
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

# torchrec's own requirements name fbgemm-gpu (the CUDA build, which would pull a CUDA toolkit and
# another torch): install it and its fbgemm without them, then its pure-Python dependencies.
INSTALL_HINT = ("pip install --no-deps torchrec==1.8.0 fbgemm-gpu-cpu==1.8.0 (fbgemm-gpu==1.8.0 on CUDA), "
                "then pip install 'dm2s2_fast[torchrec]' (tensordict, pyvers, pyre-extensions)")


def _keyed_jagged_tensor_class():
    try:
        with warnings.catch_warnings():  # fbgemm's import warns about its own module layout
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
    except ImportError as exc:  # absent, or present without one of its own dependencies
        raise ImportError(f"the KeyedJaggedTensor conversions need TorchRec, which did not import "
                          f"({type(exc).__name__}: {exc}); {INSTALL_HINT}") from exc
    return KeyedJaggedTensor


def from_kjt(config: DM2S2Config, kjt: "KeyedJaggedTensor", dense: dict[str, Any] | None = None, *,
             truncate: bool = False) -> SequenceSet:
    """A validated ``SequenceSet`` from a ``KeyedJaggedTensor`` of id modalities.

    ``kjt``'s keys are modality names of kind ``tokens`` or ``categorical`` (any subset, any order;
    a modality left out is missing in every sample), its stride is the batch size. ``dense`` gives
    the dense modalities as ``{name: (values [total, input_dim], lengths [B])}`` (or TorchRec
    ``JaggedTensor``\\ s). Weighted KJTs and variable batch sizes per key are refused: DM²S² has no
    per-id weights, and every modality describes the same samples. Bad input raises ``ValueError``
    naming the modality and the sample, as every ``SequenceSet`` constructor does.
    """
    KeyedJaggedTensor = _keyed_jagged_tensor_class()
    if not isinstance(kjt, KeyedJaggedTensor):
        raise ValueError(f"from_kjt takes a torchrec KeyedJaggedTensor, got {type(kjt).__name__}")
    kinds = {m.name: m.kind for m in config.modalities}
    keys = list(kjt.keys())
    for key in keys:
        if key not in kinds:
            raise ValueError(f"KeyedJaggedTensor key {key!r} is not a modality; the config has {sorted(kinds)}")
        if kinds[key] == "dense":
            raise ValueError(f"modality {key!r} is dense: a KeyedJaggedTensor holds 1-D ids; pass its "
                             f"features in dense={{{key!r}: (values, lengths)}}")
    if len(set(keys)) != len(keys):
        raise ValueError(f"KeyedJaggedTensor keys repeat: {keys}")
    if kjt.weights_or_none() is not None:
        raise ValueError("a weighted KeyedJaggedTensor: DM²S² has no per-id weights (drop them or fold "
                         "them into a dense modality)")
    if kjt.variable_stride_per_key():
        raise ValueError("a KeyedJaggedTensor with a variable batch size per key: every modality must "
                         "describe the same samples")
    jagged: dict[str, tuple] = {}
    if keys:
        values, lengths = kjt.values(), kjt.lengths()
        stride = kjt.stride()
        if lengths.numel() != stride * len(keys):
            raise ValueError(f"KeyedJaggedTensor has {lengths.numel()} lengths for {len(keys)} keys of "
                             f"stride {stride}")
        per_key = lengths.view(len(keys), stride)
        totals = per_key.sum(1).tolist()  # one host read for all the keys
        if sum(totals) != values.shape[0]:
            raise ValueError(f"KeyedJaggedTensor lengths sum to {sum(totals)} but it has "
                             f"{values.shape[0]} values")
        start = 0
        for k, key in enumerate(keys):
            jagged[key] = (values[start:start + totals[k]], per_key[k])
            start += totals[k]
    for name, pair in (dense or {}).items():
        if name in jagged:
            raise ValueError(f"modality {name!r} is given both in the KeyedJaggedTensor and in dense")
        if kinds.get(name, "dense") != "dense":
            raise ValueError(f"modality {name!r} holds ids ({kinds[name]}): put it in the KeyedJaggedTensor")
        if hasattr(pair, "values") and hasattr(pair, "lengths") and callable(pair.lengths):
            pair = (pair.values(), pair.lengths())  # a torchrec JaggedTensor
        jagged[name] = pair
    return SequenceSet.from_jagged(config, jagged, truncate=truncate)


def to_kjt(batch: SequenceSet) -> "KeyedJaggedTensor":
    """The id modalities (``tokens``, ``categorical``) of ``batch`` as a ``KeyedJaggedTensor``:
    keys in config order (every one, missing sequences as zero lengths), int64 values and lengths
    on the batch's device, stride = batch size. Dense modalities cannot be KJT values (they are
    feature vectors): take them with ``dense_jagged(batch)``. The inverse:
    ``from_kjt(batch.config, to_kjt(batch), dense=dense_jagged(batch))``."""
    KeyedJaggedTensor = _keyed_jagged_tensor_class()
    if not isinstance(batch, SequenceSet):
        raise ValueError(f"to_kjt takes a SequenceSet, got {type(batch).__name__}")
    names = [m.name for m in batch.config.modalities if m.kind != "dense"]
    device = batch.device
    if names:
        values = torch.cat([batch.values[n] for n in names])
        lengths = torch.cat([batch.lengths[n] for n in names])
    else:
        values = torch.zeros(0, dtype=torch.int64, device=device)
        lengths = torch.zeros(0, dtype=torch.int64, device=device)
    return KeyedJaggedTensor(keys=names, values=values, lengths=lengths, stride=batch.batch_size)


def dense_jagged(batch: SequenceSet) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The dense modalities of ``batch`` as ``{name: (values [total, input_dim], lengths [B])}``:
    what ``to_kjt`` leaves out, in the form ``from_kjt``'s ``dense`` takes."""
    return {m.name: (batch.values[m.name], batch.lengths[m.name])
            for m in batch.config.modalities if m.kind == "dense"}
