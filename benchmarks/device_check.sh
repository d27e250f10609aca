#!/usr/bin/env bash
# Every many-core and GPU figure of issue 10 in one run, for a lent 16-core + GPU machine (run from the repo root).
#
#   python benchmarks/shrink_data.py ../shared/data .devdata/data --quality 70 \
#       --weights ../shared/weights/mobilenet_v2_imagenet.pth       # ~47 MiB: photos at short side 256
#   ls .devdata/data/unlabeled | sort | tail -n +501 | (cd .devdata/data/unlabeled && xargs rm)  # with the repo
#                                                     # (15 MiB) a call carries at most 64 MiB: keep 500 unlabeled
#   mkdir -p .devdata/site .devdata/lib; cp .venv/lib/python3*/site-packages/turbojpeg.py .devdata/site/
#   cp /usr/lib/x86_64-linux-gnu/libturbojpeg.so.0.2.0 .devdata/lib/   # the machine has no libturbojpeg
#   OUT=/tmp/out bash benchmarks/device_check.sh                        # there: carry .devdata
#
# Steps (each under its own time limit, all under DEADLINE seconds; a step that fails is logged and the next runs):
#   env      machine, versions, lossless backend, `import torch` time (cold and with a bytecode cache)
#   photos   PHOTOS 12 MP JPEGs made from the unlabeled photos (64 distinct ones, hard-linked under new names)
#   profile  seconds per GPU training step of the recipe, and an operator profile (benchmarks/train_profile.py)
#   gpu_run  `smartcrop run --device cuda` with nvidia-smi sampling GPU utilisation every 200 ms
#   gpu_profile  cProfile of one `run --device cuda` over 64 photos (main process: run_gpu_profile.txt)
#   scoring  scoring time per photo on the GPU, float32 and bfloat16 autocast, batches of 32
#   train    one fold of the validation protocol trained on the GPU (benchmarks/validate.py --device cuda), its
#            process pinned to cores 2.. while, at the same time,
#   scaling2 `smartcrop run --device cpu` confined to cores 0,1 (`taskset -c 0,1`), lossless and --reencode
#   scaling  the same runs on every core (--device cpu)
# SKIP="scaling2 ..." leaves the 2-core runs out of `train_scaling2`; TRAIN_SECONDS (150) bounds the training.
#   amp      benchmarks/amp_check.py --device cuda on GAICD dev and FCDB test (skipped unless SKIP is set)
# Results: $OUT/results.tgz (every JSON and log) and $OUT/summary.txt, rewritten after every step (so a call cut
# short still returns what finished); the output's last lines are the summary.
# The image's torch ships without compiled bytecode (every process compiled ~1,000 modules: 2.2 s of start-up in
# the fourth session), so Python's bytecode cache is pointed at /tmp and filled once first, as an installed torch
# would have it; `env` times `import torch` both ways.
# DEVICE=cpu and smaller PHOTOS / COUNTS / TRAIN_ARGS make a quick rehearsal on a machine without a GPU.
set -u
OUT=${OUT:?set OUT}
DEVICE=${DEVICE:-cuda}
PHOTOS=${PHOTOS:-512}
COUNTS=${COUNTS:-64 $PHOTOS}  # photo counts of the runs on every core and on the GPU
TRAIN_ARGS=${TRAIN_ARGS:-}
export TRAIN_SECONDS=${TRAIN_SECONDS:-150}
SKIP=${SKIP:-amp}
DEADLINE=${DEADLINE:-520}  # seconds for all the steps together
D=.devdata
R=/tmp/devcheck
rm -rf $R && mkdir -p $R
unset PYTHONDONTWRITEBYTECODE
export OUT DEVICE PHOTOS COUNTS TRAIN_ARGS SKIP D R PYTHONUNBUFFERED=1 PYTHONPATH="$D/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PY=${PY:-python3} NCPU=$(nproc)
log() { echo "[$(date +%T)] $*" | tee -a $R/summary.txt; }
save() {  # what has finished so far, back under $OUT
  tar czf $OUT/results.tgz -C $R --exclude=photos --exclude=p64 --exclude=validate/data --exclude='*.safetensors' \
    --exclude=pycache --exclude=prof_out . 2>/dev/null
  cp $R/summary.txt $OUT/ 2>/dev/null
}
limit() {  # limit SECONDS: SECONDS, or less where the deadline comes first
  local left=$((DEADLINE - SECONDS - 5))
  [ "$1" -lt "$left" ] && echo "$1" || echo "$((left > 1 ? left : 1))"
}
step() {  # step NAME SECONDS COMMAND...: run it with a time limit, output to $R/NAME.log
  local name=$1 secs; secs=$(limit "$2"); shift 2
  case " $SKIP " in *" $name "*) log "$name: skipped"; return;; esac
  local t0=$SECONDS
  timeout --kill-after=5 "$secs" bash -c "$*" > $R/$name.log 2>&1
  log "$name: exit $? after $((SECONDS - t0)) s (limit $secs s)"
  tail -n 4 $R/$name.log | sed 's/^/    /' | tee -a $R/summary.txt
  save
}
export -f limit
if [ -f $D/lib/libturbojpeg.so.0.2.0 ] && [ -w /usr/lib/x86_64-linux-gnu ] && ! ldconfig -p | grep -q libturbojpeg; then
  cp $D/lib/libturbojpeg.so.0.2.0 /usr/lib/x86_64-linux-gnu/ &&
    ln -sf libturbojpeg.so.0.2.0 /usr/lib/x86_64-linux-gnu/libturbojpeg.so.0 && ldconfig
