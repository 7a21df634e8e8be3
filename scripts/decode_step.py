"""A few fused decode steps at Llama-3.1-8B attention shapes and the 3bit preset, and nothing else: the program a
profiler watches (``scripts/ncu_decode.sh``).

    python scripts/decode_step.py [--batch 1] [--context 32768] [--steps 4]
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.decode_attention import decode_attention  # noqa: E402
from profiling.cmd_bench_kernels import HEAD_DIM, decode_inputs, qjl_layer  # noqa: E402
from qjl.backend import decode_arguments  # noqa: E402
from qjl.config import QJLConfig  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    config = QJLConfig.preset("3bit", head_dim=HEAD_DIM)
    q, k, v = decode_inputs(args.batch, args.context, torch.device("cuda"))
    fused_args = decode_arguments(qjl_layer(config, k, v), q, HEAD_DIM ** -0.5)
    for _ in range(args.steps):
        decode_attention(*fused_args)
    torch.cuda.synchronize()
    print(f"{args.steps} decode steps, batch {args.batch}, context {args.context}")


if __name__ == "__main__":
    main()
