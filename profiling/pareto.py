"""The bits-against-quality Pareto study: per preset, measured bits per number, teacher-forced agreement and KL
against the full cache, passkey accuracy and decode step time; the Pareto front and its plotly figure.

A preset is on the front when no other preset stores fewer (or as many) bits per number with at least its quality
and is strictly better in one of the two.
"""

from __future__ import annotations

import statistics
import time

import plotly.graph_objects as go
import torch

import qjl
from qjl.cache import model_head_dim
from qjl.presets import stored_bits
from qjl.runner import cache_kwarg, fork, prefill, synchronize

from .figures import LAYOUT
from .quality import passkey, teacher_forced

METHOD_COLORS = {"full": "#636efa", "qjl": "#ef553b", "kivi": "#00cc96", "turboquant": "#ab63fa",
                 "hf-quanto": "#ffa15a"}


def decode_step_time(model, input_ids: torch.Tensor, make_cache, steps: int) -> tuple[float, object]:
    """Median seconds of one greedy decode step after an exact prefill of ``input_ids`` into ``make_cache``, and
    the cache after the steps."""
    device = next(model.parameters()).device
    full, logits, _ = prefill(model, input_ids.to(device))
    cache, _ = fork(model, full, make_cache)
    del full
    token, key, times = logits.argmax(-1, keepdim=True), cache_kwarg(model), []
    with torch.no_grad():
        for _ in range(steps):
            synchronize(device)
            start = time.perf_counter()
            logits = model(input_ids=token, use_cache=True, **{key: cache}).logits[:, -1]
            synchronize(device)
            times.append(time.perf_counter() - start)
            token = logits.argmax(-1, keepdim=True)
    return statistics.median(times), cache


def measure_preset(model, tokenizer, name: str, text_ids: torch.Tensor, prefix_tokens: int, eval_tokens: int,
                   passkey_lengths, passkey_depths, step_tokens: int, steps: int, seed: int = 0) -> dict:
    """Every figure of the study for one preset (see ``qjl.list_presets`` for its settings)."""
    make_cache = lambda model: qjl.make_cache(model, name)  # noqa: E731
    info = qjl.list_presets(model_head_dim(model), model.config.num_hidden_layers)[name]
    forced = teacher_forced(model, text_ids, make_cache, prefix_tokens, eval_tokens)
    found = passkey(model, tokenizer, make_cache, passkey_lengths, passkey_depths, seed)
    # Bits are measured on the timed cache: ``step_tokens`` quantized, then ``steps`` decoded (buffer included).
    step_s, cache = decode_step_time(model, text_ids[:, :step_tokens], make_cache, steps)
    return {
        "preset": name, "method": info["method"], "settings": info["settings"],
        "bits_analytic": info["bits"],
        "bits": stored_bits(cache, float_bits=16),  # exact tokens, norms and scales counted at fp16
        "bits_as_run": stored_bits(cache),  # in the model's dtype (float32 on a CPU run)
        "top1": forced["top1"], "kl": forced["kl"], "n": forced["n"],
        "nll_full": forced["nll_full"], "nll_compressed": forced["nll_compressed"],
        "passkey": sum(r["found_compressed"] for r in found) / len(found),
        "passkey_full": sum(r["found_full"] for r in found) / len(found),
        "passkey_answers": [{k: r[k] for k in ("length", "depth", "passkey", "answers")} for r in found],
        "step_s": step_s, "step_context": step_tokens,
    }


def pareto_front(rows: list[dict], x: str = "bits", y: str = "top1", higher_is_better: bool = True) -> list[dict]:
    """The rows no other row dominates (fewer or equal ``x``, at least as good ``y``, better in one), by ``x``."""
    sign = 1 if higher_is_better else -1

    def dominates(a, b):
        return (a[x] <= b[x] and sign * a[y] >= sign * b[y]) and (a[x] < b[x] or sign * a[y] > sign * b[y])

    front = [row for row in rows if not any(dominates(other, row) for other in rows if other is not row)]
    return sorted(front, key=lambda row: row[x])


def pareto_figure(rows: list[dict], y: str = "top1", title: str | None = None) -> go.Figure:
    """Bits per number against ``y`` (top-1 agreement, higher is better; or KL, lower), one marker per preset, one
    colour per method, the Pareto front as a dashed line."""
    higher = y != "kl"
    label = {"top1": "teacher-forced top-1 agreement", "kl": "KL(full || compressed), nats",
             "passkey": "passkey accuracy"}.get(y, y)
    figure = go.Figure()
    for method in dict.fromkeys(row["method"] for row in rows):
        points = [row for row in rows if row["method"] == method]
        figure.add_trace(go.Scatter(
            x=[row["bits"] for row in points], y=[row[y] for row in points], mode="markers+text", name=method,
            text=[row["preset"] for row in points], textposition="top center",
            marker=dict(size=11, color=METHOD_COLORS.get(method))))
    front = pareto_front(rows, "bits", y, higher)
    figure.add_trace(go.Scatter(x=[row["bits"] for row in front], y=[row[y] for row in front], mode="lines",
                                name="Pareto front", line=dict(dash="dash", color="#444")))
    figure.update_layout(title=title or f"Bits per stored number against {label}",
                         xaxis_title="bits per stored number (measured, fp16 for exact tokens)", yaxis_title=label,
                         **LAYOUT)
    return figure


def markdown_table(rows: list[dict]) -> str:
    lines = ["| preset | bits/number (analytic / measured) | top-1 | KL (nats) | passkey | step time (ms) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['bits_analytic']:.2f} / {r['bits']:.2f} | {r['top1']:.3f} | "
                     f"{r['kl']:.4f} | {r['passkey']:.0%} | {1000 * r['step_s']:.1f} |")
    return "\n".join(lines)
