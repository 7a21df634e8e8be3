"""``sweep``: KV-cache bytes and decode latency against context length, for the full cache and each preset.

Per length, the long document's first tokens are prefilled once (exact) and copied into every compressed cache;
then each cache decodes ``--steps`` further tokens of the document, timed one by one (device-synchronised); the
latency reported is the median.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from tqdm.auto import tqdm

from qjl.runner import cache_kwarg, cache_nbytes, fork, prefill, synchronize

from . import cli, figures
from .caches import FULL, factory

HELP = "KV bytes and decode latency against context length, full cache and each preset"


def add_arguments(parser):
    cli.add_common(parser, out="results/sweep", presets="all", lengths="256,512,1024,2048")
    parser.add_argument("--steps", type=int, default=3, help="decode steps timed per length and cache")


def decode_latency(model, cache, tokens: torch.Tensor) -> float:
    """Median seconds of one decode step, feeding ``tokens`` ``[1, n]`` one at a time."""
    device, key, times = tokens.device, cache_kwarg(model), []
    with torch.no_grad():
        for i in range(tokens.shape[1]):
            synchronize(device)
            start = time.perf_counter()
            model(input_ids=tokens[:, i:i + 1], use_cache=True, **{key: cache})
            synchronize(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(args) -> int:
    import assets

    model, tokenizer = cli.load(args)
    device = next(model.parameters()).device
    ids = tokenizer(assets.long_text(), return_tensors="pt")["input_ids"].to(device)
    if max(args.lengths) + args.steps > ids.shape[1]:
        raise SystemExit(f"the longest length must be at most {ids.shape[1] - args.steps} tokens (the long text)")
    names = cli.presets(args)
    rows = []
    for length in tqdm(args.lengths, desc="lengths", file=sys.stderr):
        full, _, _ = prefill(model, ids[:, :length])
        caches = {name: fork(model, full, factory(name))[0] for name in names if name != FULL}
        fp16_bytes = next(iter(caches.values())).fp16_nbytes() if caches else None
        new_tokens = ids[:, length:length + args.steps]
        for name, cache in [(FULL, full)] + list(caches.items()):
            nbytes = cache_nbytes(cache)
            rows.append({"cache": name, "context_tokens": length, "bytes": nbytes, "fp16_bytes": fp16_bytes,
                         "reduction_vs_fp16": fp16_bytes / nbytes if fp16_bytes else None,
                         "latency_s": decode_latency(model, cache, new_tokens)})
            print(f"{length:>6} {name:>16}: {nbytes / 2**20:8.2f} MiB, {1000 * rows[-1]['latency_s']:7.1f} ms/token",
                  file=sys.stderr)
    all_figures = {"kv-bytes-vs-context": figures.kv_bytes_vs_context(rows),
                   "latency-vs-context": figures.latency_vs_context(rows)}
    config = {"presets": names, "lengths": args.lengths, "steps": args.steps, "text": "assets/gpl-3.0.txt"}
    cli.write_results(args, "sweep", config, rows, all_figures, model)
    return 0
