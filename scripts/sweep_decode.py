"""Launch choices of the fused QJL decode kernel on this GPU: pipeline stages, warps per program, register cap,
prefetch of per-token numbers and outlier channels, the exact tokens' tile and programs, programs per multiprocessor,
the queries' projection in column blocks and both limbs in one sign product, at Llama-3.1-8B attention shapes (32
query heads, 8 KV heads, head dim 128, bf16) and the 3bit preset, next to bf16 SDPA (grouped-query, and with each KV
head's queries folded into rows). Times are CUDA-graph replays with the L2 cache cold (each call on its own copy of
the inputs, in turn), as in ``bench-kernels`` (``graph_ms``), in ``ROUNDS`` rounds whose order of launches turns a
place each round, the median of a launch's rounds reported. Each shape has two decode states: the layer as the
prompt leaves it (4 sink and 28 buffered tokens at 32k, what ``bench-kernels`` times), and the same layer with its
buffer one token short of a flush (``buffer_filling``: 131 exact tokens, the most a step reads), timed at the
launches that place the exact tokens. Prints and writes JSON; ``max_diff`` is each choice's largest difference
from the default launch, ``resident`` the programs a multiprocessor holds.

A kernel to compare against, where one is wanted, goes beside the current one before the run (untracked files travel
to a GPU machine; its history does not), and is timed at its own defaults on the same card:

    bash scripts/decode_baseline.sh COMMIT  # once per kernel to time beside the current one
    python scripts/sweep_decode.py OUT.json [--contexts 32768,131072] [--batches 1,8]
"""

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.common import multiprocessors  # noqa: E402
from kernels.decode_attention import INTERPRETER_PROGRAMS_PER_SM, RESIDENT_PROGRAMS, decode_attention  # noqa: E402
from profiling.cmd_bench_kernels import (  # noqa: E402
    HEAD_DIM,
    KV_HEADS,
    buffer_filling,
    decode_bytes,
    decode_inputs,
    graph_ms,
    layer_copies,
    sdpa_graph_ms,
)
from qjl.backend import decode_arguments  # noqa: E402
from qjl.config import QJLConfig  # noqa: E402
from qjl.values import unblock_tokens  # noqa: E402
from scripts.sass_decode import baseline_modules  # noqa: E402

# Launch choices beside the default (``launch_config``: eight programs a multiprocessor at the benchmark's shapes, a
# cap of 128 registers, three stages, the exact tokens 16 at a time with their queries unpadded, both limbs of the
# queries' rows in one sign product; two warps, per-token numbers and outlier channels a tile ahead, PTX bit
# unpacking, programmatic launches; one wave of the programs that fit), each the default with what it names changed,
# and each row with the programs a multiprocessor holds by the driver's count (``resident``). The ones worth
# re-timing when the kernel changes, with their times against the default of the same run at batch 1 with 32k and
# 128k tokens and batch 8 with 32k and 128k, each call on its own copy of the inputs (sweep-decode-7870952.txt, the
# median of three rounds; in brackets sweep-decode-ebed0ed.txt, before the outlier channels' prefetch was the
# default):
# - two stages at eight programs: 1.00x, 1.03x, 1.03x, 1.03x (1.01x, 1.05x, 1.03x, 1.03x);
# - four stages at eight programs (eight copy groups in flight at the loop's wait, not four; same instructions a
#   tile): 1.02x, 1.01x, 1.00x, 1.00x (1.03x, 1.01x, 1.00x, 1.00x);
# - the queries' projection in four programs a KV head (``project_blocks``): 0.97x, 0.99x, 1.00x, 1.00x (0.98x,
#   1.00x, 0.96x, 0.95x; 1.00-1.02x at e057ae0);
# - the step's three kernels launched one after another, not programmatically (kernels.common.programmatic_launch):
#   0.99x, 1.00x, 0.98x, 1.00x (1.00x, 1.01x, 0.95x, 0.95x);
# - each group's outlier channels loaded at the tile (``PREFETCH_CHANNELS=False``, the default until 7870952):
#   1.01x, 1.02x, 1.05x, 1.05x (their prefetch, then the row: 0.98x, 0.99x, 0.95x, 0.95x);
# - and, per shape, the splits that leave each KV head's exact-tokens program room in the wave: one fewer than the
#   default at batch 8 (1.06x, 1.05x; 1.01x, 1.06x); at batch 1 the default's own launch, timed again: 0.99x, 1.00x
#   (1.00x, 1.00x).
# The layers hold 32 exact tokens (the prompt's remainder of the group, 4 sink and 28 buffered), one program a KV head
# whatever ``exact_split`` is given, so the row ``exact_tokens=4096`` (one program, as before ``exact_split``) was the
# default's launch too: 0.98x, 1.02x, 1.00x, 1.01x at e057ae0 and 0.98x, 1.02x, 1.00x, 1.00x at 92a46ce. Those
# re-timings are the sweep's noise: about 2%, and the default (timed first) 2% slower at batch 1 and 32k in both runs.
# Dropped from the list as consistently slower on the H100 (sweep-decode-*.txt, against the default of the same run at
# the four shapes), and to keep gpu-check.sh's run short: both value planes of a token in one 16-byte load of its row
# (``WHOLE_ROWS``, 1.08x, 1.13x, 1.09x, 1.11x at ebed0ed; removed from the kernel), the launch that was the default
# until 1014fa3 (six programs: a cap of 168, two stages, the exact tokens 32 at a time with padded queries, a sign
# product a limb; 1.15x, 1.24x, 1.30x, 1.34x at e057ae0), no prefetch of the per-token numbers (``PREFETCH=False``:
# 1.06x, 1.11x, 1.12x, 1.14x at e057ae0), the L2 prefetch (each split asking the L2 cache for its first tokens before
# it waited for the projection; removed from the kernel after 1.11x, 1.08x, 1.08x, 1.08x with cold copies at e057ae0),
# nine programs a multiprocessor (a cap of 112: 1.07x, 1.14x, 1.15x, 1.17x at e057ae0), seven programs (a cap of 144;
# at three stages and stacked 1.02-1.12x the time of eight at 43a6c51), eight without the stacked limbs (1.08-1.16x),
# no register cap (as the cap of 200, four programs) and four warps (1.27-1.66x the six programs' time at 615d3fd),
# one stage (1.04-1.32x), more programs than fit (``programs_per_sm=8`` at six: 1.23-1.35x), cb8154c's launch
# (1.07-1.16x) and the interpreter's element-wise unpacking in place of the PTX (1.35-1.54x; the kernel tests check
# the PTX against the reference on the GPU).
TUNINGS = [dict(num_stages=2), dict(num_stages=4), dict(project_blocks=4), dict(PDL=False),
           dict(PREFETCH_CHANNELS=False)]
