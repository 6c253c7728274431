#!/bin/bash
# Issue 7's A/B runs, all at once on one GPU: bash experiments/convergence/run_ab_gpu.sh [OUT_DIR]
# SET=extra runs the 8 variants the first call had no room for, with max_epochs=23 (the budget the first
# call's runs reached), MAXT=00:00:04:00 and HARD=270.
#
# 22 demo-length runs (the demo and the crowded set, 2 seeds each) share the GPU and the CPU cores; each
# stops at trainer.max_time (MAXT, default 7 min 20 s), so they reach about the same number of epochs and
# the report compares them over the fewest any reached. Then:
#   python -m detr_lightning.tools.report OUT_DIR/demo_plain_s4? ... --brief -o experiments/convergence/README.md
#
# Run from the repository root with the project installed (make install). On the lent GPU machine of this
# workplace (its own torch, no registry) the missing packages travel as wheels in .whl/ and pure-Python
# folders in .pylib/ (both git-ignored): they are put on the path when present.
set -u
OUT_DIR=${1:-runs}
MAXT=${MAXT:-00:00:07:20}
HARD=${HARD:-540}                       # kill a run that is still going after this many seconds
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/.pylib:$PWD/src
fi
export PYTHONUNBUFFERED=1 DETR_LIGHTNING_OFFLINE=1 WANDB_MODE=disabled PYTHONWARNINGS=ignore
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1  # 22 processes on 16 cores
PYTHON=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
$PYTHON -c "import torch, torchvision, lightning; print(torch.__version__, torchvision.__version__, lightning.__version__)"
$PYTHON -m detr_lightning.data.demo data/demo > /dev/null &
$PYTHON -m detr_lightning.data.demo data/demo_crowded --crowded > /dev/null &
wait
mkdir -p "$OUT_DIR"

job() {
  local name=$1; shift
  local start; start=$(date +%s)
  timeout "$HARD" $PYTHON train.py "$@" trainer=gpu data.num_workers=1 callbacks.progress_bar=null \
    callbacks.plots=null trainer.max_time=$MAXT hydra.run.dir="$OUT_DIR/$name" > "$OUT_DIR/$name.log" 2>&1
  echo "$name rc=$? wall=$(( $(date +%s) - start ))s" >> "$OUT_DIR/status.txt"
}

PLAIN="model.spatial_prior=none"
if [ "${SET:-main}" = extra ]; then
  for seed in 42 43; do
    job demo_varifocal_s$seed experiment=demo seed=$seed $PLAIN loss.class_loss=varifocal trainer.max_epochs=23 &
    C="experiment=demo_crowded seed=$seed trainer.max_epochs=23"
    job crowded_groups4_s$seed $C $PLAIN model.num_groups=4 &
    job crowded_focal_s$seed $C $PLAIN loss.class_loss=focal &
    job crowded_varifocal_s$seed $C $PLAIN loss.class_loss=varifocal &
  done
  sleep 45; nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader; wait; sort "$OUT_DIR/status.txt"; exit 0
fi
for seed in 42 43; do
  D="experiment=demo seed=$seed"
  job demo_plain_s$seed $D $PLAIN &
  job demo_groups4_s$seed $D $PLAIN model.num_groups=4 &
  job demo_focal_s$seed $D $PLAIN loss.class_loss=focal &
  job demo_prior_s$seed $D &
  job demo_prior_groups4_s$seed $D model.num_groups=4 &
  job demo_prior_focal_s$seed $D loss.class_loss=focal &
  job demo_prior_varifocal_s$seed $D loss.class_loss=varifocal &
  C="experiment=demo_crowded seed=$seed"
  job crowded_plain_s$seed $C $PLAIN &
  job crowded_prior_s$seed $C &
  job crowded_prior_groups4_s$seed $C model.num_groups=4 &
done
job demo_prior_ce2_s42 experiment=demo seed=42 loss.ce_loss_coef=2 matcher.cost_class=2 &
job demo_prior_lr4e-4_s42 experiment=demo seed=42 optimizer.lr=4e-4 optimizer.lr_backbone=4e-4 &
sleep 60
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
uptime
wait
sort "$OUT_DIR/status.txt"
