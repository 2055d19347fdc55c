#!/bin/bash
# Keskar et al. 2017 comparison in docs/lab.md: LAMB at a small (64) and a large (2048) batch, each stopped at the
# same test accuracy (95%), then the epsilon-sharpness of both minima.
set -e
COMMON="--config docs/lab/mnist1d_sweep.toml --set recipe.optimizer=lamb --set recipe.scaling=none
  --set train.target_acc=0.95 --set train.epochs=20 --set train.threads=1 --no-progress"
scalelab train $COMMON --set train.batch_size=64 --set recipe.base_lr=0.0025 --set train.eval_every=20 \
  --out runs/lab-sharpness/b64
scalelab train $COMMON --set train.batch_size=2048 --set recipe.base_lr=0.014 --set train.eval_every=1 \
  --out runs/lab-sharpness/b2048
scalelab sharpness runs/lab-sharpness/b64 runs/lab-sharpness/b2048 --samples 2048 --eps 1e-3,5e-4
