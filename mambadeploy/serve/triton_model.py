"""The Triton Python-backend model (decoupled): each request streams one response per generated token; every request
joins one InflightBatcher that runs the decode batch of all live sequences.

Runs inside Triton's Python stub (imports triton_python_backend_utils, which only exists there). A request:
  input_ids INT64 [-1] or text_input STRING [1] (with the repository's tokenizer); max_tokens INT32 (16 when absent);
  temperature FP32, top_k INT32, top_p FP32, seed INT64 (greedy when absent); stop_ids INT64 [-1]; stream BOOL
  (false: a single response with every token, as Triton's /generate endpoint needs; /generate_stream and gRPC
  streaming take one response per token).
Each response: output_ids INT64 [1], index INT32 [1], latency_ms FP32 [1] (index 0: time to first token from arrival;
after: the gap since the previous token), text_output STRING [1] with a tokenizer. The last response carries the
FINAL flag. Numbers cross the stub boundary through DLPack (works under numpy 1 and 2); strings need numpy < 2 there
(the stub dies on a string tensor under numpy 2), so the text fields exist only in repositories written with a
tokenizer, which serve-repo refuses under numpy 2. A bad request gets one error response (with FINAL) and never reaches the batcher. Time to first token and
inter-token latency also go to Triton's metrics endpoint as histograms (custom metrics of the Python backend):
mambadeploy_time_to_first_token_seconds, mambadeploy_inter_token_latency_seconds; plus the gauge
mambadeploy_live_sequences and the counter mambadeploy_generated_tokens_total.
"""

from __future__ import annotations

import json
import queue
import threading
from pathlib import Path

import numpy as np
from torch.utils.dlpack import from_dlpack

from ..errors import MambaDeployError
from ..runtime.sampling import SamplingConfig
from .batcher import InflightBatcher, Request
from .repo import OUTPUTS, TOKENIZER_FILE

DEFAULT_MAX_TOKENS = 16
GIL_SWITCH_S = 2e-4
# seconds; TTFT on a GPU is ms-scale, on the CPU tests 10-100 ms
LATENCY_BUCKETS = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0]


def _pb():
    import triton_python_backend_utils as pb_utils  # provided by the Python stub

    return pb_utils


