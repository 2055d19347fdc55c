# Sourced by the docs/lab/*_985*.sh scripts: where the 98.5% sweeps of one seed live, and the LR grids' guesses.
# TEST empty: the first draw of the data (2,000-example test set); TEST=10000: the second (data.n_test=10000).
R=docs/lab/results
T=${TEST:+test$TEST-}            # sweep-985-${T}seedS, sweep-985-${T}kfac-fresh-seedS, sweep-985-${T}low/
LOW_DIR=$R/sweep-985-${T}low
SGD_GUESS=0.1@64:sqrt KFAC_GUESS=0.025@64:linear   # scalelab sweep --lr-guess OPT=...; K-FAC's: docs/lab.md
case "${TEST:-2000}" in 2000|10000) ;;
  *) echo "$0: TEST=$TEST is not one of: (empty, the 2,000-example draw), 10000" >&2; exit 2 ;; esac
[ -n "$SEEDS" ] || { echo "$0: set SEEDS, e.g. SEEDS=\"0 1 2 3\"" >&2; exit 2; }

default_dirs() {  # SEED -> the default sweep of momentum SGD and K-FAC, with its extra searches, comma-separated
  case "$T$1" in
    0) echo "$R/sweep-985,$R/sweep-985-extra/kfac-low,$R/sweep-985-extra/kfac-low128" ;;  # seeds 0 and 1 of the
    1) echo "$R/sweep-985-seed1,$R/sweep-985-extra/kfac-low-seed1,$R/sweep-985-extra/sgd-low-seed1" ;;  # first
    *) echo "$R/sweep-985-${T}seed$1" ;;                                                       # draw: docs/lab.md
  esac
}
fresh_dir() { echo "$R/sweep-985-${T}kfac-fresh-seed$1"; }
DECAY_DIR=$R/sweep-985-${T}decay  # docs/lab/sweep_985_decay.sh: seedS-eE, one sweep per horizon E (epochs)
# the settings every decayed-LR sweep shares (sweep_985_decay*.sh, probe_985_decay.sh; a later --lr-mults or
# --warmup-epochs replaces these): cosine to zero over the trial's budget, which is its horizon
DECAY_SWEEP="--config docs/lab/mnist1d_sweep.toml --target-acc 0.985 --set recipe.schedule=cosine --budget-steps 1
  --eval-examples 1024 --lr-mults 0.5,1,2 --extend 1 --warmup-epochs 0.25 --jobs 2 ${TEST:+--set data.n_test=$TEST}"
QUASI_DIR=$R/sweep-985-${T}quasi  # docs/lab/sweep_985_quasi.sh: seedS, the quasi-random search over LR and horizon
decay_dirs() { d=$DECAY_DIR/seed$1; echo "$d-e1,$d-e2,$d-e4,$d-e8,$d-e16${2:+,$d-fine}"; }  # 2nd arg: with -fine
