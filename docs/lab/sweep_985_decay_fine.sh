#!/bin/sh
# The decayed-LR 98.5% sweep of docs/lab/sweep_985_decay.sh at horizons between its powers of two: with a decay,
# a run reaches the target late in its horizon (at 0.5-0.95 of it), so steps-to-target moves with the horizon
# grid, and a grid of factors of 2 cannot resolve the knee's 1.25x. Horizons 0.75, 1.25, 1.5, 2.5, 3, 5 epochs
# (with 1, 2, 4, 8: steps of at most 1.33x up to 4 epochs), batch 64..512, momentum SGD and K-FAC, in one sweep
# (scalelab sweep --horizons), the other settings as in sweep_985_decay.sh.
#
#   SEEDS="0 1 2 3" docs/lab/sweep_985_decay_fine.sh     -> docs/lab/results/sweep-985-decay/seedS-fine
#   SEEDS="0 1 2 3" DECAY=fine docs/lab/combine_985_seeds.sh   with the horizons of both -> .../combined-4-seeds-fine
set -e
. docs/lab/seeds_985.sh
for seed in $SEEDS; do
  run=runs/lab-sweep-985-${T}decay-seed$seed-fine
  nice -n 19 scalelab sweep $DECAY_SWEEP --horizons 0.75,1.25,1.5,2.5,3,5 --batch 64..512 \
    --optimizers sgd,kfac --lr-guess kfac=$KFAC_GUESS --lr-guess sgd=$SGD_GUESS --set train.seed=$seed \
    --out $run < /dev/null
  mkdir -p $DECAY_DIR/seed$seed-fine
  (cd $run && cp best.csv sweep.csv sweep.json sweep_spec.json ../../$DECAY_DIR/seed$seed-fine/)
done
