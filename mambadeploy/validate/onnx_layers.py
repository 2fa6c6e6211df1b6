"""Per-layer drift inside ONNX graphs, through polygraphy: every intermediate tensor of the prefill graph the backend
runs, against the same tensor of an fp32 export of MODEL run by ONNX Runtime on CPU.

Polygraphy does the work it is made for: ModifyOutputs marks the tensors as graph outputs, OnnxrtRunner runs each
graph, Comparator.run feeds both the same prompt and Comparator.compare_accuracy judges every tensor (CompareFunc.simple
with the per-layer bound as rtol and atol, elementwise). What is added here is the map from a tensor to the model layer
that computes it, so the first failing tensor names a layer and an op.

Layer of a tensor: the `layers.N` in its node's scope metadata (the dynamo exporter records the module path of every
node); a node without one (the residual adds, the standard-op expansions of custom nodes) belongs to the deepest layer
among its inputs (an initializer's layer is the `layers.N` in its name). Graph inputs count as before the first layer
(-1); the final norm and the LM head as after the last (n_layers).
"""

from __future__ import annotations

import re
import tempfile
import warnings
from pathlib import Path

import numpy as np

from ..errors import lazy_import

_LAYER = re.compile(r"layers\.(\d+)")
SCOPE_KEYS = ("pkg.torch.onnx.name_scopes", "namespace")


def tensor_layers(model, n_layers: int) -> dict[str, tuple[int, str]]:
    """{tensor name: (layer, op_type)} for every node output of the main graph; layer -1 = before the first layer
    (embedding, masks), n_layers = after the last (final norm, LM head)."""
    # weights carry their layer in their name (model.layers.3.mixer.in_proj.weight): a node that only reshapes a weight
    # then belongs to the weight's layer
    layer_of: dict[str, int] = {}
    for init in model.graph.initializer:
        found = _LAYER.findall(init.name)
        layer_of[init.name] = int(found[-1]) if found else -1
    out = {}
    for node in model.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        scope = next((meta[k] for k in SCOPE_KEYS if k in meta), "")
        found = _LAYER.findall(scope)
        if found:
            layer = int(found[-1])
        elif "final_norm" in scope or "lm_head" in scope:
            layer = n_layers
        else:
            layer = max((layer_of.get(i, -1) for i in node.input if i), default=-1)
        for o in node.output:
            if o:
                layer_of[o] = layer
                if node.op_type != "Constant":  # folded into initializers by polygraphy's graph view: not markable
                    out[o] = (layer, node.op_type)
    return out


def compare_graphs(ref_path: Path, cand_path: Path, feed: dict, n_layers: int, bound: float, cand_session,
                   ref_session) -> tuple[list[dict], str | None]:
    """Run both graphs with every common intermediate tensor marked as an output; one row per tensor, in the
    candidate graph's order. `*_session(path) -> onnxruntime.InferenceSession` (provider and custom ops chosen by the
    caller)."""
    onnx = lazy_import("onnx", extra="onnx", why="per-layer drift of ONNX graphs")
    lazy_import("polygraphy", extra="trt", why="per-layer drift of ONNX graphs")
    from polygraphy.backend.onnx import ModifyOutputs
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import Comparator
    from polygraphy.comparator.struct import IterationResult, RunResults
    from polygraphy.logger import G_LOGGER

    try:  # polygraphy >= 0.50 names the function object; CompareFunc.simple is its deprecated spelling
        from polygraphy.comparator import SimpleCompareFunc as simple
    except ImportError:
        from polygraphy.comparator import CompareFunc

        simple = CompareFunc.simple
    # polygraphy logs every tensor it compares, and numpy warns about the -inf time steps of pad positions (inf - inf):
    # keep the console readable
    with G_LOGGER.verbosity(G_LOGGER.ERROR), np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return _compare(onnx, (ModifyOutputs, OnnxrtRunner, Comparator, simple, IterationResult, RunResults),
                        ref_path, cand_path, feed, n_layers, bound, cand_session, ref_session)


