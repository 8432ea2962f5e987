"""Model configuration: the modalities of a sample and the BERT encoder's sizes (docs/model.md)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

ModalityKind = Literal["tokens", "categorical", "dense"]
KINDS = ("tokens", "categorical", "dense")


@dataclass(frozen=True)
class Modality:
    """One sequence of a sample.

    ``tokens`` index the shared word table (``vocab_size`` rows), ``categorical`` their own table of
    ``num_embeddings`` rows, ``dense`` are float vectors of ``input_dim`` projected to the hidden size.
    """

    name: str
    kind: ModalityKind
    input_dim: int | None = None
    num_embeddings: int | None = None

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"modality name must be a non-empty string, got {self.name!r}")
        if self.kind not in KINDS:
            raise ValueError(f"modality {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "dense" and not (isinstance(self.input_dim, int) and self.input_dim > 0):
            raise ValueError(f"modality {self.name!r}: a dense modality needs input_dim > 0")
        if self.kind == "categorical" and not (
            isinstance(self.num_embeddings, int) and self.num_embeddings > 0
        ):
            raise ValueError(f"modality {self.name!r}: a categorical modality needs num_embeddings > 0")


@dataclass(frozen=True)
class DM2S2Config:
    modalities: tuple[Modality, ...]
    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_positions: int = 512
    attention: Literal["set", "modality"] = "set"
    mra_hidden_size: int | None = None  # IntraMRA/InterMRA score MLP width; None = hidden_size
    head_hidden_size: int | None = None  # classifier hidden width; None = hidden_size
    num_outputs: int = 1
    layer_norm_eps: float = 1e-12
    embedding_layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        object.__setattr__(self, "modalities", tuple(self.modalities))
        if not self.modalities:
            raise ValueError("a config needs at least one modality")
        names = [m.name for m in self.modalities]
        if len(set(names)) != len(names):
            raise ValueError(f"modality names must be unique, got {names}")
        if self.attention not in ("set", "modality"):
            raise ValueError(f"attention must be 'set' or 'modality', got {self.attention!r}")
        for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                    "max_positions", "num_outputs"):
            value = getattr(self, key)
            smallest = 0 if key == "num_layers" else 1
            if not isinstance(value, int) or value < smallest:
                raise ValueError(f"{key} must be an integer >= {smallest}, got {value!r}")
        for key in ("mra_hidden_size", "head_hidden_size"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{key} must be None (the hidden size) or an integer >= 1, got {value!r}")
        for key in ("layer_norm_eps", "embedding_layer_norm_eps"):
            value = getattr(self, key)
            # eps > 0 keeps LayerNorm of a constant row finite (the CUDA-graph padding has zero rows).
            if not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{key} must be a positive finite number, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}"
            )

    def check_batch(self, batch_config: "DM2S2Config") -> None:
        """Raise ValueError unless a batch validated against ``batch_config`` is valid input here:
        the same modalities, and ids and lengths checked against the same vocabulary and position
        table (else out-of-range ids would reach the embedding kernels)."""
        for key in ("modalities", "vocab_size", "max_positions"):
            if getattr(batch_config, key) != getattr(self, key):
                raise ValueError(f"the batch was built for a config with other {key} "
                                 f"({getattr(batch_config, key)!r}, the model has {getattr(self, key)!r})")

    @property
    def num_modalities(self) -> int:
        return len(self.modalities)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mra_dim(self) -> int:
        return self.mra_hidden_size or self.hidden_size

    @property
    def classifier_dim(self) -> int:
        return self.head_hidden_size or self.hidden_size

    def modality_index(self, name: str) -> int:
        for i, m in enumerate(self.modalities):
            if m.name == name:
                return i
        raise ValueError(f"unknown modality {name!r}; the config has {[m.name for m in self.modalities]}")

    @classmethod
    def default_ads(cls, **overrides) -> "DM2S2Config":
        """The ``ads`` workload's config (docs/workloads.md): title, description, image patches,
        category on the all-MiniLM-L6 shape."""
        fields = dict(
            modalities=(
                Modality("title", "tokens"),
                Modality("description", "tokens"),
                Modality("image", "dense", input_dim=512),
                Modality("category", "categorical", num_embeddings=1000),
            ),
            vocab_size=30522,
            hidden_size=384,
            num_layers=6,
            num_heads=12,
            intermediate_size=1536,
            max_positions=512,
        )
        fields.update(overrides)
        return cls(**fields)
