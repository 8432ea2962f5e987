"""The benchmark's provider names, table order and labels (no torch import: report.py renders
results without it; peers.py builds the runners)."""

# "<backend>+graphs": the engine with cuda_graphs=True (one graph replay per shape bucket);
# "+fastlaunch": the engine with tuning=Tuning(triton_fast_launch=True) (Triton launches through
# FastLaunch's cache instead of JITFunction.run).
ENGINE_BACKENDS = ("auto", "torch", "cpp", "triton", "triton+fastlaunch", "cuda", "auto+graphs", "triton+graphs",
                   "cuda+graphs")
PEERS = ("hf", "nested", "onnxruntime", "flex")
# Table order: floor first, then the oracle, the engine, the peers, the pooling row.
PROVIDERS = ("floor", "reference") + ENGINE_BACKENDS + PEERS + ("pool",)

LABELS = {"floor": "floor (BLAS linears)", "reference": "reference (padded)",
          **{p: f"engine: {p}" for p in ENGINE_BACKENDS},
          "hf": "HF BertModel (sdpa)", "nested": "nn.TransformerEncoder (nested)",
          "onnxruntime": "ONNX Runtime", "flex": "flex_attention (packed)", "pool": "MRA pool + head"}
