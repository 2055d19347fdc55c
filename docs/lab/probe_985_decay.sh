#!/bin/sh
# Probes of the decayed-LR 98.5% sweep (docs/lab.md, "A decaying LR"), at the two cells that decide the knees,
# with the settings of docs/lab/sweep_985_decay.sh otherwise:
#  - K-FAC at batch 512 within a 1-epoch horizon (87 steps; perfect scaling from K-FAC's ~580 steps at 64 needs
#    at most 91), seed 1, with its knobs one at a time: a wider LR grid, KL clipping 0.01 and off, fresh
#    curvature (factors and inverses every step), warm-up 0.05 and 0.1 epoch, damping 0.01 and 1e-4;
#  - K-FAC at batch 64 within a 0.75-epoch horizon (527 steps), seeds 0-2: does the start get faster still?
#
#   docs/lab/probe_985_decay.sh      -> docs/lab/results/probe-985-decay/<probe>/
set -e
SEEDS=${SEEDS:-"0 1 2"}   # the seeds of the batch-64 probe
. docs/lab/seeds_985.sh
probe() {  # NAME BATCH HORIZON SEED WARMUP LR_MULTS [--set ...]
  name=$1 batch=$2 e=$3 seed=$4 wu=$5 mults=$6; shift 6
  run=runs/lab-probe-985-decay/$name
  nice -n 19 scalelab sweep $DECAY_SWEEP --budget-epochs $e --batch $batch --optimizers kfac \
    --lr-guess kfac=$KFAC_GUESS --lr-mults $mults --warmup-epochs $wu --set train.seed=$seed --no-progress \
    --out $run "$@" < /dev/null > /dev/null
  mkdir -p $R/probe-985-decay/$name
  (cd $run && cp best.csv sweep.csv sweep.json sweep_spec.json ../../../$R/probe-985-decay/$name/)
  python -c "import csv, sys; print(sys.argv[1] + ':', ' '.join(','.join(r[k] for k in ('batch', 'steps_to_target',
    'lr', 'status', 'best_test_acc')) for r in csv.DictReader(open(sys.argv[2]))))" $name $run/sweep.csv
}
probe b512-e1-base 512 1 1 0.25 2,4,8
probe b512-e1-kl1e-2 512 1 1 0.25 2,4,8 --set recipe.kfac_kl_clip=0.01
probe b512-e1-kl0 512 1 1 0.25 2,4,8 --set recipe.kfac_kl_clip=0
probe b512-e1-fresh 512 1 1 0.25 2,4,8 --set recipe.kfac_factor_every=1 --set recipe.kfac_inverse_every=1
probe b512-e1-wu005 512 1 1 0.05 2,4,8
probe b512-e1-wu01 512 1 1 0.1 2,4,8
probe b512-e1-damp1e-2 512 1 1 0.1 2,4,8 --set recipe.kfac_damping=0.01
probe b512-e1-damp1e-4 512 1 1 0.1 2,4,8 --set recipe.kfac_damping=0.0001
for seed in $SEEDS; do probe b64-e0.75-s$seed 64 0.75 $seed 0.25 0.5,1,2; done
