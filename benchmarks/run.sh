#!/usr/bin/env bash
# Reproduces the README's benchmark table: default training, test metrics and speed
# on both sets of ../shared/data, plus the ELPV demo. Writes under runs/ (git-ignored).
# Needs the ONNX extra for the ONNX Runtime figures: pip install ".[onnx]"
set -euo pipefail
data=${1:-../shared/data}
mkdir -p runs
for set in magnetic_tile visa_capsules; do
  /usr/bin/time -v cflowad train "$data/$set" --out "runs/$set" 2> >(tee "runs/$set.train.log" >&2)
  cflowad test "runs/$set" "$data/$set" --json "runs/$set.test.json"
  cflowad bench "runs/$set" "$data/$set/test/good" --json "runs/$set.bench.json" --repeats 9 --onnx
done
cflowad demo --out runs/demo
# the default 256 x 256 model: predict memory at batch 1
cflowad bench runs/demo/model --json runs/demo.bench.json --batch-size 1 --repeats 9
