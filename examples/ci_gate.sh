#!/usr/bin/env bash
# Merge the built-in example and fail the job if accuracy drops below a bar.
# (The README's CI snippet; .ci/run runs it on every change.)
set -euo pipefail
cd "$(dirname "$0")"
out=$(mktemp -d)/merged.safetensors
zipit merge zoo/r20x1_c10a_s1.pt zoo/r20x1_c10b_s2.pt --arch resnet20 --calib calib --stop layer2 -o "$out" --quiet
zipit inspect "$out" --json > /dev/null
zipit eval "$out" --data test --min-avg 0.75 --min-joint 0.55 || { echo "merged model below the bar" >&2; exit 1; }
