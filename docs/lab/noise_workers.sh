#!/bin/sh
# The gradient noise scale of docs/lab.md's 95% section measured the free way: momentum SGD at batch 256, LR 0.4,
# on 4 data-parallel workers, |G_b|^2 (b = 64, each worker's share) and |G_B|^2 (B = 256) from the training step's
# own gradients before and after DDP's all-reduce (train.noise_method=workers, the default with several workers).
# Every 5 steps with EMA 0.9 (the shards run's cadence), then every step with EMA 0.98 (about the same window);
# then the 98.5% run of docs/lab/sweep_985.sh on 4 workers.
set -e
for every in 5 1; do
  ema=$([ $every = 5 ] && echo 0.9 || echo 0.98)
  out=runs/lab-sweep-95/noise-workers4$([ $every = 1 ] && echo -every1 || true)
  scalelab noise --nproc 4 --config docs/lab/mnist1d_sweep.toml --set train.batch_size=256 --set recipe.optimizer=sgd \
    --set recipe.base_lr=0.4 --set recipe.scaling=none --set train.target_acc=0.95 --set train.epochs=10 \
    --set train.eval_every=10 --set train.progress=false --every $every --ema $ema --out $out
  mkdir -p docs/lab/results/sweep-95/$(basename $out)
  cp $out/noise.json $out/noise.png $out/summary.json docs/lab/results/sweep-95/$(basename $out)/
done
# The same at 98.5% (docs/lab/sweep_985.sh, step 4, on 4 workers of 64): momentum SGD at batch 256, LR 0.1
scalelab noise --nproc 4 --config docs/lab/mnist1d_sweep.toml --set train.batch_size=256 --set recipe.optimizer=sgd \
  --set recipe.base_lr=0.1 --set recipe.scaling=none --set recipe.warmup_epochs=0.25 --set train.target_acc=0.985 \
  --set train.epochs=8 --set train.eval_every=4 --set train.progress=false --every 5 \
  --out runs/lab-sweep-985/noise-workers4
mkdir -p docs/lab/results/sweep-985/noise-workers4
cp runs/lab-sweep-985/noise-workers4/noise.json runs/lab-sweep-985/noise-workers4/noise.png \
  runs/lab-sweep-985/noise-workers4/summary.json docs/lab/results/sweep-985/noise-workers4/
# The peer, run the same day: the shard estimator in one process (the commands of docs/lab.md's 95% section and of
# docs/lab/sweep_985.sh, step 4)
scalelab noise --config docs/lab/mnist1d_sweep.toml --set train.batch_size=256 --set recipe.optimizer=sgd \
  --set recipe.base_lr=0.4 --set recipe.scaling=none --set train.target_acc=0.95 --set train.epochs=10 \
  --set train.eval_every=10 --set train.threads=1 --set train.progress=false --every 5 --shards 8 \
  --out runs/lab-sweep-95/noise-shards-2026-12-06
scalelab noise --config docs/lab/mnist1d_sweep.toml --set train.batch_size=256 --set recipe.optimizer=sgd \
  --set recipe.base_lr=0.1 --set recipe.scaling=none --set recipe.warmup_epochs=0.25 --set train.target_acc=0.985 \
  --set train.epochs=8 --set train.eval_every=4 --set train.threads=1 --set train.progress=false --every 5 \
  --shards 8 --out runs/lab-sweep-985/noise-shards-2026-12-06
for t in 95 985; do
  mkdir -p docs/lab/results/sweep-$t/noise-shards-2026-12-06
  cp runs/lab-sweep-$t/noise-shards-2026-12-06/noise.json runs/lab-sweep-$t/noise-shards-2026-12-06/noise.png \
    runs/lab-sweep-$t/noise-shards-2026-12-06/summary.json docs/lab/results/sweep-$t/noise-shards-2026-12-06/
done
