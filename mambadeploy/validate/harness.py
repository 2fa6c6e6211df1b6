"""validate's data flow: reference trace -> one runner per backend -> numerics, latency, per-layer -> one result dict
(the JSON document described by result.schema.json). No printing here beyond progress bars; console.py and
report_html.py render the result."""

from __future__ import annotations

import datetime
import gc
import platform
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__
from ..errors import InputError, MambaDeployError
from ..models.checkpoint import load_model
from ..runtime.torch_eager import TorchEagerRunner
from . import artifacts, per_layer, tolerances
from .backends import ONNX_BACKENDS, BackendRequest, default_device, dtype_name, parse_backends, unavailable_reason
from .latency import DeviceMemory, decode_bytes_per_step, latency_summary, roofline
from .parity import ReferenceTrace, free_greedy, teacher_forced, trace_reference
from .prompts import load_prompts, random_prompts

SCHEMA_ID = "mambadeploy.validate/2"


@dataclass
class ValidateOptions:
    model: str
    export_dir: str | None = None
    backends: str | None = None  # "torch,ort-cpu:fp16"; None = every backend, unavailable ones skipped
    dtype: str = "fp32"
    device: str | None = None  # torch backends and the reference; None = cuda when visible, else cpu
    prompts_file: str | None = None
    num_prompts: int = 2
    prompt_len: int = 16
    new_tokens: int = 32
    seed: int = 0
    per_layer: bool = False
    prefill_repeats: int = 3
    ops: str | None = None  # export op set for the export validate makes itself (None = the exporter's default)
    use_cache: bool = True  # exports made here go through the ORT runtime's export cache (runtime/ort_runner.py)
    time_limit_s: float | None = None  # backends not started by then are reported as skipped
    progress: bool = False
    parallel: str = "tp=2"  # layout of the `parallel` backend (parallel/mesh.parse_layout)
    parallel_kernels: str = "torch"  # its decode: the sharded reference ("torch") or torch-fast's kernels ("triton")
    max_context: int | None = None  # KV cache slots per sequence (None: the checkpoint's context)
    prefill_chunk: int | None = None  # torch-fast prompt tokens per prefill chunk (None: its default)


def run_validation(opts: ValidateOptions, log=lambda msg: None) -> dict:
    requests, explicit = parse_backends(opts.backends, opts.dtype)
    if opts.new_tokens < 1:
        raise InputError(f"--new-tokens must be >= 1, got {opts.new_tokens}")
    runnable, skipped = [], []
    for req in requests:
        why = unavailable_reason(req.name, explicit)
        if why and explicit:
            raise MambaDeployError(f"backend {req.name} cannot run here: {why}")
        (skipped if why else runnable).append((req, why))
    device = opts.device or default_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda asked for, but torch sees no CUDA GPU here")

    if (Path(str(opts.model)) / "manifest.json").is_file():
        raise InputError(f"{opts.model} is an export directory; validate MODEL takes the preset or checkpoint the "
                         f"reference is built from: mambadeploy validate MODEL --export {opts.model}")
    log(f"loading {opts.model} (fp32 reference on {device})")
    # built on the CPU, then moved: a preset's random weights depend on the device that draws them, and the exports
    # (traced on the CPU) must hold the same weights as the reference; every torch candidate is a copy of these
    model = load_model(opts.model, dtype="fp32", device="cpu", max_context=opts.max_context).to(device)
    config = model.config
    # the export cache is keyed by the checkpoint alone: a cache sized by --max-context exports from this model
    exports = artifacts.Exports(opts.model, model, opts.export_dir, opts.ops,
                                opts.use_cache and opts.max_context is None)
    if opts.export_dir and Path(opts.export_dir).exists():
        exports.check_given()  # an export of another model fails here, before any work
        # ONNX backends named without a dtype run the given export in its own dtype
        have = _parse(exports.dtype_of(Path(opts.export_dir)))
        runnable = [(BackendRequest(r.name, have, False) if r.name in ONNX_BACKENDS and not r.dtype_given else r, why)
                    for r, why in runnable]
        requests = [BackendRequest(r.name, have, False) if r.name in ONNX_BACKENDS and not r.dtype_given else r
                    for r in requests]
    prompts = (load_prompts(opts.prompts_file, config.vocab_size) if opts.prompts_file
               else random_prompts(config.vocab_size, opts.num_prompts, opts.prompt_len, opts.seed))
    longest = max(len(p) for p in prompts)
    if config.has_attention and longest + opts.new_tokens > config.max_seq_len:
        raise InputError(f"prompts of up to {longest} tokens + {opts.new_tokens} new tokens exceed the attention KV "
                         f"cache of {config.max_seq_len} slots")

    reference = TorchEagerRunner(model)
    log(f"reference: greedy {opts.new_tokens} tokens for {len(prompts)} prompt(s)")
    trace = trace_reference(reference, prompts, opts.new_tokens, keep_states=opts.per_layer, progress=opts.progress)
    ref_stream = per_layer.residual_stream(model, trace.ids, trace.lengths) if opts.per_layer else None

    results = []
    baselines = Baselines(model, device, trace, opts.progress)
    # torch backends first: a torch:<low precision> run is also that dtype's precision baseline
    runnable.sort(key=lambda item: item[0].name != "torch")
    with tempfile.TemporaryDirectory(prefix="mambadeploy-validate-") as tmp:
        exports.temp_root = Path(tmp)
        started = time.perf_counter()
        for req, _ in runnable:
            if opts.time_limit_s is not None and time.perf_counter() - started > opts.time_limit_s:
                results.append(_skipped(req, f"not started: --time-limit of {opts.time_limit_s:g} s reached"))
                continue
            log(f"{req.label}: running" + (" (its export is made first, or taken from the cache)"
                                           if req.name in ONNX_BACKENDS and not opts.export_dir else ""))
            results.append(_run_backend(req, opts, model, reference, trace, ref_stream, exports, device, baselines))
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    results += [_skipped(req, why) for req, why in skipped]
    order = {(r.name, r.dtype): i for i, r in enumerate(requests)}
    results.sort(key=lambda r: order.get((r["backend"], _parse(r["dtype"])), 0))
    return _document(opts, model, device, trace, prompts, results, explicit, requests, exports, baselines)


