#!/bin/sh
# Four more seeds (train.seed 4-7) of the 98.5% sweep, momentum SGD and K-FAC at its defaults, with exactly the
# spec of docs/lab/sweep_985_seeds23.sh; K-FAC with fresh curvature at the same seeds is
# SEEDS="4 5 6 7" docs/lab/sweep_985_kfac_fresh.sh.
set -e
C="--config docs/lab/mnist1d_sweep.toml --target-acc 0.985 --extend 1 --budget-epochs 8 --budget-steps 250 --eval-examples 1024"
for seed in ${SEEDS:-4 5 6 7}; do
  nice -n 19 scalelab sweep $C --batch 64..2048 --optimizers sgd,kfac --set train.seed=$seed \
    --lr-guess sgd=0.1@64:sqrt --lr-guess kfac=0.025@64:linear --lr-mults 0.5,1,2 \
    --warmup-epochs 0.25,1 --warmup-search-from 1024 --jobs 2 --out runs/lab-sweep-985-seed$seed
  scalelab report runs/lab-sweep-985-seed$seed
done
