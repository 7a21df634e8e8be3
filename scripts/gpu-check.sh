#!/usr/bin/env bash
# One command for a short GPU slot: kernel tests on the GPU itself (whole-model decoding through the kernels against
# the torch path included), the decode benchmark and one step's launches timed apart (decode_launches.py, into
# bench.txt), the sweep of the fused decode kernel's launch choices (with the programs a multiprocessor holds for
# each), and Nsight Compute on one of its launches (its per-instruction samples in ncu-source.csv.gz) and on one of
# the queries' projection (batch 1, 32k: what the step's fixed cost waits on). Everything lands in OUTDIR (7 files,
# what a GPU slot returns at most); tests.txt also says when each step ended. At ebed0ed the steps ended at 256 s
# (tests), 376 (benchmark, QuantizedCache in every row), 401 (launches), 445 (sweep) and 476 (Nsight Compute); the
# sm_90 compile report (156 s at 43a6c51, when it came last here) builds the same code on a CPU machine, so it is run
# there, with the GPU box's Triton too:
#   python -m venv V && V/bin/pip install torch==2.13.0 triton==3.6.0 numpy pytest "transformers>=5.17,<6"
#   V/bin/python -m profiling kernels-compile --arch 90 --arch 80 --out DIR
# which leaves time in a 15-minute slot for a second call (bench-kernels after a sweep row becomes the default:
# 391 s of 900 were left after this one at ebed0ed, the machine's start included). Needs torch (CUDA), triton,
# transformers, pytest; not gradio, plotly or kaleido. Before the call, on this machine: `bash
# scripts/gpu-wheels.sh` for transformers' QuantizedCache in the benchmark (carry ".whl"), and, to time earlier
# decode kernels on the same card, `bash scripts/decode_baseline.sh COMMIT` for each (the GPU box gets no history).
# optimum-quanto builds its CUDA extension on its first use (nvcc: AWQ and Marlin GEMMs beside the unpacking
# QuantizedCache needs; 144 s at ebed0ed), so it is built in the background from the start, and the benchmark times
# QuantizedCache only in the rows that find it built (--quanto-built-only); the build's end goes to tests.txt.
set -uo pipefail
OUT="${1:?usage: bash scripts/gpu-check.sh OUTDIR}"
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
status=0
# each step's end in seconds since the start, into tests.txt as it comes (a run cut short keeps them): where a slot's
# time goes
ended() { echo "--- $1 ended at $SECONDS s" >> "$OUT/tests.txt"; }
if compgen -G ".whl/*.whl" > /dev/null; then
  python -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu-check-site .whl/*.whl || status=1
  export PYTHONPATH="/tmp/gpu-check-site${PYTHONPATH:+:$PYTHONPATH}"
  # niced, on 4 of the 16 cores: the kernel tests beside it compile Triton kernels on the CPU (236 s for 65 tests
  # at ebed0ed, with the build beside them)
  MAX_JOBS=4 nice -n 19 timeout 600 python -c "import time; start = time.time(); from optimum.quanto.library.extensions import get_extension
get_extension('quanto_cuda').lib; print(f'--- optimum-quanto CUDA extension built in {time.time() - start:.0f} s')" \
    > /tmp/quanto-build.log 2>&1 &
  quanto_build=$!
fi
{ nvidia-smi; python -c "import sys, numpy, torch, triton, transformers; print(sys.version); print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'numpy', numpy.__version__)"; python -m pip list 2>/dev/null | grep -i quanto; } > "$OUT/tests.txt" 2>&1
# in 8 processes where pytest-xdist is installed (the GPU box has it): their time is mostly Triton compiling on the
# CPU, 236 s in one process at ebed0ed (the whole run then took 476 s of the 8 minutes it must stay well under)
workers=$(python -c "import xdist" 2>/dev/null && echo "-n 8")
timeout 300 python -m pytest -q ${workers:-} tests/test_kernels.py 2>&1 | tee -a "$OUT/tests.txt" || status=1
ended tests
timeout 300 python -m profiling bench-kernels --quanto-built-only --out "$OUT/bench-kernels" 2>&1 | tee "$OUT/bench.txt" \
  || status=1
ended bench-kernels
timeout 120 python scripts/decode_launches.py >> "$OUT/bench.txt" 2>&1 || status=1
ended decode_launches
timeout 240 python scripts/sweep_decode.py "$OUT/sweep-decode.json" > "$OUT/sweep-decode.txt" 2>&1 || status=1
ended sweep
timeout 120 bash scripts/ncu_decode.sh 1 32768 "$OUT/ncu-source.csv" > "$OUT/ncu.txt" 2>&1 || status=1
timeout 60 env NCU_KERNEL=project_kernel bash scripts/ncu_decode.sh 1 32768 >> "$OUT/ncu.txt" 2>&1 || status=1
gzip -f "$OUT/ncu-source.csv" || status=1
ended ncu
if [ -n "${quanto_build:-}" ]; then
  if kill -0 "$quanto_build" 2>/dev/null; then
    echo "--- optimum-quanto CUDA extension still building at $SECONDS s: stopped" >> /tmp/quanto-build.log
    kill "$quanto_build"
  fi
  tail -n 15 /tmp/quanto-build.log >> "$OUT/tests.txt"
fi
echo "gpu-check: exit $status; results in $OUT"
exit $status
