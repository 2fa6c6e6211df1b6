"""Serving throughput and latency through Triton (the in-flight-batching Python model), beside the same runner driven
directly at the same batch sizes.

  python benchmarks/serve_bench.py --out $OUT                 # H200: blackmamba-2.8b, torch-fast bf16, 1/8/32/64 streams
  python benchmarks/serve_bench.py --dry-run --out /tmp/sb    # CPU: blackmamba-tiny, torch eager, 1/8/32 streams

Direct: one batch of B prompts (128 tokens) prefilled together, one untimed step (its CUDA-graph capture), then 126
timed greedy decode steps, each token brought to the host as the server does; tokens/s = B * 126 / their time, and
the step's p50/p99. In-process batcher: the served model's InflightBatcher on the same runner in this process (no
Triton), B requests at once: its inter-token latency and per-step breakdown. Served: B concurrent gRPC streams (clients spread over --client-procs
processes, so the Python client is not the bottleneck), each a 128-token prompt asking 128 new tokens; tokens/s = all
streamed tokens / (last token - first request) in wall time; time to first token and inter-token latency as the
model measured them (latency_ms of each response) and as the clients saw them; also the steady rate (while every
stream was live) against the direct decode rate, and end to end against the direct prefill + decode rate. Goals
(issue 19): at 64 streams >= 80 % of the direct batch-64 rate; at 1 stream an inter-token latency <= 1.2x the direct
step. Where the served time goes, per level: the model's profile counters (serve/profile.py: decode step, emit,
bookkeeping, prefill and admission wait, responses and tokens per response, send time) and the CPU seconds per token
of the server's process tree and of the clients (/proc: robust to a shared, busy CPU, unlike wall time).
Writes serve_<gpu>.json and serve_<gpu>.svg (throughput vs concurrency) into --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch

FULL = {"preset": "blackmamba-2.8b", "backend": "torch-fast", "dtype": "bf16", "device": "cuda", "prompt_len": 128,
            "new_tokens": 128, "streams": [1, 8, 32, 64], "max_batch": 64}
DRY = {"preset": "blackmamba-tiny", "backend": "torch", "dtype": "fp32", "device": "cpu", "prompt_len": 16,
       "new_tokens": 48, "streams": [1, 8, 32], "max_batch": 32}
# after a level, the model pushes its profile counters at its next idle turn (the batcher waits 0.5 s for work)
PROFILE_FLUSH_S = 0.8


def percentile(values, q):
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def prompts_for(batch, length, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g).tolist()


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def direct(cfg) -> tuple[list[dict], list[dict], dict]:
    """The runner driven directly at each batch size, then the in-process batcher on the same runner."""
    from mambadeploy.runtime.factory import make_runner

    runner = make_runner(cfg["preset"], backend=cfg["backend"], dtype=cfg["dtype"], device=cfg["device"])
    if hasattr(runner, "check_inputs"):
        runner.check_inputs = False  # as the served batcher runs it (ids checked once, at submission)
    vocab = runner.config.vocab_size
    rows = []
    for batch in cfg["streams"]:
        ids = torch.tensor(prompts_for(batch, cfg["prompt_len"], vocab, seed=batch))
        for attempt in ("warm-up", "timed"):  # the warm-up compiles; each new state captures its graph at step 1
            sync(cfg["device"])
            t0 = time.perf_counter()
            logits, state = runner.prefill(ids)
            token = logits.argmax(-1)
            sync(cfg["device"])
            prefill_s = time.perf_counter() - t0
            logits, state = runner.step(token, state)  # untimed: this state's CUDA-graph capture
            token = logits.argmax(-1)
            steps = []
            t1 = time.perf_counter()
            for _ in range(cfg["new_tokens"] - 2):
                ts = time.perf_counter()
                logits, state = runner.step(token, state)
                token = logits.argmax(-1)
                token.cpu()  # the served loop also brings every token to the host each step
                steps.append(time.perf_counter() - ts)
            decode_s = time.perf_counter() - t1
        rows.append({"batch": batch, "prefill_ms": prefill_s * 1e3,
                     "tokens_per_s": batch * len(steps) / decode_s,
                     # prefill + every token (the capture step counted at the mean step): what a served stream sees
                     "e2e_tokens_per_s": batch * cfg["new_tokens"] / (prefill_s + decode_s / len(steps) * (
                         cfg["new_tokens"] - 1)),
                     "step_ms_p50": percentile(steps, 50) * 1e3, "step_ms_p99": percentile(steps, 99) * 1e3})
        print(f"direct batch {batch}: {rows[-1]['tokens_per_s']:.0f} tok/s, step p50 {rows[-1]['step_ms_p50']:.3f} ms")
    describe = runner.describe()
    del state, logits
    batcher_rows = in_process(cfg, runner)
    del runner
    if str(cfg["device"]).startswith("cuda"):
        torch.cuda.empty_cache()
    return rows, batcher_rows, describe


def _batch_through(batcher, prompts, new_tokens) -> tuple[list, float]:
    """Submit every prompt at once to an in-process batcher; returns (each request's latencies in s, wall s)."""
    import threading

    from mambadeploy.serve.batcher import Request

    latency = [[] for _ in prompts]
    left, all_done, errors = [len(prompts)], threading.Event(), []

    def end(message=None):
        if message:
            errors.append(message)
        left[0] -= 1  # only the batcher thread calls emit / fail
        if not left[0]:
            all_done.set()

    def make(i):
        def emit(token, index, latency_s, final):
            latency[i].append(latency_s)
            if final:
                end()

        return Request(prompts[i], new_tokens, emit, end)

    t0 = time.perf_counter()
    for i in range(len(prompts)):
        batcher.submit(make(i))
    if not all_done.wait(1800) or errors:
        raise RuntimeError(f"in-process batcher: {errors[:1] or 'timed out'}")
    return latency, time.perf_counter() - t0


@torch.no_grad()
def in_process(cfg, runner) -> list[dict]:
    """The served model's InflightBatcher driven in this process: B requests at once (128 + 128 tokens), with no
    Triton (no IPC, no sender thread). Between the direct runner and the served model: what the batcher itself costs
    (pipelined on CUDA: serve/batcher.py) and, against the served rows, what the server path adds."""
    from mambadeploy.serve.batcher import InflightBatcher

    batcher = InflightBatcher(runner, max_batch=cfg["max_batch"]).start()
    rows = []
    try:
        for batch in cfg["streams"]:
            prompts = prompts_for(batch, cfg["prompt_len"], runner.config.vocab_size, seed=2000 + batch)
            _batch_through(batcher, prompts, 4)  # warm-up: captures the decode graph of every bucket <= batch
            before = dataclasses.replace(batcher.stats)
            latency, wall = _batch_through(batcher, prompts, cfg["new_tokens"])
            after = batcher.stats
            steps = max(after.steps - before.steps, 1)
            itl = [v for lat in latency for v in lat[1:]]
            rows.append({"batch": batch, "tokens_per_s": batch * cfg["new_tokens"] / wall,
                         "ttft_ms_p50": percentile([lat[0] for lat in latency], 50) * 1e3,
                         "itl_ms_p50": percentile(itl, 50) * 1e3, "itl_ms_p99": percentile(itl, 99) * 1e3,
                         "pipelined": batcher.pipeline, "mean_batch": (after.step_rows - before.step_rows) / steps,
                         "step_ms": (after.step_s - before.step_s) / steps * 1e3,
                         "wait_ms_per_step": (after.wait_s - before.wait_s) / steps * 1e3,
                         "emit_ms_per_step": (after.emit_s - before.emit_s) / steps * 1e3})
            r = rows[-1]
            print(f"in-process batcher {batch}: {r['tokens_per_s']:.0f} tok/s, ITL p50 {r['itl_ms_p50']:.3f} / p99 "
                  f"{r['itl_ms_p99']:.3f} ms; step {r['step_ms']:.3f} ms (waiting on the device "
                  f"{r['wait_ms_per_step']:.3f}), emit {r['emit_ms_per_step']:.3f} ms")
    finally:
        batcher.stop()
    return rows


def _client_process(url, model, inbox, outbox):
    """One client process: streams one warm-up request (a process's first stream was seen to get all its responses at
    once at the end: its gRPC runtime starting up), then runs each share of streams it is given, returning them as
    dicts with the CPU seconds it spent (the client's receive cost: near 1.0 CPU s per wall s it would be the
    bottleneck)."""
    from mambadeploy.serve.client import run_streams

    run_streams(url, model, [{"prompt": [1], "max_tokens": 16}])
    outbox.put("ready")
    while (jobs := inbox.get()) is not None:
        cpu, wall = time.process_time(), time.perf_counter()
        results = [vars(r) for r in run_streams(url, model, jobs)]
        outbox.put({"results": results, "cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall})


class ClientProcesses:
    """n client processes, each given its own share of a level's streams: the shares run at the same time (a pool
    could hand two shares to one process, which runs them one after the other)."""

    def __init__(self, n: int, url: str, model: str):
        ctx = multiprocessing.get_context("spawn")
        self.queues = [(ctx.Queue(), ctx.Queue()) for _ in range(n)]
        self.procs = [ctx.Process(target=_client_process, args=(url, model, inbox, outbox), daemon=True)
                      for inbox, outbox in self.queues]
        for proc in self.procs:
            proc.start()
        for _, outbox in self.queues:
            assert outbox.get(timeout=300) == "ready"

    def run(self, jobs: list) -> list[dict]:
        n = len(self.procs)
        shares = [jobs[i::n] for i in range(n)]
        for (inbox, _), share in zip(self.queues, shares):
            if share:
                inbox.put(share)
        return [outbox.get(timeout=1800) for (_, outbox), share in zip(self.queues, shares) if share]

    def close(self) -> None:
        for inbox, _ in self.queues:
            inbox.put(None)
        for proc in self.procs:
            proc.join(10)


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of process `pid` and its children (tritonserver + its Python stubs), from /proc:
    the served path's whole cost per token, which a busy shared CPU does not inflate the way it does wall time."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if stat.parent.name == str(pid) or fields[1] == str(pid):  # fields[1]: the parent pid
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def steady_rate(results) -> float:
    """Tokens/s while every stream was live (from the last first token to the first last token): the decode-phase
    rate, comparable with the direct decode rate; nan when the streams never all overlapped."""
    start = max(r["arrived_at"][0] for r in results)
    end = min(r["last_at"] for r in results)
    if end - start <= 0:
        return float("nan")
    return sum(1 for r in results for t in r["arrived_at"] if start < t <= end) / (end - start)


def served(cfg, server, vocab, client_procs) -> list[dict]:
    from mambadeploy.serve.profile import breakdown, read_profile

    rows = []
    clients = ClientProcesses(client_procs, server.grpc_url, "mamba")
    try:
        for streams in cfg["streams"]:
            prompts = prompts_for(streams, cfg["prompt_len"], vocab, seed=1000 + streams)
            for attempt in ("warm-up", "timed"):  # the warm-up captures the decode graph of every bucket <= streams
                tokens = 4 if attempt == "warm-up" else cfg["new_tokens"]
                jobs = [{"prompt": p, "max_tokens": tokens} for p in prompts]
                time.sleep(PROFILE_FLUSH_S)
                before = read_profile(server.metrics_url, "mamba")
                cpu_before = tree_cpu_s(server.process.pid)
                outcome = clients.run(jobs)
            server_cpu = tree_cpu_s(server.process.pid) - cpu_before  # before the idle wait: little counted in it
            time.sleep(PROFILE_FLUSH_S)
            after = read_profile(server.metrics_url, "mamba")
            results = [r for share in outcome for r in share["results"]]
            errors = [r["error"] for r in results if r["error"]]
            if errors:
                raise RuntimeError(f"{len(errors)} streams failed, e.g. {errors[0]}")
            wall = max(r["last_at"] for r in results) - min(r["sent_at"] for r in results)
            total = sum(len(r["tokens"]) for r in results)
            ttft = [r["latency_ms"][0] for r in results]
            itl = [v for r in results for v in r["latency_ms"][1:]]
            client_ttft = [r["client_ms"][0] for r in results]
            client_itl = [v for r in results for v in r["client_ms"][1:]]
            responses = sum(r["responses"] for r in results)
            client_cpu = sum(share["cpu_s"] for share in outcome)
            rows.append({"streams": streams, "tokens": total, "wall_s": wall, "tokens_per_s": total / wall,
                         "steady_tokens_per_s": steady_rate(results),
                         "ttft_ms_p50": percentile(ttft, 50), "ttft_ms_p99": percentile(ttft, 99),
                         "itl_ms_p50": percentile(itl, 50), "itl_ms_p99": percentile(itl, 99),
                         "client_ttft_ms_p50": percentile(client_ttft, 50),
                         "client_itl_ms_p50": percentile(client_itl, 50),
                         "client_itl_ms_p99": percentile(client_itl, 99),
                         "client_processes": len(outcome), "client_responses": responses,
                         "client_cpu_us_per_response": client_cpu / max(responses, 1) * 1e6,
                         "client_cpu_us_per_token": client_cpu / total * 1e6,
                         "server_cpu_us_per_token": server_cpu / total * 1e6,
                         "client_cpu_frac_max": max(share["cpu_s"] / share["wall_s"] for share in outcome),
                         "server": breakdown(before, after, wall)})
            print(describe(rows[-1]))
    finally:
        clients.close()
    return rows


def describe(r) -> str:
    """A served row in three lines: the client's view, the server's breakdown, the CPU cost per token."""
    b = r["server"]
    return (f"served {r['streams']} streams: {r['tokens_per_s']:.0f} tok/s (steady {r['steady_tokens_per_s']:.0f}), "
            f"TTFT p50 {r['ttft_ms_p50']:.2f} ms, ITL p50 {r['itl_ms_p50']:.3f} / p99 {r['itl_ms_p99']:.3f} ms\n"
            f"  server: {b['decode_steps']} steps of mean batch {b['mean_batch']:.1f}: step {b['step_ms']:.3f} (of it "
            f"waiting on the GPU {b['wait_ms_per_step']:.3f}) + emit {b['emit_ms_per_step']:.3f} + "
            f"other {b['bookkeeping_ms_per_step']:.3f} ms; {b['sync_step_frac']:.0%} steps unpipelined, "
            f"{b['wasted_rows']} wasted rows; {b['prefills']} prefills of "
            f"{b['prefill_ms_mean']:.2f} ms, admission wait {b['admit_wait_ms_mean']:.2f} ms; {b['responses']} "
            f"responses of {b['tokens_per_response']:.2f} tokens, {b['send_us_per_response']:.0f} us each "
            f"({b['send_cpu_us_per_response']:.0f} us CPU); busy: sender {b['sender_busy_frac']:.0%}, watcher "
            f"{b['watcher_busy_frac']:.0%}, batcher "
            f"{b['batcher_busy_frac']:.0%} (step {b['step_frac']:.0%})\n"
            f"  CPU per token: server + stub {r['server_cpu_us_per_token']:.0f} us (step included), client "
            f"{r['client_cpu_us_per_token']:.0f} us ({r['client_cpu_us_per_response']:.0f} us per response; busiest "
            f"client process at {r['client_cpu_frac_max']:.0%} of a core)")


def svg_plot(direct_rows, served_rows, title) -> str:
    """Throughput vs concurrency as a small self-contained SVG (no plotting library on the machines)."""
    w, h, pad = 560, 360, 60
    xs = [r["batch"] for r in direct_rows]
    top = max([r["tokens_per_s"] for r in direct_rows + served_rows] + [1]) * 1.1
    ticks = list(range(len(xs)))

    def px(i):
        return pad + i * (w - 2 * pad) / max(len(xs) - 1, 1)

    def py(v):
        return h - pad - v / top * (h - 2 * pad)

    def line(rows, key, color, label, y_label):
        pts = " ".join(f"{px(i):.1f},{py(r['tokens_per_s']):.1f}" for i, r in enumerate(rows))
        dots = "".join(f'<circle cx="{px(i):.1f}" cy="{py(r["tokens_per_s"]):.1f}" r="3" fill="{color}"/>'
                       for i, r in enumerate(rows))
        return (f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2"/>{dots}'
                f'<text x="{w - pad - 150}" y="{y_label}" fill="{color}" font-size="12">{label}</text>')

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif">',
             f'<text x="{w / 2}" y="20" text-anchor="middle" font-size="13">{title}</text>',
             f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>',
             f'<text x="{w / 2}" y="{h - 15}" text-anchor="middle" font-size="12">concurrent streams (batch)</text>',
             (f'<text x="15" y="{h / 2}" transform="rotate(-90 15 {h / 2})" text-anchor="middle" '
             f'font-size="12">output tokens/s</text>')]
    for i in ticks:
        parts.append(f'<text x="{px(i):.1f}" y="{h - pad + 16}" text-anchor="middle" font-size="11">{xs[i]}</text>')
    for k in range(5):
        v = top * k / 4
        parts.append(f'<text x="{pad - 6}" y="{py(v) + 4:.1f}" text-anchor="end" font-size="10">{v:.0f}</text>')
    parts.append(line(direct_rows, "batch", "#1f77b4", "runner, direct", pad + 10))
    parts.append(line(served_rows, "streams", "#d62728", "Triton, streamed", pad + 28))
    return "".join(parts) + "</svg>"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for the JSON and the SVG plot")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny CPU preset: checks the script and profiles the serving path (not the GPU goals)")
    parser.add_argument("--streams", type=int, nargs="+", help="concurrency levels (default 1 8 32 64)")
    parser.add_argument("--client-procs", type=int, default=4, help="client processes (4)")
    parser.add_argument("--response-interval-ms", type=float, default=0.0,
                        help="serve-repo's: at most one response per stream per interval (0: adaptive only)")
    parser.add_argument("--ready-timeout", type=float, default=900, help="seconds for the model to load (900)")
    args = parser.parse_args(argv)
    cfg = dict(DRY if args.dry_run else FULL)
    if args.dry_run:
        torch.set_num_threads(1)  # as the served model (threads=1): a shared CPU otherwise decides the ratio
    if args.streams:
        cfg["streams"], cfg["max_batch"] = args.streams, max(args.streams)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from mambadeploy.serve.repo import write_repo
    from mambadeploy.serve.server import TritonServer, free_port

    direct_rows, batcher_rows, describe = direct(cfg)
    vocab = 512 if args.dry_run else 50304
    repo = Path(tempfile.mkdtemp(prefix="serve-bench-repo-"))
    write_repo(cfg["preset"], repo, name="mamba", backend=cfg["backend"], dtype=cfg["dtype"], device=cfg["device"],
               max_batch=cfg["max_batch"], threads=1 if args.dry_run else None, state_config=False,
               response_interval_ms=args.response_interval_ms)
    server = TritonServer(repo, free_port(), free_port(), free_port())
    t0 = time.perf_counter()
    server.start(args.ready_timeout)
    load_s = time.perf_counter() - t0
    try:
        served_rows = served(cfg, server, vocab, min(args.client_procs, max(cfg["streams"])))
    finally:
        server.stop()
    by_batch = {r["batch"]: r for r in direct_rows}
    for r in batcher_rows:
        r["itl_p50_over_direct_step_p50"] = r["itl_ms_p50"] / by_batch[r["batch"]]["step_ms_p50"]
    for r in served_rows:
        d = by_batch[r["streams"]]
        r["ratio_to_direct_tokens_per_s"] = r["tokens_per_s"] / d["tokens_per_s"]
        r["itl_p50_over_direct_step_p50"] = r["itl_ms_p50"] / d["step_ms_p50"]
        r["ratio_to_direct_e2e_tokens_per_s"] = r["tokens_per_s"] / d["e2e_tokens_per_s"]
        r["steady_ratio_to_direct_tokens_per_s"] = r["steady_tokens_per_s"] / d["tokens_per_s"]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() and cfg["device"] == "cuda" else "cpu"
    top = max(cfg["streams"])
    last = served_rows[-1]
    # the ratio (served end to end, prefill included, over the direct decode rate) and two like-for-like
    # ones: both sides with their prefill, and both in the decode phase only
    goals = {"served_over_direct_at_max_streams": last["ratio_to_direct_tokens_per_s"],
             "served_over_direct_e2e_at_max_streams": last["ratio_to_direct_e2e_tokens_per_s"],
             "steady_served_over_direct_at_max_streams": last["steady_ratio_to_direct_tokens_per_s"],
             "goal_at_64": ">= 0.80", "itl_over_step_at_1_stream": served_rows[0]["itl_p50_over_direct_step_p50"],
             "goal_at_1": "<= 1.2"}
    data = {"config": cfg, "dry_run": args.dry_run, "device": {"gpu": gpu, "torch": torch.__version__,
            "python": sys.version.split()[0]}, "runner": describe, "server_load_s": load_s, "direct": direct_rows,
            "in_process_batcher": batcher_rows,
            "served": served_rows, "goals": goals, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "note": f"served at {top} streams vs direct batch {top}"}
    stem = f"serve_{gpu.lower().replace(' ', '_')}" + ("_dry_run" if args.dry_run else "")
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1, default=str))
    (out / f"{stem}.svg").write_text(svg_plot(direct_rows, served_rows, f"{cfg['preset']} {cfg['backend']} "
                                                                        f"{cfg['dtype']} on {gpu}"))
    print(json.dumps(goals))
    print(f"wrote {out / stem}.json and .svg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
