#!/usr/bin/env bash
# Nsight Compute on one launch of the fused decode kernel (the last of scripts/decode_step.py's steps, compiled and
# warm): throughput against the GPU's peaks, occupancy, what the warps wait on (WarpStateStats) and where in the code
# (SourceCounters). The kernel is latency bound on the H100 (README, "Kernels and the GPU"); this says on what. Needs
# ncu (the GPU box has it). Prints the sections, then each stall reason's warps per issued instruction (the raw
# metrics behind WarpStateStats); with SOURCE_CSV, also writes the SASS with each instruction's samples there.
# NCU_KERNEL names another of the step's kernels (project_kernel, combine_splits_kernel): at batch 1 the projection
# and the merge are a fixed cost of the step (scripts/decode_launches.py).
#   [NCU_KERNEL=decode_split_kernel] bash scripts/ncu_decode.sh [BATCH] [CONTEXT] [SOURCE_CSV]
set -euo pipefail
cd "$(dirname "$0")/.."
batch="${1:-1}"
context="${2:-32768}"
report="$(mktemp -d)/decode"
echo "--- ncu: ${NCU_KERNEL:-decode_split_kernel}, batch $batch, context $context"
ncu --clock-control none --kernel-name "regex:${NCU_KERNEL:-decode_split_kernel}" --launch-skip 3 --launch-count 1 \
  --section SpeedOfLight --section Occupancy --section LaunchStats --section SchedulerStats \
  --section WarpStateStats --section SourceCounters --section MemoryWorkloadAnalysis -f -o "$report" \
  python scripts/decode_step.py --batch "$batch" --context "$context" --steps 4
ncu --import "$report.ncu-rep"
ncu --import "$report.ncu-rep" --page raw --csv | python3 -c '
import csv, sys
names, units, *values = list(csv.reader(sys.stdin))
stalls = [(float(v.replace(",", "")), n) for n, v in zip(names, values[0]) if "issue_stalled" in n and "per_issue_active" in n
          and v.replace(",", "").replace(".", "").isdigit()]
for value, name in sorted(stalls, reverse=True):
    print(f"{value:8.3f}  {name}")' || echo "ncu_decode.sh: the raw page did not parse"
if [ -n "${3:-}" ]; then
  ncu --import "$report.ncu-rep" --page source --csv --print-source sass > "$3" || echo "ncu_decode.sh: no source page"
fi
