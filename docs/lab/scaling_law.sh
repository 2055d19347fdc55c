#!/bin/bash
# Hestness et al. 2017 data scaling in docs/lab.md: widths 8 and 16 on 1k..16k MNIST-1D examples, 600 SGD steps of
# batch 128 each, the power law fitted on the best width per size, extrapolated to the full 45k and checked there.
set -e
scalelab scaling-law --config docs/lab/mnist1d_sweep.toml --set recipe.schedule=cosine --set recipe.base_lr=0.2 \
  --set train.batch_size=128 --n-train 1000,2000,4000,8000,16000 --widths 8,16 --steps 600 --predict 45000 \
  --out runs/lab-scaling
