#!/usr/bin/env bash
# Train a distilled shipped-model candidate on all labelled data: the teachers are the shipped model (the
# MobileNetV2 recipe) and two EfficientNet-Lite0 models (seeds 0 and 1), the same three recipes as the fold
# teachers of the validation variant `distill64w2` (docs/results.md); then evaluate it like the shipped model.
# Resumable: a finished teacher or student is not trained again.  Needs the `lite` extra.
#   bash benchmarks/distill_shipped.sh [DATA=../shared/data] [OUT=runs/distill_full]
set -euo pipefail
DATA=${1:-../shared/data}
OUT=${2:-runs/distill_full}
mkdir -p "$OUT"
common=(--gaicd "$DATA/gaicd:dev" --fcdb "$DATA/fcdb" --unlabeled "$DATA/unlabeled"
        --unlabeled "$DATA/gaicd/images/holdout" --val-fraction 0 --device cpu)
for seed in 0 1; do
  m="$OUT/lite0_seed$seed.safetensors"
  [ -f "$m" ] || smartcrop train "${common[@]}" --backbone efficientnet_lite0 --seed "$seed" --out "$m" \
    2> "$OUT/lite0_seed$seed.log"
done
student="$OUT/sacnet_mobilenetv2_distilled.safetensors"
[ -f "$student" ] || smartcrop train "${common[@]}" --backbone-weights "$DATA/../weights/mobilenet_v2_imagenet.pth" \
  --teacher weights/sacnet_mobilenetv2.safetensors --teacher "$OUT/lite0_seed0.safetensors" \
  --teacher "$OUT/lite0_seed1.safetensors" --distill-anchors 64 --distill-weight 2 --out "$student" \
  2> "$OUT/student.log"
for ratio in any gt; do
  echo "{\"model\": \"$student\", \"ratio\": \"$ratio\", \"fcdb_test\": $(smartcrop eval fcdb "$DATA/fcdb" --ratio $ratio \
    --json --weights "$student")}"
done | tee "$OUT/results.jsonl"
