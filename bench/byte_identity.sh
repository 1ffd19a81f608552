#!/usr/bin/env bash
# Hash the merges a refactor must leave byte-identical (issue 26): the default, permute, fixed zipit,
# the refit, a three-way merge and a sweep's JSON, with the same seed. Run before and after a change
# and diff the two lists:   bash bench/byte_identity.sh /tmp/before > before.txt
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
M=$ROOT/examples; Z=$ROOT/../shared/zoo; D=${1:-/tmp/byte-identity}
rm -rf "$D" && mkdir -p "$D" && cd "$D"
A="$M/zoo/r20x1_c10a_s1.pt $M/zoo/r20x1_c10b_s2.pt --arch resnet20 --calib $M/calib --num-calib 128 --stop layer2 --quiet"
zipit merge $A -o default.safetensors
zipit merge $A --method permute -o permute.safetensors
zipit merge $A --method zipit --alpha 0.3 --beta 0.125 -o zipit.safetensors
zipit merge $A --refit lsq -o refit.safetensors
zipit merge "$Z/r20x1_c10x3a_s21.pt" "$Z/r20x1_c10x3b_s22.pt" "$Z/r20x1_c10x3c_s23.pt" --arch resnet20 \
    --calib "$M/calib" --num-calib 128 --quiet -o three.safetensors
zipit sweep $M/zoo/r20x1_c10a_s1.pt $M/zoo/r20x1_c10b_s2.pt --arch resnet20 --calib $M/calib --num-calib 128 \
    --data $M/test --limit 20 --json --quiet > sweep.json
sha256sum *.safetensors *.md *.json
