"""The three launches of one fused decode step timed apart, at Llama-3.1-8B attention shapes and the 3bit preset: the
queries' projection (``kernels.decode_project``), the splits (``kernels.decode_attention``'s split kernel, the
whole step less the other two) and their merge (``kernels.combine_splits``, on as many splits as the step makes),
next to bf16 SDPA; CUDA-graph replays, each call of the step, SDPA and the projection on its own copy of the
inputs in turn (the L2 cache cold, as ``bench-kernels`` times them: ``graph_ms``; the merge reads what the splits
just wrote, so one copy), and the step also on one copy replayed, as every timing was until 02932f7 (its bytes
then stay in L2 where they fit). At batch 1 the projection and the merge are a fixed cost that the splits'
work does not amortise. With programmatic launches (the default on Hopper, ``kernels.common``) the three overlap at
their edges, so "splits about" is then the split kernel less that overlap; the step without them is timed too.
The projection is also timed at other launches (``PROJECTION_TUNINGS``), for what its fixed cost is made of.

    python scripts/decode_launches.py
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import decode_attention as da  # noqa: E402
from kernels.combine_splits import combine_splits  # noqa: E402
from kernels.decode_project import project_queries  # noqa: E402
from profiling.cmd_bench_kernels import (  # noqa: E402
    HEAD_DIM,
    KV_HEADS,
    Q_HEADS,
    decode_bytes,
    decode_inputs,
    graph_ms,
    layer_copies,
    sdpa_graph_ms,
)
from qjl.backend import decode_arguments  # noqa: E402
from qjl.config import QJLConfig  # noqa: E402


# The projection's launch is one program of 8 warps a KV head, taking 32 channels of the sketch a step (32 KB of it,
# fp16 high and low parts); each of these compiles without stack (Triton 3.6 and 3.9, sm_90; 138, 60 and 76
# registers on 3.6, against 63): 4 warps (the launch timed until now), or 16 or 64 channels a step; or the columns in
# 2, 4 or 8 blocks, a program each (each reads its share of the 128 KB sketch through its own multiprocessor; the
# last to finish makes the limbs).
PROJECTION_TUNINGS = [dict(num_warps=4), dict(BLOCK_D=16), dict(BLOCK_D=64, num_stages=2),
                      dict(BLOCKS=2), dict(BLOCKS=4), dict(BLOCKS=8)]


def main():
    device = torch.device("cuda")
    config = QJLConfig.preset("3bit", head_dim=HEAD_DIM)
    group = Q_HEADS // KV_HEADS
    for batch, context in ((1, 1024), (1, 32768), (1, 131072), (8, 32768)):
        q, k, v = decode_inputs(batch, context, device)
        nbytes = decode_bytes(config, batch, context)
        sdpa = min(sdpa_graph_ms(q, k, v, HEAD_DIM ** -0.5).values())
        layers = layer_copies(config, k, v, nbytes["qjl"], device)
        k = v = None  # frees the bf16 caches (a del would unbind names the copies' lambdas read)
        copies = [decode_arguments(layer, q, HEAD_DIM ** -0.5) for layer in layers]
        layer, args = layers[0], copies[0]
        da.RESIDENT_PROGRAMS.clear()
        da.decode_attention(*args)
        # the driver's count, which the launcher just read (none under the interpreter, which takes its own)
        programs_per_sm = next(iter(da.RESIDENT_PROGRAMS.values()), da.INTERPRETER_PROGRAMS_PER_SM)
        launch = da.launch_config(group, HEAD_DIM, config.sketch_dim, 16, config.n_outliers, config.group_size,
                                  config.center_keys, config.value_bits, config.value_group_size,
                                  config.exact_outliers)
        programs = batch * KV_HEADS
        _, compressed, (exact, _) = da.split_plan(layer.n_compressed,
                                                  layer.sink_keys.shape[2] + layer.buffer_keys.shape[2], programs,
                                                  launch, programs_per_sm, device)
        splits = compressed + exact
        whole = graph_ms([lambda args=args: da.decode_attention(*args) for args in copies])
        warm = graph_ms([lambda: da.decode_attention(*args)])  # as timed until 02932f7
        serial = graph_ms([lambda args=args: da.decode_attention(*args, tuning=dict(PDL=False)) for args in copies])
        queries = q.reshape(programs, group, HEAD_DIM)
        project = graph_ms([lambda layer=layer: project_queries(queries, layer.sketch.matrix, False)
                            for layer in layers])
        variants = []
        for tuning in PROJECTION_TUNINGS:
            ms = graph_ms([lambda layer=layer: project_queries(queries, layer.sketch.matrix, False, tuning=tuning)
                           for layer in layers])
            variants.append(f"{tuning} {ms * 1e3:.1f}")
        part_m = torch.zeros(programs, splits, group, device=device)
        part_l, part_acc = torch.ones_like(part_m), torch.zeros(programs, splits, group, HEAD_DIM, device=device)
        merge = graph_ms([lambda: combine_splits(part_m, part_l, part_acc, torch.bfloat16)])
        print(f"batch {batch} context {context}: step {whole * 1e3:.1f} us (SDPA {sdpa * 1e3:.1f}; on one copy "
              f"of its {nbytes['qjl'] / 1e6:.0f} MB replayed {warm * 1e3:.1f}): projection "
              f"{project * 1e3:.1f}, splits about {(whole - project - merge) * 1e3:.1f} ({compressed} splits a KV "
              f"head and {exact} of exact tokens, {programs_per_sm} programs a multiprocessor), merge "
              f"{merge * 1e3:.1f}; "
              f"the step's kernels launched one after another (PDL=False) {serial * 1e3:.1f}; the projection at "
              f"other launches: {', '.join(variants)}", flush=True)


if __name__ == "__main__":
    main()