fi

env_info() {
  nproc; uname -r; free -g | head -2
  command -v lscpu >/dev/null && lscpu | grep -E "^(Model name|Thread|Core|Socket|NUMA node\(s\))"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY - <<'PY'
import sys, torch, PIL, numpy, typer
from smartcrop import jpegcrop
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available(),
      "pillow", PIL.__version__, "numpy", numpy.__version__, "typer", typer.__version__)
print("lossless backend:", jpegcrop.backend_name() or jpegcrop.unavailable_reason())
PY
  local TIMEFORMAT
  TIMEFORMAT="import torch (no bytecode cache): %R s"
  time PYTHONDONTWRITEBYTECODE=1 $PY -c "import torch"
  TIMEFORMAT="import torch, smartcrop.cli (bytecode cache filled): %R s"
  time PYTHONPYCACHEPREFIX=$R/pycache $PY -c "import torch, smartcrop.cli"
  TIMEFORMAT="import torch (bytecode cache used): %R s"
  time PYTHONPYCACHEPREFIX=$R/pycache $PY -c "import torch"
  $PY -m smartcrop.cli --version
}
export -f env_info
step env 60 env_info
export PYTHONPYCACHEPREFIX=$R/pycache  # from here on every process reads the filled cache

make_photos() {
  $PY benchmarks/make_photos.py $D/data/unlabeled $R/p64 --count 64 --jobs "$NCPU" || return 1
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
step photos 60 make_photos

step profile 110 $PY benchmarks/train_profile.py --data $D/data --backbone-weights $D/weights/mobilenet_v2_imagenet.pth \
  --device $DEVICE --steps 8 --settings cudnn+amp nocudnn+amp nocudnn+fp32

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
step gpu_run 80 gpu_run

# where the main process of a GPU run spends its time (it bounded the eighth session's runs: docs/performance.md)
gpu_profile() {
  $PY - "$R" "$DEVICE" <<'PY' || return 1
import cProfile, pstats, sys
r, device = sys.argv[1], sys.argv[2]
from smartcrop import cli
sys.argv = ["smartcrop", "run", f"{r}/p64", "--ratio", "16:9", "-o", f"{r}/prof_out", "--device", device]
prof = cProfile.Profile()
prof.enable()
try:
    cli.app()  # the CLI's main() would leave with os._exit, before the profile is written
except SystemExit:
    pass
prof.disable()
with open(f"{r}/run_gpu_profile.txt", "w") as f:
    for key, n in (("cumulative", 30), ("tottime", 20)):
        pstats.Stats(prof, stream=f).sort_stats(key).print_stats(n)
PY
  grep -m1 "function calls" $R/run_gpu_profile.txt
}
export -f gpu_profile
step gpu_profile 40 gpu_profile

step scoring 30 "$PY benchmarks/scoring_time.py $R/p64 --count 64 --passes 3 --device $DEVICE --batch 32 &&
  $PY benchmarks/scoring_time.py $R/p64 --count 64 --passes 3 --device $DEVICE --batch 32 --amp"

# training on the GPU (its process on cores 2..) while the 2-core runs use cores 0,1
train_and_scaling2() {
  local secs pin=""; secs=$(limit ${TRAIN_SECONDS:-150})
  [ "$NCPU" -gt 2 ] && pin="taskset -c 2-$((NCPU - 1))"
  timeout --kill-after=5 "$secs" $pin $PY benchmarks/validate.py --data $D/data \
    --backbone-weights $D/weights/mobilenet_v2_imagenet.pth --work $R/validate --variant "gpu=$TRAIN_ARGS" \
    --folds 0 --seeds 0 --code live --device $DEVICE > $R/train.log 2>&1 &
  local tr=$!
  case " $SKIP " in *" scaling2 "*) ;; *)
    taskset -c 0,1 $PY benchmarks/throughput.py $R/photos --counts $PHOTOS --repeat 1 --skip-vips --skip-peak \
      --out $R/scaling_2.json -- --device cpu;;
  esac
  wait $tr
  echo "train: exit $?"; tail -n 3 $R/train.log
}
export -f train_and_scaling2
step train_scaling2 ${TRAIN_SECONDS:-150} train_and_scaling2

step scaling 100 $PY benchmarks/throughput.py $R/photos --counts $COUNTS --repeat 2 --skip-vips --out $R/scaling_all.json \
  -- --device cpu

step amp 120 $PY benchmarks/amp_check.py --data $D/data --device $DEVICE --out $R/amp.json

# the summary: every result line
{
  for f in $R/scaling_all.json $R/scaling_2.json $R/gpu_run.json; do
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
save
cat $R/summary.txt
