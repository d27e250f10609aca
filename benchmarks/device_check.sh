#!/usr/bin/env bash
# Every many-core and GPU figure of issue 10 in one run, for a lent 16-core + GPU machine (run from the repo root).
#
#   python benchmarks/shrink_data.py ../shared/data .devdata/data --quality 70 \
#       --weights ../shared/weights/mobilenet_v2_imagenet.pth       # ~47 MiB: photos at short side 256
#   mkdir -p .devdata/site .devdata/lib; cp .venv/lib/python3*/site-packages/turbojpeg.py .devdata/site/
#   cp /usr/lib/x86_64-linux-gnu/libturbojpeg.so.0.2.0 .devdata/lib/   # the machine has no libturbojpeg
#   OUT=/tmp/out bash benchmarks/device_check.sh                        # there: carry .devdata
#
# Steps (each under its own time limit; a step that fails is logged and the next one runs):
#   env      machine, versions, lossless backend
#   photos   PHOTOS 12 MP JPEGs made from the unlabeled photos (64 distinct ones, hard-linked under new names)
#   profile  seconds per GPU training step of the recipe, and an operator profile (benchmarks/train_profile.py)
#   scaling  `smartcrop run` on every core against the same run under `taskset -c 0,1`, lossless and --reencode
#            (and once with --scoring main: the photos scored in the main process instead of the workers)
#   train    one fold of the validation protocol trained on the GPU (benchmarks/validate.py --device cuda)
#   gpu_run  `smartcrop run --device cuda` with nvidia-smi sampling GPU utilisation every 200 ms
#   scoring  scoring time per photo on the GPU, float32 and bfloat16 autocast, batches of 32
#   amp      benchmarks/amp_check.py --device cuda on GAICD dev and FCDB test
# Results: $OUT/results.tgz (every JSON and log) and $OUT/summary.txt; the output's last lines are the summary.
# DEVICE=cpu and smaller PHOTOS / TRAIN_ARGS make a quick rehearsal on a machine without a GPU.
# All steps take ~10 minutes on a 16-core + H200 machine; within one call's 10-minute limit run two calls, e.g.
# SKIP="train" and then SKIP="photos profile scaling gpu_run scoring amp" (env is cheap).
set -u
OUT=${OUT:?set OUT}
DEVICE=${DEVICE:-cuda}
PHOTOS=${PHOTOS:-256}
COUNTS=${COUNTS:-64 $PHOTOS}  # photo counts of the runs on every core and on the GPU
TRAIN_ARGS=${TRAIN_ARGS:-}
SKIP=${SKIP:-}
D=.devdata
R=/tmp/devcheck
rm -rf $R && mkdir -p $R
export OUT DEVICE PHOTOS COUNTS TRAIN_ARGS D R PYTHONUNBUFFERED=1 PYTHONPATH="$D/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PY=${PY:-python3}
log() { echo "[$(date +%T)] $*" | tee -a $R/summary.txt; }
step() {  # step NAME SECONDS COMMAND...: run it with a time limit, output to $R/NAME.log
  local name=$1 secs=$2; shift 2
  case " $SKIP " in *" $name "*) log "$name: skipped"; return;; esac
  local t0=$SECONDS
  timeout --kill-after=10 "$secs" bash -c "$*" > $R/$name.log 2>&1
  log "$name: exit $? after $((SECONDS - t0)) s"
  tail -n 4 $R/$name.log | sed 's/^/    /' | tee -a $R/summary.txt
}
if [ -f $D/lib/libturbojpeg.so.0.2.0 ] && [ -w /usr/lib/x86_64-linux-gnu ] && ! ldconfig -p | grep -q libturbojpeg; then
  cp $D/lib/libturbojpeg.so.0.2.0 /usr/lib/x86_64-linux-gnu/ &&
    ln -sf libturbojpeg.so.0.2.0 /usr/lib/x86_64-linux-gnu/libturbojpeg.so.0 && ldconfig
fi

env_info() {
  nproc; uname -r; free -g | head -2
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY - <<'PY'
import sys, torch, PIL, numpy, typer
from smartcrop import jpegcrop
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available(),
      "pillow", PIL.__version__, "numpy", numpy.__version__, "typer", typer.__version__)
print("lossless backend:", jpegcrop.backend_name() or jpegcrop.unavailable_reason())
PY
  $PY -m smartcrop.cli --version
}
export -f env_info
step env 60 env_info

