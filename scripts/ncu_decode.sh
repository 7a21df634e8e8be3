#!/usr/bin/env bash
# Nsight Compute on one launch of the fused decode kernel (the last of scripts/decode_step.py's steps, compiled and
# warm): throughput against the GPU's peaks, occupancy, what the warps wait on (WarpStateStats) and where in the code
# (SourceCounters: the instructions with the most stalls). The kernel is latency bound on the H100 (README, "Kernels
# and the GPU"); this says on what. Needs ncu (the GPU box has it); prints to stdout.
#   bash scripts/ncu_decode.sh [BATCH] [CONTEXT]
set -euo pipefail
cd "$(dirname "$0")/.."
batch="${1:-1}"
context="${2:-32768}"
ncu --clock-control none --kernel-name regex:decode_split_kernel --launch-skip 3 --launch-count 1 \
  --section SpeedOfLight --section Occupancy --section LaunchStats --section SchedulerStats \
  --section WarpStateStats --section SourceCounters --section MemoryWorkloadAnalysis \
  python scripts/decode_step.py --batch "$batch" --context "$context" --steps 4
