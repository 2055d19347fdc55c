#!/bin/sh
# The lower-LR searches of the 98.5% sweep on a 10,000-example test set (docs/lab.md, "A larger test set").
#
#   SEEDS="0 1 2 3" docs/lab/sweep_985_test10000_low.sh
#
# after `SEEDS=... TEST=10000 docs/lab/sweep_985_seeds.sh` and the same with RECIPE=kfac-fresh. In those sweeps
# the fastest trial of many small-batch cells was at the lowest LR tried (the guess x 0.25, reached by their one
# extension). docs/lab/low_edges.py lists those cells; each recipe of each seed then gets one more sweep over its
# listed batches with the multipliers one half and one quarter of the lowest tried (pooled over the batches), and
# one factor further when the lowest of those is the fastest (--extend 1); warm-up 0.25 epoch, the warm-up of
# every one of those fastest trials. Results -> docs/lab/results/sweep-985-test10000-low/<recipe>-low-seedS.
set -e
C="--config docs/lab/mnist1d_sweep.toml --target-acc 0.985 --extend 1 --budget-epochs 8 --budget-steps 250
   --eval-examples 1024 --set data.n_test=10000 --warmup-epochs 0.25 --jobs 2"
FRESH="--set recipe.kfac_factor_every=1 --set recipe.kfac_inverse_every=1"
[ -n "$SEEDS" ] || { echo "sweep_985_test10000_low.sh: set SEEDS, e.g. SEEDS=\"0 1\"" >&2; exit 2; }
R=docs/lab/results
low() {  # name seed optimizer batches mults [extra args]
  name=$1 seed=$2 opt=$3 batches=$4 mults=$5; shift 5
  run=runs/lab-sweep-985-test10000-$name-low-seed$seed
  case $opt in sgd) guess=sgd=0.1@64:sqrt ;; *) guess=kfac=0.025@64:linear ;; esac
  nice -n 19 scalelab sweep $C --batch $batches --optimizers $opt --set train.seed=$seed \
    --lr-guess $guess --lr-mults $mults "$@" --out $run < /dev/null
  mkdir -p $R/sweep-985-test10000-low/$name-low-seed$seed
  (cd $run && cp -r best.csv steps_*.csv sweep.csv sweep.json sweep_spec.json \
    ../../$R/sweep-985-test10000-low/$name-low-seed$seed/)
}
for seed in $SEEDS; do
  python docs/lab/low_edges.py $R/sweep-985-test10000-kfac-fresh-seed$seed | while read -r opt batches mults; do
    low fresh $seed $opt $batches $mults $FRESH
  done
  python docs/lab/low_edges.py $R/sweep-985-test10000-seed$seed | while read -r opt batches mults; do
    low $opt $seed $opt $batches $mults
  done
done
