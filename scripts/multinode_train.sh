#!/usr/bin/env bash
# multinode_train.sh: a real multi-node scalelab run on one machine, one emulated host per worker.
#
# Usage (as root):
#   scripts/multinode_train.sh N [options] -- TRAIN_ARGS...
# Options:
#   --rate RATE        shape every host's link (tc tbf, e.g. 1gbit)          } passed to netns_cluster.sh up
#   --delay DELAY      add latency to every host's link (tc netem, e.g. 1ms) }
#   --port PORT        rendezvous port on host 0 (default 29500)
#   --rdzv-endpoint H:P  rendezvous endpoint (default host 0's address:PORT; for testing failures)
#   --max-restarts R   torchrun --max-restarts (default 0)
#   --join-timeout S   how long an agent waits for the others and for the rendezvous store (default 60 s)
#   --timeout S        give up (and tear down) after S seconds (default: none)
# TRAIN_ARGS go to `scalelab train` in every worker; they must include --out DIR (one shared run directory:
# only rank 0 writes it, every rank reads its checkpoints).
#
# What it does: `netns_cluster.sh up N` (namespaces ${SL_NETNS_PREFIX:-sl-}h0..h{N-1} on 10.77.0.0/24), then in
# each host i, with GLOO_SOCKET_IFNAME set to host i's interface:
#   python -m torch.distributed.run --nnodes N --nproc-per-node 1 \
#       --rdzv-backend c10d --rdzv-endpoint 10.77.0.1:PORT --rdzv-id ID --local-addr 10.77.0.<i+1> \
#       --rdzv-conf is_host=<1 on host 0, else 0>,join_timeout=S -m scalelab train TRAIN_ARGS
# waits for all of them, and tears the hosts down on success, on failure and on Ctrl-C/SIGTERM (trap EXIT).
# When one host's torchrun fails, the others are stopped at once (their run cannot complete without it).
# Exit status: 0 when every host succeeded, else the first failing host's status (124 on --timeout).
#
# Why these torchrun flags: there is no --node-rank, because the c10d rendezvous assigns node ranks itself in the
# order the agents join (torchrun ignores --node-rank with c10d and says so); rank 0 may be on any host. The c10d
# store is hosted by the agent whose endpoint address is local, and torchrun decides that by matching the
# endpoint against the machine's hostname, which in a network namespace is the root namespace's; is_host=1/0
# says it explicitly. --local-addr makes the agent advertise its namespace
# address rather than the machine's FQDN, which does not resolve to an address reachable from the namespaces.
#
# Environment: PYTHON (default: the repository's .venv/bin/python, else python3), SL_NETNS_PREFIX (namespace
# name prefix, default "sl-"), and everything else (SCALELAB_CACHE, OMP_NUM_THREADS, ...) is passed through.
#
# Example:
#   scripts/multinode_train.sh 2 --rate 1gbit -- --out runs/two-nodes --set data.name=synthetic --set model.name=mlp
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
CLUSTER="$HERE/netns_cluster.sh"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON="$(command -v python3)"; fi
fi

die() { echo "multinode_train: $*" >&2; exit 2; }

