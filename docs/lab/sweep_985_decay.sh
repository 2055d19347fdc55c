#!/bin/sh
# The 98.5% sweep with a decaying LR (docs/lab.md, limits): cosine decay to zero over a horizon of E epochs
# (--budget-epochs E, --budget-steps 1: the budget is the horizon), E = 1, 2, 4, 8, each a sweep of momentum SGD and
# K-FAC over batch 64..2048 with the LR grids of docs/lab/sweep_985_seeds.sh, and E = 16 for momentum SGD at 2048
# alone (8 epochs there are 168 steps, fewer than its constant-LR trials needed); a cell's value is its best over
# the horizons. When these ran, a decayed trial could not be pruned and ran to the target or its horizon; now it is
# stopped at its cell's best so far with its schedule's length kept (train.schedule_steps), which leaves every
# cell's best as it was and marks such trials pruned instead of reached or missed. (`scalelab sweep --horizons 1,2,4,8` now searches the horizons in one sweep; this script, one sweep
# per horizon, is what produced the published results and replays them.)
#
#   SEEDS="0" docs/lab/sweep_985_decay.sh      -> docs/lab/results/sweep-985-decay/seedS-eE
#   SEEDS="0" HORIZONS=16 docs/lab/sweep_985_decay.sh    only the given horizons (default: 1 2 4 8 16)
#   SEEDS="0" TEST=10000 docs/lab/sweep_985_decay.sh     the second draw -> docs/lab/results/sweep-985-test10000-decay
#   SEEDS="0 1 2" [TEST=10000] DECAY=yes docs/lab/combine_985_seeds.sh     the seeds combined -> .../combined-3-seeds
set -e
. docs/lab/seeds_985.sh
for seed in $SEEDS; do
  for e in ${HORIZONS:-1 2 4 8 16}; do
    case $e in
      1|2|4|8) cells="--batch 64..2048 --optimizers sgd,kfac --lr-guess kfac=$KFAC_GUESS" ;;
      16) cells="--batch 2048 --optimizers sgd" ;;
      *) echo "sweep_985_decay.sh: horizon $e is not one of: 1 2 4 8 16" >&2; exit 2 ;;
    esac
    run=runs/lab-sweep-985-${T}decay-seed$seed-e$e
    nice -n 19 scalelab sweep $DECAY_SWEEP --budget-epochs $e $cells --lr-guess sgd=$SGD_GUESS \
      --set train.seed=$seed --out $run < /dev/null
    mkdir -p $DECAY_DIR/seed$seed-e$e
    (cd $run && cp best.csv sweep.csv sweep.json sweep_spec.json ../../$DECAY_DIR/seed$seed-e$e/)
  done
done
