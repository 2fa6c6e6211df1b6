"""The Triton Python-backend model (decoupled): each request streams its tokens as they are generated; every request
joins one InflightBatcher that runs the decode batch of all live sequences.

Runs inside Triton's Python stub (imports triton_python_backend_utils, which only exists there). A request:
  input_ids INT64 [-1] or text_input STRING [1] (with the repository's tokenizer); max_tokens INT32 (16 when absent);
  temperature FP32, top_k INT32, top_p FP32, seed INT64 (greedy when absent); stop_ids INT64 [-1]; stream BOOL
  (false: a single response with every token, as Triton's /generate endpoint needs; /generate_stream and gRPC
  streaming take a response per token, or per few tokens under load: see _send_loop).
Each response: output_ids INT64 [k], index INT32 [k], latency_ms FP32 [k] (index 0: time to first token from arrival;
after: the gap since the previous token), text_output STRING [1] with a tokenizer (the k tokens' text). The last
response carries the FINAL flag. Numbers cross the stub boundary through DLPack (works under numpy 1 and 2); strings need numpy < 2 there
(the stub dies on a string tensor under numpy 2), so the text fields exist only in repositories written with a
tokenizer, which serve-repo refuses under numpy 2. A bad request gets one error response (with FINAL) and never reaches the batcher. Time to first token and
inter-token latency also go to Triton's metrics endpoint as histograms (custom metrics of the Python backend):
mambadeploy_time_to_first_token_seconds, mambadeploy_inter_token_latency_seconds (each sequence's mean gap: every
metric update is a round trip to the server, so never one per token); plus the gauge
mambadeploy_live_sequences and the counter mambadeploy_generated_tokens_total.
"""

from __future__ import annotations

import collections
import json
import queue
import threading
import time
from pathlib import Path

import numpy as np
from torch.utils.dlpack import from_dlpack

from ..errors import MambaDeployError
from ..runtime.sampling import SamplingConfig
from .batcher import InflightBatcher, Request
from .repo import OUTPUTS, TOKENIZER_FILE

DEFAULT_MAX_TOKENS = 16
GIL_SWITCH_S = 2e-4
# the watcher asks one open stream at a time whether its client went away (each ask is a round trip to the server)
CANCEL_CYCLE_S = 0.2  # every open stream asked about this often (one stream: 5 asks a second) ...
CANCEL_MIN_GAP_S = 0.01  # ... but at most one ask per 10 ms (64 streams: each every 0.64 s; at 5 ms the watcher was
# 9-13 % busy at 32-64 streams on the CPU machine)
METRICS_EVERY_S = 0.2  # a metric update is a round trip too
# the profile counters (mambadeploy_profile_total{part=...}): BatcherStats fields, the sender's and the watcher's
PROFILE_KEYS = ("steps", "sync_steps", "step_rows", "wasted_rows", "prefills", "admitted", "busy_s", "step_s", "wait_s",
                "prefill_s", "emit_s", "admit_wait_s", "responses", "tokens", "send_s", "send_cpu_s", "watch_s",
                "cancel_asks")
# seconds; TTFT on a GPU is ms-scale, on the CPU tests 10-100 ms
LATENCY_BUCKETS = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0]


class _Stream:
    """One request's way out: tokens wait in `pending` (appended by the batcher thread, drained by the sender thread;
    deque appends and pops are atomic) while the stream sits in the sender's queue (`queued`)."""
    __slots__ = ("cancelled", "last_ready", "pending", "queued", "sender", "streaming", "wanted")

    def __init__(self, sender, streaming: bool, wanted: set):
        self.sender, self.streaming, self.wanted = sender, streaming, wanted
        self.pending: collections.deque = collections.deque()
        self.queued = False
        self.last_ready = 0.0  # when emit last queued it (the response interval)
        self.cancelled = False  # set by the watcher thread, read by the batcher between steps


def _pb():
    import triton_python_backend_utils as pb_utils  # provided by the Python stub

    return pb_utils


