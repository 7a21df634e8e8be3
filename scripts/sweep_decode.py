"""Launch choices of the fused QJL decode kernel on this GPU: pipeline stages, warps per program, register cap,
prefetch of per-token numbers, the exact tokens' tile, programs per multiprocessor, the splits' L2 prefetch, the
queries' projection in column blocks and both limbs in one sign product, at
Llama-3.1-8B attention shapes (32 query heads, 8 KV heads, head dim 128, bf16) and the 3bit preset, next to bf16 SDPA
(grouped-query, and with each KV head's queries folded into rows). Times are CUDA-graph replays
(``triton.testing.do_bench_cudagraph``), as in ``bench-kernels``. Prints and writes JSON; ``max_diff`` is each
choice's largest difference from the default launch, ``resident`` the programs a multiprocessor holds.

A kernel to compare against, where one is wanted, goes beside the current one before the run (untracked files travel
to a GPU machine; its history does not), and is timed at its own defaults on the same card:

    bash scripts/decode_baseline.sh COMMIT
    python scripts/sweep_decode.py OUT.json [--contexts 32768,131072] [--batches 1,8]
"""

import argparse
import importlib
import itertools
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench_cudagraph

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.common import multiprocessors  # noqa: E402
from kernels.decode_attention import INTERPRETER_PROGRAMS_PER_SM, RESIDENT_PROGRAMS, decode_attention  # noqa: E402
from profiling.cmd_bench_kernels import (  # noqa: E402
    HEAD_DIM,
    KV_HEADS,
    decode_bytes,
    decode_inputs,
    qjl_layer,
    sdpa_calls,
)
from qjl.backend import decode_arguments  # noqa: E402
from qjl.config import QJLConfig  # noqa: E402

# Launch choices beside the default (``launch_config``: two stages and a cap of 168 registers at the benchmark's
# shapes, six programs a multiprocessor; two warps, per-token numbers a tile ahead, PTX bit unpacking; one wave of the
# programs that fit), each the default with what it names changed, and each row with the programs a multiprocessor
# holds by the driver's count (``resident``). On the H100 at cb8154c the default then (three stages, a cap of 200,
# four programs a multiprocessor) took 1.00-1.17x the time of this one (profiling/results/nvidia-h100/); these are
# the ones worth re-timing when the kernel changes:
# - three stages at the cap of 168: since the exact tokens' loop keeps two, six programs still fit (27 KB of shared
#   memory each), with the next tile's copies issued a whole tile ahead (two stages issue them at the end of the tile
#   before, and the H100 then spends 14% of the kernel's stall samples at the loop's wait,
#   profiling/results/nvidia-h100/ncu-*.txt), no stack since the next tile's key norms are carried as float32 (445
#   instructions a tile against 430, Triton 3.6, sm_90);
# - seven programs a multiprocessor (a cap of 144: 14 warps, not 12), with two or three stages: the tile loop
#   compiles without stack at 144, and the exact tokens' loop too once it takes 16 tokens at a time (40 bytes of
#   stack with 32), 439 and 451 instructions a tile;
# - eight (a cap of 128), with the exact tokens' queries at their own count of rows, not padded to 16: with three
#   stages no stack, 461 instructions a tile; with two 16 bytes of stack (values held across the tile loop, none of
#   it in the loop);
# - each split asking the L2 cache for its first tokens before it waits for the projection (``l2_prefetch``: the
#   share of the L2 cache all splits' requests may fill; at a half, the whole of every split at batch 1 and 32k
#   tokens, 23 MB): alone, with the step's kernels launched one after another (which tells what comes of fetching
#   while the projection runs from what comes of the tile loop finding the tokens in L2), and with seven and eight
#   programs at three stages;
# - the queries' projection in four programs a KV head (each a quarter of the sketch's columns: one program reads
#   all 128 KB of the sketch through one multiprocessor, at batch 1 a fixed 5.4 us of the step's 31 at 32k), alone
#   and with the L2 prefetch (which a shorter projection leaves less time);
# - both limbs of the queries' rows in one sign product a bit position (``STACKED_LIMBS``, rows 8 on the second):
#   16 tensor-core products a tile fewer, 403 instructions a tile against 430 at six programs (8 bytes of stack in
#   the exact tokens' loop), 421 against 451 at seven with three stages, 426 against 461 at eight with three, and
#   at eight with two 405 and no stack, against 451 and 16 bytes (Triton 3.6, sm_90; 3.9: 23-33 fewer, no stack):
#   alone, with seven programs at three stages and with eight at two and three;
# - no prefetch of the per-token numbers, and the step's three kernels launched one after another (not
#   programmatically, kernels.common.programmatic_launch);
# - and, per shape, the wave counting the exact tokens' programs (one split fewer a KV head, each split longer: at
#   batch 8 and 32k 11 of 3,008 tokens, not 12 of 2,752 with 40 of the 832 programs past the 792 that fit).
# Dropped from the list as consistently slower on the H100 (sweep-decode-5176db8.txt and -615d3fd.txt, against the
# default of the same run at the four shapes): no register cap (as the cap of 200, four programs) and four warps
# (1.27-1.66x the default's time), the cap of 200 alone (1.06-1.31x), one stage (1.04-1.32x) and more programs than
# fit (``programs_per_sm=8``: 1.23-1.35x), cb8154c's launch (three stages at a cap of 200, four programs:
# 1.07-1.16x) and the interpreter's element-wise unpacking in place of the PTX (1.35-1.54x; the kernel tests check the
# PTX against the reference on the GPU).
SEVEN_PROGRAMS = dict(maxnreg=144, BLOCK_EXACT=16)
EIGHT_PROGRAMS = dict(maxnreg=128, BLOCK_EXACT=16, EXACT_PADDED=False)
L2_PREFETCH = dict(l2_prefetch=0.5)
STACKED = dict(STACKED_LIMBS=True)
TUNINGS = [dict(num_stages=3), SEVEN_PROGRAMS, dict(SEVEN_PROGRAMS, num_stages=3), EIGHT_PROGRAMS,
           dict(EIGHT_PROGRAMS, num_stages=3), L2_PREFETCH, dict(L2_PREFETCH, PDL=False),
           dict(SEVEN_PROGRAMS, num_stages=3, **L2_PREFETCH), dict(EIGHT_PROGRAMS, num_stages=3, **L2_PREFETCH),
           dict(project_blocks=4), dict(L2_PREFETCH, project_blocks=4),
           STACKED, dict(SEVEN_PROGRAMS, num_stages=3, **STACKED), dict(EIGHT_PROGRAMS, **STACKED),
           dict(EIGHT_PROGRAMS, num_stages=3, **STACKED),
           dict(PREFETCH=False), dict(PDL=False)]
