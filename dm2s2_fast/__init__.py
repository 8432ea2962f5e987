"""dm2s2_fast: a kernel-level inference engine for DM²S² over ragged, unpadded batches."""
from . import ops
from .backends import BackendUnavailable
from .config import DM2S2Config, Modality

__version__ = "0.1.0"

__all__ = ["BackendUnavailable", "DM2S2Config", "Modality", "ops"]
