#!/bin/sh
# More seeds of the 98.5% sweep of docs/lab.md, batch 64..2048, each seed's results copied (without the trials'
# run directories) to docs/lab/results/. The spec of docs/lab/sweep_985.sh step 1, but K-FAC's LR grid centred by
# the linear rule on the LRs its searches found best in seeds 0 and 1 (0.0125-0.025 at 64, 0.2-0.57 at
# 1024-2048) instead of a first search from 0.4@1024:sqrt plus second, lower searches at 64 and 128.
#
#   SEEDS="2 3" docs/lab/sweep_985_seeds.sh              momentum SGD and K-FAC at its defaults -> sweep-985-seedS
#   SEEDS="0 1" RECIPE=kfac-fresh docs/lab/sweep_985_seeds.sh
#       K-FAC alone, factors and inverses every step (recipe.kfac_factor_every=1, kfac_inverse_every=1, instead
#       of 10 and 10) -> sweep-985-kfac-fresh-seedS
#   SEEDS="0 1" TEST=10000 docs/lab/sweep_985_seeds.sh
#       the same on a test set of 10,000 examples instead of 2,000 (data.n_test; the generated training set
#       differs too, since MNIST-1D draws both from one stream) -> sweep-985-test10000-seedS
set -e
C="--config docs/lab/mnist1d_sweep.toml --target-acc 0.985 --extend 1 --budget-epochs 8 --budget-steps 250 --eval-examples 1024"
. docs/lab/seeds_985.sh
case "${RECIPE:-default}" in
  default) name=seed; opts="--optimizers sgd,kfac --lr-guess sgd=$SGD_GUESS" ;;
  kfac-fresh) name=kfac-fresh-seed
    opts="--optimizers kfac --set recipe.kfac_factor_every=1 --set recipe.kfac_inverse_every=1" ;;
  *) echo "sweep_985_seeds.sh: RECIPE=$RECIPE is not one of: default, kfac-fresh" >&2; exit 2 ;;
esac
if [ -n "$TEST" ]; then opts="$opts --set data.n_test=$TEST"; name="$T$name"; fi
for seed in $SEEDS; do
  run=runs/lab-sweep-985-$name$seed
  nice -n 19 scalelab sweep $C --batch 64..2048 $opts --set train.seed=$seed \
    --lr-guess kfac=$KFAC_GUESS --lr-mults 0.5,1,2 \
    --warmup-epochs 0.25,1 --warmup-search-from 1024 --jobs 2 --out $run
  scalelab report $run
  mkdir -p $R/sweep-985-$name$seed
  (cd $run && cp -r best.csv plots report.html steps_*.csv sweep.csv sweep.json sweep_spec.json \
    ../../$R/sweep-985-$name$seed/)
done
