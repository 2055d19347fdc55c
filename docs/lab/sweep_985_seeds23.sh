#!/bin/sh
# Two more seeds (train.seed 2 and 3) of the 98.5% sweep of docs/lab.md, momentum SGD and K-FAC at batch 64..2048:
# the same spec as docs/lab/sweep_985.sh step 1, but K-FAC's LR grid centred by the linear rule on the LRs its
# searches found best in seeds 0 and 1 (0.0125-0.025 at 64, 0.2-0.57 at 1024-2048) instead of a first search from
# 0.4@1024:sqrt plus second, lower searches at 64 and 128. Then the four seeds combined (combine_985.py).
set -e
C="--config docs/lab/mnist1d_sweep.toml --target-acc 0.985 --extend 1 --budget-epochs 8 --budget-steps 250 --eval-examples 1024"
for seed in 2 3; do
  nice -n 19 scalelab sweep $C --batch 64..2048 --optimizers sgd,kfac --set train.seed=$seed \
    --lr-guess sgd=0.1@64:sqrt --lr-guess kfac=0.025@64:linear --lr-mults 0.5,1,2 \
    --warmup-epochs 0.25,1 --warmup-search-from 1024 --jobs 2 --out runs/lab-sweep-985-seed$seed
  scalelab report runs/lab-sweep-985-seed$seed
done
R=docs/lab/results; E=$R/sweep-985-extra
for seed in 2 3; do  # the results, without the trials' run directories
  mkdir -p $R/sweep-985-seed$seed
  (cd runs/lab-sweep-985-seed$seed && cp -r best.csv plots report.html steps_*.csv sweep.csv sweep.json sweep_spec.json \
    ../../$R/sweep-985-seed$seed/)
done
python docs/lab/combine_985.py $R/sweep-985/combined-4-seeds --seed 0=$R/sweep-985,$E/kfac-low,$E/kfac-low128 \
  --seed 1=$R/sweep-985-seed1,$E/kfac-low-seed1,$E/sgd-low-seed1 --seed 2=$R/sweep-985-seed2 --seed 3=$R/sweep-985-seed3
