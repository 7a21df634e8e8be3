"""Plotly figures from records: the runner's step records (live, redrawn by the app during a run), memory samples,
sweeps over context length, teacher-forced agreement, the passkey grid and exact-against-estimated scores.

Inputs are lists of dicts (or the runner's dataclasses); every function returns a ``plotly.graph_objects.Figure``.
"""

from __future__ import annotations

import plotly.graph_objects as go

from .records import as_dict, as_dicts

MIB = 2 ** 20
COLORS = {"full": "#636efa", "compressed": "#ef553b"}
LAYOUT = dict(template="plotly_white", margin=dict(l=60, r=20, t=50, b=50), legend=dict(orientation="h", y=-0.2))


def _figure(title: str, x_title: str, y_title: str) -> go.Figure:
    figure = go.Figure()
    figure.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, **LAYOUT)
    return figure


def _series(rows: list[dict], key: str) -> dict[str, list[dict]]:
    """Rows grouped by ``row[key]``, in first-seen order."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(str(row[key]), []).append(row)
    return groups


# --- live figures of one run (step records) ----------------------------------------------------------------------------
def live_memory(step_records, prefill_record=None) -> go.Figure:
    """KV-cache bytes of both sides against context length, with the full/compressed ratio on a second axis."""
    rows = ([as_dict(prefill_record) | {"context_tokens": as_dict(prefill_record)["prompt_tokens"]}]
            if prefill_record is not None else []) + as_dicts(step_records)
    x = [r["context_tokens"] for r in rows]
    figure = _figure("KV cache memory", "context (tokens)", "KV cache (MiB)")
    for side in ("full", "compressed"):
        figure.add_scatter(x=x, y=[r[f"bytes_{side}"] / MIB for r in rows], name=side, mode="lines+markers",
                           line_color=COLORS[side])
    figure.add_scatter(x=x, y=[r["bytes_full"] / r["bytes_compressed"] if r["bytes_compressed"] else None
                               for r in rows], name="ratio full / compressed", yaxis="y2", mode="lines",
                       line=dict(dash="dot", color="gray"))
    figure.update_layout(yaxis2=dict(title="ratio", overlaying="y", side="right", rangemode="tozero"))
    return figure


def live_latency(step_records) -> go.Figure:
    """Per-token decode latency of each side (ms) and the tokens per second so far."""
    rows = as_dicts(step_records)
    figure = _figure("Decode latency", "step", "latency per token (ms)")
    for side in ("full", "compressed"):
        key = f"latency_{side}_s"
        steps = [r for r in rows if r[key]]
        figure.add_scatter(x=[r["step"] for r in steps], y=[1000 * r[key] for r in steps], name=side,
                           mode="lines+markers", line_color=COLORS[side])
        total, rates = 0.0, []
        for count, r in enumerate(steps, 1):
            total += r[key]
            rates.append(count / total)
        figure.add_scatter(x=[r["step"] for r in steps], y=rates, name=f"{side} tokens/s", yaxis="y2",
                           mode="lines", line=dict(dash="dot", color=COLORS[side]))
    figure.update_layout(yaxis2=dict(title="tokens per second", overlaying="y", side="right", rangemode="tozero"))
    return figure


def live_agreement(step_records) -> go.Figure:
    """Running match rate of the generated tokens, with the first divergence marked."""
    rows = as_dicts(step_records)
    figure = _figure("Agreement so far", "step", "token match rate")
    figure.add_scatter(x=[r["step"] for r in rows], y=[r["match_rate"] for r in rows], name="match rate",
                       mode="lines+markers", line_color=COLORS["compressed"])
    divergence = rows[-1]["first_divergence"] if rows else None
    if divergence is not None:
        figure.add_vline(x=divergence, line_dash="dash", annotation_text=f"first divergence (step {divergence})")
    figure.update_yaxes(range=[0, 1.05])
    return figure


# --- figures of profiling runs ------------------------------------------------------------------------------------------
def memory_over_time(samples, info: dict | None = None) -> go.Figure:
    """Memory samples of ``MemorySampler``: every field that was measured, in MiB, against time."""
    rows = as_dicts(samples)
    source = (info or {}).get("source")
    title = "Memory over time" + (" (process RSS: no GPU/NVML)" if source == "rss" else "")
    figure = _figure(title, "time (s)", "MiB")
    names = {"device_used_bytes": "device used", "process_device_bytes": "this process on the device",
             "torch_allocated_bytes": "torch allocated", "torch_reserved_bytes": "torch reserved",
             "rss_bytes": "process RSS"}
    for key, name in names.items():
        if any(r.get(key) is not None for r in rows):
            figure.add_scatter(x=[r["t"] for r in rows], y=[r[key] / MIB if r.get(key) is not None else None
                                                            for r in rows], name=name, mode="lines")
    return figure


def kv_bytes_vs_context(rows) -> go.Figure:
    """Rows ``{cache, context_tokens, bytes}``: KV bytes against context length, one line per cache."""
    figure = _figure("KV cache size against context", "context (tokens)", "KV cache (MiB)")
    for name, group in _series(as_dicts(rows), "cache").items():
        figure.add_scatter(x=[r["context_tokens"] for r in group], y=[r["bytes"] / MIB for r in group], name=name,
                           mode="lines+markers")
    return figure


def latency_vs_context(rows) -> go.Figure:
    """Rows ``{cache, context_tokens, latency_s}``: decode latency per token against context, one line per cache."""
    figure = _figure("Decode latency against context", "context (tokens)", "latency per token (ms)")
    for name, group in _series(as_dicts(rows), "cache").items():
        figure.add_scatter(x=[r["context_tokens"] for r in group], y=[1000 * r["latency_s"] for r in group],
                           name=name, mode="lines+markers")
    return figure


def agreement_over_steps(results: dict) -> go.Figure:
    """``{cache name: teacher_forced(...) result}``: running top-1 agreement and per-step KL over the eval steps."""
    figure = _figure("Teacher-forced agreement with the full cache", "step", "top-1 agreement (running mean)")
    for name, result in results.items():
        steps = result["steps"]
        running, total = [], 0.0
        for count, s in enumerate(steps, 1):
            total += s["top1"]
            running.append(total / count)
        figure.add_scatter(x=[s["step"] for s in steps], y=running, name=f"{name} top-1", mode="lines")
        figure.add_scatter(x=[s["step"] for s in steps], y=[s["kl"] for s in steps], name=f"{name} KL", yaxis="y2",
                           mode="lines", line=dict(dash="dot"))
    figure.update_layout(yaxis=dict(range=[0, 1.05]),
                         yaxis2=dict(title="KL(full || compressed) (nats)", overlaying="y", side="right"))
    return figure


def passkey_heatmap(results, side: str = "compressed", title: str | None = None) -> go.Figure:
    """``passkey(...)`` results: found (1) or not (0) over prompt length and depth, for ``side``."""
    rows = as_dicts(results)
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    found = {(r["length"], r["depth"]): float(r[f"found_{side}"]) for r in rows}
    figure = go.Figure(go.Heatmap(z=[[found.get((length, depth)) for length in lengths] for depth in depths],
                                  x=[str(length) for length in lengths], y=[f"{depth:.0%}" for depth in depths],
                                  zmin=0, zmax=1, colorscale=[[0, "#ef553b"], [1, "#00cc96"]], showscale=False))
    figure.update_layout(title=title or f"Passkey retrieval ({side})", xaxis_title="prompt (tokens)",
                         yaxis_title="depth of the key", **LAYOUT)
    return figure


def score_scatter(results) -> go.Figure:
    """``attention_score_error(...)`` results: estimated against exact ``q . k``, one colour per layer, with y = x."""
    rows = as_dicts(results)
    figure = _figure("Attention scores: exact against estimated", "exact q.k", "estimated q.k")
    low = min((min(r["exact"]) for r in rows if r["exact"]), default=0.0)
    high = max((max(r["exact"]) for r in rows if r["exact"]), default=1.0)
    for r in rows:
        figure.add_scatter(x=r["exact"], y=r["estimated"], mode="markers", marker=dict(size=3, opacity=0.5),
                           name=f"layer {r['layer']} (rel. err {r['relative_error']:.2f}, r={r['correlation']:.3f})")
    figure.add_scatter(x=[low, high], y=[low, high], mode="lines", name="y = x", line=dict(color="black", dash="dash"))
    return figure
