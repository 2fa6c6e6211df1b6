"""Streaming clients of the served model over gRPC (tritonclient's asyncio client): many concurrent streams from one
event loop, for the tests and benchmarks/serve_bench.py."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import lazy_import


@dataclass
class StreamResult:
    tokens: list = field(default_factory=list)
    latency_ms: list = field(default_factory=list)  # as the model measured them: [TTFT, gap, gap, ...]
    client_ms: list = field(default_factory=list)  # as this client saw them: the gap before each token's response
    responses: int = 0  # responses with tokens (one carries every token the server had ready for this stream)
    error: str | None = None
    cancelled: bool = False
    sent_at: float = 0.0  # wall clock (time.time) when the request went out, and of its last token
    last_at: float = 0.0
    arrived_at: list = field(default_factory=list)  # wall clock of each token's response


def _grpc():
    return lazy_import("tritonclient.grpc", "tritonclient[grpc]", extra="serve", why="the serve clients")


def make_inputs(prompt=None, text=None, max_tokens=None, temperature=None, top_k=None, top_p=None, seed=None,
                stop_ids=None, types: dict | None = None) -> list:
    """InferInputs for the given fields (None: not sent). types overrides a field's numpy dtype (bad-request tests)."""
    grpc = _grpc()
    dtypes = {"input_ids": np.int64, "max_tokens": np.int32, "temperature": np.float32, "top_k": np.int32,
              "top_p": np.float32, "seed": np.int64, "stop_ids": np.int64, "text_input": object}
    dtypes.update(types or {})
    fields = {"input_ids": prompt, "text_input": None if text is None else [text.encode()], "max_tokens": max_tokens,
              "temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed, "stop_ids": stop_ids}
    inputs = []
    for name, value in fields.items():
        if value is None:
            continue
        array = np.array(value if isinstance(value, (list, tuple)) else [value], dtype=dtypes[name])
        from tritonclient.utils import np_to_triton_dtype

        tensor = grpc.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


async def stream(client, model: str, request_id: str, cancel_after: int | None = None, **fields) -> StreamResult:
    """One streaming request; cancel_after: close the stream after that many tokens (a client that goes away)."""
    result = StreamResult()
    inputs = make_inputs(**fields)

    async def requests():
        yield {"model_name": model, "inputs": inputs, "request_id": request_id, "enable_empty_final_response": True}

    sent = time.perf_counter()
    last = sent
    result.sent_at = result.last_at = time.time()
    responses = client.stream_infer(requests())
    try:
        async for response, error in responses:
            if error is not None:
                result.error = str(error)
                break
            message = response.get_response()
            if message.outputs:
                now = time.perf_counter()
                ids = response.as_numpy("output_ids").tolist()
                result.tokens.extend(ids)
                result.latency_ms.extend(response.as_numpy("latency_ms").tolist())
                result.client_ms.extend([(now - last) * 1e3] + [0.0] * (len(ids) - 1))  # arrived together
                result.responses += 1
                last = now
                result.last_at = time.time()
                result.arrived_at.extend([result.last_at] * len(ids))
            if message.parameters["triton_final_response"].bool_param:
                break
            if cancel_after is not None and len(result.tokens) >= cancel_after:
                responses.cancel()
                result.cancelled = True
                break
    except asyncio.CancelledError:
        result.cancelled = True
    return result


async def _many(url: str, model: str, jobs: list[dict]) -> list[StreamResult]:
    aio = lazy_import("tritonclient.grpc.aio", "tritonclient[grpc]", extra="serve", why="the serve clients")
    async with aio.InferenceServerClient(url) as client:
        return await asyncio.gather(*(stream(client, model, f"r{i}", **job) for i, job in enumerate(jobs)))


def run_streams(url: str, model: str, jobs: list[dict]) -> list[StreamResult]:
    """Run every job (keyword arguments of `stream`) as its own concurrent stream; results in job order."""
    return asyncio.run(_many(url, model, jobs))
