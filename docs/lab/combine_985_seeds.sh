#!/bin/sh
# The 98.5% sweeps of docs/lab.md combined over seeds: per seed, the default sweep (momentum SGD and K-FAC, with
# its extra searches), the fresh-curvature K-FAC sweep and the lower-LR searches that exist for it
# (docs/lab/sweep_985_low.sh), the fresh-curvature trials named kfac-fresh. Knees, bootstrap, plot: combine_985.py.
#
#   SEEDS="0 1 ... 15" docs/lab/combine_985_seeds.sh          first draw -> docs/lab/results/sweep-985/combined-16-seeds
#   SEEDS="0 1 ... 7" TEST=10000 docs/lab/combine_985_seeds.sh  -> docs/lab/results/sweep-985-test10000/combined-8-seeds
#   FRESH=no ...    momentum SGD and K-FAC only (their common reference without fresh K-FAC) -> ...-seeds-sgd-kfac
#   LOW=no ...      without the lower-LR searches (the first draw's eight seeds as first published)
#   DECAY=yes ...   the decayed-LR sweeps instead (docs/lab/sweep_985_decay.sh: momentum SGD and K-FAC, best over
#                   the horizons) -> docs/lab/results/sweep-985-[test10000-]decay/combined-N-seeds
#   DECAY=fine ...  and the horizons between (docs/lab/sweep_985_decay_fine.sh) -> ...combined-N-seeds-fine
#   DECAY=quasi ... the quasi-random search over LR and horizon (docs/lab/sweep_985_quasi.sh)
#                   -> docs/lab/results/sweep-985-[test10000-]quasi/combined-N-seeds
#   DECAY=all ...   every decayed-LR search of each seed (the horizon grid, the horizons between where they were
#                   run, the quasi-random search), best over all -> .../sweep-985-[test10000-]quasi/combined-N-seeds-all
set -e
case "${DECAY:-no}" in yes|fine|quasi|all|no) ;;
  *) echo "$0: DECAY=$DECAY is not one of: yes, fine, quasi, all, no" >&2; exit 2 ;; esac
case "${FRESH:-yes}" in yes) suffix="" ;; no) suffix=-sgd-kfac ;;
  *) echo "$0: FRESH=$FRESH is not one of: yes, no" >&2; exit 2 ;; esac
case "${LOW:-yes}" in yes|no) ;; *) echo "$0: LOW=$LOW is not one of: yes, no" >&2; exit 2 ;; esac
. docs/lab/seeds_985.sh
args="" n=0
if [ "${DECAY:-no}" = quasi ] || [ "$DECAY" = all ]; then
  for s in $SEEDS; do
    dirs=$QUASI_DIR/seed$s
    if [ "$DECAY" = all ]; then
      fine=$([ -d $DECAY_DIR/seed$s-fine ] && echo -fine || true)
      dirs="$(decay_dirs $s $fine),$dirs"
    fi
    args="$args --seed $s=$dirs" n=$((n + 1))
  done
  exec python docs/lab/combine_985.py $QUASI_DIR/combined-$n-seeds$([ "$DECAY" = all ] && echo -all || true) $args
fi
if [ "${DECAY:-no}" != no ]; then
  fine=$([ "$DECAY" = fine ] && echo -fine || true)
  for s in $SEEDS; do args="$args --seed $s=$(decay_dirs $s $fine)" n=$((n + 1)); done
  exec python docs/lab/combine_985.py $DECAY_DIR/combined-$n-seeds$fine $args
fi
for s in $SEEDS; do
  dirs=$(default_dirs $s) names="sgd kfac"
  if [ -z "$suffix" ]; then
    dirs="$dirs,$(fresh_dir $s)" names="fresh $names"
    args="$args --rename $(basename $(fresh_dir $s)):kfac=kfac-fresh --rename fresh-low-seed$s:kfac=kfac-fresh"
  fi
  for name in $names; do
    [ "${LOW:-yes}" = yes ] && [ -d "$LOW_DIR/$name-low-seed$s" ] && dirs="$dirs,$LOW_DIR/$name-low-seed$s"
  done
  args="$args --seed $s=$dirs" n=$((n + 1))
done
[ "${LOW:-yes}" = no ] && suffix=$suffix-no-low
python docs/lab/combine_985.py $R/sweep-985${TEST:+-test$TEST}/combined-$n-seeds$suffix $args
