"""The weights a server loads: one file holding the model's config and its ``state_dict``.

``save_checkpoint(model, path)`` writes ``{"format", "config", "state_dict"}`` with ``torch.save``;
``load_checkpoint(path)`` reads it back with ``weights_only=True`` (no pickled code runs) and rebuilds
the reference ``DM2S2``; ``build_engine`` converts it for a device. The Triton repository and the Ray
Serve deployment load the same file, so one checkpoint serves both.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from ...config import DM2S2Config, Modality
from ...reference import DM2S2

FORMAT = "dm2s2_fast.checkpoint/1"


def config_to_dict(config: DM2S2Config) -> dict:
    """A ``DM2S2Config`` as plain data (str/int/float/None, lists, dicts): JSON- and weights_only-safe."""
    data = dataclasses.asdict(config)
    data["modalities"] = [dataclasses.asdict(m) for m in config.modalities]
    return data


def config_from_dict(data: dict) -> DM2S2Config:
    data = dict(data)
    data["modalities"] = tuple(Modality(**m) for m in data["modalities"])
    return DM2S2Config(**data)


def save_checkpoint(model: DM2S2, path: str | os.PathLike) -> Path:
    """Write ``model`` (a reference ``DM2S2``; its parameters are saved in their dtype, on the CPU)."""
    if not isinstance(model, DM2S2):
        raise TypeError(f"save_checkpoint takes a dm2s2_fast.reference.DM2S2, got {type(model).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    torch.save({"format": FORMAT, "config": config_to_dict(model.config), "state_dict": state}, path)
    return path


def load_checkpoint(path: str | os.PathLike) -> DM2S2:
    """The reference model saved by ``save_checkpoint`` (on the CPU, in eval mode)."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path} is not a dm2s2_fast checkpoint (format {FORMAT!r}), found {found!r}; "
                         f"write one with dm2s2_fast.serving.triton.save_checkpoint(model, path)")
    model = DM2S2(config_from_dict(data["config"]))
    model.load_state_dict(data["state_dict"])
    return model.eval()


def model_from_source(source, *, seed: int = 0) -> DM2S2:
    """The reference model that ``source`` names: a ``FastDM2S2`` (its model), a ``DM2S2``, a
    checkpoint file (``save_checkpoint``), a Hugging Face BERT directory (its encoder loaded into the
    ads config; the MRA layers and the head stay at their seeded initialisation), or None (a seeded
    random ads model: for trying a server out, not for ranking)."""
    from ...engine import FastDM2S2

    if isinstance(source, FastDM2S2):
        return source.model
    if isinstance(source, DM2S2):
        return source
    if source is None:
        torch.manual_seed(seed)
        return DM2S2(DM2S2Config.default_ads()).eval()
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ValueError(f"{path} is a directory without config.json: neither a dm2s2_fast "
                                 "checkpoint file nor a Hugging Face BERT checkpoint")
            torch.manual_seed(seed)
            return DM2S2(DM2S2Config.default_ads()).eval().load_bert(path)
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint at {path}")
        return load_checkpoint(path)
    raise TypeError("expected a FastDM2S2, a DM2S2, a checkpoint path or None, got "
                    f"{type(source).__name__}")


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def build_engine(model: DM2S2, *, device: str | torch.device = "cpu", dtype: str = "float32",
                 backend: str = "auto", cuda_graphs: bool = False, num_threads: int | None = None):
    """``model`` moved to ``device``/``dtype`` and converted (``dm2s2_fast.convert``)."""
    from ...engine import convert

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if num_threads:
        torch.set_num_threads(int(num_threads))
    model = model.to(torch.device(device), DTYPES[dtype]).eval()
    return convert(model, backend, cuda_graphs=bool(cuda_graphs))
