"""The reference DM²S²: padded PyTorch modules that define the model (docs/model.md).

This is the numerical oracle every backend is tested against and the trainable form of the model;
``dm2s2_fast.convert`` turns it into the ragged engine sharing these very parameters.
Padding here is per modality (each modality padded to its longest sequence in the batch, the
blocks concatenated), with masks doing the work: simple to read, and independent of the engine's
packing code.
"""
from __future__ import annotations

import json
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from .config import DM2S2Config
from .output import DM2S2Output
from .data import SequenceSet


class Embeddings(nn.Module):
    def __init__(self, config: DM2S2Config):
        super().__init__()
        d = config.hidden_size
        self.word = nn.Embedding(config.vocab_size, d)
        self.position = nn.Embedding(config.max_positions, d)
        self.token_type = nn.Embedding(config.num_modalities, d)
        self.categorical = nn.ModuleDict({m.name: nn.Embedding(m.num_embeddings, d)
                                          for m in config.modalities if m.kind == "categorical"})
        self.dense = nn.ModuleDict({m.name: nn.Linear(m.input_dim, d)
                                    for m in config.modalities if m.kind == "dense"})
        self.layer_norm = nn.LayerNorm(d, eps=config.embedding_layer_norm_eps)

    def table(self, modality) -> nn.Embedding:
        return self.word if modality.kind == "tokens" else self.categorical[modality.name]

    def content(self, modality, values: torch.Tensor) -> torch.Tensor:
        """E_m(x): a table row for ids, the projection for dense features."""
        if modality.kind == "dense":
            layer = self.dense[modality.name]
            return layer(values.to(layer.weight.dtype))
        return self.table(modality)(values)


class EncoderLayer(nn.Module):
    """BERT post-LN layer; q, k, v projections held as one [3d, d] Linear (loaded from BERT's three)."""

    def __init__(self, config: DM2S2Config):
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(d, 3 * d)
        self.attention_output = nn.Linear(d, d)
        self.attention_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.intermediate = nn.Linear(d, config.intermediate_size)
        self.output = nn.Linear(config.intermediate_size, d)
        self.output_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """x [B, T, d]; allowed [B, T, T] (or broadcastable) bool: query i may attend key j."""
        B, T, d = x.shape
        H = self.num_heads
        q, k, v = self.qkv(x).view(B, T, 3, H, d // H).permute(2, 0, 3, 1, 4)  # each [B, H, T, D]
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d // H)
        scores = scores.masked_fill(~allowed[:, None], torch.finfo(scores.dtype).min)
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, d)
        x = self.attention_norm(x + self.attention_output(context))
        return self.output_norm(x + self.output(F.gelu(self.intermediate(x))))


class ResidualAttention(nn.Module):
    """MRA scorer ``s = vᵀ tanh(W x + c)`` with the residual pooling ``Σ (1 + softmax(s)) x / (n + 1)``."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(d, hidden)
        self.score = nn.Parameter(torch.empty(hidden))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., n, d], mask [..., n] → pooled [..., d], weights [..., n] (0 where masked)."""
        s = torch.tanh(self.proj(x)) @ self.score
        s = s.masked_fill(~mask, torch.finfo(s.dtype).min)
        weights = s.softmax(-1) * mask
        count = mask.sum(-1, keepdim=True).to(x.dtype)
        residual = (1 + weights) * mask / (count + 1)
        return (residual.unsqueeze(-1) * x).sum(-2), weights


class Head(nn.Module):
    def __init__(self, config: DM2S2Config):
        super().__init__()
        self.hidden = nn.Linear(config.hidden_size, config.classifier_dim)
        self.out = nn.Linear(config.classifier_dim, config.num_outputs)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        return self.out(F.gelu(self.hidden(r)))


