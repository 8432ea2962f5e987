"""The batch boundary: every ``SequenceSet`` constructor ends here (docs/data.md#validation,
docs/reliability.md#what-the-boundary-refuses).

A bad batch raises one ``ValueError`` (``TypeError`` for a config that is not a ``DM2S2Config``)
naming the modality and, where one is to blame, the sample and the field; nothing invalid reaches a
kernel. Each check is written once: ``check_values`` serves both a single sample's sequence
(``from_samples``) and a modality's packed values; the constructors' input handling
(``pack_samples``, ``split_jagged``, ``unpad``) lives here too, so that every constructor takes the
same inputs (tensors, NumPy arrays, nested lists) and refuses the same ones the same way.
"""
from __future__ import annotations

import numpy as np
import torch

from ..config import DM2S2Config, Modality

# ids: the integer dtypes whose every value converts to int64 exactly (uint16/32/64 are refused:
# torch has no arithmetic for them on every device, and uint64 would wrap).
ID_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
INT_DTYPES = ID_DTYPES  # lengths take the same
# features: the float dtypes every backend and device computes with (float8 has no arithmetic).
FEATURE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# The largest dense feature magnitude taken (docs/reliability.md#huge-features): the embedding
# projection and LayerNorm compute in fp32 at the widest; a row's squared deviations overflow fp32
# once the projected values reach ~1e17-1e19 (measured: small test models fail from 1e19 on), and
# the projection itself overflows near 3.4e38 / (a weight row's |sum|). 1e12 leaves a margin of
# ~10^5 for weight rows whose absolute sum stays below ~1e4.
FEATURE_LIMIT = 1e12
_FLOAT32_MAX = torch.finfo(torch.float32).max
_ID_NAMES = "int64, int32, int16, int8 or uint8"
_FEATURE_NAMES = "float32, float64, float16 or bfloat16"


