#!/usr/bin/env bash
# netns_cluster.sh: N emulated hosts on this machine, as Linux network namespaces on a private bridge.
#
# Usage (as root; needs iproute2's `ip`, and `tc` for --rate/--delay):
#   scripts/netns_cluster.sh up N [--rate RATE] [--delay DELAY]   create hosts 0..N-1
#   scripts/netns_cluster.sh down                                  remove everything `up` created (idempotent)
#   scripts/netns_cluster.sh run I CMD [ARGS...]                   run CMD inside host I (ip netns exec)
#   scripts/netns_cluster.sh status                                namespaces, addresses, qdiscs
#   scripts/netns_cluster.sh addr I                                print host I's address (10.77.0.<I+1>)
#   scripts/netns_cluster.sh ifname I                              print host I's interface (for GLOO_SOCKET_IFNAME)
#
# Layout (P = $SL_NETNS_PREFIX, default "sl-"):
#   namespace ${P}net   holds the bridge ${P}br0 and the bridge-side veth ends ${P}b0 .. ${P}b{N-1}
#   namespace ${P}h<I>  is host I: loopback up, veth ${P}v<I> with address ${SL_NETNS_SUBNET}.<I+1>/24
# Nothing is created in the root namespace: the machine's own interfaces, routes and addresses are untouched, and
# the 10.77.0.0/24 addresses exist only inside these namespaces. Two clusters with different prefixes (tests use
# a unique one) are fully independent, even with the same subnet, because each has its own bridge namespace.
#
# --rate RATE (tc syntax, e.g. 1gbit, 100mbit) shapes each host's egress with a token bucket filter
# (tbf rate RATE burst $SL_TBF_BURST latency $SL_TBF_LATENCY, defaults 256kb and 50ms); --delay DELAY (e.g. 1ms,
# 5ms) adds netem delay. With both, netem is the root qdisc and tbf its child. Every host's egress is shaped, so
# both directions of every host pair go through one shaped link per sender.
#
# Example:
#   scripts/netns_cluster.sh up 2 --rate 1gbit --delay 1ms
#   scripts/netns_cluster.sh run 0 ip -br addr
#   scripts/netns_cluster.sh down
set -euo pipefail

P="${SL_NETNS_PREFIX:-sl-}"
SUBNET="${SL_NETNS_SUBNET:-10.77.0}"
BRNS="${P}net"
BR="${P}br0"
TBF_BURST="${SL_TBF_BURST:-256kb}"
TBF_LATENCY="${SL_TBF_LATENCY:-50ms}"

die() { echo "netns_cluster: $*" >&2; exit 2; }
usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

host_ns() { echo "${P}h$1"; }
host_if() { echo "${P}v$1"; }
host_addr() { echo "${SUBNET}.$(($1 + 1))"; }