class DM2S2(nn.Module):
    """DM²S²: embeddings → BERT encoder with masked set attention → IntraMRA → InterMRA → head."""

    def __init__(self, config: DM2S2Config):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_layers))
        self.intra_mra = ResidualAttention(config.hidden_size, config.mra_dim)
        self.inter_mra = ResidualAttention(config.hidden_size, config.mra_dim)
        self.head = Head(config)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT's initialisation: N(0, initializer_range) weights, zero biases, unit LayerNorms."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, std)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, ResidualAttention):
                nn.init.normal_(module.score, 0.0, std)

    def forward(self, batch: SequenceSet) -> DM2S2Output:
        if not isinstance(batch, SequenceSet):
            raise TypeError(f"DM2S2 takes a SequenceSet, got {type(batch).__name__}")
        self.config.check_batch(batch.config)
        cfg, emb = self.config, self.embeddings
        padded = batch.to_padded()
        blocks, masks, block_ids, widths = [], [], [], []
        for m, modality in enumerate(cfg.modalities):
            values, mask = padded[modality.name]
            width = mask.shape[1]
            e = emb.content(modality, values) + emb.position.weight[:width] + emb.token_type.weight[m]
            blocks.append(e)
            masks.append(mask)
            block_ids.append(torch.full((width,), m, device=mask.device))
            widths.append(width)
        x = emb.layer_norm(torch.cat(blocks, 1))
        mask = torch.cat(masks, 1)  # [B, T]: which columns hold an element
        allowed = mask[:, None, :]  # set attention: every element of the sample
        if cfg.attention == "modality":
            block = torch.cat(block_ids)
            allowed = allowed & (block[:, None] == block[None, :])[None]
        for layer in self.layers:
            x = layer(x, allowed)

        pooled_blocks, alpha_blocks = [], []
        for xm, mm in zip(x.split(widths, 1), masks):
            z, alpha = self.intra_mra(xm, mm)
            pooled_blocks.append(z)
            alpha_blocks.append(alpha)
        z = torch.stack(pooled_blocks, 1)  # [B, M, d]
        present = torch.stack([mm.any(1) for mm in masks], 1)  # [B, M]
        r, beta = self.inter_mra(z, present)
        return DM2S2Output(
            logits=self.head(r), pooled=r, hidden=x[mask],
            intra_weights=torch.cat(alpha_blocks, 1)[mask], inter_weights=beta[present],
            segment_pooled=z[present], layout=batch.layout)

    # ---- pre-trained BERT ---------------------------------------------------------------------
    @torch.no_grad()
    def load_bert(self, path: str | os.PathLike) -> "DM2S2":
        """Load encoder, word, position and type tables from a Hugging Face BERT checkpoint directory.

        Modality m takes BERT's token-type row m where one exists; the others are drawn as BERT
        draws them, N(0, the checkpoint's initializer_range).
        """
        cfg = self.config
        with open(os.path.join(path, "config.json")) as f:
            hf = json.load(f)
        expected = {"hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
                    "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.intermediate_size,
                    "vocab_size": cfg.vocab_size}
        wrong = {k: (hf.get(k), v) for k, v in expected.items() if hf.get(k) != v}
        if wrong:
            raise ValueError("checkpoint and config disagree (checkpoint, config): "
                             + ", ".join(f"{k}={a}/{b}" for k, (a, b) in wrong.items()))
        if hf.get("model_type", "bert") != "bert":  # e.g. RoBERTa: same keys, other position ids
            raise ValueError(f"only BERT checkpoints load; this one is {hf['model_type']!r}")
        if hf.get("hidden_act", "gelu") not in ("gelu", "gelu_python"):  # both exact erf in transformers
            raise ValueError(f"only exact-erf GELU BERTs load; the checkpoint uses {hf['hidden_act']!r}")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported")
        for key in ("layer_norm_eps", "embedding_layer_norm_eps"):  # BERT has one eps for every LayerNorm
            if abs(hf.get("layer_norm_eps", 1e-12) - getattr(cfg, key)) > 1e-15:
                raise ValueError(f"checkpoint layer_norm_eps {hf.get('layer_norm_eps', 1e-12)} differs from "
                                 f"the config's {key} {getattr(cfg, key)}")
        state = _read_checkpoint(path)
        prefix = "bert." if any(k.startswith("bert.") for k in state) else ""

        def take(name: str) -> torch.Tensor:
            key = prefix + name
            if key not in state:
                # Old TF-converted checkpoints call LayerNorm parameters gamma/beta.
                alt = key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
                if alt not in state:
                    raise ValueError(f"checkpoint has no {key!r}")
                key = alt
            return state[key]

        emb = self.embeddings
        emb.word.weight.copy_(take("embeddings.word_embeddings.weight"))
        positions = take("embeddings.position_embeddings.weight")
        if positions.shape[0] < cfg.max_positions:
            raise ValueError(f"checkpoint has {positions.shape[0]} positions, config max_positions is "
                             f"{cfg.max_positions}")
        emb.position.weight.copy_(positions[: cfg.max_positions])
        types = take("embeddings.token_type_embeddings.weight")
        rows = min(types.shape[0], cfg.num_modalities)
        emb.token_type.weight[:rows].copy_(types[:rows])
        emb.token_type.weight[rows:].normal_(0.0, float(hf.get("initializer_range", 0.02)))
        emb.layer_norm.weight.copy_(take("embeddings.LayerNorm.weight"))
        emb.layer_norm.bias.copy_(take("embeddings.LayerNorm.bias"))
        for i, layer in enumerate(self.layers):
            p = f"encoder.layer.{i}."
            layer.qkv.weight.copy_(torch.cat([take(p + f"attention.self.{n}.weight") for n in ("query", "key", "value")]))
            layer.qkv.bias.copy_(torch.cat([take(p + f"attention.self.{n}.bias") for n in ("query", "key", "value")]))
            pairs = ((layer.attention_output, "attention.output.dense"),
                     (layer.attention_norm, "attention.output.LayerNorm"),
                     (layer.intermediate, "intermediate.dense"),
                     (layer.output, "output.dense"), (layer.output_norm, "output.LayerNorm"))
            for module, name in pairs:
                module.weight.copy_(take(p + name + ".weight"))
                module.bias.copy_(take(p + name + ".bias"))
        return self


def _read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    safetensors_file = os.path.join(path, "model.safetensors")
    if os.path.exists(safetensors_file):
        from safetensors.torch import load_file

        return load_file(safetensors_file)
    bin_file = os.path.join(path, "pytorch_model.bin")
    if os.path.exists(bin_file):
        return torch.load(bin_file, map_location="cpu", weights_only=True)
    raise ValueError(f"{path} holds neither model.safetensors nor pytorch_model.bin")