def _dtype(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def check_config(config) -> None:
    if not isinstance(config, DM2S2Config):
        raise TypeError(f"a SequenceSet is built for a dm2s2_fast.DM2S2Config, got {type(config).__name__}")


def check_names(config: DM2S2Config, names, where: str = "") -> None:
    """Every name is a string naming one of the config's modalities."""
    known = [m.name for m in config.modalities]
    for name in names:
        if not isinstance(name, str) or name not in known:
            kind = "" if isinstance(name, str) else f" (modality names are strings, got {type(name).__name__})"
            raise ValueError(f"{where}unknown modality {name!r}{kind}; the config has {known}")


def empty_values(modality: Modality, device) -> torch.Tensor:
    """A missing modality's values: no ids, or no rows of ``input_dim`` features."""
    if modality.kind == "dense":
        return torch.zeros(0, modality.input_dim, device=device)
    return torch.zeros(0, dtype=torch.int64, device=device)


def is_empty(t: torch.Tensor) -> bool:
    """An empty sequence (a missing modality): no rows. A ``(5, 0)`` tensor has five rows."""
    return t.dim() >= 1 and t.shape[0] == 0


def as_tensor(x, where: str, what: str) -> torch.Tensor:
    """``x`` as a tensor: tensors as given, NumPy arrays and (nested) lists converted; else a
    ValueError naming ``where`` and ``what``. Meta tensors are refused: they hold no data to check."""
    if not isinstance(x, torch.Tensor):
        try:
            if isinstance(x, np.ndarray) and any(s < 0 for s in x.strides):
                x = x.copy()  # torch takes no negative strides
            x = torch.as_tensor(x)
        except Exception as exc:  # any failure to convert is the caller's input, not ours
            raise ValueError(f"{where}: cannot make a tensor of the {what} ({type(x).__name__}): "
                             f"{type(exc).__name__}: {exc}") from None
    if x.device.type == "meta":
        raise ValueError(f"{where}: the {what} {'are' if what.endswith('s') else 'is'} on the meta device "
                         "(no data to check)")
    return x


def check_dtype(modality: Modality, t: torch.Tensor, where: str) -> None:
    """``modality``'s values have a dtype it takes: features float32/float64/float16/bfloat16, ids
    int64/int32/int16/int8/uint8."""
    if modality.kind == "dense":
        if not t.is_floating_point():
            raise ValueError(f"{where}: dense features must be floating point ({_FEATURE_NAMES}), "
                             f"got {_dtype(t.dtype)}")
        if t.dtype not in FEATURE_DTYPES:
            raise ValueError(f"{where}: dense features must be {_FEATURE_NAMES}, got {_dtype(t.dtype)} "
                             "(no arithmetic for it on every device; convert with .float())")
    elif t.dtype not in ID_DTYPES:
        if t.dtype in (torch.uint16, torch.uint32, torch.uint64):
            raise ValueError(f"{where}: ids of dtype {_dtype(t.dtype)} are not supported (unsigned "
                             f"beyond 8 bits); give {_ID_NAMES} (e.g. .long())")
        raise ValueError(f"{where}: ids must be integers, got {t.dtype} (take {_ID_NAMES})")


def check_values(modality: Modality, t: torch.Tensor, where: str, rows: str = "length") -> None:
    """dtype and shape of ``modality``'s values: float [rows, input_dim] features or 1-D integer ids."""
    check_dtype(modality, t, where)
    if modality.kind == "dense":
        if t.dim() != 2 or t.shape[1] != modality.input_dim:
            raise ValueError(f"{where}: dense features must be 2-D [{rows}, {modality.input_dim}], "
                             f"got shape {tuple(t.shape)}")
    elif t.dim() != 1:
        raise ValueError(f"{where}: ids must be 1-D, got shape {tuple(t.shape)}")


def _as_device(device):
    if device is None:
        return None
    try:
        device = torch.device(device)
    except Exception as exc:
        raise ValueError(f"from_samples: device={device!r} is not a device: {exc}") from None
    if device.type == "meta":
        raise ValueError("from_samples: device='meta' holds no data to check; build the batch on a real device")
    try:
        torch.empty(0, device=device)  # a device this process can use (not a CUDA one on a CPU-only build)
    except Exception as exc:
        raise ValueError(f"from_samples: device={str(device)!r} cannot be used here: {type(exc).__name__}: {exc}") from None
    return device


def _moved(t: torch.Tensor, device: torch.device, where: str) -> torch.Tensor:
    try:
        return t.to(device)
    except Exception as exc:  # e.g. a CUDA device on a machine without one
        raise ValueError(f"{where}: cannot move the sequence to {device}: {type(exc).__name__}: {exc}") from None


def pack_samples(config: DM2S2Config, samples, device=None) -> tuple[dict, dict]:
    """``from_samples``' input as ``(values, lengths)`` dicts for ``validate``: one dict per sample,
    modality name → ids (1-D) or features (2-D), as tensors, NumPy arrays or lists. dtype and shape are
    checked per sample, before concatenation (which could promote bool ids beside int ones, or int
    features beside float ones, into a batch that passes). Without ``device`` every sequence must be
    on one device, which becomes the batch's (the CPU if none is given)."""
    check_config(config)
    if not isinstance(samples, (list, tuple)):
        raise ValueError(f"from_samples takes a list of dicts, one per sample, got {type(samples).__name__}")
    device = _as_device(device)
    given: list[dict] = []
    batch_device, origin = device, None
    for b, sample in enumerate(samples):
        if not isinstance(sample, dict):
            raise ValueError(f"sample {b}: expected a dict of modality name -> sequence, got {type(sample).__name__}")
        check_names(config, sample, f"sample {b}: ")
        row = {}
        for modality in config.modalities:
            seq = sample.get(modality.name)
            if seq is None:
                continue
            where = f"modality {modality.name!r}, sample {b}"
            t = as_tensor(seq, where, "sequence")
            if device is not None:
                t = _moved(t, device, where)
            elif batch_device is None:
                batch_device, origin = t.device, where
            elif t.device != batch_device:
                raise ValueError(f"{where}: the sequence is on {t.device} but {origin}'s is on {batch_device}; "
                                 "give every sequence on one device, or pass device=")
            row[modality.name] = t
        given.append(row)
    batch_device = batch_device or torch.device("cpu")
    values, lengths = {}, {}
    for modality in config.modalities:
        seqs = []
        for b, row in enumerate(given):
            t = row.get(modality.name)
            if t is None or is_empty(t):
                t = empty_values(modality, batch_device)
            else:
                check_values(modality, t, f"modality {modality.name!r}, sample {b}")
            seqs.append(t)
        lengths[modality.name] = torch.tensor([s.shape[0] for s in seqs], dtype=torch.int64, device=batch_device)
        values[modality.name] = torch.cat(seqs) if seqs else empty_values(modality, batch_device)
    return values, lengths


def split_jagged(config: DM2S2Config, jagged) -> tuple[dict, dict]:
    """``from_jagged``'s input ``{name: (values, lengths)}`` as the two dicts ``validate`` takes."""
    check_config(config)
    if not isinstance(jagged, dict):
        raise ValueError(f"from_jagged takes a dict {{modality name: (values, lengths)}}, got {type(jagged).__name__}")
    check_names(config, jagged)
    values, lengths = {}, {}
    for name, pair in jagged.items():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"modality {name!r}: expected a (values, lengths) pair, got {type(pair).__name__}")
        values[name], lengths[name] = pair
    return values, lengths


