"""Decode-attention benchmark of one layer with Llama-3.1-8B attention shapes (32 query heads, 8 KV heads, head dim
128, bf16): bf16 SDPA over a full cache, the fused QJL kernel, the QJL torch reference, transformers' QuantizedCache
where optimum-quanto is installed; the bytes each decode step
reads and the achieved bandwidth next to the measured copy bandwidth (GPU times are CUDA-graph replays with the L2
cache cold, as each layer of a decoding step finds it: ``graph_ms``); prompt quantization next to prefill attention;
and the largest context a whole 32-layer model's KV cache fits in. On a CPU the bytes model still runs (at a nominal
bandwidth) and the torch reference is timed on the small contexts, so the path stays exercised.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from pathlib import Path

HELP = "benchmark QJL decode attention (fused kernel, torch reference) against bf16 SDPA; bytes model; JSON + plot"

Q_HEADS, KV_HEADS, HEAD_DIM, LAYERS = 32, 8, 128, 32
NOMINAL = {"bandwidth_gbs": 3350.0, "memory_gib": 80.0}  # H100 SXM, used where no GPU is measured


def add_arguments(parser):
    parser.add_argument("--contexts", default="1024,4096,16384,32768,65536,131072")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--preset", default="3bit", help="QJL preset (see qjl.config.PRESETS)")
    parser.add_argument("--cpu-max-context", type=int, default=1024, help="largest context timed on a CPU")
    parser.add_argument("--prefill-max-context", type=int, default=32768, help="largest context of the prefill timing")
    parser.add_argument("--out", type=Path, default=Path("profiling/results/bench-kernels"))
    parser.add_argument("--quanto-built-only", action="store_true",
                        help="on a GPU, time transformers' QuantizedCache only in rows that find optimum-quanto's CUDA "
                             "extension built (its first use builds it, minutes of nvcc; scripts/gpu-check.sh builds "
                             "it beside the tests)")
    parser.add_argument("--figure-from", type=Path, metavar="RESULTS_JSON",
                        help="only draw the figure of an earlier run's results.json (written where plotly was "
                             "missing, as on a bare GPU box) into --out")


def timer(device):
    """Milliseconds of ``fn``: triton's do_bench (CUDA events, warm-up) on a GPU, a wall-clock median on a CPU."""
    import torch

    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=100)

    def cpu(fn):
        fn()
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            runs.append((time.perf_counter() - start) * 1e3)
        return sorted(runs)[1]

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    return cpu


# A decoding step reads each layer's cache once, and the other layers' weights and caches pass through the L2 cache
# in between, so each layer's read starts cold. One copy of the inputs replayed would instead find what the last call
# read still in L2 wherever it fits: the QJL cache at batch 1 and 32k tokens is 23 MB, the H100's L2 50 MB, the bf16
# cache 134 MB. So timed calls take copies of their inputs in turn, enough copies that between two reads of one byte
# this many L2 caches' worth of data is read.
COLD_L2 = 3


def cold_copies(nbytes: int, device) -> int:
    """How many copies of inputs of ``nbytes`` make ``COLD_L2`` L2 caches of reads between two reads of a byte."""
    from kernels.common import l2_cache_bytes

    return max(1, math.ceil(COLD_L2 * l2_cache_bytes(device) / nbytes))


def cold_inputs(make, nbytes: int, device, first=None) -> list:
    """``cold_copies`` copies of inputs of ``nbytes``: ``first`` (the inputs themselves, where given) and calls of
    ``make`` for the rest."""
    count = cold_copies(nbytes, device)
    return [first if first is not None else make()] + [make() for _ in range(count - 1)]


def graph_ms(calls, rep: int = 100) -> float | None:
    """Milliseconds of one of ``calls`` replayed from a CUDA graph, the calls in turn (each on its own copy of the
    inputs, ``cold_copies``): GPU time without Python's launch overhead, as a decoding loop captured in a graph runs,
    with the L2 cache as cold as a layer finds it. Each call runs once first, so that what a copy makes on its first
    call (a sketch's tables, ``kernels.decode_project.sketch_tables``) is not captured and replayed. None where the
    calls cannot be captured. ``rep``: milliseconds each of do_bench_cudagraph's replays takes."""
    import torch
    from triton.testing import do_bench_cudagraph

    turn = itertools.cycle(calls)
    try:
        for call in calls:
            call()
        return do_bench_cudagraph(lambda: next(turn)(), rep=rep)
    except (RuntimeError, torch.cuda.CudaError):  # not capturable
        torch.cuda.synchronize()
        return None