def _compare(onnx, polygraphy, ref_path, cand_path, feed, n_layers, bound, cand_session, ref_session):
    ModifyOutputs, OnnxrtRunner, Comparator, simple, IterationResult, RunResults = polygraphy

    ref_model, cand_model = onnx.load(str(ref_path)), onnx.load(str(cand_path))
    ref_layers = tensor_layers(ref_model, n_layers)
    cand_layers = tensor_layers(cand_model, n_layers)
    common = [n for n in cand_layers if n in ref_layers]
    if not common:
        return [], (f"{cand_path} and the fp32 reference export share no tensor names (made by another exporter or "
                    "with other options): only the state tensors are compared")
    with tempfile.TemporaryDirectory(prefix="mambadeploy-layers-") as tmp:
        paths = []
        for tag, model in (("ref", ref_model), ("cand", cand_model)):
            marked = ModifyOutputs(model, outputs=common)()  # polygraphy: those tensors become graph outputs
            path = Path(tmp) / f"{tag}.onnx"
            big = marked.ByteSize() > 1 << 30 if hasattr(marked, "ByteSize") else True
            onnx.save(marked, str(path), save_as_external_data=big, location=f"{tag}.onnx.data")
            paths.append(path)
        runners = [OnnxrtRunner(ref_session(paths[0]), name="reference"), OnnxrtRunner(cand_session(paths[1]),
                                                                                         name="candidate")]
        results = Comparator.run(runners, data_loader=[feed])
    (ref_name, (ref_iter,)), (cand_name, (cand_iter,)) = results[0], results[1]
    ref_out, cand_out = {}, {}
    for name, cand in cand_iter.items():
        ref = ref_iter[name] if name in ref_iter.keys() else None  # noqa: SIM118 - a polygraphy struct
        if ref is None or np.shape(cand) != np.shape(ref):
            continue  # the same name for different tensors (graphs of other dtypes / options): not comparable
        ref_out[name] = ref
        # compared in the reference's dtype (an fp16 graph against the fp32 one)
        cand_out[name] = cand.astype(ref.dtype) if cand.dtype != ref.dtype else cand
    results = RunResults([(ref_name, [IterationResult(ref_out, runner_name=ref_name)]),
                          (cand_name, [IterationResult(cand_out, runner_name=cand_name)])])
    accuracy = Comparator.compare_accuracy(
        results, compare_func=simple(rtol=bound, atol=bound, check_shapes=False, infinities_compare_equal=True))
    if not hasattr(accuracy, "values"):  # newer polygraphy: one AccuracyResult per compare function
        accuracy = accuracy[0]
    verdicts = next(iter(accuracy.values()))[0]  # the one runner pair, the one iteration: {name: OutputCompareResult}
    rows = []
    for name in common:
        if name not in verdicts or name not in ref_out:
            continue
        ref, cand = np.asarray(ref_out[name]), np.asarray(cand_out[name])
        if ref.shape != cand.shape:
            continue
        if not ref.size:
            continue
        ref64, cand64 = ref.astype(np.float64), cand.astype(np.float64)
        # equal values (the -inf time steps of pad positions included) differ by 0, not by inf - inf = nan
        diff = np.where(ref64 == cand64, 0.0, np.abs(cand64 - ref64))
        finite = np.abs(ref64[np.isfinite(ref64)])
        scale = max(float(finite.max()) if finite.size else 0.0, 1e-6)
        max_abs = float(np.nan_to_num(diff.max(), nan=1e30, posinf=1e30))
        layer, op = cand_layers[name]
        rows.append({"name": name, "layer": layer, "kind": "onnx", "phase": "prefill", "max_abs": max_abs,
                     "max_rel": min(max_abs / scale, 1e30), "mean_abs": float(np.nan_to_num(diff.mean(), nan=1e30)),
                     "ok": bool(verdicts[name]), "op": op})
    return rows, None


def ort_session_factory(provider: str):
    """path -> onnxruntime.InferenceSession on 'cpu' or 'cuda' (fp32 MatMuls without TF32, so an fp32 comparison
    measures the graph, not TF32 rounding), with ONNX Runtime's own warnings silenced."""
    ort = lazy_import("onnxruntime", extra="onnx", why="per-layer drift of ONNX graphs")

    def make(path):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        if provider == "cuda":
            providers = [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
        return ort.InferenceSession(str(path), so, providers=providers)

    return make


def uses_custom_domain(path: Path) -> bool:
    import onnx

    from .. import opset

    return any(o.domain == opset.DOMAIN for o in onnx.load(str(path), load_external_data=False).opset_import)
