"""Where the served model's time goes, read from Triton's metrics endpoint: the model counts its work and times its
parts in mambadeploy_profile_total{part=...} (triton_model.PROFILE_KEYS); two readings around a load give a breakdown.

Parts (seconds, summed): busy = the batcher's turns that had work; step = the batcher's time in decode steps (queuing
them + waiting for their tokens on the host; pipelined, the host emits step k while step k+1 runs: see
batcher.BatcherStats); wait = the part of step blocked on the device; prefill = admission prefills; emit = handing
tokens to the streams; send = the sender thread
building and sending responses (Triton's IPC to the server); watch = the watcher thread's cancellation asks and metric
updates; admit_wait = arrival to prefill, per admitted request.
"""

from __future__ import annotations

import re
import urllib.request

_LINE = re.compile(r'^mambadeploy_profile_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$')


def read_profile(metrics_url: str, model: str) -> dict:
    """{part: value} of `model`'s profile counters (empty when the server has no custom metrics)."""
    text = urllib.request.urlopen(f"{metrics_url}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if m is None:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m["labels"]))
        if labels.get("model") == model:
            out[labels["part"]] = float(m["value"])
    return out


def breakdown(before: dict, after: dict, wall_s: float) -> dict:
    """Per-step and per-response costs between two readings of read_profile taken around wall_s seconds of load."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    steps, responses = max(d.get("steps", 0), 1), max(d.get("responses", 0), 1)
    other = d.get("busy_s", 0) - d.get("step_s", 0) - d.get("prefill_s", 0) - d.get("emit_s", 0)
    return {
        "decode_steps": int(d.get("steps", 0)),
        "mean_batch": d.get("step_rows", 0) / steps,
        "step_ms": d.get("step_s", 0) / steps * 1e3,
        "wait_ms_per_step": d.get("wait_s", 0) / steps * 1e3,  # blocked on the device: near step_ms = GPU-bound
        "sync_step_frac": d.get("sync_steps", 0) / steps,  # steps run one at a time (sampled rows live)
        "wasted_rows": int(d.get("wasted_rows", 0)),  # rows stepped past a stop id / cancellation (pipelining)
        "emit_ms_per_step": d.get("emit_s", 0) / steps * 1e3,
        "bookkeeping_ms_per_step": other / steps * 1e3,
        "prefills": int(d.get("prefills", 0)),
        "prefill_ms_mean": d.get("prefill_s", 0) / max(d.get("prefills", 0), 1) * 1e3,
        "admit_wait_ms_mean": d.get("admit_wait_s", 0) / max(d.get("admitted", 0), 1) * 1e3,
        "responses": int(d.get("responses", 0)),
        "tokens_per_response": d.get("tokens", 0) / responses,
        "send_us_per_response": d.get("send_s", 0) / responses * 1e6,
        # the sender thread's own CPU time: well below the wall time above = it waits (IPC, the GIL)
        "send_cpu_us_per_response": d.get("send_cpu_s", 0) / responses * 1e6,
        # fractions of the wall time: the batcher thread's parts, and the sender thread's
        "batcher_busy_frac": d.get("busy_s", 0) / wall_s,
        "step_frac": d.get("step_s", 0) / wall_s,
        "prefill_frac": d.get("prefill_s", 0) / wall_s,
        "sender_busy_frac": d.get("send_s", 0) / wall_s,
        "watcher_busy_frac": d.get("watch_s", 0) / wall_s,  # cancellation asks + metric updates
        "cancel_asks_per_s": d.get("cancel_asks", 0) / wall_s,
    }