def _parse(name: str) -> torch.dtype:
    from ..models.checkpoint import parse_dtype

    return parse_dtype(name)


class Baselines:
    """Per low-precision dtype, the torch-eager model in that dtype against the fp32 reference (tolerances.logits_gate
    judges backends of that dtype against it). Taken from a torch:<dtype> backend run when there is one, else run
    here once (teacher-forced only)."""

    def __init__(self, model, device, trace, progress):
        self.model, self.device, self.trace, self.progress = model, device, trace, progress
        self.figures: dict[str, dict] = {}

    def record(self, dtype: torch.dtype, tf: dict, device: str) -> None:
        name = dtype_name(dtype)
        if dtype != torch.float32 and name not in self.figures and device == self.device:
            self.figures[name] = {"backend": f"torch:{name}", "device": device, "max_rel": tf["worst"]["max_rel"],
                                  "mean_abs": tf["worst"]["mean_abs"], "cosine": tf["worst"]["cosine"],
                                  "top1_agreement": tf["top1_agreement"]}

    def get(self, dtype: torch.dtype) -> dict | None:
        if dtype == torch.float32:
            return None
        if dtype_name(dtype) not in self.figures:
            from ..runtime.factory import make_runner

            runner = make_runner(self.model, backend="torch", dtype=dtype_name(dtype), device=self.device)
            self.record(dtype, teacher_forced(runner, self.trace, progress=self.progress,
                                              label=f"baseline torch:{dtype_name(dtype)}"), self.device)
        return self.figures[dtype_name(dtype)]


def _run_backend(req: BackendRequest, opts, model, reference, trace: ReferenceTrace, ref_stream, exports, device,
                 baselines: Baselines):
    entry = _entry(req, "error")
    memory = DeviceMemory(device if req.name == "torch" else _backend_device(req.name))
    memory.start()
    try:
        runner = _make_runner(req, opts, reference, exports, device, trace)
        entry["describe"] = _jsonable(runner.describe())
        tf = teacher_forced(runner, trace, keep_states=opts.per_layer, progress=opts.progress, label=req.label)
        memory.sample()
        greedy = free_greedy(runner, trace, opts.prefill_repeats, progress=opts.progress)
        memory.sample()
    except MambaDeployError as exc:
        entry["reason"] = str(exc)
        entry["failures"] = [f"could not run: {exc}"]
        return entry
    except Exception as exc:  # noqa: BLE001 - one broken backend must not hide the others' results
        entry["reason"] = f"{type(exc).__name__}: {exc}"
        entry["failures"] = [f"crashed: {entry['reason']}"]
        entry["traceback"] = traceback.format_exc(limit=6)
        return entry
    if req.name == "torch":
        baselines.record(req.dtype, tf, device)
    gate = tolerances.logits_gate(req.dtype, baselines.get(req.dtype))
    entry["tolerance"].update(gate)
    B = trace.tokens.shape[0]
    entry["logits"] = {k: tf[k] for k in ("prefill", "decode_steps", "worst")}
    entry["teacher_forced"] = {"top1_agreement": tf["top1_agreement"], "positions": tf["positions"]}
    entry["greedy"] = {k: greedy[k] for k in ("token_match_rate", "first_divergence", "first_divergence_per_row")}
    lat = latency_summary(greedy["prefill_s"], greedy["step_s"], B)
    lat.update(batch=B, prompt_len=int(trace.ids.shape[1]))
    entry["latency"] = lat
    entry["memory"] = memory.result()
    if runner is reference and entry["memory"]["peak_mb"] is not None:  # its weights were there before the start
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        entry["memory"] = {"peak_mb": entry["memory"]["peak_mb"] + weights / 2**20,
                           "method": entry["memory"]["method"] + " + the reference's weights (this run reuses them)"}
    gpu = entry["describe"].get("gpu") if _on_gpu(entry["describe"], req.name) else None
    if entry["memory"]["peak_mb"] is not None:  # long prompts: what one sequence costs
        entry["memory"]["peak_mb_per_sequence"] = entry["memory"]["peak_mb"] / B
    entry["roofline"] = roofline(decode_bytes_per_step(model, model.config, req.dtype, B), lat["decode_ms_p50"], gpu)
    if opts.per_layer:
        try:
            entry["per_layer"] = _per_layer(req, runner, model, trace, tf, ref_stream, exports)
        except Exception as exc:  # noqa: BLE001 - a diagnostic that breaks must not hide the verdict
            entry["per_layer"] = per_layer.summarise([], model.config, req.dtype, [],
                                                     [f"per-layer comparison failed: {type(exc).__name__}: {exc}"])
    entry["failures"] = _verdict(gate, tf)
    entry["status"] = "failed" if entry["failures"] else "passed"
    del runner
    return entry


