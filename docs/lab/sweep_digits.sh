#!/bin/sh
# The digits sweep of docs/lab.md: steps to 98% test accuracy (292 of 297 images) for momentum SGD, LARS (trust
# coefficient 0.02) and LAMB, batch 16..1024 (1,500 training images: 1024 is the largest power of two that fills
# one step per epoch), warm-up 1 epoch, budget max(30 epochs, 300 steps), evaluation after every step; then the gradient noise scale of a
# momentum-SGD run at batch 64. The Smith et al. comparison on digits is docs/lab/smith_digits.sh.
set -e
nice -n 19 scalelab sweep --config docs/lab/digits_sweep.toml --batch 16..1024 --target-acc 0.98 \
  --optimizers sgd,lars,lamb --set recipe.trust_coef=0.02 --lr-guess sgd=0.05@32:linear \
  --lr-guess lars=0.4@1024:sqrt --lr-guess lamb=0.02@1024:sqrt --lr-mults 0.5,1,2 --extend 2 \
  --budget-epochs 30 --budget-steps 300 --eval-examples 16 --jobs 2 --out runs/lab-sweep-digits
scalelab report runs/lab-sweep-digits
# The gradient noise scale of momentum SGD at batch 64 with the sweep's fastest LR there (0.05), every step, 8 shards
nice -n 19 scalelab noise --config docs/lab/digits_sweep.toml --set train.batch_size=64 --set recipe.optimizer=sgd \
  --set recipe.base_lr=0.05 --set recipe.scaling=none --set train.target_acc=0.98 --set train.epochs=30 \
  --set train.eval_every=1 --set train.threads=1 --set train.progress=false --every 1 --shards 8 \
  --out runs/lab-sweep-digits/noise