def unpad(config: DM2S2Config, padded) -> dict:
    """``from_padded``'s input ``{name: (padded [B, L(, input_dim)], mask [B, L] bool)}`` as
    ``{name: (values, lengths)}``: the elements whose mask is True, in order."""
    check_config(config)
    if not isinstance(padded, dict):
        raise ValueError(f"from_padded takes a dict {{modality name: (padded, mask)}}, got {type(padded).__name__}")
    check_names(config, padded)
    modalities = {m.name: m for m in config.modalities}
    jagged = {}
    for name, pair in padded.items():
        where = f"modality {name!r}"
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"{where}: expected a (padded, mask) pair, got {type(pair).__name__}")
        data, mask = as_tensor(pair[0], where, "padded values"), as_tensor(pair[1], where, "mask")
        if mask.dtype != torch.bool:
            raise ValueError(f"{where}: mask must be bool, got {mask.dtype} (e.g. mask.bool())")
        if mask.dim() != 2:
            raise ValueError(f"{where}: mask must be 2-D [B, L], got shape {tuple(mask.shape)}")
        if data.dim() < 2 or tuple(data.shape[:2]) != tuple(mask.shape):
            raise ValueError(f"{where}: padded values must be [B, L] ids or [B, L, input_dim] features with "
                             f"[B, L] the mask's shape {tuple(mask.shape)}, got shape {tuple(data.shape)}")
        if mask.device != data.device:
            raise ValueError(f"{where}: mask is on {mask.device} but the padded values on {data.device}")
        check_dtype(modalities[name], data, where)  # before indexing: torch indexes no uint16/32/64
        jagged[name] = (data[mask], mask.sum(1))
    return jagged


def _as_lengths(name: str, l) -> torch.Tensor:
    where = f"modality {name!r}"
    if not isinstance(l, torch.Tensor):
        try:
            if isinstance(l, np.ndarray) and any(s < 0 for s in l.strides):
                l = l.copy()
            l = torch.as_tensor(l)
        except Exception as exc:
            raise ValueError(f"{where}: cannot make lengths of {type(l).__name__}: {type(exc).__name__}: {exc}") from None
        if l.numel() == 0 and l.dim() == 1:  # [] (no samples) is float32 to torch
            l = l.to(torch.int64)
    if l.device.type == "meta":
        raise ValueError(f"{where}: lengths are on the meta device (no data to check)")
    if l.dim() != 1 or (l.dtype not in INT_DTYPES):
        raise ValueError(f"{where}: lengths must be a 1-D integer tensor ({_ID_NAMES}), got "
                         f"{_dtype(l.dtype)} of shape {tuple(l.shape)}")
    return l