class MambaServeModel:
    def __init__(self, args: dict):
        import sys

        import torch

        from ..runtime.factory import make_runner

        # Three threads share the GIL here (batcher, response sender, watcher): at Python's default 5 ms switch
        # interval the batcher could wait that long for the GIL between decode steps
        sys.setswitchinterval(GIL_SWITCH_S)
        pb = _pb()
        config = json.loads(args["model_config"])
        if not pb.using_decoupled_model_transaction_policy(config):
            raise MambaDeployError(f"model {config['name']}: needs model_transaction_policy {{ decoupled: true }}")
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        if params.get("threads"):
            torch.set_num_threads(int(params["threads"]))
        self.name = config["name"]
        self.response_interval_s = float(params.get("response_interval_ms") or 0) / 1e3
        options = {"cuda_graph": False} if params["backend"].startswith("ort") else {}  # slots.py feeds ORT by copy
        self.runner = make_runner(params["target"], backend=params["backend"], dtype=params["dtype"],
                                  device=params["device"], **options)
        self.tokenizer = None
        if params.get("tokenizer"):
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(Path(args["model_repository"]) / TOKENIZER_FILE))
        # the sender's and the watcher's share of the profile counters
        self.sent = {"responses": 0, "tokens": 0, "send_s": 0.0, "send_cpu_s": 0.0, "watch_s": 0.0, "cancel_asks": 0}
        self._metrics(pb)
        self._outbox: queue.Queue = queue.Queue()
        # id(sender) -> _Stream whose last response is not sent yet. The watcher asks only these, under the lock that
        # the last response is sent under: asking Triton about a completed request crashes the server (SIGSEGV in
        # TRITONBACKEND_ResponseFactoryIsCancelled, seen here)
        self._open: dict = {}
        self._open_lock = threading.Lock()
        self._finished: collections.deque = collections.deque()  # (ttft_s, itl_s) for the histograms
        self._stopping = threading.Event()
        self._sender = threading.Thread(target=self._send_loop, name="mambadeploy-sender", daemon=True)
        self._sender.start()
        self.batcher = InflightBatcher(self.runner, max_batch=int(params["max_batch"]),
                                       on_finish=self._observe).start()
        self._watcher = threading.Thread(target=self._watch_loop, name="mambadeploy-watcher", daemon=True)
        self._watcher.start()

    # ------------------------------------------------------------------ metrics
    def _metrics(self, pb) -> None:
        """Histograms where this Triton's Python backend has them (24.08 on); None otherwise (responses still carry
        latency_ms)."""
        labels = {"model": self.name}
        self.ttft = self.itl = self.live_gauge = self.tokens = self.cancelled = None
        self.profile = {}
        self._cancelled_seen = 0
        self._live_seen = -1
        self._profile_seen: dict = {}
        try:
            family = pb.MetricFamily
            # the families must outlive their metrics: Triton refuses a metric whose family was collected
            self._families = [family(name, text, kind) for name, text, kind in (
                ("mambadeploy_time_to_first_token_seconds", "Time from a request's arrival to its first token",
                 family.HISTOGRAM),
                ("mambadeploy_inter_token_latency_seconds", "Mean gap between consecutive tokens, per sequence",
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
            self._profile_family = family("mambadeploy_profile_total", "Where the model's time goes (seconds) and "
                                          "its work counts; profile.py in serve/ reads them", family.COUNTER)
            self.profile = {key: self._profile_family.Metric(labels={**labels, "part": key}) for key in PROFILE_KEYS}
        except (AttributeError, TypeError, pb.TritonModelException) as exc:
            pb.Logger.log_warn(f"mambadeploy: custom metrics unavailable ({exc}); latency_ms is in each response")

    def _observe(self, ttft_s, itl_s) -> None:
        """on_finish, on the decode loop: only queued here (an observe is a round trip to the server; a finished
        sequence of n tokens has n of them), pushed by the watcher."""
        if ttft_s is not None and self.ttft is not None:  # without custom metrics nothing would drain them
            self._finished.append((ttft_s, itl_s))

    def _watch_loop(self) -> None:
        """Every round trip to the server but the responses, off the decode loop: it asks one open stream at a time
        (round robin) whether its client went away, each stream about every CANCEL_CYCLE_S and never more than one
        ask per CANCEL_MIN_GAP_S, and every METRICS_EVERY_S pushes the metrics. Its time is the profile's watch_s."""
        cursor, last_push, gap = 0, 0.0, CANCEL_CYCLE_S
        while not self._stopping.wait(gap):
            started = time.perf_counter()
            with self._open_lock:
                streams = list(self._open.values())
                if streams:
                    cursor = (cursor + 1) % len(streams)
                    stream = streams[cursor]
                    try:
                        gone = bool(stream.sender.is_cancelled())
                    except Exception:  # noqa: BLE001 - asking a closed stream counts as cancelled
                        gone = True
                    stream.cancelled = stream.cancelled or gone
                    self.sent["cancel_asks"] += 1
            gap = max(CANCEL_MIN_GAP_S, CANCEL_CYCLE_S / max(len(streams), 1))
            if started - last_push >= METRICS_EVERY_S:
                last_push = started
                try:
                    self._push_metrics()
                except Exception as exc:  # noqa: BLE001 - metrics never stop the watcher
                    _pb().Logger.log_verbose(f"mambadeploy: metrics not pushed ({exc})")
            self.sent["watch_s"] += time.perf_counter() - started

    def _push_metrics(self) -> None:
        """Each metric update is a round trip to the server, like a response: per finished sequence its time to first
        token and its MEAN inter-token gap are observed (one each, not one per token), counters only when changed."""
        if self.live_gauge is None:
            return
        stats = self.batcher.stats
        tokens = 0
        while self._finished:
            ttft_s, itl_s = self._finished.popleft()
            self.ttft.observe(ttft_s)
            if itl_s:
                self.itl.observe(sum(itl_s) / len(itl_s))
            tokens += 1 + len(itl_s)
        if tokens:
            self.tokens.increment(tokens)
        live = len(self.batcher.live)
        if live != self._live_seen:
            self.live_gauge.set(live)
            self._live_seen = live
        if stats.cancelled > self._cancelled_seen:
            self.cancelled.increment(stats.cancelled - self._cancelled_seen)
            self._cancelled_seen = stats.cancelled
        now = {**{k: getattr(stats, k) for k in PROFILE_KEYS if hasattr(stats, k)}, **self.sent}
        for key, metric in self.profile.items():
            delta = now[key] - self._profile_seen.get(key, 0)
            if delta > 0:
                metric.increment(delta)
                self._profile_seen[key] = now[key]

    # ------------------------------------------------------------------ requests
    def execute(self, requests):
        pb = _pb()
        for request in requests:
            sender = request.get_response_sender()
            key = id(sender)
            try:
                parsed = self._parse(pb, request, sender)
                with self._open_lock:  # before submit: its last response may leave before submit returns
                    self._open[key] = parsed.stream
                self.batcher.submit(parsed)
            except (MambaDeployError, ValueError, TypeError) as exc:  # this request alone fails
                with self._open_lock:
                    self._open.pop(key, None)
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
        stream, emit, fail = self._responder(sender, streaming is None or bool(streaming.reshape(-1)[0]),
                                     request.requested_output_names())
        parsed = Request(prompt, scalar("max_tokens", DEFAULT_MAX_TOKENS, int), emit, fail, sampling, stop_ids,
                         cancelled=lambda: stream.cancelled)
        parsed.stream = stream
        return parsed

    def _responder(self, sender, streaming: bool, requested=()):
        """emit(token, index, latency_s, final) and fail(message) of one request. They only append to the stream's
        pending list and queue the stream once for the sender thread (a few microseconds on the decode loop). With
        a response interval, a streaming request is queued at most once per interval (and at its last token): its
        tokens gather in between, whatever the sender's speed."""
        stream = _Stream(sender, streaming, set(requested) if requested else set(OUTPUTS))
        ready = self._outbox.put
        interval = self.response_interval_s
        clock = time.perf_counter

        def emit(token, index, latency_s, final):
            stream.pending.append((token, index, latency_s * 1e3, final))
            if stream.queued or not (streaming or final):
                return
            if interval and not final:
                now = clock()
                if now - stream.last_ready < interval:
                    return
                stream.last_ready = now
            stream.queued = True
            ready(stream)

        def fail(message):
            stream.pending.append((None, message, 0.0, True))
            if not stream.queued:
                stream.queued = True
                ready(stream)

        return stream, emit, fail

    def _send_loop(self) -> None:
        """Sends each queued stream's pending tokens as ONE response (output_ids [k], index [k], latency_ms [k]):
        when the sender keeps up (one stream, or a step slower than a response) that is one token per response, the
        lowest latency; when it falls behind (many streams: each response costs the stub an IPC round trip to the
        server) a stream's tokens gather while it waits its turn and leave together, so the response rate, not the
        token rate, is what the sender pays for and the decode loop never waits for it. Per-stream order holds: a
        stream is in the queue at most once and its tokens leave in the order they were emitted."""
        pb = _pb()
        final_flag = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        while True:
            stream = self._outbox.get()
            if stream is None:
                return
            stream.queued = False  # before draining: a token emitted from here on queues the stream again
            items = []
            while stream.pending:
                items.append(stream.pending.popleft())
            if not items:
                continue
            started, cpu = time.perf_counter(), time.thread_time()
            tokens = [it for it in items if it[0] is not None]
            error = next((it[1] for it in items if it[0] is None), None)
            closing = error is not None or tokens[-1][3]
            if closing:
                self._open_lock.acquire()  # the watcher never asks a stream once its last response is sent
            try:
                if tokens and (error is None or stream.streaming):  # non-streaming: an error replaces the tokens
                    # send() releases the GIL while it waits for the server (python_backend's response_sender.cc):
                    # only building the response holds it, and the batcher then waits on its device event anyway
                    stream.sender.send(self._response(pb, stream, tokens),
                                       flags=final_flag if error is None and closing else 0)
                    self.sent["responses"] += 1
                    self.sent["tokens"] += len(tokens)
                if error is not None:
                    stream.sender.send(pb.InferenceResponse(error=pb.TritonError(error)), flags=final_flag)
            except Exception as exc:  # noqa: BLE001 - the client is gone (the batcher sees it cancelled)
                pb.Logger.log_verbose(f"mambadeploy: a response was not delivered ({exc})")
            finally:
                if closing:
                    self._open.pop(id(stream.sender), None)
                    self._open_lock.release()
            self.sent["send_s"] += time.perf_counter() - started
            self.sent["send_cpu_s"] += time.thread_time() - cpu

    def _response(self, pb, stream, tokens):
        """One response of `tokens` [(id, index, latency_ms, final)], with only the outputs the client asked for."""
        import torch

        outputs = [pb.Tensor.from_dlpack(name, torch.tensor([t[column] for t in tokens], dtype=dtype))
                   for name, column, dtype in (("output_ids", 0, torch.int64), ("index", 1, torch.int32),
                                               ("latency_ms", 2, torch.float32)) if name in stream.wanted]
        if self.tokenizer is not None and "text_output" in stream.wanted:
            text = self.tokenizer.decode([t[0] for t in tokens])
            outputs.append(pb.Tensor("text_output", np.array([text.encode()], dtype=object)))
        return pb.InferenceResponse(output_tensors=outputs)

    def finalize(self) -> None:
        self._stopping.set()
        self.batcher.stop()  # fails what is still live: those errors go through the outbox first
        self._outbox.put(None)
        self._sender.join(5)
        self._watcher.join(1)
