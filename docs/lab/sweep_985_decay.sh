#!/bin/sh
# The 98.5% sweep with a decaying LR (docs/lab.md, limits): cosine decay to zero over a horizon of E epochs
# (--budget-epochs E, --budget-steps 1: the budget is the horizon), E = 1, 2, 4, 8, each a sweep of momentum SGD and
# K-FAC over batch 64..2048 with the LR grids of docs/lab/sweep_985_seeds.sh; a cell's value is its best over the
# horizons. Trials cannot be pruned (the LR depends on the run's length), so every trial runs to the target or
# its horizon.
#
#   SEEDS="0" docs/lab/sweep_985_decay.sh      -> docs/lab/results/sweep-985-decay/seedS-eE
set -e
[ -z "$TEST" ] || { echo "sweep_985_decay.sh: runs on the first draw only; unset TEST" >&2; exit 2; }
. docs/lab/seeds_985.sh
D=$R/sweep-985-decay
for seed in $SEEDS; do
  for e in 1 2 4 8; do
    run=runs/lab-sweep-985-decay-seed$seed-e$e
    nice -n 19 scalelab sweep --config docs/lab/mnist1d_sweep.toml --target-acc 0.985 --budget-epochs $e \
      --budget-steps 1 --eval-examples 1024 --batch 64..2048 --optimizers sgd,kfac --set train.seed=$seed \
      --set recipe.schedule=cosine --lr-guess sgd=$SGD_GUESS --lr-guess kfac=$KFAC_GUESS \
      --lr-mults 0.5,1,2 --extend 1 --warmup-epochs 0.25 --jobs 2 --out $run < /dev/null
    mkdir -p $D/seed$seed-e$e
    (cd $run && cp best.csv sweep.csv sweep.json sweep_spec.json ../../$D/seed$seed-e$e/)
  done
done