check_prefix() {
    # interface names are at most 15 characters: the longest is ${P}br0 / ${P}v<I>
    [[ ${#P} -le 9 ]] || die "SL_NETNS_PREFIX '$P' is too long (at most 9 characters)"
    [[ "$P" =~ ^[A-Za-z0-9_.-]+$ ]] || die "SL_NETNS_PREFIX '$P' may only contain letters, digits, '_', '.', '-'"
}

# the namespaces of this cluster (prefix + h<digits>, or prefix + net), whatever state they are in
our_namespaces() {
    local name
    ip netns list 2>/dev/null | awk '{print $1}' | while read -r name; do
        if [[ "$name" == "$BRNS" || ( "$name" == "${P}h"* && "${name#"${P}h"}" =~ ^[0-9]+$ ) ]]; then
            echo "$name"
        fi
    done | sort -V
}

cmd_down() {
    # Deleting a namespace destroys the interfaces in it; a veth pair dies with either end, so this also
    # cleans up after an `up` that stopped halfway.
    local ns
    for ns in $(our_namespaces); do
        ip netns pids "$ns" 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
        ip netns del "$ns" 2>/dev/null || true
    done
    local left
    left="$(our_namespaces)"
    [[ -z "$left" ]] || die "could not remove: $left"
}

cmd_up() {
    local n="${1:-}" rate="" delay=""
    [[ "$n" =~ ^[0-9]+$ && "$n" -ge 1 && "$n" -le 250 ]] || die "up: N must be an integer in 1..250, got '${n}'"
    shift
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --rate) [[ $# -ge 2 ]] || die "--rate needs a value"; rate="$2"; shift 2 ;;
            --delay) [[ $# -ge 2 ]] || die "--delay needs a value"; delay="$2"; shift 2 ;;
            *) die "up: unknown option '$1'" ;;
        esac
    done
    [[ -z "$(our_namespaces)" ]] || die "a cluster with prefix '$P' exists already ($(our_namespaces | xargs)); run 'down' first"
    if [[ -n "$rate$delay" ]]; then command -v tc >/dev/null || die "--rate/--delay need tc (iproute2)"; fi

    # a failure halfway (a failing command, or die) removes what was made
    trap 'rc=$?; if [[ $rc -ne 0 ]]; then echo "netns_cluster: up failed; removing what was created" >&2;
          cmd_down || true; fi; exit $rc' EXIT

    ip netns add "$BRNS"
    ip -n "$BRNS" link set lo up
    if [[ -n "$delay" ]]; then  # netem is a kernel module (sch_netem) that some kernels do not have
        ip netns exec "$BRNS" tc qdisc add dev lo root netem delay "$delay" 2>/dev/null \
            || die "--delay: tc netem is not available in this kernel (sch_netem), or '$delay' is not a delay"
        ip netns exec "$BRNS" tc qdisc del dev lo root
    fi
    ip -n "$BRNS" link add "$BR" type bridge
    ip -n "$BRNS" link set "$BR" up
    local i ns ifn
    for ((i = 0; i < n; i++)); do
        ns="$(host_ns "$i")"; ifn="$(host_if "$i")"
        ip netns add "$ns"
        ip -n "$ns" link set lo up
        # make the pair inside the bridge namespace, then move the host end: never touches the root namespace
        ip -n "$BRNS" link add "${P}b$i" type veth peer name "$ifn"
        ip -n "$BRNS" link set "$ifn" netns "$ns"
        ip -n "$BRNS" link set "${P}b$i" master "$BR"
        ip -n "$BRNS" link set "${P}b$i" up
        ip -n "$ns" addr add "$(host_addr "$i")/24" dev "$ifn"
        ip -n "$ns" link set "$ifn" up
        if [[ -n "$delay" && -n "$rate" ]]; then
            ip netns exec "$ns" tc qdisc add dev "$ifn" root handle 1: netem delay "$delay"
            ip netns exec "$ns" tc qdisc add dev "$ifn" parent 1: handle 2: tbf rate "$rate" \
                burst "$TBF_BURST" latency "$TBF_LATENCY"
        elif [[ -n "$delay" ]]; then
            ip netns exec "$ns" tc qdisc add dev "$ifn" root handle 1: netem delay "$delay"
        elif [[ -n "$rate" ]]; then
            ip netns exec "$ns" tc qdisc add dev "$ifn" root handle 1: tbf rate "$rate" \
                burst "$TBF_BURST" latency "$TBF_LATENCY"
        fi
    done
    trap - EXIT
    echo "netns_cluster: $n hosts up (prefix '$P', ${SUBNET}.1..${SUBNET}.$n, bridge $BR in namespace $BRNS${rate:+, rate $rate}${delay:+, delay $delay})"
}

cmd_run() {
    local i="${1:-}"
    [[ "$i" =~ ^[0-9]+$ ]] || die "run: host index must be an integer, got '${i}'"
    shift
    [[ $# -ge 1 ]] || die "run: no command given"
    local ns
    ns="$(host_ns "$i")"
    ip netns list | awk '{print $1}' | grep -qxF "$ns" || die "run: host $i ($ns) does not exist"
    exec ip netns exec "$ns" "$@"
}

cmd_status() {
    local nss ns
    nss="$(our_namespaces)"
    if [[ -z "$nss" ]]; then echo "netns_cluster: no cluster with prefix '$P'"; return 0; fi
    for ns in $nss; do
        echo "== $ns"
        ip -n "$ns" -br addr | sed 's/^/   /'
        if [[ "$ns" != "$BRNS" ]] && command -v tc >/dev/null; then
            ip netns exec "$ns" tc qdisc show | grep -v "noqueue" | sed 's/^/   qdisc: /' || true
        fi
    done
}

main() {
    [[ $# -ge 1 ]] || usage
    command -v ip >/dev/null || die "'ip' (iproute2) is not installed"
    check_prefix
    local cmd="$1"
    shift
    case "$cmd" in
        up)
            [[ $EUID -eq 0 ]] || die "up: needs root (ip netns add)"
            cmd_up "$@" ;;
        down)
            [[ $EUID -eq 0 ]] || die "down: needs root (ip netns del)"
            cmd_down ;;
        run) cmd_run "$@" ;;
        status) cmd_status ;;
        addr) [[ "${1:-}" =~ ^[0-9]+$ ]] || die "addr: host index needed"; host_addr "$1" ;;
        ifname) [[ "${1:-}" =~ ^[0-9]+$ ]] || die "ifname: host index needed"; host_if "$1" ;;
        -h|--help|help) usage ;;
        *) die "unknown command '$cmd' (up, down, run, status, addr, ifname)" ;;
    esac
}

main "$@"
