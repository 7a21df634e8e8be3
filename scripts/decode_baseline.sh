#!/usr/bin/env bash
# Puts the fused decode kernel of COMMIT beside the current one, with the projection module it was written against:
# kernels/decode_attention_baseline_SHORT.py and kernels/decode_project_baseline_SHORT.py (SHORT: the commit's
# 7-character hash; untracked, they travel to a GPU machine with the working tree), which scripts/sweep_decode.py
# times and scripts/sass_decode.py counts on the same card. Run it once per commit to put several beside it.
set -euo pipefail
commit="${1:?usage: bash scripts/decode_baseline.sh COMMIT}"
cd "$(dirname "$0")/.."
short=$(git rev-parse --short=7 "$commit")
git show "$commit:kernels/decode_project.py" > "kernels/decode_project_baseline_$short.py"
git show "$commit:kernels/decode_attention.py" \
  | sed "s/^from \.decode_project import/from .decode_project_baseline_$short import/" \
  > "kernels/decode_attention_baseline_$short.py"
echo "kernels/decode_attention_baseline_$short.py: the fused decode kernel of $short"
