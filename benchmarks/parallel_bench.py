"""Tensor / expert parallel decode and prefill on several GPUs beside one GPU of the same machine (NCCL; GPU only).

    python benchmarks/parallel_bench.py --gpus 2 --out $OUT/parallel.json
    python benchmarks/parallel_bench.py --gpus 8 --shape jamba-1.5-large --layouts tp=8,ep=8 --no-single --out ...

Model: a Jamba at Jamba-1.5-Mini width with all 32 layers (or --layers N), bf16, random weights built directly sharded
on each GPU (parallel/load.build_sharded, init "local": no rank ever holds more than its slices). `--shape
jamba-1.5-large` is the 398B shape (72 layers, hidden 8192, 16 experts top-2, ffn 24576, 64 / 8 heads, dt_rank 512):
796 GB in bf16, so 8 H200s.
First a parity check (the benchmark's numbers mean nothing if the sharded model is wrong): 2 blocks (Mamba + MoE,
attention + MLP) at the same width, weights drawn exactly as the single-process model's ("exact" init), sharded run against the single-process
model on rank 0's GPU, prefill + 8 decode steps, within the bf16 logits bound of validate/tolerances.py.
Then, per layout and on 1 GPU (the same code at world 1), two kernel sets: "parallel" = the sharded reference model
(torch ops, its step captured in a CUDA graph), "torch_fast" = torch-fast's Triton step (1 GPU: TorchFastRunner;
N GPUs: parallel/fast.ParallelFastRunner, collectives inside its graph; `--no-torch-fast` to skip). Decode ms/token =
GPU time of one CUDA-graph replay of the step (collectives inside the graph), median over 20, at batch 1 / 8 / 64 after
a 16-token prompt; prefill of 2048 tokens at batch 1 ("parallel" only: eager, median of 3). The JSON holds the GPU
names and count, every timing, and each kernel set's N-GPU / 1-GPU ratios (goal of issue 20: decode at batch 1
<= 0.6x).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _bench import gpu_ms

from mambadeploy.models.config import AttentionConfig, MambaConfig, MLPConfig, ModelConfig, MoEConfig
from mambadeploy.models.presets import jamba_layers, preset_config

PROMPT = 16  # tokens before the timed decode steps
PREFILL_LEN = 2048


def jamba_large_config(n_layers: int = 72) -> ModelConfig:
    """Jamba-1.5-Large's shape (AI21's config.json, 398B)."""
    return ModelConfig(
        family="jamba", name="jamba-1.5-large", vocab_size=65536, d_model=8192, layers=jamba_layers(n_layers),
        mamba=MambaConfig(d_inner=16384, d_state=16, d_conv=4, dt_rank=512, conv_bias=True, proj_bias=False,
                          bcdt_norm=True),
        attention=AttentionConfig(n_heads=64, n_kv_heads=8, head_dim=128),
        moe=MoEConfig(n_experts=16, ffn_size=24576, top_k=2, router="softmax_topk", router_bias=False,
                      activation="silu"),
        mlp=MLPConfig(ffn_size=24576, activation="silu"), final_norm="rmsnorm", tie_embeddings=False,
        norm_eps=1e-6, max_seq_len=4096)


def model_config(shape: str, layers: int | None) -> ModelConfig:
    config = jamba_large_config() if shape == "jamba-1.5-large" else preset_config(shape)
    if layers:
        config = copy.deepcopy(config)
        config.layers = config.layers[:layers]
    return config


def time_runner(runner, vocab: int, batches, prefill: bool) -> dict:
    out = {"decode_ms": {}, "errors": {}}
    g = torch.Generator().manual_seed(0)
    for b in batches:
        try:
            ids = torch.randint(0, vocab, (b, PROMPT), generator=g)
            logits, state = runner.prefill(ids)
            logits, state = runner.step(logits.argmax(-1), state)  # captures the CUDA graph
            out["decode_ms"][b] = gpu_ms(state.graph.replay, reps=20, warmup=3)
            del state
        except Exception as exc:  # noqa: BLE001 - an out-of-memory batch is recorded, the others still run
            out["errors"][b] = f"{type(exc).__name__}: {str(exc)[:300]}"
        torch.cuda.empty_cache()
    if prefill:
        try:
            ids = torch.randint(0, vocab, (1, PREFILL_LEN), generator=g)
            out["prefill_2048_ms"] = gpu_ms(lambda: runner.prefill(ids), reps=3, warmup=1)
        except Exception as exc:  # noqa: BLE001
            out["errors"]["prefill"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return out


def parity_check(config, mesh, device) -> dict:
    """2 blocks (Mamba + MoE, attention + MLP), exact weights: sharded vs single-process (rank 0 builds the reference),
    prefill + 8 steps."""
    from mambadeploy.models.checkpoint import empty_model
    from mambadeploy.models.model import init_random_
    from mambadeploy.parallel.load import build_sharded
    from mambadeploy.parallel.runner import ParallelRunner
    from mambadeploy.validate.tolerances import LOGITS_REL, rel_to_scale

    small = copy.deepcopy(config)
    small.layers = [next(s for s in config.layers if s.mixer == "mamba" and s.ffn == "moe"),
                    next((s for s in config.layers if s.mixer == "attention"), config.layers[0])]
    model, _ = build_sharded(small, mesh, torch.bfloat16, device, init="exact")
    runner = ParallelRunner(model, mesh, cuda_graph=True)
    ids = torch.randint(0, small.vocab_size, (2, PROMPT), generator=torch.Generator().manual_seed(1))
    logits, state = runner.prefill(ids)
    got, tokens = [logits], []
    for _ in range(8):
        tokens.append(logits.argmax(-1))
        logits, state = runner.step(tokens[-1], state)
        got.append(logits)
    if mesh.rank != 0:
        return {}
    reference = init_random_(empty_model(small, torch.bfloat16, device)).eval()
    with torch.no_grad():
        ref, ref_state = reference.prefill(ids.to(device))
        worst = rel_to_scale(got[0], ref)[0]
        for t, tok in enumerate(tokens):
            ref, ref_state = reference.step(tok, ref_state)
            worst = max(worst, rel_to_scale(got[t + 1], ref)[0])
    bound = LOGITS_REL[torch.bfloat16]
    return {"blocks": 2, "steps": 8, "max_err_rel_scale": worst, "bound": bound, "ok": worst <= bound}


def rank_main(rank: int, world: int, layout_text: str, args, port: int, result_path: str):
    from mambadeploy.parallel.load import build_sharded
    from mambadeploy.parallel.mesh import init_distributed, parse_layout
    from mambadeploy.parallel.runner import ParallelRunner

    device = f"cuda:{rank}"
    torch.cuda.set_device(device)
    layout = parse_layout(layout_text, world)
    mesh = init_distributed(layout, rank, device, timeout_s=600, init_method=f"tcp://127.0.0.1:{port}")
    config = model_config(args.shape, args.layers)
    result = {"layout": layout.text(), "world": world}
    try:
        if world > 1 and not args.no_check:
            result["parity"] = parity_check(config, mesh, device)
        model, _ = build_sharded(config, mesh, torch.bfloat16, device, init="local")
        result["weights_gb_per_gpu"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
        runner = ParallelRunner(model, mesh, cuda_graph=True, sync_steps=False)
        result["parallel"] = time_runner(runner, config.vocab_size, args.batches, not args.no_prefill)
        del runner
        if not args.no_torch_fast:  # the same weights on torch-fast's Triton kernels (collectives in its graph)
            from mambadeploy.parallel.fast import ParallelFastRunner
            from mambadeploy.runtime.torch_fast import TorchFastRunner

            fast = (TorchFastRunner(model, check_inputs=False) if world == 1
                    else ParallelFastRunner(model, mesh, check_inputs=False))
            try:
                result["torch_fast"] = time_runner(fast, config.vocab_size, args.batches, prefill=False)
            except Exception:  # noqa: BLE001 - not yet run on several GPUs: record, keep the other numbers
                result["torch_fast"] = {"error": traceback.format_exc(limit=8)}
        result["peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    except Exception:  # noqa: BLE001 - the JSON says what failed
        result["error"] = traceback.format_exc(limit=8)
    if rank == 0:
        Path(result_path).write_text(json.dumps(result, default=str))


def run_world(world: int, layout: str, args) -> dict:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = f"/tmp/parallel_bench_{os.getpid()}_{world}.json"
    start = time.perf_counter()
    print(f"=== world {world} layout {layout}", flush=True)
    mp.spawn(rank_main, args=(world, layout, args, port, path), nprocs=world, join=True)
    result = json.loads(Path(path).read_text())
    result["wall_s"] = time.perf_counter() - start
    print(json.dumps(result, indent=1, default=str)[:3000], flush=True)
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=2, help="GPUs of the parallel runs (2)")
    p.add_argument("--layouts", nargs="+", default=None,
                   help="layouts for --gpus N (default: tp=N,ep=1 (experts split by width) and tp=N,ep=N)")
    p.add_argument("--shape", default="jamba-1.5-mini", help="jamba-1.5-mini (default), jamba-1.5-large, or a preset")
    p.add_argument("--layers", type=int, default=None, help="keep the first N layers (default: all)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--no-single", action="store_true", help="skip the 1-GPU baseline (a shape that needs > 1 GPU)")
    p.add_argument("--no-torch-fast", action="store_true", help="skip the torch-fast (Triton) decode timings")
    p.add_argument("--no-prefill", action="store_true")
    p.add_argument("--no-check", action="store_true", help="skip the 2-block parity check")
    p.add_argument("--out", default=None, help="JSON path (default $OUT/parallel_bench.json)")
    args = p.parse_args()
    if torch.cuda.device_count() < args.gpus:
        sys.exit(f"needs {args.gpus} GPUs, {torch.cuda.device_count()} visible")
    n = args.gpus
    layouts = args.layouts or [f"tp={n},ep=1", f"tp={n},ep={n}"]
    doc = {"gpu_names": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
           "gpu_count": torch.cuda.device_count(), "gpus_used": n, "torch": torch.__version__,
           "nccl": ".".join(map(str, torch.cuda.nccl.version())), "shape": args.shape, "layers": args.layers,
           "dtype": "bf16", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": []}
    if not args.no_single:
        doc["runs"].append(run_world(1, "tp=1,ep=1", args))
    for layout in layouts:
        doc["runs"].append(run_world(n, layout, args))
    single = doc["runs"][0] if not args.no_single else None
    if single and "parallel" in single:
        doc["ratios_vs_1gpu"] = {}
        for run in doc["runs"][1:]:
            for name in ("parallel", "torch_fast"):  # each kernel set against itself on 1 GPU
                base = single.get(name, {}).get("decode_ms", {})
                mine = run.get(name, {}).get("decode_ms", {})
                doc["ratios_vs_1gpu"][f"{run['layout']} {name}"] = {
                    f"decode_b{b}": mine[b] / base[b] for b in mine if b in base}
    doc["goal"] = "issue 20: 2-GPU decode <= 0.6x the 1-GPU step at batch 1"
    out = Path(args.out or Path(os.environ.get("OUT", ROOT / "benchmarks" / "results")) / "parallel_bench.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