BASELINE = "kernels.decode_attention_baseline"


def baseline_kernel():
    try:
        return importlib.import_module(BASELINE).decode_attention
    except ModuleNotFoundError:
        return None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--contexts", default="32768,131072")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--preset", default="3bit")
    args = parser.parse_args()
    device = torch.device("cuda")
    config = QJLConfig.preset(args.preset, head_dim=HEAD_DIM)
    baseline = baseline_kernel()
    rows = []
    for batch, context in itertools.product(map(int, args.batches.split(",")), map(int, args.contexts.split(","))):
        q, k, v = decode_inputs(batch, context, device)
        scale = HEAD_DIM ** -0.5
        row = dict(batch=batch, context=context, bytes=decode_bytes(config, batch, context),
                   **{f"sdpa_{name}_ms": do_bench_cudagraph(fn) for name, fn in sdpa_calls(q, k, v, scale).items()})
        layer = qjl_layer(config, k, v)
        del k, v
        fused_args = decode_arguments(layer, q, scale)
        RESIDENT_PROGRAMS.clear()
        reference = decode_attention(*fused_args).float()
        # the split count that keeps each KV head's exact-tokens program in the wave (the driver's count just read):
        # at batch 8 one fewer than the default, whose exact programs wait for a split to finish; at batch 1 the
        # default's own once tokens per split round up to whole tiles
        row["default_resident"] = next(iter(RESIDENT_PROGRAMS.values()), INTERPRETER_PROGRAMS_PER_SM)
        slots = row["default_resident"] * multiprocessors(device)
        tunings = TUNINGS + [dict(splits=max(1, slots // (batch * KV_HEADS) - 1))]
        row["default_ms"] = do_bench_cudagraph(lambda: decode_attention(*fused_args))
        if baseline is not None:
            row["baseline_ms"] = do_bench_cudagraph(lambda: baseline(*fused_args))
            row["baseline_max_diff"] = (baseline(*fused_args).float() - reference).abs().max().item()
        row["tunings"] = []
        for tuning in tunings:
            RESIDENT_PROGRAMS.clear()
            out = decode_attention(*fused_args, tuning=tuning)
            resident = next(iter(RESIDENT_PROGRAMS.values()), None)  # none where the tuning gives programs_per_sm
            ms = do_bench_cudagraph(lambda: decode_attention(*fused_args, tuning=tuning))
            row["tunings"].append(dict(tuning, resident=resident, ms=ms,
                                       max_diff=(out.float() - reference).abs().max().item()))
        best = min(row["tunings"], key=lambda t: t["ms"])
        sdpa = min(row["sdpa_gqa_ms"], row["sdpa_folded_ms"])
        against = (f" baseline {row['baseline_ms']:.4f} ms ({row['baseline_ms'] / row['default_ms']:.2f}x the "
                   f"default's time)" if baseline is not None else "")
        print(f"batch {batch} context {context}: sdpa gqa {row['sdpa_gqa_ms']:.4f} folded {row['sdpa_folded_ms']:.4f}"
              f" default {row['default_ms']:.4f} ms ({row['default_resident']} resident, "
              f"{sdpa / row['default_ms']:.2f}x sdpa, "
              f"{row['bytes']['qjl'] / row['default_ms'] / 1e6:.0f} GB/s){against}; best {best} "
              f"({sdpa / best['ms']:.2f}x sdpa)", flush=True)
        for t in row["tunings"]:
            print("   ", t, flush=True)
        rows.append(row)
        layer = fused_args = None  # frees the cache before empty_cache (a del would unbind names the lambdas read)
        torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), preset=args.preset,
                                        baseline=baseline is not None, rows=rows), indent=1))


if __name__ == "__main__":
    main()
