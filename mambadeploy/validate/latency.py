"""Latency figures and the memory-bandwidth roofline.

Decode at small batch is bound by memory bandwidth: every step must read the active weights once (and the recurrent
state, read and written). The roofline floor of a step is those bytes / the GPU's HBM peak; roofline % is that floor /
the measured p50 step time. The bytes counted are what the model *needs* per step (only the chosen experts), so a
backend that reads more than it needs (a dense MoE) shows a low %.
"""

from __future__ import annotations

import torch

from ..models.config import ModelConfig
from ..models.state import state_bytes_per_sequence
from .metrics import percentile

# The vendors' data sheets, matched by substring of torch.cuda.get_device_name() (first match wins, so the more
# specific names come first): (key, label, peak HBM bytes/s, dense bf16 FLOP/s). The one table every roofline and
# benchmark reads; a benchmark reports the ceilings it measures in the same run beside these.
DATASHEET = [
    ("H200", "NVIDIA H200", 4.8e12, 989e12),
    ("H100 PCIe", "NVIDIA H100 PCIe", 2.0e12, 756e12),
    ("H100", "NVIDIA H100 SXM (HBM3)", 3.35e12, 989e12),
    ("A100-SXM4-80GB", "NVIDIA A100 80GB SXM", 2.039e12, 312e12),
    ("A100", "NVIDIA A100 40GB", 1.555e12, 312e12),
]


def datasheet(device_name: str | None) -> dict | None:
    """{"label", "hbm_bytes_per_s", "bf16_flops"} for a GPU name, or None (CPU, or a GPU not in the table)."""
    for key, label, hbm, flops in DATASHEET if device_name else ():
        if key in device_name:
            return {"label": label, "hbm_bytes_per_s": hbm, "bf16_flops": flops}
    return None


def hbm_peak(device_name: str | None) -> tuple[str, float] | None:
    """(table entry, bytes/s) for a GPU name, or None (CPU, or a GPU not in the table)."""
    sheet = datasheet(device_name)
    return None if sheet is None else (sheet["label"], sheet["hbm_bytes_per_s"])


def decode_bytes_per_step(model, config: ModelConfig, dtype: torch.dtype, batch: int) -> int:
    """Bytes one decode step must move: every non-expert weight once (the LM head's V x d matrix included; of the
    embedding only `batch` rows), the experts the batch can route to (at most min(E, batch * top_k) per MoE layer),
    and the recurrent state / KV cache read and written."""
    elt = torch.empty((), dtype=dtype).element_size()
    n = 0
    for name, p in model.named_parameters():
        if name == "embedding.weight":
            rows = p.shape[0] if config.tie_embeddings else min(batch, p.shape[0])
            n += rows * p.shape[1]
        elif name.endswith((".w1", ".w2")) and p.dim() == 3:  # stacked experts (E, ., .)
            used = min(p.shape[0], batch * config.moe.top_k)
            n += used * p[0].numel()
        else:
            n += p.numel()
    return n * elt + 2 * batch * state_bytes_per_sequence(config, dtype)


def roofline(bytes_per_step: int, step_ms: float | None, device_name: str | None) -> dict:
    entry = hbm_peak(device_name)
    if entry is None or step_ms is None:
        why = "n/a on CPU" if not device_name else f"GPU {device_name!r} is not in the HBM table (validate/latency.py)"
        return {"bytes_per_step": bytes_per_step, "hbm_peak_bytes_per_s": None, "gpu": None, "floor_ms": None,
                "percent": None, "note": why}
    label, peak = entry
    floor_ms = bytes_per_step / peak * 1e3
    return {"bytes_per_step": bytes_per_step, "hbm_peak_bytes_per_s": peak, "gpu": label, "floor_ms": floor_ms,
            "percent": 100.0 * floor_ms / step_ms, "note": "bytes needed per decode step / HBM peak, over p50 step time"}


def latency_summary(prefill_s: list[float], step_s: list[float], batch: int) -> dict:
    steps_ms = [s * 1e3 for s in step_s]
    p50 = percentile(steps_ms, 50)
    mean = sum(steps_ms) / len(steps_ms) if steps_ms else None
    return {
        "prefill_ms": percentile([s * 1e3 for s in prefill_s], 50),
        "prefill_runs": len(prefill_s),
        "decode_ms_p50": p50,
        "decode_ms_p99": percentile(steps_ms, 99),
        "decode_ms_mean": mean,
        "decode_steps": len(steps_ms),
        "tokens_per_s": batch * 1e3 / mean if mean else None,
        "step_ms": steps_ms,
    }


class DeviceMemory:
    """Peak device memory of one backend's run: torch's own peak allocation (exact) plus whatever other libraries
    (ONNX Runtime's CUDA arena, TensorRT) took outside torch, seen as the rise of device-wide used memory
    (cudaMemGetInfo, sampled) beyond the rise of torch's reserved pool. On a machine running one job at a time that
    rise is the backend's."""

    def __init__(self, device: str | None):
        self.cuda = bool(device) and str(device).startswith("cuda") and torch.cuda.is_available()

    def _used(self) -> int:
        free, total = torch.cuda.mem_get_info()
        return total - free

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base_alloc = torch.cuda.memory_allocated()
            self.base_reserved = torch.cuda.memory_reserved()
            self.base_used = self.used_peak = self._used()

    def sample(self) -> None:
        if self.cuda:
            self.used_peak = max(self.used_peak, self._used())

    def result(self) -> dict:
        if not self.cuda:
            return {"peak_mb": None, "method": "n/a on CPU"}
        self.sample()
        torch_peak = torch.cuda.max_memory_allocated() - self.base_alloc
        outside = (self.used_peak - self.base_used) - (torch.cuda.max_memory_reserved() - self.base_reserved)
        return {"peak_mb": (torch_peak + max(outside, 0)) / 2**20,
                "method": "torch peak allocation + device-wide used-memory rise outside torch (cudaMemGetInfo)"}
