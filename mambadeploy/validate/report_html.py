"""The self-contained HTML report of a validate result: verdict, tables, and three inline-SVG plots (logit error per
decode step per backend, decode-step latency distribution per backend, roofline % per backend). No external files."""

from __future__ import annotations

import json
from html import escape

from . import svg

STYLE = """body{font-family:sans-serif;margin:24px;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:8px 0 18px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}.passed{color:#1a7f37}.failed,.error{color:#c62828}.skipped{color:#888}
.verdict{font-size:22px;font-weight:bold}code{background:#f4f4f4;padding:1px 4px}"""


def _f(x, fmt="{:.2e}", none="-"):
    return none if x is None else fmt.format(x)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_html(result: dict) -> str:
    m, s = result["model"], result["settings"]
    ran = [r for r in result["backends"] if r["status"] != "skipped"]
    done = [r for r in ran if r["logits"] is not None]
    parts = [(f"<!doctype html><html><head><meta charset='utf-8'><title>validate {escape(m['name'])}</title>"
             f"<style>{STYLE}</style></head><body>"),
             f"<h1>mambadeploy validate: {escape(m['name'] or m['target'])}</h1>",
             (f"<p class='verdict {'passed' if result['passed'] else 'failed'}'>"
             f"{'PASSED' if result['passed'] else 'FAILED'}</p>"),
             (f"<p>{escape(m['family'])}, {m['n_layers']} layers (<code>{escape(m['layer_pattern'])}</code>), "
             f"{m['parameters'] / 1e6:.1f}M parameters ({m['active_parameters'] / 1e6:.1f}M active). Reference: fp32 torch on "
             f"{escape(result['reference']['device'])}. {s['num_prompts']} prompt(s) of "
             f"{min(s['prompt_lengths'])}–{max(s['prompt_lengths'])} tokens, {s['new_tokens']} new tokens. "
             f"Machine: {escape(result['machine']['gpu'] or result['machine']['cpu'])}, torch "
             f"{escape(result['machine']['torch'])}. {escape(result['created'])}.</p>")]
    rows = []
    for r in ran:
        st = f"<span class='{r['status']}'>{r['status']}</span>"
        if r["logits"] is None:
            rows.append([escape(r["label"]), st] + ["-"] * 7)
            continue
        w, pf = r["logits"]["worst"], r["logits"]["prefill"]
        div = r["greedy"]["first_divergence"]
        rows.append([escape(r["label"]), st, _f(pf["max_rel"]), _f(w["max_rel"]), f"{r['tolerance']['logits_max_rel']:.0e}",
                     _f(w["mean_abs"]), _f(w["cosine"], "{:.6f}"),
                     f"{r['teacher_forced']['top1_agreement']:.2%} (≥ {r['tolerance']['top1_agreement']:.0%})",
                     f"{r['greedy']['token_match_rate']:.2%}, {'none' if div is None else div}"])
    parts.append("<h2>Parity with the fp32 reference</h2>")
    parts.append(_table(["backend", "status", "prefill err/scale", "worst err/scale", "bound", "worst mean abs",
                         "min cosine", "teacher-forced top-1", "greedy tokens equal, first divergence"], rows))
    rows = [[escape(r["label"]), _f(r["latency"]["prefill_ms"], "{:.2f}"), _f(r["latency"]["decode_ms_p50"], "{:.3f}"),
             _f(r["latency"]["decode_ms_p99"], "{:.3f}"), _f(r["latency"]["tokens_per_s"], "{:.0f}"),
             _f(r["memory"]["peak_mb"], "{:.0f}", "n/a"), _f(r["roofline"]["percent"], "{:.1f}%", "n/a"),
             _f(r["roofline"]["floor_ms"], "{:.3f}", "n/a")] for r in done]
    parts.append("<h2>Latency</h2>")
    parts.append(_table(["backend", "prefill ms", "decode ms/step p50", "p99", "tokens/s", "peak device MB",
                         "roofline %", "roofline floor ms/step"], rows))
    failures = [f"<li><b>{escape(r['label'])}</b>: {escape(f)}</li>" for r in result["backends"] for f in r["failures"]]
    skipped = [f"<li><b>{escape(r['label'])}</b>: {escape(r['reason'] or '')}</li>"
               for r in result["backends"] if r["status"] == "skipped"]
    if failures:
        parts.append(f"<h2>Failures</h2><ul>{''.join(failures)}</ul>")
    if skipped:
        parts.append(f"<h2>Skipped</h2><ul>{''.join(skipped)}</ul>")
    parts.append("<h2>Plots</h2>")
    parts.append(svg.line_chart(
        {r["label"]: [(0, r["logits"]["prefill"]["max_rel"])] + [(d["step"], d["max_rel"]) for d in r["logits"]["decode_steps"]]
         for r in done}, "logit error per decode step (0 = prefill)", "decode step", "max err / logit scale",
        floor=1e-9))
    parts.append(svg.box_plot({r["label"]: r["latency"]["step_ms"] for r in done},
                              "decode step latency (p1 / quartiles / median / p99)", "ms per step"))
    if any(r["roofline"]["percent"] is not None for r in done):
        parts.append(svg.bar_chart({r["label"]: r["roofline"]["percent"] for r in done},
                                   "HBM roofline (bytes needed per step / peak, over p50 step time)", "% of roofline"))
    else:
        parts.append("<p>Roofline: n/a (no backend ran on a GPU of the HBM table).</p>")
    for r in done:
        pl = r.get("per_layer")
        if not pl:
            continue
        parts.append(f"<h2>Per-layer drift: {escape(r['label'])}</h2><p>bound {pl['bound_rel']:.0e} (max abs / "
                     f"tensor scale); first layer out: {pl['first_bad_layer'] if pl['first_bad_layer'] is not None else 'none'}"
                     f"{' (' + escape(pl['first_bad_tensor']) + ')' if pl['first_bad_tensor'] else ''}. "
                     f"{escape('; '.join(pl['methods']))}.</p>")
        parts.append(_table(["layer", "kind", "max err / scale", "max abs", "worst tensor", "ok"],
                            [[str(l["layer"]), escape(l["kind"]), _f(l["max_rel"]), _f(l["max_abs"]),
                              escape(l["worst_tensor"]), "yes" if l["ok"] else "<b class='failed'>no</b>"]
                             for l in pl["layers"]]))
        for note in pl["notes"]:
            parts.append(f"<p>{escape(note)}</p>")
    parts.append("<h2>Backends</h2><pre>" + escape(json.dumps({r["label"]: r["describe"] for r in done}, indent=1))
                 + "</pre></body></html>")
    return "\n".join(p for p in parts if p)