# With a full buffer (131 exact tokens a KV head) the exact tokens spread over as many programs as the wave has room
# for (``exact_split``: three of 48 tokens at batch 1 and 32k, five of 32 at batch 8, after the wave's last split);
# against them, one program a KV head (as before ``exact_split``), and (per shape) one split fewer.
FULL_BUFFER_TUNINGS = [dict(exact_tokens=4096)]
# The rounds' order turns so that no launch is always timed first: in two runs with one round (92a46ce and before),
# the default, timed first, came out 2% slower at batch 1 and 32k than identical launches timed later.
ROUNDS = 3


def baseline_kernels() -> list[tuple]:
    """(commit, ``decode_attention``, what makes its arguments of the current kernel's) of each kernel put beside the
    current one (``scripts/decode_baseline.sh``): ``per_token_values`` for kernels from before the value codes'
    blocks, which have no ``VALUE_BLOCK``."""
    return [(commit, module.decode_attention,
             (lambda args: args) if hasattr(module, "VALUE_BLOCK") else per_token_values)
            for commit, module in baseline_modules().items()]


def per_token_values(args: tuple) -> tuple:
    """The fused kernel's arguments with the value codes a row per token, as kernels up to 314499c read them."""
    packed, *numbers = args[2]
    n = args[1][0].shape[2]
    return (*args[:2], (unblock_tokens(packed, n).contiguous(), *numbers), *args[3:])


