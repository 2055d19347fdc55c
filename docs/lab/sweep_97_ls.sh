#!/bin/sh
# The attempt at the goal in docs/lab.md: the 97% sweep again for momentum SGD and LAMB with label smoothing 0.1
# at every batch and the warm-up searched (1 and 0.25 epochs) from batch 512 on; otherwise as docs/lab/sweep_97.sh.
set -e
nice -n 19 scalelab sweep --config docs/lab/mnist1d_sweep.toml --batch 64..1024 --target-acc 0.97 \
  --optimizers sgd,lamb --set recipe.label_smoothing=0.1 --lr-guess sgd=0.025@32:linear \
  --lr-guess lamb=0.02@1024:sqrt --lr-mults 0.5,1,2 --extend 1 --warmup-epochs 1,0.25 --warmup-search-from 512 \
  --budget-epochs 10 --budget-steps 200 --eval-examples 1024 --jobs 1 --out runs/lab-sweep-97-ls
scalelab report runs/lab-sweep-97-ls