def copy_bandwidth_gbs(device, measure) -> float:
    import torch

    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / measure(lambda: dst.copy_(src)) / 1e6


def decode_bytes(config, batch: int, context: int, decoded: int = 0) -> dict:
    """Bytes one decode step of one layer reads: the full bf16 cache, and QJL's compressed state (with the keys'
    mean, read where there are compressed tokens) plus its exact tokens (sink and buffer, bf16), from the config's
    own bit counts, for the tokens a layer holds once it took the ``context``-token prompt and ``decoded`` tokens
    after it (``qjl.layer.prompt_split``), as the layers this benchmark times do."""
    from qjl.layer import prompt_split

    compressed, exact = prompt_split(context, config.sink_tokens, config.buffer_size, config.group_size,
                                     config.buffer_keep, decoded)
    per_token_bits = config.key_bits_per_token(config.initial_layers) + config.value_bits_per_token(HEAD_DIM)
    heads = batch * KV_HEADS
    full = heads * (context + decoded) * HEAD_DIM * 2 * 2
    mean = HEAD_DIM * 2 if config.center_keys and compressed else 0
    qjl = heads * (compressed * per_token_bits / 8 + mean + exact * HEAD_DIM * 2 * 2)
    return dict(full=int(full), qjl=int(math.ceil(qjl)), compressed_tokens=compressed, exact_tokens=exact)


def qjl_layer(config, keys, values, decoded: int = 0, layer_idx: int | None = None):
    """A layer holding ``keys``/``values`` as the prompt (quantized through the active backend), then ``decoded``
    random tokens of the same dtype, one ``update`` each, as decoding appends them; at ``layer_idx`` (by default the
    first past the initial layers' wider sketches), which seeds its sketch."""
    import torch

    from qjl.cache import QJLLayer

    layer = QJLLayer(config, layer_idx=config.initial_layers if layer_idx is None else layer_idx)
    layer.update(keys, values)
    gen = torch.Generator(device=keys.device).manual_seed(decoded)
    b, h, _, d = keys.shape
    for _ in range(decoded):
        token_k, token_v = (torch.randn(b, h, 1, d, generator=gen, device=keys.device, dtype=keys.dtype)
                            for _ in range(2))
        layer.update(token_k, token_v)
    return layer


def layer_copies(config, keys, values, nbytes: int, device, first=None, decoded: int = 0) -> list:
    """``cold_inputs`` of ``qjl_layer``s holding ``keys``/``values`` (and ``decoded`` tokens), ``first`` (a layer at
    the default index) among them where given, each at a layer index of its own: a model's layers each draw their
    own sketch (``qjl.cache.QJLLayer`` seeds it by the layer's index) and read it once a step, as cold as their caches,
    where copies sharing one sketch would find its tables in L2. Indices from ``config.initial_layers`` on share one
    sketch width."""
    indices = itertools.count(config.initial_layers + (first is not None))
    return cold_inputs(lambda: qjl_layer(config, keys, values, decoded, next(indices)), nbytes, device, first)


def buffer_filling(config, context: int) -> int:
    """Tokens to decode after a ``context``-token prompt until the buffer holds one short of a flush: the most exact
    tokens a decoding step reads (from the first flush on, steps cycle through buffers of up to ``buffer_size - 1``
    tokens; the prompt leaves fewer, a remainder of the group)."""
    from qjl.layer import prompt_split

    _, exact = prompt_split(context, config.sink_tokens, config.buffer_size, config.group_size, config.buffer_keep)
    sink = min(context, config.sink_tokens)
    return config.sink_tokens - sink + max(config.buffer_size - 1 - (exact - sink), 0)