N="${1:-}"
[[ "$N" =~ ^[0-9]+$ && "$N" -ge 1 ]] || die "usage: $0 N [--rate R] [--delay D] [--port P] [--timeout S] -- TRAIN_ARGS (see the header)"
shift
UP_ARGS=()
PORT=29500
ENDPOINT=""
RESTARTS=0
JOIN_TIMEOUT=60
TIMEOUT=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --rate|--delay) [[ $# -ge 2 ]] || die "$1 needs a value"; UP_ARGS+=("$1" "$2"); shift 2 ;;
        --port) [[ $# -ge 2 ]] || die "--port needs a value"; PORT="$2"; shift 2 ;;
        --rdzv-endpoint) [[ $# -ge 2 ]] || die "--rdzv-endpoint needs a value"; ENDPOINT="$2"; shift 2 ;;
        --max-restarts) [[ $# -ge 2 ]] || die "--max-restarts needs a value"; RESTARTS="$2"; shift 2 ;;
        --join-timeout) [[ $# -ge 2 ]] || die "--join-timeout needs a value"; JOIN_TIMEOUT="$2"; shift 2 ;;
        --timeout) [[ $# -ge 2 ]] || die "--timeout needs a value"; TIMEOUT="$2"; shift 2 ;;
        --) shift; break ;;
        *) die "unknown option '$1' (scalelab's own arguments go after --)" ;;
    esac
done
[[ $# -ge 1 ]] || die "no scalelab train arguments after -- (at least --out DIR)"
[[ " $* " == *" --out "* ]] || die "give the run directory: -- --out DIR ..."
[[ -z "$ENDPOINT" ]] && ENDPOINT="$("$CLUSTER" addr 0):$PORT"
RDZV_ID="scalelab-$$"

PIDS=()
WATCHDOG=""
cleanup() {
    local rc=$? pid
    trap - EXIT INT TERM
    [[ -n "$WATCHDOG" ]] && kill "$WATCHDOG" 2>/dev/null || true
    # each host's torchrun leads its own process group (setsid): stop the agent and its workers together
    for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    for _ in $(seq 50); do
        local alive=0
        for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [[ $alive -eq 0 ]] && break
        sleep 0.1
    done
    for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
    "$CLUSTER" down || rc=$((rc ? rc : 1))  # also kills anything still running in the namespaces
    echo "multinode_train: hosts torn down (exit $rc)" >&2
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 124' USR1  # the watchdog's signal

"$CLUSTER" up "$N" "${UP_ARGS[@]}"

if [[ -n "$TIMEOUT" ]]; then
    # a subshell: kill it with its sleep (the sleep keeps running otherwise, harmless but untidy)
    ( trap 'kill $sp 2>/dev/null; exit 0' TERM; sleep "$TIMEOUT" & sp=$!; wait $sp; echo "multinode_train: timeout after ${TIMEOUT}s" >&2; kill -USR1 $$ ) &
    WATCHDOG=$!
fi

declare -A HOST_OF
for ((i = 0; i < N; i++)); do
    is_host=$([[ $i -eq 0 ]] && echo 1 || echo 0)
    addr="$("$CLUSTER" addr "$i")"
    ifname="$("$CLUSTER" ifname "$i")"
    echo "multinode_train: host $i ($addr, $ifname): torchrun, 1 of $N nodes, rendezvous c10d at $ENDPOINT" >&2
    setsid "$CLUSTER" run "$i" env GLOO_SOCKET_IFNAME="$ifname" TP_SOCKET_IFNAME="$ifname" \
        "$PYTHON" -m torch.distributed.run --nnodes "$N" --nproc-per-node 1 \
        --rdzv-backend c10d --rdzv-endpoint "$ENDPOINT" --rdzv-id "$RDZV_ID" --local-addr "$addr" \
        --rdzv-conf "is_host=$is_host,join_timeout=$JOIN_TIMEOUT,read_timeout=$JOIN_TIMEOUT" --max-restarts "$RESTARTS" \
        -m scalelab train "$@" > >(sed -u "s/^/[h$i] /") 2>&1 &
    PIDS+=("$!")
    HOST_OF[$!]=$i
done

RUNNING=("${PIDS[@]}")
while [[ ${#RUNNING[@]} -gt 0 ]]; do
    done_pid=""
    set +e
    wait -n -p done_pid "${RUNNING[@]}"
    rc=$?
    set -e
    [[ -n "$done_pid" ]] || continue  # interrupted by a trapped signal: the trap exits the script
    still=()
    for pid in "${RUNNING[@]}"; do [[ $pid == "$done_pid" ]] || still+=("$pid"); done
    RUNNING=("${still[@]}")
    if [[ $rc -ne 0 ]]; then
        echo "multinode_train: host ${HOST_OF[$done_pid]} failed (exit $rc); stopping the others" >&2
        exit "$rc"
    fi
    echo "multinode_train: host ${HOST_OF[$done_pid]} finished" >&2
done
echo "multinode_train: all $N hosts finished" >&2