def _make_runner(req, opts, reference, exports, device, trace: ReferenceTrace):
    from ..runtime.factory import make_runner

    if req.name == "torch":
        if req.dtype == torch.float32:
            return reference  # the same fp32 model on the same device: reuse it rather than load it twice
        return make_runner(reference.model, backend="torch", dtype=dtype_name(req.dtype), device=device)
    if req.name == "torch-fast":
        return make_runner(reference.model, backend="torch-fast", dtype=dtype_name(req.dtype),
                           device="cuda" if torch.cuda.is_available() else "cpu", prefill_chunk=opts.prefill_chunk)
    if req.name == "parallel":  # its workers load MODEL themselves, each only its slices
        return make_runner(opts.model, backend="parallel", dtype=dtype_name(req.dtype), device=device,
                           parallel=opts.parallel, kernels=opts.parallel_kernels)
    if req.name == "trt":  # engines built from the export, with profiles covering this run's batch and prompt
        engine_dir = exports.engine(req, int(trace.ids.shape[0]), int(trace.ids.shape[1]))
        return make_runner(str(engine_dir), backend="trt", device="cuda")
    export_dir = exports.get(req)
    return make_runner(str(export_dir), backend=req.name, dtype=dtype_name(req.dtype), device=_backend_device(req.name))


def _backend_device(name: str) -> str:
    if name == "ort-cpu" or not torch.cuda.is_available():
        return "cpu"
    return "cuda"


def _on_gpu(describe: dict, name: str) -> bool:
    return "cuda" in str(describe.get("device", "")) or name in ("ort-cuda", "trt")


def _verdict(gate: dict, tf: dict) -> list[str]:
    bound, top1 = gate["logits_max_rel"], gate["top1_agreement"]
    failures = []
    rows = [{"step": 0, **tf["prefill"]}] + tf["decode_steps"]
    worst = max(rows, key=lambda r: r["max_rel"])
    if worst["max_rel"] > bound:
        where = "prefill" if worst["step"] == 0 else f"decode step {worst['step']}"
        failures.append(f"logits max error {worst['max_rel']:.3e} of the logit scale exceeds {bound:.2g} (worst at "
                        f"{where}; bound: {gate['source']})")
    if tf["top1_agreement"] < top1:
        failures.append(f"teacher-forced top-1 agreement {tf['top1_agreement']:.2%} is below {top1:.2%} "
                        f"(bound: {gate['source']})")
    return failures


