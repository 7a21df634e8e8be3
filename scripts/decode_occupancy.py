"""How many programs of the fused decode kernel the CUDA driver fits on a multiprocessor, for the default launch and a
few register caps and warp counts, and what one decode step takes with the one wave of programs the launcher then
makes (CUDA-graph replays), at Llama-3.1-8B attention shapes and the 3bit preset.

    python scripts/decode_occupancy.py
"""

import sys
from pathlib import Path

import torch
from triton.testing import do_bench_cudagraph

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import decode_attention as da  # noqa: E402
from profiling.cmd_bench_kernels import HEAD_DIM, decode_inputs, qjl_layer  # noqa: E402
from qjl.backend import decode_arguments  # noqa: E402
from qjl.config import QJLConfig  # noqa: E402


def main():
    config = QJLConfig.preset("3bit", head_dim=HEAD_DIM)
    for batch, context in ((1, 32768), (8, 131072)):
        q, k, v = decode_inputs(batch, context, torch.device("cuda"))
        layer = qjl_layer(config, k, v)
        args = decode_arguments(layer, q, HEAD_DIM ** -0.5)
        for tuning in ({}, dict(maxnreg=255), dict(num_stages=3, maxnreg=200), dict(num_warps=4)):
            da.RESIDENT_PROGRAMS.clear()
            da.decode_attention(*args, tuning=dict(tuning))
            ms = do_bench_cudagraph(lambda: da.decode_attention(*args, tuning=dict(tuning)))
            print(batch, context, tuning, "resident", list(da.RESIDENT_PROGRAMS.values()), f"{ms:.4f} ms", flush=True)


if __name__ == "__main__":
    main()
