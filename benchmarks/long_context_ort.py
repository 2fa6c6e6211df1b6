"""The ORT-CUDA half of long_context.py (issue 21): the exported graphs of the Jamba-1.5-Mini shape — `--ops custom
--prefill-state`: our kernels, DecodeAttention in decode, GroupQueryAttention (flash) in the chunked prefill, both
writing the KV cache in place — against torch-fast on the same weights in the same run.

Disk: the 32 layers' bf16 weights are 96 GB; the device machine's disk is 64 GB. With --shared-period 8 the model has
the real shape's 32 layers in their order, and layer i holds the tensors of layer i % 8 (Jamba's period: the same
mixer and FFN kinds): 26 GB of distinct weights, one export file, while every layer still reads its own bytes each
step (26 GB is 500x the L2 cache) and the prompt costs the FLOPs of 32 layers. torch-fast runs this same model, so the
two runtimes are compared on identical work; torch-fast on 32 distinct layers is `long_context_decode_h200.json`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from mambadeploy.models.checkpoint import set_max_context
from mambadeploy.models.model import MambaMoELM
from mambadeploy.models.presets import preset_config

GIB = 2 ** 30


def shared_layer_model(preset: str, period: int, dtype, device, init) -> MambaMoELM:
    """The preset's model whose layer i is layer i % period of a `period`-layer model drawn by init(preset config cut
    to `period` layers, dtype, device)."""
    config = preset_config(preset)
    kinds = config.layers
    if any(kinds[i] != kinds[i % period] for i in range(len(kinds))):
        raise SystemExit(f"{preset}'s layers do not repeat with period {period}")
    head = init(dataclasses.replace(config, layers=kinds[:period]), dtype, device)
    with torch.device("meta"):
        model = MambaMoELM(config)
    for name, child in head.named_children():
        if name != "layers":
            setattr(model, name, child)
    for i in range(len(kinds)):
        model.layers[i] = head.layers[i % period]
    assert not any(p.is_meta for p in model.parameters()), "a parameter was left unshared"
    model.source = {"kind": "random", "preset": preset, "shared_period": period}
    return model.eval()


def export_once(model, directory: Path, max_context: int, say=print) -> Path:
    """`mambadeploy export --ops custom --prefill-state --max-context N` of the model (on the CPU), unless done."""
    from mambadeploy.export.exporter import export_model

    if (directory / "manifest.json").is_file():
        return directory
    device = next(model.parameters()).device
    set_max_context(model, max_context)
    t0 = time.perf_counter()
    export_model(model.cpu(), directory, ops="custom", prefill_state=True, force=True, progress=say)
    model.to(device)
    say(f"exported {directory} in {time.perf_counter() - t0:.0f} s")
    return directory


def device_used_gib() -> float:
    free, total = torch.cuda.mem_get_info()
    return (total - free) / GIB


def part_ort(directory: Path, provider: str, vocab: int, lens, chunk: int, held_list, steps: int, reference,
             out) -> None:
    """ORT: its logits against torch-fast's on the same prompt (a chunk and more) (`reference`: (ids, logits) computed before
    the torch model left the GPU), then decode ms/token with `held_list` tokens held in the export's cache, then
    prefill of `lens` tokens in `chunk`-token chunks (seconds; device memory in use after it, ORT's arena included)."""
    from mambadeploy.runtime.ort_runner import OrtRunner
    from mambadeploy.validate.tolerances import rel_to_scale

    t0 = time.perf_counter()
    runner = OrtRunner(directory, provider, prefill_chunk=chunk)
    runner.session("prefill_state")
    row = {"sessions_s": time.perf_counter() - t0, "provider": provider, "chunk": chunk,
           "aliased_decode_states": sorted(runner.aliased_states)}
    if provider == "cuda":
        row["device_gib_after_sessions"] = device_used_gib()
    if reference is not None:
        ids, ref_logits = reference
        logits, _ = runner.prefill(ids)
        row["check_rel_to_scale"] = rel_to_scale(logits.float(), ref_logits.float())[0]
        row["check_greedy_equal"] = bool(torch.equal(logits.argmax(-1), ref_logits.argmax(-1)))
    print(f"ort: {row}", flush=True)
    out.put("ort", {"setup": row, "prefill": [], "decode": []})
    for held in held_list:
        held = min(held, runner.max_length - 9 - steps)
        r = {"held": held, "cache": runner.max_length, "ms_per_token": _time_steps(runner, vocab, held, steps)}
        print(f"ort decode: {r}", flush=True)
        out.data["ort"]["decode"].append(r)
        dec = {r["held"]: r["ms_per_token"] for r in out.data["ort"]["decode"]}
        out.data["ort"]["decode_longest_over_shortest"] = dec[max(dec)] / dec[min(dec)]
        out.save()
    ids = torch.randint(0, vocab, (1, max(lens)), generator=torch.Generator().manual_seed(2))
    runner.prefill(ids[:, :chunk + 1])  # warm-up: two chunks (a prompt of one chunk would take the prefill graph)
    for n in lens:
        if runner.max_length is not None and n > runner.max_length:
            continue
        runner.synchronize()
        t0 = time.perf_counter()
        logits, state = runner.prefill(ids[:, :n])
        runner.synchronize()
        r = {"tokens": n, "seconds": time.perf_counter() - t0, "finite": bool(torch.isfinite(logits).all())}
        if provider == "cuda":
            r["device_gib_after"] = device_used_gib()
        print(f"ort prefill: {r}", flush=True)
        out.data["ort"]["prefill"].append(r)
        out.save()
        del state


def _time_steps(runner, vocab: int, held: int, steps: int) -> float:
    """ms per decode step from a state holding `held` tokens: a 16-token prefill, then the fill counter moved to
    `held` with random KV before it (a step's cost does not depend on their values)."""
    n = min(16, held)
    _, state = runner.prefill(torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(3)))
    tensors = runner.state_to_torch(state)
    if not isinstance(state.values["pos"], torch.Tensor):  # OrtValues (no CUDA graph): the step takes torch tensors
        tensors = state.values = {k: v.clone() for k, v in tensors.items()}
    for name, t in tensors.items():  # in place: in CUDA-graph mode these are the runner's own buffers
        if name.endswith((".key", ".value")):
            t[:, :, n:held].copy_(torch.randn(t[:, :, n:held].shape).to(t.device, t.dtype))
    tensors["pos"].fill_(held)
    state.tokens = held
    token = np.zeros(1, dtype=np.int64)
    for _ in range(8):  # CUDA-graph capture + warm-up
        _, state = runner.step(token, state)
    runner.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        _, state = runner.step(token, state)
    runner.synchronize()
    return (time.perf_counter() - t0) / steps * 1e3
