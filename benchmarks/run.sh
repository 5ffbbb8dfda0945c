#!/usr/bin/env bash
# Reproduces the README's results: default training, test metrics (with pictures) and speed
# on both sets of ../shared/data, the ELPV demo, and predict's memory on 200 and 5,000 images.
# Writes under runs/ (git-ignored). Needs the ONNX extra: pip install ".[onnx]"
set -euo pipefail
data=${1:-../shared/data}
mkdir -p runs
for set in magnetic_tile visa_capsules; do
  rm -rf "runs/$set" "runs/$set.pictures"
  /usr/bin/time -v cflowad train "$data/$set" --out "runs/$set" 2> >(tee "runs/$set.train.log" >&2)
  cflowad test "runs/$set" "$data/$set" --json "runs/$set.test.json" --out "runs/$set.pictures"
  cflowad bench "runs/$set" "$data/$set/test/good" --json "runs/$set.bench.json" --repeats 9 --onnx
done
cflowad demo --out runs/demo
python benchmarks/predict_memory.py runs/magnetic_tile "$data/magnetic_tile" | tee runs/predict_memory.txt
