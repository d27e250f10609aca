#!/usr/bin/env bash
# Fine-tune the shipped model on the GAICD holdout photos (scores withheld) and on FCDB's photos, then evaluate.
#   bash benchmarks/finetune_shipped.sh [DATA=../shared/data] [OUT=runs/finetune_shipped]
set -euo pipefail
DATA=${1:-../shared/data}
OUT=${2:-runs/finetune_shipped}
mkdir -p "$OUT"
ev() {  # model label
  echo "{\"model\": \"$2\", \"gaicd_dev\": $(smartcrop eval gaicd "$DATA/gaicd" --split dev --json --weights "$1"),"\
       "\"fcdb_any\": $(smartcrop eval fcdb "$DATA/fcdb" --ratio any --json --weights "$1"),"\
       "\"fcdb_gt\": $(smartcrop eval fcdb "$DATA/fcdb" --ratio gt --json --weights "$1")}"
}
ev weights/sacnet_mobilenetv2.safetensors shipped > "$OUT/results.jsonl"
for album in gaicd_holdout:"$DATA/gaicd/images/holdout" fcdb:"$DATA/fcdb/images"; do
  name=${album%%:*}; dir=${album#*:}
  /usr/bin/time -f "%e" -o "$OUT/$name.time" smartcrop finetune "$dir" -o "$OUT/$name.safetensors" --epochs 3 --force \
    2> "$OUT/$name.log"
  ev "$OUT/$name.safetensors" "finetuned on $name" >> "$OUT/results.jsonl"
done
cat "$OUT/results.jsonl"