def validate(config: DM2S2Config, values: dict, lengths: dict, truncate: bool):
    """``(values, lengths, batch_size)`` of a valid batch, one entry per config modality (missing
    ones empty), ids as int64; raises ``ValueError`` on anything else. The caller's dicts are left
    as given."""
    check_config(config)
    if not isinstance(values, dict) or not isinstance(lengths, dict):
        raise ValueError("a SequenceSet takes two dicts, {modality name: values} and {modality name: lengths}; "
                         f"got {type(values).__name__} and {type(lengths).__name__}")
    check_names(config, list(values) + list(lengths))
    known = [m.name for m in config.modalities]
    if set(values) != set(lengths):
        raise ValueError(f"values and lengths must name the same modalities, got {sorted(values)} "
                         f"and {sorted(lengths)}")
    if not values:
        raise ValueError(f"a SequenceSet needs at least one modality's (values, lengths); the config has {known}")
    batch_size, device = None, None
    lengths = {name: _as_lengths(name, lengths[name]) for name in values}
    for name, l in lengths.items():
        if batch_size is None:
            batch_size, device = l.numel(), l.device
        elif l.numel() != batch_size:
            raise ValueError(f"modality {name!r}: lengths has {l.numel()} samples, another modality "
                             f"has {batch_size}")
    out_values, out_lengths = {}, {}
    for modality in config.modalities:
        name = modality.name
        if name not in values:
            out_values[name] = empty_values(modality, device)
            out_lengths[name] = torch.zeros(batch_size, dtype=torch.int64, device=device)
            continue
        v, l = as_tensor(values[name], f"modality {name!r}", "values"), lengths[name].to(torch.int64)
        if v.dim() == 0:
            raise ValueError(f"modality {name!r}: values must be 1-D ids or 2-D features, got a scalar")
        if v.device != device or l.device != device:
            raise ValueError(f"modality {name!r}: values on {v.device} and lengths on {l.device}; "
                             f"the batch is on {device}")
        host_l = l.cpu()
        if batch_size and int(host_l.min()) < 0:
            b = int(torch.nonzero(host_l < 0)[0])
            raise ValueError(f"modality {name!r}, sample {b}: negative length {int(host_l[b])}")
        # Before the sum: no length may exceed the values (so the int64 sum cannot wrap around).
        if batch_size and int(host_l.max()) > v.shape[0]:
            b = int(torch.argmax(host_l))
            raise ValueError(f"modality {name!r}, sample {b}: length {int(host_l[b])} but there are only "
                             f"{v.shape[0]} values")
        total = int(host_l.sum())
        if is_empty(v) and total == 0:
            v = empty_values(modality, device)
        check_values(modality, v, f"modality {name!r}", rows="total")
        if modality.kind != "dense":
            v = v.to(torch.int64)
        if v.shape[0] != total:
            raise ValueError(f"modality {name!r}: lengths sum to {total} but there are {v.shape[0]} "
                             f"values")
        _check_contents(config, modality, v, host_l, total)
        too_long = host_l > config.max_positions
        if bool(too_long.any()):
            if not truncate:
                b = int(torch.nonzero(too_long)[0])
                raise ValueError(f"modality {name!r}, sample {b}: length {int(host_l[b])} exceeds "
                                 f"max_positions {config.max_positions} (pass truncate=True to cut)")
            v, l = _truncate(v, host_l, config.max_positions, device)
        out_values[name], out_lengths[name] = v, l.to(device)
    return out_values, out_lengths, batch_size


def _sample_of(lengths: torch.Tensor, flat_index: int) -> int:
    """The sample that packed value ``flat_index`` belongs to, given per-sample lengths."""
    ends = torch.cumsum(lengths.cpu(), 0)
    return int(torch.searchsorted(ends, torch.tensor(flat_index), right=True))


