#!/bin/sh
# Smith et al. 2017 on digits (docs/lab.md): decay the LR (x0.2 at epochs 4 and 8 of 12) at batch 32, or keep the LR
# and grow the batch x5 at the same epochs (32 -> 160 -> 800). Same epochs, same examples, fewer updates.
set -e
COMMON="--config docs/lab/digits_sweep.toml --set recipe.optimizer=sgd --set recipe.scaling=none
  --set recipe.base_lr=0.05 --set recipe.warmup_epochs=0.5 --set train.batch_size=32 --set train.epochs=12
  --set train.threads=1 --no-progress"
scalelab train $COMMON --set recipe.schedule=step --set recipe.milestones=4,8 --set recipe.gamma=0.2 \
  --out runs/lab-smith-digits/decay-lr
scalelab train $COMMON --set recipe.schedule=constant --set recipe.batch_milestones=4,8 \
  --set recipe.batch_growth=5 --out runs/lab-smith-digits/grow-batch
