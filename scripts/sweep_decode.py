"""Launch choices of the fused QJL decode kernel on this GPU: pipeline stages, programs per multiprocessor and tokens per
program, at Llama-3.1-8B attention shapes (32 query heads, 8 KV heads, head dim 128, bf16) and the 3bit preset,
next to bf16 SDPA (grouped-query, and with each KV head's queries folded into rows). Times are
``triton.testing.do_bench`` (CUDA events; Python's launch overhead counts where the GPU waits for it). Prints and
writes JSON; ``max_diff`` is each choice's largest difference from the default launch.

    python scripts/sweep_decode.py OUT.json [--contexts 32768,131072] [--batches 1,8]
"""

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.decode_attention import decode_attention  # noqa: E402
from profiling.cmd_bench_kernels import HEAD_DIM, KV_HEADS, Q_HEADS, decode_bytes, qjl_layer  # noqa: E402
from qjl.backend import decode_arguments  # noqa: E402
from qjl.config import QJLConfig  # noqa: E402

TUNINGS = [dict(num_stages=s, programs_per_sm=p, min_tokens=t)
           for s, p, t in itertools.product((1, 2), (2, 3, 4, 6), (256, 1024))]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--contexts", default="32768,131072")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--preset", default="3bit")
    args = parser.parse_args()
    device = torch.device("cuda")
    config = QJLConfig.preset(args.preset, head_dim=HEAD_DIM)
    bench = lambda fn: do_bench(fn, warmup=25, rep=100)  # noqa: E731
    rows = []
    for batch, context in itertools.product(map(int, args.batches.split(",")), map(int, args.contexts.split(","))):
        gen = torch.Generator(device=device).manual_seed(context)
        k, v = (torch.randn(batch, KV_HEADS, context, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=gen)
                for _ in range(2))
        q = torch.randn(batch, Q_HEADS, 1, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=gen)
        scale = HEAD_DIM ** -0.5
        folded = q.reshape(batch, KV_HEADS, Q_HEADS // KV_HEADS, HEAD_DIM)
        row = dict(batch=batch, context=context, bytes=decode_bytes(config, batch, context),
                   sdpa_gqa_ms=bench(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)),
                   sdpa_folded_ms=bench(lambda: F.scaled_dot_product_attention(folded, k, v, scale=scale)))
        layer = qjl_layer(config, k, v)
        del k, v
        fused_args = decode_arguments(layer, q, scale)
        reference = decode_attention(*fused_args).float()
        row["tunings"] = []
        for tuning in TUNINGS:
            out = decode_attention(*fused_args, tuning=tuning)
            ms = bench(lambda: decode_attention(*fused_args, tuning=tuning))
            row["tunings"].append(dict(tuning, ms=ms, max_diff=(out.float() - reference).abs().max().item()))
        best = min(row["tunings"], key=lambda t: t["ms"])
        sdpa = min(row["sdpa_gqa_ms"], row["sdpa_folded_ms"])
        print(f"batch {batch} context {context}: sdpa gqa {row['sdpa_gqa_ms']:.4f} folded {row['sdpa_folded_ms']:.4f}"
              f" best {best} ({sdpa / best['ms']:.2f}x sdpa, "
              f"{row['bytes']['qjl'] / best['ms'] / 1e6:.0f} GB/s)", flush=True)
        for t in row["tunings"]:
            print("   ", t, flush=True)
        rows.append(row)
        del layer, fused_args
        torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), preset=args.preset, rows=rows), indent=1))


if __name__ == "__main__":
    main()
