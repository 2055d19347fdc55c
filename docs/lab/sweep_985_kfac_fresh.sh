#!/bin/sh
# K-FAC with fresh curvature (factors and inverses every step instead of every 10) in the 98.5% sweep of
# docs/lab.md, batch 64..2048, seeds 0-3: the same spec as docs/lab/sweep_985_seeds23.sh for K-FAC (LR grid
# centred by the linear rule 0.025@64), only recipe.kfac_factor_every=1 and recipe.kfac_inverse_every=1.
# Then the four seeds combined with momentum SGD's four seeds (combine_985.py).
set -e
C="--config docs/lab/mnist1d_sweep.toml --target-acc 0.985 --extend 1 --budget-epochs 8 --budget-steps 250 --eval-examples 1024"
for seed in ${SEEDS:-0 1 2 3}; do
  nice -n 19 scalelab sweep $C --batch 64..2048 --optimizers kfac --set train.seed=$seed \
    --set recipe.kfac_factor_every=1 --set recipe.kfac_inverse_every=1 \
    --lr-guess kfac=0.025@64:linear --lr-mults 0.5,1,2 \
    --warmup-epochs 0.25,1 --warmup-search-from 1024 --jobs 2 --out runs/lab-sweep-985-kfac-fresh-seed$seed
  scalelab report runs/lab-sweep-985-kfac-fresh-seed$seed
done
