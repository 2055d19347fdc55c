#!/bin/sh
# The 95% sweep of docs/lab.md: batch 32..8192, budget max(10 epochs, 200 steps), LR grid widened (--extend 2).
# Trials whose run the new budget leaves unchanged are reused (docs/lab/reuse_trials.py says which): those of the
# first, epochs-only sweep and of a first attempt with --budget-steps 400 that was stopped for lack of machine time.
set -e
python docs/lab/reuse_trials.py runs/lab-sweep-95 docs/lab/results/sweep-95-epochs/sweep.json \
  runs/lab-sweep-95-b400 --budget-epochs 10 --budget-steps 200 --n-train 45000
nice -n 19 scalelab sweep --config docs/lab/mnist1d_sweep.toml --batch 32..8192 --target-acc 0.95 \
  --optimizers sgd,lars,lamb --lr-guess sgd=0.05@32:linear --lr-guess lars=8@4096:sqrt \
  --lr-guess lamb=0.02@4096:sqrt --lr-mults 0.5,1,2 --extend 2 --budget-epochs 10 --budget-steps 200 \
  --eval-examples 1024 --jobs 2 --out runs/lab-sweep-95
scalelab report runs/lab-sweep-95
# The linear rule's LRs for momentum SGD at 4096 and 8192 (1.6-25.6) all stayed near chance, so the search had no
# direction to go; at 2048 the fastest LR was 0.4, below the rule's 3.2. A second search there, around 0.4:
nice -n 19 scalelab sweep --config docs/lab/mnist1d_sweep.toml --batch 4096,8192 --target-acc 0.95 \
  --optimizers sgd --lr-guess sgd=0.4@2048:none --lr-mults 0.5,1,2 --extend 1 --budget-epochs 10 \
  --budget-steps 200 --eval-examples 1024 --jobs 2 --out runs/lab-sweep-95-sgd-low
