"""DM²S² on Triton Inference Server's Python backend (copied into the repository as ``1/model.py``
by ``python -m dm2s2_fast triton-repo``; runs in the backend's stub process, never imported by the
package itself).

``execute`` gets the requests the dynamic batcher grouped (ragged: any K and T each). Each is
validated alone — a malformed one gets its own error response — and the valid ones are packed into
one ragged batch, run through the engine once and answered with their own rows of the scores
(``dm2s2_fast.serving.triton.packing.BatchScorer``). The stub's Python must import torch and
dm2s2_fast: the launcher (``dm2s2_fast.serving.triton.server``) sets ``PYTHONHOME``, and puts the
launching interpreter's site directories on ``PYTHONPATH`` and in ``DM2S2_FAST_SITE_DIRS``; their
``.pth`` files run below (PYTHONPATH alone skips them), so a virtual environment or an editable
install works.
"""
import json
import os
import site

_default_site = set(site.getsitepackages()) if hasattr(site, "getsitepackages") else set()
for _dir in os.environ.get("DM2S2_FAST_SITE_DIRS", "").split(os.pathsep):
    if _dir and _dir not in _default_site:  # their .pth files (editable installs) have not run yet
        site.addsitedir(_dir)

import torch  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from dm2s2_fast.serving.triton.checkpoint import build_engine, load_checkpoint  # noqa: E402
from dm2s2_fast.serving.triton.packing import OUTPUT_NAME, BatchScorer, RequestError, input_names  # noqa: E402


def _error(exc):
    code = pb_utils.TritonError.INVALID_ARG if isinstance(exc, RequestError) else pb_utils.TritonError.INTERNAL
    try:
        return pb_utils.TritonError(str(exc), code)
    except (AttributeError, TypeError):  # servers before error codes
        return pb_utils.TritonError(str(exc))


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = os.path.dirname(os.path.abspath(__file__))
        if args.get("model_instance_kind") == "GPU":
            device = f"cuda:{int(args.get('model_instance_device_id', 0))}"
            torch.cuda.set_device(device)
        else:
            device = "cpu"
        model = load_checkpoint(os.path.join(version_dir, params.get("weights", "dm2s2.pt")))
        engine = build_engine(model, device=device, dtype=params.get("dtype", "float32"),
                              backend=params.get("backend", "auto"),
                              cuda_graphs=params.get("cuda_graphs", "false") == "true",
                              num_threads=int(params.get("num_threads", "0") or 0))
        transport_only = params.get("transport_only", "false") == "true"
        if transport_only:
            pb_utils.Logger.log_warn("dm2s2: transport_only=true: answering zeros without the engine (a benchmark mode)")
        self.scorer = BatchScorer(engine, device=device, truncate=params.get("truncate", "false") == "true",
                                  transport_only=transport_only)
        self.names = [n for pair in input_names(engine.config) for n in pair]
        self.scorer.warm_up()
        pb_utils.Logger.log_info(f"dm2s2: {args['model_instance_name']} on {device}, backend "
                                 f"{params.get('backend', 'auto')} "
                                 f"({'+'.join(sorted(set(engine.last_backends.values())))}), "
                                 f"{torch.get_num_threads()} threads")

    def execute(self, requests):
        inputs = []
        for request in requests:
            arrays = {}
            for name in self.names:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    arrays[name] = torch.from_dlpack(tensor.to_dlpack())
            inputs.append(arrays)
        results = self.scorer.score_requests(inputs, batch_dim=True)
        responses = []
        for result in results:
            if isinstance(result, Exception):
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=_error(result)))
            else:
                # from_dlpack: pb_utils.Tensor(name, ndarray) sent an empty buffer under numpy 2 (stub 24.10)
                scores = pb_utils.Tensor.from_dlpack(OUTPUT_NAME, result.unsqueeze(0).contiguous())
                responses.append(pb_utils.InferenceResponse(output_tensors=[scores]))
        return responses

    def finalize(self):
        stats = self.scorer.stats.as_dict()
        pb_utils.Logger.log_info(f"dm2s2: finalize, {json.dumps(stats)}")
