#!/bin/sh
# Two more seeds (train.seed 2 and 3) of the 98.5% sweep of docs/lab.md, momentum SGD and K-FAC at batch
# 64..2048 (docs/lab/sweep_985_seeds.sh), then the four seeds combined (combine_985.py).
set -e
SEEDS="2 3" sh docs/lab/sweep_985_seeds.sh
R=docs/lab/results; E=$R/sweep-985-extra
python docs/lab/combine_985.py $R/sweep-985/combined-4-seeds --seed 0=$R/sweep-985,$E/kfac-low,$E/kfac-low128 \
  --seed 1=$R/sweep-985-seed1,$E/kfac-low-seed1,$E/sgd-low-seed1 --seed 2=$R/sweep-985-seed2 --seed 3=$R/sweep-985-seed3