def _feature_error(name: str, v: torch.Tensor, host_l: torch.Tensor, limit: float, why) -> ValueError:
    """The error for the first row of ``v`` holding a value not within ±``limit`` (or NaN)."""
    bad = ~(v.abs().to(torch.float64) <= limit)  # NaN counts as bad (and fp16 cannot hold the limit)
    row = int(torch.nonzero(bad.any(1))[0])
    x = float(v[row][bad[row]][0])
    return ValueError(f"modality {name!r}, sample {_sample_of(host_l, row)}: {why(x)}")


def _huge_feature(x: float) -> str:
    if x != x or abs(x) == float("inf"):
        return "features are not finite (NaN or ±inf)"
    if abs(x) > _FLOAT32_MAX:
        return f"features are not finite in float32 ({x:.3g} is beyond ±{_FLOAT32_MAX:.3g}, fp32's range)"
    return (f"features must lie within ±{FEATURE_LIMIT:.0e}, got {x:.3g}: beyond it the embedding "
            "LayerNorm's fp32 statistics can overflow (docs/reliability.md#huge-features); scale the features")


def _check_contents(config: DM2S2Config, modality: Modality, v: torch.Tensor, host_l: torch.Tensor,
                    total: int) -> None:
    """Features finite and within ±FEATURE_LIMIT, ids inside their table. One min/max pass decides
    (NaN and inf reach the min or the max); only a bad batch pays for finding the sample.
    (isfinite().all() took 8.3 ms on 10.7k image rows, aminmax 0.7.)"""
    name = modality.name
    if modality.kind == "dense":
        if v.numel() and not all(abs(float(t)) <= FEATURE_LIMIT for t in torch.aminmax(v)):
            raise _feature_error(name, v, host_l, FEATURE_LIMIT, _huge_feature)
    elif total:
        high = config.vocab_size if modality.kind == "tokens" else modality.num_embeddings
        lo, hi = (int(t) for t in torch.aminmax(v))
        if lo < 0 or hi >= high:
            i = int(torch.nonzero((v < 0) | (v >= high))[0])
            raise ValueError(f"modality {name!r}, sample {_sample_of(host_l, i)}: id {int(v[i])} "
                             f"is out of range [0, {high})")


def check_model_range(values: dict, lengths: dict, dtypes: dict) -> None:
    """Refuse dense features the model cannot take in its own dtype (``dtypes``: modality name →
    the dtype its projection computes in): beyond float16's ±65504 the cast to the model's dtype
    makes them inf. A no-op, with no pass over the data, for dtypes of fp32's range (fp32, bf16,
    fp64), whose bound ``FEATURE_LIMIT`` the constructors checked; for a float16 model one aminmax
    per dense modality (on CUDA, one host-device sync each)."""
    for name, dtype in dtypes.items():
        v = values.get(name)
        if v is None or v.numel() == 0 or not dtype.is_floating_point:
            continue
        limit = torch.finfo(dtype).max
        if limit >= FEATURE_LIMIT or torch.finfo(v.dtype).max <= limit:
            continue
        if all(abs(float(t)) <= limit for t in torch.aminmax(v)):
            continue
        raise _feature_error(name, v, lengths[name], limit, lambda x: (
            f"features must lie within ±{limit:g} for a {_dtype(dtype)} model, got {x:.3g} (the cast to "
            f"{_dtype(dtype)} would make it inf; docs/reliability.md#huge-features)"))


def _truncate(values: torch.Tensor, host_lengths: torch.Tensor, limit: int, device):
    starts = torch.cumsum(host_lengths, 0) - host_lengths
    kept = host_lengths.clamp(max=limit)
    owner = torch.arange(host_lengths.numel()).repeat_interleave(kept)
    within = torch.arange(int(kept.sum())) - (torch.cumsum(kept, 0) - kept)[owner]
    return values[(starts[owner] + within).to(device)], kept
