#!/usr/bin/env bash
# Puts the fused decode kernel of COMMIT beside the current one, with the projection module it was written against:
# kernels/decode_attention_baseline.py and kernels/decode_project_baseline.py (untracked; they travel to a GPU machine
# with the working tree), which scripts/sweep_decode.py times and scripts/sass_decode.py counts on the same card.
set -euo pipefail
commit="${1:?usage: bash scripts/decode_baseline.sh COMMIT}"
cd "$(dirname "$0")/.."
git show "$commit:kernels/decode_project.py" > kernels/decode_project_baseline.py
git show "$commit:kernels/decode_attention.py" \
  | sed 's/^from \.decode_project import/from .decode_project_baseline import/' > kernels/decode_attention_baseline.py
echo "kernels/decode_attention_baseline.py: the fused decode kernel of $commit"