class MambaServeModel:
    def __init__(self, args: dict):
        import sys

        import torch

        from ..runtime.factory import make_runner

        # Two threads share the GIL here (batcher, response sender): at Python's default 5 ms switch interval the
        # batcher could wait that long for the GIL between decode steps
        sys.setswitchinterval(GIL_SWITCH_S)
        pb = _pb()
        config = json.loads(args["model_config"])
        if not pb.using_decoupled_model_transaction_policy(config):
            raise MambaDeployError(f"model {config['name']}: needs model_transaction_policy {{ decoupled: true }}")
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        if params.get("threads"):
            torch.set_num_threads(int(params["threads"]))
        self.name = config["name"]
        options = {"cuda_graph": False} if params["backend"].startswith("ort") else {}  # slots.py feeds ORT by copy
        self.runner = make_runner(params["target"], backend=params["backend"], dtype=params["dtype"],
                                  device=params["device"], **options)
        self.tokenizer = None
        if params.get("tokenizer"):
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(Path(args["model_repository"]) / TOKENIZER_FILE))
        self._metrics(pb)
        self._outbox: queue.Queue = queue.Queue()
        self._sender = threading.Thread(target=self._send_loop, name="mambadeploy-sender", daemon=True)
        self._sender.start()
        self.batcher = InflightBatcher(self.runner, max_batch=int(params["max_batch"]),
                                       on_finish=self._observe, on_poll=self._poll).start()

    # ------------------------------------------------------------------ metrics
    def _metrics(self, pb) -> None:
        """Histograms where this Triton's Python backend has them (24.08 on); None otherwise (responses still carry
        latency_ms)."""
        labels = {"model": self.name}
        self.ttft = self.itl = self.live_gauge = self.tokens = self.cancelled = None
        self._cancelled_seen = 0
        try:
            family = pb.MetricFamily
            # the families must outlive their metrics: Triton refuses a metric whose family was collected
            self._families = [family(name, text, kind) for name, text, kind in (
                ("mambadeploy_time_to_first_token_seconds", "Time from a request's arrival to its first token",
                 family.HISTOGRAM),
                ("mambadeploy_inter_token_latency_seconds", "Gap between consecutive tokens of one sequence",
                 family.HISTOGRAM),
                ("mambadeploy_live_sequences", "Sequences in the decode batch", family.GAUGE),
                ("mambadeploy_generated_tokens_total", "Tokens streamed", family.COUNTER),
                ("mambadeploy_cancelled_total", "Sequences whose client went away", family.COUNTER))]
            ttft, itl, live, tokens, cancelled = self._families
            self.ttft = ttft.Metric(labels=labels, buckets=LATENCY_BUCKETS)
            self.itl = itl.Metric(labels=labels, buckets=LATENCY_BUCKETS)
            self.live_gauge = live.Metric(labels=labels)
            self.tokens = tokens.Metric(labels=labels)
            self.cancelled = cancelled.Metric(labels=labels)
        except (AttributeError, TypeError, pb.TritonModelException) as exc:
            pb.Logger.log_warn(f"mambadeploy: custom metrics unavailable ({exc}); latency_ms is in each response")

    def _observe(self, ttft_s, itl_s) -> None:
        if self.ttft is not None and ttft_s is not None:
            self.ttft.observe(ttft_s)
            for gap in itl_s:
                self.itl.observe(gap)
            self.tokens.increment(1 + len(itl_s))

    def _poll(self, live: int, stats) -> None:
        if self.live_gauge is not None:
            self.live_gauge.set(live)
            if stats.cancelled > self._cancelled_seen:
                self.cancelled.increment(stats.cancelled - self._cancelled_seen)
                self._cancelled_seen = stats.cancelled

    # ------------------------------------------------------------------ requests
    def execute(self, requests):
        pb = _pb()
        for request in requests:
            sender = request.get_response_sender()
            try:
                self.batcher.submit(self._parse(pb, request, sender))
            except (MambaDeployError, ValueError, TypeError) as exc:  # this request alone fails
                sender.send(pb.InferenceResponse(error=pb.TritonError(str(exc))),
                            flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        # decoupled: responses go through the senders

    def _parse(self, pb, request, sender) -> Request:
        from ..errors import InputError

        def value(name):
            """Numeric inputs through DLPack: the wheel's stub reads numpy arrays with numpy 1.x's ABI and garbles
            them under numpy 2 (seen here: [5, 2, 3] arrived as [5, 5, 5]); DLPack does not involve numpy."""
            tensor = pb.get_input_tensor_by_name(request, name)
            return None if tensor is None else from_dlpack(tensor.to_dlpack())

        ids = value("input_ids")
        text = pb.get_input_tensor_by_name(request, "text_input")
        if ids is not None and text is not None:
            raise InputError("give input_ids or text_input, not both")
        if text is not None:
            if self.tokenizer is None:
                raise InputError("text_input needs a tokenizer: write the repository with serve-repo --tokenizer")
            raw = text.as_numpy().reshape(-1)[0]
            prompt = self.tokenizer.encode(raw.decode() if isinstance(raw, bytes) else str(raw)).ids
        elif ids is not None:
            prompt = ids.reshape(-1).tolist()
        else:
            raise InputError("no prompt: give input_ids (INT64) or text_input (STRING)")

        def scalar(name, default, kind):
            v = value(name)
            return default if v is None or v.numel() == 0 else kind(v.reshape(-1)[0].item())

        sampling = SamplingConfig(temperature=scalar("temperature", 0.0, float), top_k=scalar("top_k", 0, int),
                                  top_p=scalar("top_p", 1.0, float), seed=scalar("seed", 0, int))
        stop = value("stop_ids")
        stop_ids = tuple(stop.reshape(-1).tolist()) if stop is not None else ()
        streaming = value("stream")
        emit, fail = self._responder(pb, sender, streaming is None or bool(streaming.reshape(-1)[0]),
                                     request.requested_output_names())
        return Request(prompt, scalar("max_tokens", DEFAULT_MAX_TOKENS, int), emit, fail, sampling, stop_ids,
                       cancelled=sender.is_cancelled)

    def _responder(self, pb, sender, streaming: bool, requested=()):
        """emit(token, index, latency_s, final): one response per token, or (streaming False) one at the end."""
        import torch

        final_flag = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        tokenizer = self.tokenizer
        kept = {"ids": [], "index": [], "latency": []}

        wanted = set(requested) if requested else set(OUTPUTS)  # build only what the client asked for

        def send(ids, index, latency_ms, flags):
            outputs = [pb.Tensor.from_dlpack(name, torch.tensor(values, dtype=dtype)) for name, values, dtype in
                       (("output_ids", ids, torch.int64), ("index", index, torch.int32),
                        ("latency_ms", latency_ms, torch.float32)) if name in wanted]
            if tokenizer is not None and "text_output" in wanted:
                outputs.append(pb.Tensor("text_output", np.array([tokenizer.decode(ids).encode()], dtype=object)))
            sender.send(pb.InferenceResponse(output_tensors=outputs), flags=flags)

        def queue_send(*args):
            self._outbox.put((send, args))

        def emit(token, index, latency_s, final):
            if streaming:
                queue_send([token], [index], [latency_s * 1e3], final_flag if final else 0)
                return
            for key, v in zip(kept, (token, index, latency_s * 1e3)):
                kept[key].append(v)
            if final:
                queue_send(kept["ids"], kept["index"], kept["latency"], final_flag)

        def send_error(message):
            sender.send(pb.InferenceResponse(error=pb.TritonError(message)), flags=final_flag)

        def fail(message):
            self._outbox.put((send_error, (message,)))

        return emit, fail

    def _send_loop(self) -> None:
        """Sends responses in order (one queue: a stream's tokens never overtake each other) while the batcher
        thread runs the next decode step: the per-response cost of the stub (IPC to the server) overlaps the GPU."""
        while True:
            item = self._outbox.get()
            if item is None:
                return
            fn, args = item
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001 - the client is gone (the batcher sees it cancelled)
                _pb().Logger.log_verbose(f"mambadeploy: a response was not delivered ({exc})")

    def finalize(self) -> None:
        self.batcher.stop()  # fails what is still live: those errors go through the outbox first
        self._outbox.put(None)
        self._sender.join(5)
