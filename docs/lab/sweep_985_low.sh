#!/bin/sh
# The lower-LR searches of the 98.5% sweeps (docs/lab.md, "A larger test set" and "Sixteen seeds").
#
#   SEEDS="0 1 2 3" TEST=10000 docs/lab/sweep_985_low.sh    the draw with a 10,000-example test set
#   SEEDS="0 1 2 3" docs/lab/sweep_985_low.sh               the first draw (2,000-example test set)
#
# after `SEEDS=... [TEST=10000] docs/lab/sweep_985_seeds.sh` and the same with RECIPE=kfac-fresh. In those sweeps
# the fastest trial of many small-batch cells was at the lowest LR tried (the guess x 0.25, reached by their one
# extension). docs/lab/low_edges.py lists those cells (pooling a seed's extra searches by LR); each recipe of each
# seed then gets one more sweep over its listed batches with the multipliers one half and one quarter of the
# lowest LR tried (pooled over the batches), and one factor further when the lowest of those is the fastest
# (--extend 1); warm-up 0.25 epoch, the warm-up of every one of those fastest trials.
# Results -> docs/lab/results/sweep-985-[test10000-]low/<recipe>-low-seedS.
set -e
. docs/lab/seeds_985.sh
C="--config docs/lab/mnist1d_sweep.toml --target-acc 0.985 --extend 1 --budget-epochs 8 --budget-steps 250
   --eval-examples 1024 --warmup-epochs 0.25 --jobs 2 ${TEST:+--set data.n_test=$TEST}"
FRESH="--set recipe.kfac_factor_every=1 --set recipe.kfac_inverse_every=1"
low() {  # name seed optimizer batches mults [extra args]
  name=$1 seed=$2 opt=$3 batches=$4 mults=$5; shift 5
  run=runs/lab-sweep-985-$T$name-low-seed$seed
  case $opt in sgd) guess=$SGD_GUESS ;; *) guess=$KFAC_GUESS ;; esac
  nice -n 19 scalelab sweep $C --batch $batches --optimizers $opt --set train.seed=$seed \
    --lr-guess $opt=$guess --lr-mults $mults "$@" --out $run < /dev/null
  mkdir -p $LOW_DIR/$name-low-seed$seed
  (cd $run && cp -r best.csv steps_*.csv sweep.csv sweep.json sweep_spec.json ../../$LOW_DIR/$name-low-seed$seed/)
}
edges() { python docs/lab/low_edges.py --guess sgd=$SGD_GUESS --guess kfac=$KFAC_GUESS $(echo "$1" | tr , ' '); }
for seed in $SEEDS; do
  edges "$(fresh_dir $seed)" | while read -r opt batches mults; do
    low fresh $seed $opt $batches $mults $FRESH
  done
  edges "$(default_dirs $seed)" | while read -r opt batches mults; do
    low $opt $seed $opt $batches $mults
  done
done
