#!/bin/sh
# The 98.5% sweeps on a 10,000-example test set (docs/lab.md, "A larger test set") combined over seeds: per seed,
# the default sweep (momentum SGD and K-FAC), the fresh-curvature K-FAC sweep and the lower-LR searches that
# exist for it (docs/lab/sweep_985_test10000_low.sh), with the fresh-curvature trials named kfac-fresh.
#
#   SEEDS="0 1 2 3 4 5 6 7" docs/lab/combine_985_test10000.sh  -> docs/lab/results/sweep-985-test10000/combined-8-seeds
#   SEEDS="0 1 2 3 4 5 6 7" FRESH=no docs/lab/combine_985_test10000.sh
#       momentum SGD and K-FAC only (the common reference without fresh K-FAC) -> .../combined-8-seeds-sgd-kfac
set -e
case "${FRESH:-yes}" in yes) suffix="" ;; no) suffix=-sgd-kfac ;;
  *) echo "combine_985_test10000.sh: FRESH=$FRESH is not one of: yes, no" >&2; exit 2 ;; esac
[ -n "$SEEDS" ] || { echo "combine_985_test10000.sh: set SEEDS, e.g. SEEDS=\"0 1 2 3\"" >&2; exit 2; }
R=docs/lab/results
args="" n=0
for s in $SEEDS; do
  dirs=$R/sweep-985-test10000-seed$s names="sgd kfac"
  if [ -z "$suffix" ]; then
    dirs="$dirs,$R/sweep-985-test10000-kfac-fresh-seed$s" names="fresh $names"
    args="$args --rename sweep-985-test10000-kfac-fresh-seed$s:kfac=kfac-fresh"
  fi
  for name in $names; do
    low=$R/sweep-985-test10000-low/$name-low-seed$s
    [ -d "$low" ] && dirs="$dirs,$low"
  done
  [ -z "$suffix" ] && [ -d "$R/sweep-985-test10000-low/fresh-low-seed$s" ] && args="$args --rename fresh-low-seed$s:kfac=kfac-fresh"
  args="$args --seed $s=$dirs" n=$((n + 1))
done
python docs/lab/combine_985.py $R/sweep-985-test10000/combined-$n-seeds$suffix $args
