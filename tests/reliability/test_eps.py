"""Tests that fail when a LayerNorm eps is wrong anywhere (issue #19 item 5).

Every other model test runs at the default eps (1e-12) on rows of variance near 1, where any eps
below ~1e-6 changes nothing measurable: mutation testing found that an encoder LayerNorm given the
embedding eps, ``linear_add_layernorm`` ignoring eps, the reference's eps changed from 1e-12 to
1e-5, and an engine hard-coding one eps all passed the suite. Here:

- configs with distinct, large eps (``layer_norm_eps`` 0.1 and ``embedding_layer_norm_eps`` 1e-3,
  and swapped) through the engine on every backend against the fp64 reference;
- a model whose LayerNorm inputs have a variance of ~1e-6 (eps 1e-12 vs 1e-5 is then a 50 % effect),
  at the default eps, through the engine on every backend;
- the reference model itself against a forward written out by hand from its parameters, with the
  eps taken from the config (not from the modules), so a reference that builds its LayerNorms with
  the wrong eps fails too; and the defaults are BERT's 1e-12;
- the three LayerNorm ops at eps 0.1, 1e-12 and 0 on every backend against the formula
  ``(x - mean) / sqrt(var + eps) * w + b`` on low-variance rows.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

import dm2s2_fast as dm
from conftest import FP32_TOL, fp64_reference, random_batch, random_model, rel_err, require_backend, small_config
from dm2s2_fast import DM2S2Config, Modality, SequenceSet, ops

FIELDS = ("logits", "pooled", "hidden", "intra_weights", "inter_weights", "segment_pooled")
BACKENDS = ("torch", "cpp", "triton")
EPS_PAIRS = [(0.1, 1e-3), (1e-3, 0.1)]  # (layer_norm_eps, embedding_layer_norm_eps)


def low_variance_model(config: DM2S2Config, seed: int = 0):
    """A model whose every LayerNorm input has a variance of ~1e-6: small tables, projections and
    LayerNorm gains, so eps 1e-12 and 1e-5 differ by tens of percent in every LayerNorm."""
    model = random_model(config, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("embeddings."):
                p.mul_(3e-3)
            elif "norm" in name:
                p.mul_(1e-3)
    return model


# ============================================================================ defaults
def test_default_eps_is_berts():
    """BERT's LayerNorms use 1e-12 (``load_bert`` refuses a checkpoint whose eps differs)."""
    config = DM2S2Config(modalities=(Modality("t", "tokens"),))
    assert config.layer_norm_eps == 1e-12 and config.embedding_layer_norm_eps == 1e-12
    ads = DM2S2Config.default_ads()
    assert ads.layer_norm_eps == 1e-12 and ads.embedding_layer_norm_eps == 1e-12


@pytest.mark.parametrize("eps,emb_eps", EPS_PAIRS)
def test_reference_layernorms_take_the_configs_eps(eps, emb_eps):
    model = random_model(small_config(layer_norm_eps=eps, embedding_layer_norm_eps=emb_eps))
    assert model.embeddings.layer_norm.eps == emb_eps
    for layer in model.layers:
        assert layer.attention_norm.eps == eps and layer.output_norm.eps == eps


# ============================================================================ the reference, by hand
def _layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)  # biased, as BERT's
    return (x - mean) / torch.sqrt(var + eps) * w + b


def _gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _pool(x, proj_w, proj_b, score):
    s = torch.tanh(x @ proj_w.T + proj_b) @ score
    a = torch.softmax(s, 0)
    return ((1 + a)[:, None] * x).sum(0) / (x.shape[0] + 1), a


