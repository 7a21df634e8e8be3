#!/usr/bin/env bash
# The wheels the GPU box lacks, into .whl/ (git-ignored; a device call takes it along by carrying ".whl"), which
# gpu-check.sh installs before it runs: optimum-quanto, for transformers' QuantizedCache in bench-kernels. What it
# needs (torch, ninja, numpy, safetensors, huggingface_hub) and nvcc for its CUDA extension are on the box already.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 -d .whl "optimum-quanto==0.2.7"
