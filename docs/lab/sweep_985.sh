#!/bin/sh
# The second attempt at the goal in docs/lab.md: a harder target, 98.5% test accuracy, where the small batches
# need several epochs (so S0 b0 / S_min is large), for momentum SGD and K-FAC (recipe.optimizer=kfac: K-FAC +
# momentum SGD with scalelab's defaults: factors and inverses every 10 steps, damping 1e-3, KL clip 1e-3),
# batch 64..2048, warm-up 0.25 epoch everywhere and also 1 epoch from batch 1024 on, LR constant after the warm-up
# (so that slow trials can be pruned), budget max(8 epochs, 250 steps), two seeds (train.seed 0 and 1; the data set
# is the same). All sweeps ran next to each other, 2 trial processes each, under nice -n 19.
set -e
C="--config docs/lab/mnist1d_sweep.toml --target-acc 0.985 --extend 1 --budget-epochs 8 --budget-steps 250 --eval-examples 1024"

# 1. the main sweep, seed 0, and the same for seed 1
for seed in 0 1; do
  out=runs/lab-sweep-985; [ $seed = 1 ] && out=runs/lab-sweep-985-seed1
  nice -n 19 scalelab sweep $C --batch 64..2048 --optimizers sgd,kfac --set train.seed=$seed \
    --lr-guess sgd=0.1@64:sqrt --lr-guess kfac=0.4@1024:sqrt --lr-mults 0.5,1,2 \
    --warmup-epochs 0.25,1 --warmup-search-from 1024 --jobs 2 --out $out
done
# (seed 0 was run without --set train.seed=0, its default: the same spec.)

# 2. K-FAC's LR search at the small batches, lower: the sqrt rule from 0.4@1024 puts 0.1 at batch 64, and the
#    fastest K-FAC LRs there turned out to be 8x lower (second searches, as for SGD at 4096-8192 at 95%)
nice -n 19 scalelab sweep $C --batch 64 --optimizers kfac --lr-guess kfac=0.025@64:none --lr-mults 0.5,1 \
  --warmup-epochs 0.25 --jobs 1 --out runs/lab-985-kfac-low
nice -n 19 scalelab sweep $C --batch 128 --optimizers kfac --lr-guess kfac=0.0125@64:linear --lr-mults 0.5,1,2 \
  --warmup-epochs 0.25 --jobs 1 --out runs/lab-985-kfac-low128
nice -n 19 scalelab sweep $C --batch 64,128 --optimizers kfac --set train.seed=1 --lr-guess kfac=0.0125@64:linear \
  --lr-mults 0.5,1,2 --warmup-epochs 0.25 --jobs 1 --out runs/lab-985-kfac-low-seed1

# 3. K-FAC with 10x and 100x the damping, a probe of K-FAC's small-batch start (batch 64, seed 0; damping 0.1 also
#    at 64 with seed 1 and at 128 with both seeds; the damping-0.1 sweep over 64..2048 was stopped after 1024 and
#    2048 for lack of machine time)
for d in 0.01 0.1; do
  nice -n 19 scalelab sweep $C --batch 64 --optimizers kfac --set recipe.kfac_damping=$d --lr-guess kfac=0.1@64:none \
    --lr-mults 0.5,1,2 --warmup-epochs 0.25 --jobs 1 --out runs/lab-985-kfac-d$d
done
D="--optimizers kfac --set recipe.kfac_damping=0.1 --warmup-epochs 0.25 --jobs 1"
nice -n 19 scalelab sweep $C $D --batch 64 --lr-guess kfac=0.0125@64:none --lr-mults 1 --extend 0 \
  --out runs/lab-985-kfac-d0.1-low
nice -n 19 scalelab sweep $C $D --batch 64 --set train.seed=1 --lr-guess kfac=0.025@64:none --lr-mults 0.5,1,2 \
  --out runs/lab-985-kfac-d0.1-seed1
for seed in 0 1; do
  nice -n 19 scalelab sweep $C $D --batch 128 --set train.seed=$seed --lr-guess kfac=0.0125@64:linear --lr-mults 0.5,1,2 \
    --extend 0 --out runs/lab-985-kfac-d0.1-b128$([ $seed = 1 ] && echo -seed1)
