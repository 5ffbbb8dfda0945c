#!/usr/bin/env bash
# Reproduces the README's results: default training, test metrics (with pictures) and speed
# on both sets of ../shared/data and visa_capsules in tiles, the ELPV demo, and predict's
# memory on 200 and 5,000 images.
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
# visa_capsules at its own size in tiles (the README's third row)
rm -rf runs/visa_capsules.tiles
/usr/bin/time -v cflowad train "$data/visa_capsules" --out runs/visa_capsules.tiles \
  --image-size native --tile-size 256 2> >(tee runs/visa_capsules.tiles.train.log >&2)
cflowad test runs/visa_capsules.tiles "$data/visa_capsules" --json runs/visa_capsules.tiles.test.json
cflowad bench runs/visa_capsules.tiles "$data/visa_capsules/test/good" \
  --json runs/visa_capsules.tiles.bench.json --repeats 9 --onnx
cflowad demo --out runs/demo
python benchmarks/predict_memory.py runs/magnetic_tile "$data/magnetic_tile" | tee runs/predict_memory.txt