def timed_in_rounds(launches: list, rounds: int = ROUNDS) -> list:
    """The median over ``rounds`` of each launch's ``graph_ms`` (``launches``: lists of calls, one per copy of the
    inputs), round ``r`` timing them from launch ``r`` on, in a circle; None for a launch that cannot be captured."""
    times = [[] for _ in launches]
    for r in range(rounds):
        for i in range(len(launches)):
            turn = (r + i) % len(launches)
            times[turn].append(graph_ms(launches[turn], rep=100 // rounds))
    return [None if None in ms else statistics.median(ms) for ms in times]


def fewer_splits(resident: int, batch: int, device: torch.device) -> dict:
    """The split count that keeps each KV head's exact-tokens programs in the wave of ``resident`` programs a
    multiprocessor: at batch 8 one fewer than the default, whose exact programs wait for a split to finish; at batch 1
    the default's own, once tokens per split round up to whole tiles."""
    return dict(splits=max(1, resident * multiprocessors(device) // (batch * KV_HEADS) - 1))


def sweep_state(fused_copies, tunings, batch: int, device: torch.device, baselines=()) -> dict:
    """The default launch, each of ``tunings`` and ``fewer_splits`` (from the default's programs a multiprocessor)
    on one decode state (``fused_copies``: the fused kernel's arguments, one tuple per copy of the inputs): their
    times (``timed_in_rounds``), the programs a multiprocessor holds, and each launch's largest difference from the
    default's output; the ``baselines``' (``baseline_kernels``) too, at their own defaults."""
    RESIDENT_PROGRAMS.clear()
    reference = decode_attention(*fused_copies[0]).float()
    state = dict(default_resident=next(iter(RESIDENT_PROGRAMS.values()), INTERPRETER_PROGRAMS_PER_SM), tunings=[])
    launches = [[lambda args=args: decode_attention(*args) for args in fused_copies]]
    for tuning in tunings + [fewer_splits(state["default_resident"], batch, device)]:
        RESIDENT_PROGRAMS.clear()
        out = decode_attention(*fused_copies[0], tuning=tuning)
        resident = next(iter(RESIDENT_PROGRAMS.values()), None)  # none where the tuning gives programs_per_sm
        state["tunings"].append(dict(tuning, resident=resident, max_diff=(out.float() - reference).abs().max().item()))
        launches.append([lambda args=args, tuning=tuning: decode_attention(*args, tuning=tuning)
                         for args in fused_copies])
    state["baselines"] = []
    for commit, kernel, arguments in baselines:
        copies = [arguments(args) for args in fused_copies]
        state["baselines"].append(dict(commit=commit,
                                       max_diff=(kernel(*copies[0]).float() - reference).abs().max().item()))
        launches.append([lambda args=args, kernel=kernel: kernel(*args) for args in copies])
    times = timed_in_rounds(launches)
    state["default_ms"] = times[0]
    for launch, ms in zip(state["tunings"] + state["baselines"], times[1:]):
        launch["ms"] = ms
    return state


def report(title: str, state: dict, sdpa: float, nbytes: int):
    """Prints one state's line and its launches' rows, each with its time against the default's."""
    if not state["default_ms"]:
        print(f"{title}: the default launch could not be captured in a CUDA graph", flush=True)
        return
    print(f"{title}: default {state['default_ms']:.4f} ms ({state['default_resident']} resident, "
          f"{sdpa / state['default_ms']:.2f}x sdpa, {nbytes / state['default_ms'] / 1e6:.0f} GB/s)", flush=True)
    for baseline in state["baselines"]:
        if baseline["ms"]:
            print(f"    baseline {baseline['commit']} {baseline['ms']:.4f} ms "
                  f"({baseline['ms'] / state['default_ms']:.3f}x the default's time, max diff "
                  f"{baseline['max_diff']:.2e})", flush=True)
    for t in state["tunings"]:
        against = f" ({t['ms'] / state['default_ms']:.3f}x the default's time)" if t["ms"] else " (not captured)"
        print("   ", t, against, flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--contexts", default="32768,131072")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--preset", default="3bit")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only under Triton's interpreter, for tests")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    config = QJLConfig.preset(args.preset, head_dim=HEAD_DIM)
    baselines = baseline_kernels()
    rows = []
    for batch, context in itertools.product(map(int, args.batches.split(",")), map(int, args.contexts.split(","))):
        q, k, v = decode_inputs(batch, context, device)
        scale = HEAD_DIM ** -0.5
        row = dict(batch=batch, context=context, bytes=decode_bytes(config, batch, context))
        row.update({f"sdpa_{name}_ms": ms for name, ms in sdpa_graph_ms(q, k, v, scale).items()})
        sdpa = min(row["sdpa_gqa_ms"], row["sdpa_folded_ms"])
        filling = buffer_filling(config, context)
        full_bytes = decode_bytes(config, batch, context, filling)
        copies = [decode_arguments(layer, q, scale)
                  for layer in layer_copies(config, k, v, row["bytes"]["qjl"], device)]
        full_copies = [decode_arguments(layer, q, scale)
                       for layer in layer_copies(config, k, v, full_bytes["qjl"], device, decoded=filling)]
        k = v = None  # frees the bf16 caches (a del would unbind names the copies' lambdas read)
        row.update(sweep_state(copies, TUNINGS, batch, device, baselines))
        report(f"batch {batch} context {context}: sdpa gqa {row['sdpa_gqa_ms']:.4f} folded "
               f"{row['sdpa_folded_ms']:.4f}", row, sdpa, row["bytes"]["qjl"])
        copies = None
        row["full_buffer"] = dict(decoded=filling, bytes=full_bytes,
                                  **sweep_state(full_copies, FULL_BUFFER_TUNINGS, batch, device))
        report(f"  {full_bytes['exact_tokens']} exact tokens (buffer one short of a flush)", row["full_buffer"],
               sdpa, full_bytes["qjl"])
        rows.append(row)
        full_copies = None  # frees the caches before empty_cache
        if device.type == "cuda":
            torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    args.out.write_text(json.dumps(dict(device=name, preset=args.preset, rounds=ROUNDS,
                                        baselines=[commit for commit, _, _ in baselines], rows=rows), indent=1))


if __name__ == "__main__":
    main()
