"""dm2s2_fast: a kernel-level inference engine for DM²S² over ragged, unpadded batches."""
from . import ops, reference
from .config import DM2S2Config, Modality
from .data import PackedLayout, SequenceSet
from .dispatch import BackendUnavailable
from .engine import FastDM2S2, convert
from .export import ExportedEngine, aoti_package, export, load_package  # noqa: F811 - the function shadows the module
from .output import DM2S2Output
from .tuning import AttentionTiles, PoolRows, ScoreTiles, Tuning

__version__ = "0.1.0"

__all__ = ["AttentionTiles", "BackendUnavailable", "DM2S2Config", "DM2S2Output", "ExportedEngine", "FastDM2S2",
           "Modality", "PackedLayout", "PoolRows", "ScoreTiles", "SequenceSet", "Tuning", "aoti_package", "convert",
           "export", "load_package", "ops", "reference"]