make_photos() {
  $PY benchmarks/make_photos.py $D/data/unlabeled $R/p64 --count 64 --jobs "$(nproc)" || return 1
  mkdir -p $R/photos
  local k=0
  while [ $k -lt "$PHOTOS" ]; do
    for f in $R/p64/*.jpg; do
      [ $k -ge "$PHOTOS" ] && break
      ln "$f" $R/photos/$(printf '%04d' $k)_$(basename "$f")
      k=$((k + 1))
    done
  done
  ls $R/photos | wc -l; du -sh $R/photos
}
export -f make_photos
step photos 120 make_photos

step profile 150 $PY benchmarks/train_profile.py --data $D/data --backbone-weights $D/weights/mobilenet_v2_imagenet.pth \
  --device $DEVICE --steps 5 --profile-steps 2

step scaling 330 "set -e;
  $PY benchmarks/throughput.py $R/photos --counts $COUNTS --repeat 2 --skip-vips --out $R/scaling_all.json -- --device cpu;
  $PY benchmarks/throughput.py $R/photos --counts $PHOTOS --modes default --repeat 1 --skip-vips --out $R/scaling_main.json -- --device cpu --scoring main;
  taskset -c 0,1 $PY benchmarks/throughput.py $R/photos --counts $PHOTOS --repeat 1 --skip-vips --out $R/scaling_2.json -- --device cpu"

step train 290 $PY benchmarks/validate.py --data $D/data --backbone-weights $D/weights/mobilenet_v2_imagenet.pth \
  --work $R/validate --variant "'gpu=$TRAIN_ARGS'" --folds 0 --seeds 0 --code live --device $DEVICE

gpu_run() {
  local smi=""
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -lms 200 \
      > $R/gpu_util.csv & smi=$!
  fi
  $PY benchmarks/throughput.py $R/photos --counts $COUNTS --modes default --repeat 2 --skip-vips \
    --out $R/gpu_run.json -- --device $DEVICE
  local rc=$?
  [ -n "$smi" ] && kill $smi
  [ -f $R/gpu_util.csv ] && awk -F', ' '{n++; s+=$2; if ($2 > 0) b++} END {if (n) printf "gpu util samples %d, mean %.1f %%, busy %.0f %%\n", n, s/n, 100*b/n}' $R/gpu_util.csv
  return $rc
}
export -f gpu_run
step gpu_run 120 gpu_run

step scoring 90 "$PY benchmarks/scoring_time.py $R/p64 --count 64 --passes 3 --device $DEVICE --batch 32 &&
  $PY benchmarks/scoring_time.py $R/p64 --count 64 --passes 3 --device $DEVICE --batch 32 --amp"

step amp 120 $PY benchmarks/amp_check.py --data $D/data --device $DEVICE --out $R/amp.json

# the summary: every result line
{
  for f in $R/scaling_all.json $R/scaling_main.json $R/scaling_2.json $R/gpu_run.json; do
    [ -f $f ] && $PY -c "import json,sys; d=json.load(open('$f')); [print('$(basename $f)', d['cores'], json.dumps(r)) for r in d['runs']]"
  done
  for f in $R/validate/results/gpu/*.json; do
    [ -f "$f" ] && $PY -c "import json; r=json.load(open('$f')); print('train', json.dumps(r['train']), json.dumps(r['gaicd_val']), json.dumps({k: r[k] for k in r if k.startswith('fcdb_')}))"
  done
  grep -h '"seconds"' $R/validate/runs/gpu/*/model.log.jsonl 2>/dev/null | cut -c1-200
  grep -h 'median' $R/scoring.log
  grep -h '^amp=' $R/profile.log
  [ -f $R/amp.json ] && $PY -c "import json; r=json.load(open('$R/amp.json')); print('amp', json.dumps({k: v for k, v in r.items() if 'changed' in k or 'images' in k}), 'fp32', json.dumps(r['fp32']), 'bf16', json.dumps(r['bf16']))"
} >> $R/summary.txt 2>&1
find $R/validate -name '*.safetensors' -delete
tar czf $OUT/results.tgz -C $R --exclude=photos --exclude=p64 --exclude=validate/data . 2>/dev/null
cp $R/summary.txt $OUT/
cat $R/summary.txt
