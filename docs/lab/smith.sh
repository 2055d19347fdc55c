#!/bin/bash
# Smith et al. 2017 comparison in docs/lab.md: decay the LR (x0.2 at epochs 2 and 4 of 6) at batch 128, or keep the
# LR and grow the batch x5 at the same epochs (128 -> 640 -> 3200). Same epochs, same examples, fewer updates.
set -e
COMMON="--config docs/lab/mnist1d_sweep.toml --set recipe.optimizer=sgd --set recipe.scaling=none
  --set recipe.base_lr=0.2 --set recipe.warmup_epochs=0.5 --set train.batch_size=128 --set train.epochs=6
  --set train.threads=1 --no-progress"
scalelab train $COMMON --set recipe.schedule=step --set recipe.milestones=2,4 --set recipe.gamma=0.2 \
  --out runs/lab-smith/decay-lr
scalelab train $COMMON --set recipe.schedule=constant --set recipe.batch_milestones=2,4 \
  --set recipe.batch_growth=5 --out runs/lab-smith/grow-batch
