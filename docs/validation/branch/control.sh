#!/bin/bash
# Control: resume the fold's base checkpoint without a branch seed (the checkpoint's own random state) to epoch 5.
F=$1
D=/work/main/runs/branch/fold$F
export OMP_NUM_THREADS=1 PYTHONPATH=/work/main/runs/branch/code
ARGS="--gaicd /work/main/runs/validate/data/gaicd_fold$F:train --fcdb /work/main/runs/validate/data/fcdb_heldout --unlabeled /work/shared/data/unlabeled --unlabeled /work/shared/data/gaicd/images/holdout --val-fraction 0 --backbone-weights /work/shared/weights/mobilenet_v2_imagenet.pth --device cpu --fcdb-weight 0.5 --seed 0"
cd /work/main/runs/branch/code
/work/main/.venv/bin/python -m smartcrop.cli train $ARGS --epochs 5 --resume $D/base.ckpt --out $D/plain.safetensors > $D/plain.log 2>&1
