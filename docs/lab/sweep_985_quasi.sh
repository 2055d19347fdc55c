#!/bin/sh
# The decayed-LR 98.5% sweep with the quasi-random search (docs/lab.md): per seed, momentum SGD and K-FAC at batch
# 64..1024, TRIALS points per cell (default 24) of a scrambled Sobol sequence over the LR (0.25-4x the guesses of
# the grid sweeps) and the horizon (0.5-8 epochs, cosine to zero over it), each trial pruned at its cell's best so
# far. The settings otherwise are the grid's (DECAY_SWEEP in docs/lab/seeds_985.sh).
#
#   SEEDS="0" docs/lab/sweep_985_quasi.sh               -> docs/lab/results/sweep-985-quasi/seedS
#   SEEDS="0" TEST=10000 docs/lab/sweep_985_quasi.sh    the second draw -> docs/lab/results/sweep-985-test10000-quasi
#   SEEDS="0 1 2 3" [TEST=10000] DECAY=quasi docs/lab/combine_985_seeds.sh    the seeds combined -> .../combined-4-seeds
set -e
. docs/lab/seeds_985.sh
for seed in $SEEDS; do
  run=runs/lab-sweep-985-${T}quasi-seed$seed
  nice -n 19 scalelab sweep $DECAY_SWEEP --search quasi-random --trials ${TRIALS:-24} --lr-range 0.25,4 \
    --horizon-range 0.5,8 --batch 64..1024 --optimizers sgd,kfac --lr-guess sgd=$SGD_GUESS \
    --lr-guess kfac=$KFAC_GUESS --set train.seed=$seed --out $run < /dev/null
  mkdir -p $QUASI_DIR/seed$seed
  (cd $run && cp best.csv sweep.csv sweep.json sweep_spec.json ../../$QUASI_DIR/seed$seed/)
done