def quantized_cache_step_ms(k, v, q, scale: float) -> float:
    """transformers' ``QuantizedCache`` decode path on optimum-quanto, at the ``hf-quanto-4bit`` preset's settings:
    the mean time of one step (dequantize the whole cache, attend) over one cycle of its exact buffer, whose last step
    re-quantizes the whole cache. Wall clock around the cycle: the path is host-bound as much as device-bound."""
    import torch
    import torch.nn.functional as F
    from transformers.cache_utils import QuantoQuantizedLayer

    from qjl.presets import QuantoConfig

    config = QuantoConfig(bits=4)
    layer = QuantoQuantizedLayer(nbits=config.bits, q_group_size=config.group_size,
                                 residual_length=config.buffer_size)
    layer.update(k, v)  # the prompt, quantized
    token_k, token_v = k[:, :, -1:], v[:, :, -1:]

    def step():
        keys, values = layer.update(token_k, token_v)
        return F.scaled_dot_product_attention(q, keys, values, scale=scale, enable_gqa=True)

    step()
    if k.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(config.buffer_size):
        step()
    if k.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / config.buffer_size


def quanto_extension_built() -> bool:
    """Whether optimum-quanto's CUDA extension is built for this torch: quanto (0.2.7) builds it on its first CUDA
    use, then writes the torch version into its build folder."""
    import importlib.util

    import torch

    spec = importlib.util.find_spec("optimum.quanto")
    version = Path(spec.origin).parent / "library" / "extensions" / "cuda" / "build" / "pytorch_version.txt"
    return version.is_file() and version.read_text().strip() == torch.__version__


def quantized_cache_note(rows) -> str:
    """What the rows say about transformers' QuantizedCache: measured (in how many rows), failed (the first error),
    or not installed."""
    from qjl.presets import quanto_available

    if not quanto_available():
        return "not measured: optimum-quanto is not installed"
    errors = [r["quantized_cache_error"] for r in rows if "quantized_cache_error" in r]
    if errors:
        return f"failed in {len(errors)} of {len(rows)} rows: {errors[0]}"
    skipped = sum("quantized_cache_skipped" in r for r in rows)
    measured = "quantized_cache_ms: transformers' QuantizedCache on optimum-quanto, 4 bits"
    if skipped:
        return (f"{measured}, in {len(rows) - skipped} of {len(rows)} rows: the others ran before optimum-quanto's "
                "CUDA extension was built (--quanto-built-only)")
    return measured


def decode_inputs(batch: int, context: int, device, gen=None):
    """bf16 keys and values ``[batch, KV_HEADS, context, HEAD_DIM]`` and one decode token's queries ``[batch,
    Q_HEADS, 1, HEAD_DIM]``, random: what every decode timing here runs on. Drawn from ``gen`` (a caller's further
    draws continue it), by default a generator seeded by the context."""
    import torch

    if gen is None:
        gen = torch.Generator(device=device).manual_seed(context)
    k, v = (torch.randn(batch, KV_HEADS, context, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=gen)
            for _ in range(2))
    q = torch.randn(batch, Q_HEADS, 1, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=gen)
    return q, k, v


def sdpa_calls(q, k, v, scale: float) -> dict:
    """Two ways to ask SDPA for grouped-query decoding of one token, ``{"gqa": fn, "folded": fn}``; the faster is the
    baseline. Folding each KV head's queries into rows is exact for one query token and lets the flash kernel run
    without repeating keys."""
    import torch.nn.functional as F

    batch, kv_heads, _, head_dim = k.shape
    folded = q.reshape(batch, kv_heads, q.shape[1] // kv_heads, head_dim)
    return {"gqa": lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True),
            "folded": lambda: F.scaled_dot_product_attention(folded, k, v, scale=scale)}


def sdpa_graph_ms(q, k, v, scale: float, names=("gqa", "folded")) -> dict:
    """``graph_ms`` of ``sdpa_calls``' ``names``, each call on its own copy of the bf16 cache (``cold_inputs``)."""
    nbytes = sum(t.numel() * t.element_size() for t in (k, v))
    copies = cold_inputs(lambda: (k.clone(), v.clone()), nbytes, k.device, first=(k, v))
    return {name: graph_ms([sdpa_calls(q, *kv, scale)[name] for kv in copies]) for name in names}


