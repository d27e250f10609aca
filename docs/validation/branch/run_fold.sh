#!/bin/bash
# Late-branch soup members for one validation fold: a base run to epoch 2 (seed 0, init 0), then two branches
# resumed from its checkpoint with branch seeds 10 and 11 to epoch 5. Code: the snapshot in runs/branch/code.
set -e
F=$1
cd /work/main
D=/work/main/runs/branch/fold$F
mkdir -p $D
export OMP_NUM_THREADS=1 PYTHONPATH=/work/main/runs/branch/code
ARGS="--gaicd /work/main/runs/validate/data/gaicd_fold$F:train --fcdb /work/main/runs/validate/data/fcdb_heldout --unlabeled /work/shared/data/unlabeled --unlabeled /work/shared/data/gaicd/images/holdout --val-fraction 0 --backbone-weights /work/shared/weights/mobilenet_v2_imagenet.pth --device cpu --fcdb-weight 0.5 --seed 0"
PY=/work/main/.venv/bin/python
cd /work/main/runs/branch/code  # python -m puts the working folder first on sys.path: the snapshot
[ -f $D/base.ckpt ] && [ -f $D/base.safetensors ] || nice -n 10 $PY -m smartcrop.cli train $ARGS --epochs 2 --out $D/base.safetensors > $D/base.log 2>&1
for B in 10 11; do
  [ -f $D/b$B.safetensors ] || nice -n 10 $PY -m smartcrop.cli train $ARGS --epochs 5 --resume $D/base.ckpt --branch-seed $B --out $D/b$B.safetensors > $D/b$B.log 2>&1
done
echo fold $F done
