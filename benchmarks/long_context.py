"""Jamba at its real context (issue 21): prefill time and peak memory at long prompts, decode ms/token against the
tokens held, on torch-fast (and ORT-CUDA on an export given with --ort-export), batch 1.

Parts (each checked or guarded on its own; an error is recorded and the rest still runs; the JSON is rewritten after
every part, so a run cut short keeps what it measured):
  check     torch-fast against the eager reference on a short prompt (logits, greedy step) and the decode-attention
            kernel against its _ref at the full cache shape: nothing is timed before this passes.
  prefill   --prefill-lens tokens, chunked (--prefill-chunk): wall time and peak memory above the weights.
  decode    ms/token with --decode-held tokens held in a --max-context cache, and --small-held held in a
            --small-context cache (the cost must follow the tokens held, not the cache). The held tokens' KV slots are
            filled with random values: a step's cost does not depend on them, and prefilling 256K tokens for every
            point would cost minutes.
  anchor    the vLLM comparison (vllm PR #23035: Jamba-Mini-1.7 FP8, 5.41 s at batch 1): a --anchor-prompt prompt plus
            --anchor-new greedy tokens, end to end.
  fp8_kv    logits error of an fp8 (e4m3) KV cache against the model-dtype cache, teacher-forced.
  ort       with --ort-export DIR (exported here from this run's model when missing: `--ops custom --prefill-state`
            at --max-context): ORT's logits against torch-fast's, then prefill and decode as above
            (long_context_ort.py; --ort-shared-period 8 makes an export that fits the device machine's disk).
  export    only the export of the ort part (run it ahead, e.g. in the background while ORT is being staged).
Goals (issue 21): 256K prefill <= 30 s; decode at 256K held <= 1.3x decode at 2K held; 2K held at a 256K cache
<= 1.05x the same at a 4K cache. The JSON carries these ratios; the SVG plots decode ms against tokens held.

  python benchmarks/long_context.py --out benchmarks/results/long_context_h200.json          # all parts in one run
  (the committed H200 run took two calls, --parts prefill / --parts check,decode,anchor,fp8_kv:
   results/long_context_prefill_h200.json and results/long_context_decode_h200.json)
  python benchmarks/long_context.py --dry-run --out /tmp/long_context_dry.json              # CPU, jamba-tiny
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch
from bench_ort import Results
from long_context_ort import export_once, shared_layer_model
from long_context_ort import part_ort as part_ort_graphs

from mambadeploy.models.checkpoint import build_preset, empty_model, set_max_context
from mambadeploy.models.presets import TINY_PRESETS, preset_config
from mambadeploy.runtime.torch_eager import TorchEagerRunner
from mambadeploy.runtime.torch_fast import PREFILL_CHUNK_DEFAULT, TorchFastRunner
from mambadeploy.validate.svg import line_chart
from mambadeploy.validate.tolerances import LOGITS_REL, rel_to_scale

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GIB = 2 ** 30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/long_context_<gpu>.json)")
    p.add_argument("--plot", type=Path, help="SVG of decode ms vs tokens held (default: beside --out)")
    p.add_argument("--preset", default="jamba-1.5-mini")
    p.add_argument("--dtype", default="bf16", choices=DTYPES)
    p.add_argument("--prefill-lens", default="32768,131072,262144")
    p.add_argument("--prefill-chunk", type=int, default=PREFILL_CHUNK_DEFAULT)
    p.add_argument("--max-context", type=int, default=262144, help="the long cache of the decode part")
    p.add_argument("--decode-held", default="2048,32768,131072,262143")
    p.add_argument("--small-context", type=int, default=4096)
    p.add_argument("--small-held", type=int, default=2048)
    p.add_argument("--steps", type=int, default=64, help="timed decode steps per point (after 8 warm-up steps)")
    p.add_argument("--anchor-prompt", type=int, default=31500)
    p.add_argument("--anchor-new", type=int, default=128)
    p.add_argument("--ort-export", type=Path, help="an export directory of the same model for the ORT part")
    p.add_argument("--ort-provider", default="cuda", choices=("cpu", "cuda"))
    p.add_argument("--ort-shared-period", type=int, help="the model's layer i holds layer i %% N's tensors (every "
                   "part: the same work, an export 32/N times smaller; long_context_ort.py)")
    p.add_argument("--parts", default="check,prefill,decode,anchor,fp8_kv,ort")
    p.add_argument("--dry-run", action="store_true", help="jamba-tiny on this machine at small lengths (CPU: the "
                   "kernels in Triton's interpreter), to check the script end to end")
    args = p.parse_args(argv)
    if args.dry_run:
        args.preset, args.dtype = "jamba-tiny", "fp32"
        args.prefill_lens, args.prefill_chunk, args.max_context = "40,100", 32, 256
        args.decode_held, args.small_context, args.small_held, args.steps = "16,64,255", 32, 16, 3
        args.anchor_prompt, args.anchor_new = 60, 4
    return args


def ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


# --------------------------------------------------------------------------- device helpers
def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_above(device, base: int) -> float | None:
    """GiB allocated at the peak since reset_peak, above `base` bytes (the weights); None on CPU."""
    if device.type != "cuda":
        return None
    return (torch.cuda.max_memory_allocated(device) - base) / GIB


@torch.no_grad()
def random_model(preset: str, dtype, device, shared_period: int | None = None):
    """The preset's shape with random weights drawn on the device. Full-size presets are not built through
    init_random_ (it draws every tensor on the CPU for device-independent weights: minutes for Jamba-1.5-Mini's 52B
    parameters); timing does not need those exact numbers, only a well-scaled model (fan-in weights, unit norms,
    Mamba's A and dt initialisation). shared_period: layer i holds the tensors of layer i % period
    (long_context_ort.shared_layer_model: an export that fits the device machine's disk)."""
    if preset in TINY_PRESETS and not shared_period:  # the preset itself (the same weights as everywhere else)
        return build_preset(preset, dtype, device)
    if shared_period:
        return shared_layer_model(preset, shared_period, dtype, device,
                                  lambda config, dt, dev: random_weights_(empty_model(config, dt, dev), dev))
    model = random_weights_(empty_model(preset_config(preset), dtype, device), device)
    model.source = {"kind": "random", "preset": preset}
    return model


@torch.no_grad()
def random_weights_(model, device):
    g = torch.Generator(device=device).manual_seed(0)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if "norm" in name:
            p.fill_(1.0)
        elif leaf == "A_log":
            p.copy_(torch.log(torch.arange(1, p.shape[1] + 1, device=device, dtype=torch.float32)).expand_as(p))
        elif leaf == "D":
            p.fill_(1.0)
        elif name.endswith("dt_proj.bias"):
            p.fill_(math.log(math.expm1(0.01)))  # softplus^-1 of a 0.01 time step
        elif leaf == "bias":
            p.zero_()
        else:
            std = 0.1 if "embedding" in name else p.shape[-1] ** -0.5
            p.normal_(0.0, std, generator=g)
    return model.eval()


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def prompt(n: int, vocab: int, seed: int = 0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, n), generator=g).to(device)


# --------------------------------------------------------------------------- parts
def part_check(model, device, out: Results, kernel_slots: int):
    """torch-fast vs the eager reference on a short prompt, and the decode kernel at the full cache shape."""
    from mambadeploy.kernels.decode_attention import decode_attention, decode_attention_ref

    ids = prompt(min(512, model.config.max_seq_len // 2), model.config.vocab_size, 1, device)
    ref, fast = TorchEagerRunner(model), TorchFastRunner(model, prefill_chunk=max(8, ids.shape[1] // 3))
    la, sa = ref.prefill(ids)
    lb, sb = fast.prefill(ids)
    token = la.argmax(-1)
    la2, _ = ref.step(token, sa)
    lb2, _ = fast.step(token, sb)
    a = model.config.attention
    S = kernel_slots
    q = torch.randn(1, a.n_heads, a.head_dim, device=device, dtype=model.dtype)
    k = torch.randn(1, a.n_kv_heads, S, a.head_dim, device=device, dtype=model.dtype)
    v = torch.randn_like(k)
    lens = torch.tensor([S - 1], device=device)
    kernel_err = (decode_attention(q, k, v, lens).float() - decode_attention_ref(q, k, v, lens).float()).abs().max()
    result = {"prompt": ids.shape[1], "prefill_rel": rel_to_scale(lb, la)[0], "step_rel": rel_to_scale(lb2, la2)[0],
              "greedy_equal": bool(torch.equal(lb.argmax(-1), la.argmax(-1)) and torch.equal(lb2.argmax(-1),
                                                                                            la2.argmax(-1))),
              "decode_kernel_max_abs": float(kernel_err), "cache_slots": S}
    out.put("check", result)
    print(f"check: {result}")
    bound = LOGITS_REL[model.dtype] * 2
    if not (result["prefill_rel"] <= bound and result["step_rel"] <= bound):
        raise RuntimeError(f"torch-fast does not match the reference (bound {bound}): {result}")


def part_prefill(model, device, lens, chunk, out: Results):
    rows = []
    base = weight_bytes(model)
    for n in lens:
        set_max_context(model, n)
        runner = TorchFastRunner(model, prefill_chunk=chunk, check_inputs=False)
        ids = prompt(n, model.config.vocab_size, 2, device)
        runner.prefill(ids[:, : min(n, chunk)])  # compiles the kernels at a chunk's shapes
        reset_peak(device)
        t0 = time.perf_counter()
        logits, state = runner.prefill(ids)
        sync(device)
        seconds = time.perf_counter() - t0
        row = {"tokens": n, "chunk": chunk, "seconds": seconds, "tokens_per_s": n / seconds,
               "peak_gib_above_weights": peak_above(device, base), "finite": bool(torch.isfinite(logits).all())}
        rows.append(row)
        print(f"prefill {n}: {seconds:.2f} s, peak {row['peak_gib_above_weights']} GiB above the weights")
        del logits, state, runner
        out.put("prefill", rows)
    return rows


def _held_state(runner, model, device, held: int):
    """A state holding `held` tokens: a short real prefill, then the fill counter moved to `held` with random KV in
    the slots before it (a step's cost does not depend on their values)."""
    n = min(16, held)
    _, st = runner.prefill(prompt(n, model.config.vocab_size, 3, device))
    for name, t in st.tensors.items():
        if name.endswith((".key", ".value")):
            t[:, :, n:held].copy_(torch.randn(t[:, :, n:held].shape, device=device).to(t.dtype))
    st.tensors["pos"].fill_(held)
    st.filled = held
    return st


def time_decode(runner, model, device, held: int, steps: int) -> dict:
    st = _held_state(runner, model, device, held)
    token = torch.zeros(1, dtype=torch.int64, device=device)
    for _ in range(8 if device.type == "cuda" else 1):  # capture + warm-up
        runner.step(token, st)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        runner.step(token, st)
    sync(device)
    ms = (time.perf_counter() - t0) / steps * 1e3
    return {"held": held, "cache": model.config.max_seq_len, "ms_per_token": ms}


def part_decode(model, device, held_list, context, small_context, small_held, steps, out: Results):
    rows = []
    set_max_context(model, context)
    runner = TorchFastRunner(model, check_inputs=False)
    for held in held_list:
        rows.append(time_decode(runner, model, device, min(held, context - 9 - steps), steps))
        print(f"decode: {rows[-1]}")
        out.put("decode", rows)
    set_max_context(model, small_context)
    small = time_decode(TorchFastRunner(model, check_inputs=False), model, device, small_held, steps)
    rows.append(small)
    print(f"decode: {small}")
    by = {(r["held"], r["cache"]): r["ms_per_token"] for r in rows}
    longest = max(r["held"] for r in rows if r["cache"] == context)
    shortest = min(r["held"] for r in rows if r["cache"] == context)
    same = by.get((small_held, context))
    goals = {"decode_longest_over_shortest": by[(longest, context)] / by[(shortest, context)],
             "goal_longest_over_shortest": 1.3,
             "decode_small_held_big_cache_over_small_cache": (same / small["ms_per_token"]) if same else None,
             "goal_small_held_big_cache_over_small_cache": 1.05}
    out.put("decode", rows)
    out.put("decode_goals", goals)
    return rows


def part_anchor(model, device, n_prompt, n_new, out: Results):
    from mambadeploy.runtime.generate import generate

    set_max_context(model, n_prompt + n_new)
    runner = TorchFastRunner(model, check_inputs=False)
    ids = prompt(n_prompt, model.config.vocab_size, 4, "cpu")[0].tolist()
    generate(runner, [ids[:256]], 4)  # warm-up: kernels compiled
    runs = []
    for _ in range(2):  # the first run of the full prompt still meets new shapes (chunk tails); the second is warm
        sync(device)
        t0 = time.perf_counter()
        result = generate(runner, [ids], n_new)
        sync(device)
        runs.append((time.perf_counter() - t0, result))
    (cold_s, _), (seconds, result) = runs
    row = {"prompt": n_prompt, "new_tokens": n_new, "seconds": seconds, "cold_seconds": cold_s,
           "prefill_s": result.prefill_s, "decode_s": result.decode_s,
           "vllm_jamba_mini_1.7_fp8_seconds": 5.41, "vllm_source": "vllm PR #23035 (GPU not stated)"}
    out.put("anchor", row)
    print(f"anchor: {row}")


def part_fp8_kv(model, device, out: Results, n_prompt=2048, steps=32):
    n_prompt = min(n_prompt, model.config.max_seq_len // 2)
    set_max_context(model, n_prompt + steps + 1)
    ids = prompt(n_prompt, model.config.vocab_size, 5, device)
    runs = {}
    for kv in ("model", "fp8"):
        runner = TorchFastRunner(model, kv_dtype=kv, check_inputs=False)
        logits, st = runner.prefill(ids)
        seq = [logits]
        for i in range(steps):
            token = (runs["model"][i] if "model" in runs else logits).argmax(-1)  # teacher-forced by the model cache
            logits, st = runner.step(token, st)
            seq.append(logits)
        runs[kv] = seq
    errs = [rel_to_scale(b, a)[0] for a, b in zip(runs["model"], runs["fp8"])]
    top1 = sum(int(torch.equal(a.argmax(-1), b.argmax(-1))) for a, b in zip(runs["model"], runs["fp8"])) / len(errs)
    row = {"prompt": n_prompt, "steps": steps, "max_rel_to_model_dtype_cache": max(errs),
           "prefill_rel": errs[0], "top1_agreement": top1}
    out.put("fp8_kv", row)
    print(f"fp8 KV: {row}")


def part_ort(model, args, device, out: Results):
    """Export (once) and time the ORT graphs beside this run's torch-fast numbers (long_context_ort.py)."""
    if not args.ort_export:
        print("ort: skipped (no --ort-export DIR)")
        return
    export_once(model, args.ort_export, args.max_context)
    reference = None
    if "export" not in args.parts.split(","):  # torch-fast's logits on the prompt the ORT graphs are checked on
        # longer than a chunk: ORT takes the chunked GroupQueryAttention graph, the path the long prompts time
        ids = prompt(min(args.prefill_chunk + 512, args.max_context // 2), model.config.vocab_size, 5, "cpu")
        logits, _ = TorchFastRunner(set_max_context(model, args.max_context), check_inputs=False).prefill(
            ids.to(device))
        reference = (ids, logits.float().cpu())
        model.cpu()  # the ORT sessions hold their own copies of the weights
        if device.type == "cuda":
            torch.cuda.empty_cache()
        part_ort_graphs(args.ort_export, args.ort_provider, model.config.vocab_size, ints(args.prefill_lens),
                        args.prefill_chunk, ints(args.decode_held), args.steps, reference, out)


def plot(rows: list[dict], path: Path, title: str):
    series = {}
    for r in rows:
        series.setdefault(f"torch-fast, cache {r['cache']}", []).append((r["held"], r["ms_per_token"]))
    for s in series.values():
        s.sort()
    path.write_text(line_chart(series, title, "tokens held", "decode ms / token", log_y=False))


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    gpu = device_name(device)
    out_path = args.out or ROOT / "benchmarks" / "results" / f"long_context_{gpu.lower().replace(' ', '_')}.json"
    parts = set(args.parts.split(","))
    if "export" in parts:
        parts.add("ort")
    model = random_model(args.preset, dtype, device, args.ort_shared_period)
    results = Results(out_path, {
        "benchmark": "long_context", "gpu": gpu if device.type == "cuda" else None, "device": str(device),
        "torch": torch.__version__, "preset": args.preset, "n_layers": model.config.n_layers, "dtype": args.dtype,
        "batch": 1, "weights_gib": weight_bytes(model) / GIB, "dry_run": args.dry_run,
        "command": " ".join(sys.argv)})
    steps = [
        # the reference's step reads its whole cache in fp32: the check runs at a smaller one (the kernel is checked
        # at the full cache shape on its own)
        ("check", lambda: part_check(set_max_context(model, min(args.max_context, 8192)), device, results,
                                     args.max_context)),
        ("prefill", lambda: part_prefill(model, device, ints(args.prefill_lens), args.prefill_chunk, results)),
        ("decode", lambda: part_decode(model, device, ints(args.decode_held), args.max_context, args.small_context,
                                       args.small_held, args.steps, results)),
        ("anchor", lambda: part_anchor(model, device, args.anchor_prompt, args.anchor_new, results)),
        ("fp8_kv", lambda: part_fp8_kv(model, device, results)),
        ("ort", lambda: part_ort(model, args, device, results)),
    ]
    for name, run in steps:
        if name not in parts:
            continue
        try:
            run()
        except Exception as exc:  # noqa: BLE001  (recorded; the other parts still run)
            results.error(name, exc)
            if name == "check":
                print("check failed: nothing is timed", file=sys.stderr)
                return 1
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if results.data.get("decode"):
        plot_path = args.plot or out_path.with_suffix(".svg")
        plot(results.data["decode"], plot_path, f"{args.preset} {args.dtype} decode, batch 1 ({gpu})")
        print(f"wrote {plot_path}")
    print(f"wrote {out_path}")
    return 0 if not results.data["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