def measure_row(config, batch, context, device, measure, timed: bool, prefill: bool,
                quanto_built_only: bool = False) -> dict:
    import torch
    import torch.nn.functional as F

    from qjl import backend
    from qjl.presets import quanto_available

    row = dict(batch=batch, context=context, bytes=decode_bytes(config, batch, context))
    if not timed:
        return row
    gen = torch.Generator(device=device).manual_seed(context)
    q, k, v = decode_inputs(batch, context, device, gen)
    scale = HEAD_DIM ** -0.5
    sdpa = sdpa_calls(q, k, v, scale)
    for name, fn in sdpa.items():
        row[f"sdpa_{name}_ms"] = measure(fn)
    fastest = min(sdpa, key=lambda name: row[f"sdpa_{name}_ms"])
    row["sdpa_ms"] = row[f"sdpa_{fastest}_ms"]
    if device.type == "cuda":
        row["cold_copies"] = dict(sdpa=cold_copies(row["bytes"]["full"], device),
                                  qjl_fused=cold_copies(row["bytes"]["qjl"], device))
        row["sdpa_graph_ms"] = sdpa_graph_ms(q, k, v, scale, (fastest,))[fastest]
    layer = None
    try:
        start = time.perf_counter()
        layer = qjl_layer(config, k, v)
        if device.type == "cuda":
            torch.cuda.synchronize()
            row["quantize_ms"] = measure(lambda: qjl_layer(config, k, v))
        else:
            row["quantize_ms"] = (time.perf_counter() - start) * 1e3
        if backend.use_triton(q):
            row["qjl_fused_ms"] = measure(lambda: layer.attend(q, None, scale))
        if backend.use_triton(q) and device.type == "cuda":
            layers = layer_copies(config, k, v, row["bytes"]["qjl"], device, first=layer)
            row["qjl_fused_graph_ms"] = graph_ms([lambda layer=layer: layer.attend(q, None, scale)
                                                  for layer in layers])
            layers = None
        os.environ["QJL_BACKEND"] = "torch"
        row["qjl_torch_ms"] = measure(lambda: layer.attend(q, None, scale))
    except torch.OutOfMemoryError:
        row["oom"] = True
    finally:
        os.environ.pop("QJL_BACKEND", None)
    if quanto_available():
        if quanto_built_only and device.type == "cuda" and not quanto_extension_built():
            row["quantized_cache_skipped"] = "optimum-quanto's CUDA extension not built yet"
        else:
            try:
                row["quantized_cache_ms"] = quantized_cache_step_ms(k, v, q, scale)
            except Exception as error:  # noqa: BLE001  third-party: e.g. quanto's CUDA extension needs ninja, nvcc
                row["quantized_cache_error"] = f"{type(error).__name__}: {error}"[:300]
    if prefill:
        qp = torch.randn(batch, Q_HEADS, context, HEAD_DIM, device=device, dtype=k.dtype, generator=gen)
        row["prefill_attention_ms"] = measure(
            lambda: F.scaled_dot_product_attention(qp, k, v, is_causal=True, scale=scale, enable_gqa=True))
        qp = None  # frees the queries (a del would unbind a name the lambda reads)
    for name, nbytes in (("sdpa", row["bytes"]["full"]), ("qjl_fused", row["bytes"]["qjl"])):
        for timing in ("", "_graph"):
            if row.get(f"{name}{timing}_ms"):
                row[f"{name}{timing}_gbs"] = nbytes / row[f"{name}{timing}_ms"] / 1e6
    layer = k = v = None  # frees the cache before empty_cache (a del would unbind names the lambdas read)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def largest_context(config, memory_bytes: float) -> dict:
    """Largest context whose KV cache alone fits, for a 32-layer 8B-shaped model at batch 1."""
    bf16 = LAYERS * KV_HEADS * HEAD_DIM * 2 * 2
    qjl = LAYERS * KV_HEADS * (config.key_bits_per_token(config.initial_layers)
                                + config.value_bits_per_token(HEAD_DIM)) / 8
    return dict(bf16=int(memory_bytes // bf16), qjl=int(memory_bytes // qjl))


def figure(result, path: Path) -> bool:
    """Decode-step time against context, per batch: CUDA-graph times where the run has them (GPU time), else the
    plain timer's. Writes ``path`` (HTML) and a PNG beside it where kaleido and a Chromium are at hand."""
    try:
        import plotly.graph_objects as go
    except ImportError:
        return False
    from .export import PNGUnavailable, write_html, write_png

    graphs = any(r.get("qjl_fused_graph_ms") for r in result["rows"])
    fig = go.Figure()
    for batch in sorted({r["batch"] for r in result["rows"]}):
        rows = [r for r in result["rows"] if r["batch"] == batch]
        for key, label in (("sdpa", "bf16 SDPA"), ("qjl_fused", "QJL fused"), ("qjl_torch", "QJL torch"),
                           ("quantized_cache", "transformers QuantizedCache (quanto, 4 bits)")):
            graphed = graphs and key in ("sdpa", "qjl_fused")
            points = [(r["context"], r.get(f"{key}_graph_ms") if graphed else r.get(f"{key}_ms")) for r in rows]
            points = [p for p in points if p[1]]
            if points:
                fig.add_scatter(x=[p[0] for p in points], y=[p[1] for p in points], name=f"{label}, batch {batch}")
        bw = result["bandwidth_gbs"]
        fig.add_scatter(x=[r["context"] for r in rows], y=[r["bytes"]["qjl"] / bw / 1e6 for r in rows],
                        name=f"QJL bytes at copy bandwidth, batch {batch}", line=dict(dash="dot"))
    timing = ("CUDA graphs, each call on its own copy of the inputs (L2 cold); QJL torch: CUDA events; "
              "QuantizedCache: wall clock" if graphs else "median of runs")
    title = f"One decode step of one layer, Llama-3.1-8B shapes<br><sup>{result['device']}; {timing}</sup>"
    fig.update_layout(title=title,
                      xaxis_type="log", yaxis_type="log", xaxis_title="context (tokens)", yaxis_title="ms")
    write_html(fig, path)
    try:
        write_png(fig, path.with_suffix(".png"))
    except PNGUnavailable as error:
        print(f"no PNG: {error}")
    return True


def run(args) -> int:
    if args.figure_from:
        args.out.mkdir(parents=True, exist_ok=True)
        if not figure(json.loads(args.figure_from.read_text()), args.out / "figure.html"):
            raise SystemExit("drawing the figure needs plotly: pip install plotly")
        print(f"wrote {args.out / 'figure.html'}")
        return 0
    import torch

    from qjl import backend
    from qjl.config import QJLConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    measure = timer(device)
    config = QJLConfig.preset(args.preset, head_dim=HEAD_DIM)
    if device.type == "cuda":
        bandwidth, memory = copy_bandwidth_gbs(device, measure), torch.cuda.mem_get_info(device)[1]
        name, measured = torch.cuda.get_device_name(device), True
    else:
        bandwidth, memory = NOMINAL["bandwidth_gbs"], NOMINAL["memory_gib"] * 2**30
        name, measured = "cpu (bytes model at H100 nominal bandwidth and memory)", False
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        for context in [int(c) for c in args.contexts.split(",")]:
            timed = device.type == "cuda" or context <= args.cpu_max_context
            prefill = batch == 1 and context <= args.prefill_max_context
            row = measure_row(config, batch, context, device, measure, timed, prefill, args.quanto_built_only)
            for key in ("full", "qjl"):
                row[f"{key}_bytes_at_bandwidth_ms"] = row["bytes"][key] / bandwidth / 1e6
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = dict(device=name, bandwidth_measured=measured, bandwidth_gbs=bandwidth, memory_bytes=memory,
                  backend=backend.name(device), preset=args.preset, config=config.__dict__, torch=torch.__version__,
                  shapes=dict(q_heads=Q_HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, layers=LAYERS),
                  largest_context=largest_context(config, memory), cold_l2=COLD_L2, rows=rows,
                  quantized_cache=quantized_cache_note(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    drew = figure(result, args.out / "figure.html")
    print(f"wrote {args.out / 'results.json'}" + ("" if drew else " (plotly absent: no figure)"))
    return 0
