"""The data layer: the ragged batch (``SequenceSet``), its validation, and its packed layout.

It imports nothing of the package but ``config`` (tests/test_architecture.py holds that).
"""
from .layout import HostPlan, Layout, PackedLayout
from .sequence_set import SequenceSet

__all__ = ["HostPlan", "Layout", "PackedLayout", "SequenceSet"]
