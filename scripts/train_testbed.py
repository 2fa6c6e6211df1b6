"""Train the small *trained* testbed models (BlackMamba-, MoE-Mamba- and Jamba-family) on an offline corpus.

Why: random weights cannot measure quality (SCAP's perplexity cost) and their logits are near-ties, so low-precision
validation of random presets says little. These models are small (< 2 MB of fp32 weights each) and trained for minutes.

Corpus: the CPython standard library's top-level `*.py` files under the running interpreter's lib dir (every Python
install carries them), byte-level vocabulary (256 ids: a token is a UTF-8 byte, so no tokenizer file is needed).
Split by file: every 10th file (sorted by name) is held out. The corpus' sha256 is recorded in the checkpoint.

Deterministic: fixed seeds, one torch thread, batches drawn from a seeded generator. Reproduce the committed checkpoints:
    PYTHONPATH=$PWD python scripts/train_testbed.py --out mambadeploy/models/trained
(Python 3.11.7's stdlib, torch 2.13 CPU; ~3 min per model on one core.)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mambadeploy.models import ref_ops
from mambadeploy.models.checkpoint import save_model
from mambadeploy.models.model import MambaMoELM, init_random_
from mambadeploy.models.trained import TRAINED_CONFIGS, corpus_split


def selective_scan_train(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         initial_state=None):
    """models.ref_ops.selective_scan_ref's math with the time steps taken by `unbind`: indexing `decay[:, :, t]`
    makes autograd allocate and fill a whole (batch, dim, L, N) gradient per step (O(L^2), 94 % of a training step)."""
    dtype_in = u.dtype
    u, delta, A, B, C = (t.float() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.float()[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, _ = u.shape
    h = u.new_zeros(batch, dim, A.shape[1]) if initial_state is None else initial_state.float()
    decay = torch.exp(delta.unsqueeze(-1) * A[None, :, None, :]).unbind(2)
    drive = ((delta * u).unsqueeze(-1) * B.transpose(1, 2)[:, None, :, :]).unbind(2)
    ys = []
    for t, c_t in enumerate(C.unbind(2)):
        h = decay[t] * h + drive[t]
        ys.append(torch.einsum("bdn,bn->bd", h, c_t))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D.float()[None, :, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype_in), h


def batches(data: torch.Tensor, batch: int, seq_len: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=g)
        chunk = torch.stack([data[s:s + seq_len + 1] for s in starts.tolist()])
        yield chunk[:, :-1].long(), chunk[:, 1:].long()


@torch.no_grad()
def heldout_perplexity(model, data: torch.Tensor, seq_len: int = 256, windows: int = 32) -> float:
    """exp(mean next-byte cross entropy) over `windows` evenly spaced windows of the held-out split."""
    step = (len(data) - seq_len - 1) // windows
    losses = []
    for w in range(windows):
        chunk = data[w * step: w * step + seq_len + 1].long()[None]
        logits, _ = model(chunk[:, :-1])
        losses.append(F.cross_entropy(logits[0], chunk[0, 1:]).item())
    return math.exp(sum(losses) / len(losses))


def train_one(name: str, train: torch.Tensor, held: torch.Tensor, args) -> dict:
    torch.manual_seed(args.seed)
    model = init_random_(MambaMoELM(TRAINED_CONFIGS[name]()), seed=args.seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    t0 = time.time()
    for i, (x, y) in enumerate(batches(train, args.batch, args.seq_len, args.steps, args.seed)):
        lr = args.lr * min(1.0, (i + 1) / 30) * 0.5 * (1 + math.cos(math.pi * i / args.steps))  # warmup + cosine
        for group in opt.param_groups:
            group["lr"] = lr
        logits, _ = model(x, check=False)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if i % 50 == 0 or i == args.steps - 1:
            print(f"{name} step {i:4d} loss {loss.item():.3f} lr {lr:.2e} {time.time() - t0:.0f}s", flush=True)
    model.eval()
    ppl = heldout_perplexity(model, held)
    return {"model": model, "heldout_ppl": ppl, "train_s": time.time() - t0}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory; one checkpoint subdirectory per model")
    parser.add_argument("--models", default=",".join(TRAINED_CONFIGS), help="comma-separated names")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # determinism and fairness on a shared machine
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    train, held, digest = corpus_split(stdlib)
    print(f"corpus {stdlib}: train {len(train)} bytes, held-out {len(held)} bytes, sha256 {digest[:16]}")
    ref_ops.selective_scan_ref = selective_scan_train  # training only; this process ends after training
    for name in args.models.split(","):
        result = train_one(name, train, held, args)
        model = result["model"]
        model.config.extra = {"trained": {
            "corpus": "CPython stdlib top-level *.py (byte-level), every 10th file held out",
            "python": sys.version.split()[0], "corpus_sha256": digest, "steps": args.steps, "batch": args.batch,
            "seq_len": args.seq_len, "lr": args.lr, "seed": args.seed,
            "heldout_ppl": round(result["heldout_ppl"], 4), "train_s": round(result["train_s"], 1),
            "command": "PYTHONPATH=$PWD python scripts/train_testbed.py --out mambadeploy/models/trained",
        }}
        save_model(model, Path(args.out) / name)
        print(json.dumps({"model": name, "heldout_ppl": result["heldout_ppl"], "train_s": result["train_s"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
