"""dm2s2_fast: a kernel-level inference engine for DM²S² over ragged, unpadded batches."""
from . import ops, reference
from .backends import BackendUnavailable
from .config import DM2S2Config, Modality
from .engine import FastDM2S2, convert
from .output import DM2S2Output
from .sequence_set import PackedLayout, SequenceSet

__version__ = "0.1.0"

__all__ = ["BackendUnavailable", "DM2S2Config", "DM2S2Output", "FastDM2S2", "Modality",
           "PackedLayout", "SequenceSet", "convert", "ops", "reference"]
