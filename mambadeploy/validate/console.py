"""The console view of a validate result (rich): one row per backend, skipped backends with their reasons, per-layer
pointers, and the verdict."""

from __future__ import annotations


def _num(x, fmt="{:.1e}", none="-"):
    return none if x is None else fmt.format(x)


def render(result: dict, console=None) -> None:
    from rich import box
    from rich.console import Console
    from rich.markup import escape  # reasons hold text like 'mambadeploy[onnx]' that rich would take for markup
    from rich.table import Table

    console = console or Console()
    m = result["model"]
    s = result["settings"]
    console.print(f"[bold]{m['name'] or m['target']}[/] ({m['family']}, {m['n_layers']} layers, "
                  f"{m['parameters'] / 1e6:.1f}M params) vs fp32 torch reference on {result['reference']['device']}: "
                  f"{s['num_prompts']} prompt(s) of {min(s['prompt_lengths'])}-{max(s['prompt_lengths'])} tokens, "
                  f"{s['new_tokens']} new tokens")
    styles = {"passed": "green", "failed": "red", "error": "red", "skipped": "dim"}
    ran = [r for r in result["backends"] if r["status"] != "skipped"]
    numerics = Table(title="parity with the fp32 reference", header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for col in ("backend", "status", "max err", "mean abs", "cos min", "top-1", "tokens", "diverge"):
        numerics.add_column(col, justify="left" if col in ("backend", "status") else "right", no_wrap=True)
    timing = Table(title="latency", header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for col in ("backend", "prefill ms", "step p50 ms", "p99 ms", "tok/s", "peak MB", "roofline"):
        timing.add_column(col, justify="left" if col == "backend" else "right", no_wrap=True)
    for r in ran:
        status = f"[{styles[r['status']]}]{r['status']}[/]"
        if r["logits"] is None:
            numerics.add_row(r["label"], status, *["-"] * 6)
            continue
        w, lat, roof = r["logits"]["worst"], r["latency"], r["roofline"]
        div = r["greedy"]["first_divergence"]
        numerics.add_row(
            r["label"], status, _num(w["max_rel"]), _num(w["mean_abs"]), _num(w["cosine"], "{:.5f}"),
            _num(r["teacher_forced"]["top1_agreement"], "{:.1%}"), _num(r["greedy"]["token_match_rate"], "{:.1%}"),
            "none" if div is None else str(div))
        timing.add_row(
            r["label"], _num(lat["prefill_ms"], "{:.2f}"), _num(lat["decode_ms_p50"], "{:.3f}"),
            _num(lat["decode_ms_p99"], "{:.3f}"), _num(lat["tokens_per_s"], "{:.0f}"),
            _num(r["memory"]["peak_mb"], "{:.0f}", "n/a"), _num(roof["percent"], "{:.1f}%", "n/a"))
    if ran:
        console.print(numerics)
        console.print(timing)
    for r in result["backends"]:
        if r["status"] == "skipped":
            console.print(f"[dim]skipped {r['label']}: {escape(r['reason'] or '')}[/]")
        for f in r["failures"]:
            console.print(f"[red]{r['label']}: {escape(f)}[/]")
        pl = r.get("per_layer")
        if pl:
            if not pl["layers"]:
                pass  # nothing compared: the notes below say why
            elif pl["first_bad_layer"] is None:
                console.print(f"{r['label']}: per-layer drift within {pl['bound_rel']:.0e} in every layer "
                              f"(worst {max((l['max_rel'] for l in pl['layers']), default=0):.2e})")
            else:
                console.print(f"[yellow]{r['label']}: per-layer drift first leaves {pl['bound_rel']:.0e} at layer "
                              f"{pl['first_bad_layer']} ({pl['first_bad_kind']}), first tensor "
                              f"{escape(str(pl['first_bad_tensor']))}[/]")
            for note in pl["notes"]:
                console.print(f"[dim]{r['label']}: {escape(note)}[/]")
    verdict = "[bold green]PASSED[/]" if result["passed"] else "[bold red]FAILED[/]"
    c = result["summary"]
    console.print(f"{verdict}: {c['passed']} passed, {c['failed']} failed, {c['error']} errors, {c['skipped']} skipped")