def _per_layer(req, runner, model, trace, tf, ref_stream, exports) -> dict:
    bound = tolerances.PER_LAYER_REL[req.dtype]
    rows, methods, notes = [], [], []
    cand_model = per_layer.torch_model_of(runner) if isinstance(runner, TorchEagerRunner) else None
    if req.name == "torch-fast":
        notes.append("torch-fast runs its own kernels, not the model's modules: no hidden-state hooks; only the "
                     "state tensors are compared")
    if cand_model is not None:
        stream = per_layer.residual_stream(cand_model, trace.ids, trace.lengths)
        rows += per_layer.drift_rows(stream, ref_stream, "prefill", "hidden", bound)
        methods.append("torch forward hooks (residual stream at every norm input)")
    elif req.name in ONNX_BACKENDS:
        try:
            onnx_rows, note = _onnx_per_layer(req, model, trace, exports, bound)
        except Exception as exc:  # noqa: BLE001 - the state comparison below still stands
            onnx_rows, note = [], f"ONNX intermediate tensors not compared: {type(exc).__name__}: {exc}"
        rows += onnx_rows
        if onnx_rows:
            methods.append("polygraphy: every intermediate tensor of prefill.onnx against an fp32 export of MODEL "
                           "run by ONNX Runtime CPU")
        if note:
            notes.append(note)
    for phase in ("prefill", "final"):
        rows += per_layer.drift_rows(tf["states"].get(phase, {}), trace.states.get(phase, {}), phase, "state", bound)
    methods.append("state tensors after prefill and after the last decode step")
    return per_layer.summarise(rows, model.config, req.dtype, methods, notes)


def _onnx_per_layer(req, model, trace, exports, bound) -> tuple[list, str | None]:
    from . import onnx_layers

    cand_dir = exports.get(req)
    ops = exports.manifest(cand_dir).ops
    ref_dir = exports.reference_export(ops)
    cand_path, ref_path = cand_dir / "prefill.onnx", ref_dir / "prefill.onnx"
    if onnx_layers.uses_custom_domain(cand_path):
        return [], ("per-layer ONNX comparison runs graphs in standard ops only; this export uses custom ops "
                    f"({ops}): only the state tensors are compared")
    provider = "cuda" if req.name == "ort-cuda" else "cpu"
    if cand_dir == ref_dir and provider == "cpu":
        return [], ("the export under test is the fp32 reference export run on the same provider: intermediate "
                    "tensors are identical by construction; only the state tensors are compared")
    feed = {"input_ids": trace.ids.numpy(), "lengths": trace.lengths.numpy()}
    return onnx_layers.compare_graphs(ref_path, cand_path, feed, model.config.n_layers, bound,
                                      onnx_layers.ort_session_factory(provider), onnx_layers.ort_session_factory("cpu"))


def _entry(req: BackendRequest, status: str) -> dict:
    return {"backend": req.name, "label": req.label, "dtype": dtype_name(req.dtype), "status": status,
            "reason": None, "describe": None,
            "tolerance": {"logits_max_rel": tolerances.LOGITS_REL[req.dtype],
                          "top1_agreement": tolerances.TOP1_AGREEMENT[req.dtype], "source": "fixed",
                          "fixed_logits_max_rel": tolerances.LOGITS_REL[req.dtype],
                          "fixed_top1_agreement": tolerances.TOP1_AGREEMENT[req.dtype]},
            "logits": None, "teacher_forced": None, "greedy": None, "latency": None, "memory": None,
            "roofline": None, "per_layer": None, "failures": []}


def _skipped(req: BackendRequest, why: str) -> dict:
    entry = _entry(req, "skipped")
    entry["reason"] = why
    return entry


def _jsonable(d: dict) -> dict:
    return {str(k): (v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else str(v)) for k, v in d.items()}


def _document(opts, model, device, trace, prompts, results, explicit, requests, exports, baselines) -> dict:
    config = model.config
    total, active = model.parameter_counts()
    ran = [r for r in results if r["status"] != "skipped"]
    counts = {s: sum(r["status"] == s for r in results) for s in ("passed", "failed", "error", "skipped")}
    return {
        "schema": SCHEMA_ID,
        "passed": bool(ran) and all(r["status"] == "passed" for r in ran),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mambadeploy_version": __version__,
        "model": {"target": str(opts.model), "name": config.name, "family": config.family,
                  "n_layers": config.n_layers, "d_model": config.d_model, "vocab_size": config.vocab_size,
                  "layer_pattern": config.layer_pattern(), "parameters": total, "active_parameters": active},
        "machine": {"device": device, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                    "cpu": platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()},
        "settings": {"backends": [r.label for r in requests], "backends_chosen_by": "user" if explicit else "default",
                     "dtype": opts.dtype, "prompts": opts.prompts_file or "random", "num_prompts": len(prompts),
                     "prompt_lengths": [len(p) for p in prompts], "new_tokens": opts.new_tokens, "seed": opts.seed,
                     "per_layer": opts.per_layer, "prefill_repeats": opts.prefill_repeats,
                     "max_context": config.max_seq_len if config.has_attention else None,
                     "export_dir": opts.export_dir, "exports": exports.describe()},
        "reference": {"backend": "torch", "dtype": "fp32", "device": device, "tokens": trace.tokens.tolist()},
        "precision_baselines": baselines.figures,
        "backends": results,
        "summary": counts,
    }