def handwritten_forward(model, config: DM2S2Config, sample: dict):
    """One sample through DM²S², written out from ``model``'s parameters (fp64) with the eps of
    ``config``: returns (logits, hidden [n, d])."""
    p = {k: v.detach().double() for k, v in model.named_parameters()}
    emb, blocks, owner = model.embeddings, [], []
    for m, modality in enumerate(config.modalities):
        v = sample.get(modality.name)
        if v is None:
            continue
        L = v.shape[0]
        if modality.kind == "dense":
            content = v.double() @ p[f"embeddings.dense.{modality.name}.weight"].T + p[f"embeddings.dense.{modality.name}.bias"]
        elif modality.kind == "tokens":
            content = p["embeddings.word.weight"][v]
        else:
            content = p[f"embeddings.categorical.{modality.name}.weight"][v]
        blocks.append(content + p["embeddings.position.weight"][:L] + p["embeddings.token_type.weight"][m])
        owner += [m] * L
    x = _layer_norm(torch.cat(blocks), p["embeddings.layer_norm.weight"], p["embeddings.layer_norm.bias"],
                    config.embedding_layer_norm_eps)
    owner = torch.tensor(owner)
    n, d, H = x.shape[0], config.hidden_size, config.num_heads
    D = d // H
    allowed = torch.ones(n, n, dtype=torch.bool)
    if config.attention == "modality":
        allowed = owner[:, None] == owner[None, :]
    for i in range(config.num_layers):
        q, k, v = (x @ p[f"layers.{i}.qkv.weight"].T + p[f"layers.{i}.qkv.bias"]).view(n, 3, H, D).unbind(1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(D)
        scores = scores.masked_fill(~allowed, -math.inf)
        context = torch.einsum("hqk,khd->qhd", torch.softmax(scores, -1), v).reshape(n, d)
        x = _layer_norm(x + context @ p[f"layers.{i}.attention_output.weight"].T + p[f"layers.{i}.attention_output.bias"],
                        p[f"layers.{i}.attention_norm.weight"], p[f"layers.{i}.attention_norm.bias"],
                        config.layer_norm_eps)
        inner = _gelu(x @ p[f"layers.{i}.intermediate.weight"].T + p[f"layers.{i}.intermediate.bias"])
        x = _layer_norm(x + inner @ p[f"layers.{i}.output.weight"].T + p[f"layers.{i}.output.bias"],
                        p[f"layers.{i}.output_norm.weight"], p[f"layers.{i}.output_norm.bias"], config.layer_norm_eps)
    segments = [_pool(x[owner == m], p["intra_mra.proj.weight"], p["intra_mra.proj.bias"], p["intra_mra.score"])[0]
                for m in range(config.num_modalities) if bool((owner == m).any())]
    r, _ = _pool(torch.stack(segments), p["inter_mra.proj.weight"], p["inter_mra.proj.bias"], p["inter_mra.score"])
    logits = _gelu(r @ p["head.hidden.weight"].T + p["head.hidden.bias"]) @ p["head.out.weight"].T + p["head.out.bias"]
    return logits, x


@pytest.mark.parametrize("attention", ["set", "modality"])
@pytest.mark.parametrize("eps,emb_eps,low", [(0.1, 1e-3, False), (1e-3, 0.1, False), (1e-12, 1e-12, True)])
def test_reference_matches_a_handwritten_forward(eps, emb_eps, low, attention):
    config = small_config(attention, layer_norm_eps=eps, embedding_layer_norm_eps=emb_eps)
    model = (low_variance_model if low else random_model)(config, 1)
    g = torch.Generator().manual_seed(2)
    samples = [{"title": torch.tensor([4, 8, 15]), "image": torch.randn(2, 6, generator=g), "tags": torch.tensor([16])},
               {"body": torch.tensor([23, 42])},
               {"tags": torch.tensor([1, 2, 3, 4]), "title": torch.tensor([7]), "body": torch.tensor([9, 9, 9])}]
    batch = SequenceSet.from_samples(config, samples)
    out = fp64_reference(model, batch)
    start = 0
    for b, sample in enumerate(samples):
        logits, hidden = handwritten_forward(model, config, sample)
        assert rel_err(out.logits[b], logits) <= 1e-10, (b, out.logits[b], logits)
        assert rel_err(out.hidden[start:start + hidden.shape[0]], hidden) <= 1e-10, b
        start += hidden.shape[0]


# ============================================================================ the engine
def _engine_parity(config, model, backend, B=6, seed=3):
    require_backend(backend, "cpu", "linear_add_layernorm")
    batch = random_batch(config, B, seed, max_len=12)
    oracle = fp64_reference(model, batch)
    with torch.no_grad():
        out = dm.convert(model, backend=backend)(batch)
    for f in FIELDS:
        assert rel_err(getattr(out, f), getattr(oracle, f)) <= FP32_TOL, (backend, f)


@pytest.mark.parametrize("eps,emb_eps", EPS_PAIRS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_with_distinct_large_eps(backend, eps, emb_eps):
    config = small_config(layer_norm_eps=eps, embedding_layer_norm_eps=emb_eps)
    _engine_parity(config, random_model(config, 11), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_at_the_default_eps_on_low_variance_rows(backend):
    """eps 1e-12 matters here: an engine or kernel hard-coding 1e-5 (torch's default) fails."""
    config = small_config()
    _engine_parity(config, low_variance_model(config, 12), backend)


# ============================================================================ the LayerNorm ops
def _rows(g, n, d, scale):
    """Rows of small variance around small means, so that eps dominates their variance."""
    return (torch.randn(n, d, generator=g) * scale + torch.randn(n, 1, generator=g) * scale)


@pytest.mark.parametrize("eps", [0.1, 1e-3, 1e-12, 0.0])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["add_layernorm", "linear_add_layernorm", "embed_layernorm_dense", "embed_layernorm_ids"])
def test_layernorm_op_against_the_formula(op, backend, eps):
    require_backend(backend, "cpu", op.replace("_dense", "").replace("_ids", ""))
    g = torch.Generator().manual_seed(13)
    n, d, k = 37, 48, 20
    scale = math.sqrt(eps) / 2 if eps else 1e-3  # row variance ~eps / 2: eps changes every row
    w, b = torch.rand(d, generator=g) + 0.5, torch.randn(d, generator=g)
    if op == "add_layernorm":
        x, residual = _rows(g, n, d, scale), _rows(g, n, d, scale)
        out = ops.add_layernorm(x, residual, w, b, eps, backend=backend)
        pre = x.double() + residual.double()
    elif op == "linear_add_layernorm":
        x, W, bias, residual = (torch.randn(n, k, generator=g), torch.randn(d, k, generator=g) * scale / 5,
                                torch.randn(d, generator=g) * scale, _rows(g, n, d, scale))
        out = ops.linear_add_layernorm(x, W, bias, residual, w, b, eps, backend=backend)
        pre = x.double() @ W.double().T + bias.double() + residual.double()
    else:
        P, T, R = 16, 3, 50
        positions, type_ids = torch.randint(0, P, (n,), generator=g), torch.randint(0, T, (n,), generator=g)
        position_table, type_table = _rows(g, P, d, scale), _rows(g, T, d, scale)
        if op.endswith("dense"):
            dense = _rows(g, n, d, scale)
            content = dense.double()
            extra = dict(dense=dense)
        else:
            ids, table = torch.randint(0, R, (n,), generator=g), _rows(g, R, d, scale)
            content = table.double()[ids]
            extra = dict(ids=ids, table=table)
        rows = torch.randperm(n + 5, generator=g)[:n]
        out_buffer = torch.zeros(n + 5, d)
        ops.embed_layernorm(positions, type_ids, position_table, type_table, w, b, eps, out=out_buffer,
                            out_rows=rows, backend=backend, **extra)
        out = out_buffer[rows]
        pre = content + position_table.double()[positions] + type_table.double()[type_ids]
    expected = _layer_norm(pre, w.double(), b.double(), eps)
    assert rel_err(out, expected) <= FP32_TOL, (op, backend, eps)
    if eps:  # the test would notice another eps: the formula at a tenth of it differs measurably
        assert rel_err(_layer_norm(pre, w.double(), b.double(), eps / 10), expected) > 1e3 * FP32_TOL