done
nice -n 19 scalelab sweep $C --batch 64..2048 --optimizers kfac --set recipe.kfac_damping=0.1 \
  --lr-guess kfac=0.025@64:sqrt --lr-mults 0.5,1,2,4 --warmup-epochs 0.25,1 --warmup-search-from 1024 --jobs 2 \
  --out runs/lab-sweep-985-kfac-d0.1 || true   # stopped by hand; the finished trials are kept

# 4. the gradient noise scale at the same target: momentum SGD at batch 256 with the fastest LR of the sweep
nice -n 19 scalelab noise --config docs/lab/mnist1d_sweep.toml --set train.batch_size=256 --set recipe.optimizer=sgd \
  --set recipe.base_lr=0.1 --set recipe.scaling=none --set recipe.warmup_epochs=0.25 --set train.target_acc=0.985 \
  --set train.epochs=8 --set train.eval_every=4 --set train.threads=1 --set train.progress=false --every 5 \
  --shards 8 --out runs/lab-sweep-985/noise

# 4b. two single points added at the end (seed 1): SGD at 64 one factor below its search's lowest LR, and K-FAC at
#     damping 0.1 at 1024
nice -n 19 scalelab sweep $C --batch 64 --optimizers sgd --set train.seed=1 --lr-guess sgd=0.0125@64:none --lr-mults 1 \
  --extend 0 --warmup-epochs 0.25 --jobs 1 --out runs/lab-985-sgd-low-seed1
nice -n 19 scalelab sweep $C --batch 1024 --optimizers kfac --set train.seed=1 --set recipe.kfac_damping=0.1 \
  --lr-guess kfac=0.1@1024:none --lr-mults 0.5,1,2 --extend 0 --warmup-epochs 0.25 --jobs 1 \
  --out runs/lab-985-kfac-d0.1-b1024-seed1

# 5. LARS (trust coefficient 0.02) and LAMB, a first pass at the two batches that decide (64 and 1024), seed 0
nice -n 19 scalelab sweep $C --batch 64,1024 --optimizers lars,lamb --set recipe.trust_coef=0.02 \
  --lr-guess lars=0.4@1024:sqrt --lr-guess lamb=0.02@1024:sqrt --lr-mults 0.5,1,2 --warmup-epochs 0.25 --jobs 2 \
  --out runs/lab-985-lars-lamb

# 6. the reports, the results copied into docs/lab/results (sweep-985 = seed 0, sweep-985-seed1, sweep-985-extra/*),
#    then per seed every sweep of that seed merged (each cell: best over all its trials), the knees per seed and of
#    the mean over the seeds, the goal, and the plot; the second one with K-FAC at damping 0.1 as a recipe of its own
scalelab report runs/lab-sweep-985
scalelab report runs/lab-sweep-985-seed1
R=docs/lab/results; E=$R/sweep-985-extra
python docs/lab/combine_985.py $R/sweep-985/combined --seed 0=$R/sweep-985,$E/kfac-low,$E/kfac-low128 \
  --seed 1=$R/sweep-985-seed1,$E/kfac-low-seed1,$E/sgd-low-seed1
python docs/lab/combine_985.py $R/sweep-985/combined-with-damping-0.1 \
  --seed 0=$R/sweep-985,$E/kfac-low,$E/kfac-low128,$E/kfac-d0.1,$E/kfac-d0.1-low,$E/kfac-d0.1-b128,$E/sweep-kfac-d0.1-stopped \
  --seed 1=$R/sweep-985-seed1,$E/kfac-low-seed1,$E/sgd-low-seed1,$E/kfac-d0.1-seed1,$E/kfac-d0.1-b128-seed1,$E/kfac-d0.1-b1024-seed1 \
  --rename kfac-d0.1:kfac=kfac-d0.1 --rename kfac-d0.1-low:kfac=kfac-d0.1 --rename kfac-d0.1-b128:kfac=kfac-d0.1 \
  --rename sweep-kfac-d0.1-stopped:kfac=kfac-d0.1 --rename kfac-d0.1-seed1:kfac=kfac-d0.1 \
  --rename kfac-d0.1-b128-seed1:kfac=kfac-d0.1 --rename kfac-d0.1-b1024-seed1:kfac=kfac-d0.1
