"""Communication cost models for the gradient exchange of synchronous data parallelism.

All use the alpha-beta-gamma form (Hockney 1994; Thakur, Rabenseifner & Gropp 2005, "Optimization of
Collective Communication Operations in MPICH", IJHPCA 19(1)): a message of n bytes costs
``alpha + n / bandwidth``, and reducing n bytes costs ``n * gamma`` (gamma = seconds per byte of the local
addition).

* Ring all-reduce (Patarasuk & Yuan 2009; Baidu's ring all-reduce 2017): a reduce-scatter then an all-gather,
  ``2(p-1) alpha + 2(p-1)/p * S/bw + (p-1)/p * S * gamma``: each rank sends 2(p-1)/p of the bytes.
* Tree all-reduce: a binary-tree reduce then broadcast,
  ``2 ceil(log2 p) (alpha + S/bw) + ceil(log2 p) S gamma`` (Thakur et al. 2005, Section 4).
* Double binary tree (Sanders, Speck & Traeff 2009, "Two-tree algorithms for full bandwidth broadcast,
  reduction and scan", Parallel Computing 35(12); NCCL 2.4, Jeaugey 2019): two complementary pipelined
  binary trees, each carrying half of the data, so every rank sends and receives about S per phase at full
  bandwidth while the latency grows with the depth: ``2 ceil(log2 p) alpha + 2 S/bw + S gamma``.
* Hierarchical (Jia et al. 2018, arXiv 1807.11205; Goyal et al. 2017, Section 4): reduce-scatter inside each
  node over its link, all-reduce of the node's 1/g share across nodes over the network (each of the g devices
  drives its own share, so they share the node's links), all-gather inside the node.
* 2-D torus (Ying et al. 2018, arXiv 1811.06992; Mikami et al. 2018, arXiv 1811.05233): reduce-scatter along
  the rows of an X x Y grid, all-reduce of the 1/X share along the columns, all-gather along the rows.
* Parameter server (Dean et al. 2012; Li et al. 2014): every worker pushes its gradient and pulls the
  parameters; with k server shards the busiest link carries ``max(S, p S / k)`` each way.
* Sparse all-gather (Lin et al. 2018 DGC; Renggli et al. SparCML): compressed (index, value) gradients cannot
  be summed in flight, so each rank gathers the p-1 others: ``(p-1) alpha + (p-1) * S_c / bw``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scalelab.errors import ConfigError

ALGORITHMS = ("ring", "tree", "hierarchical", "torus", "ps", "auto")


@dataclass(frozen=True)
class Net:
    """One level of the network: latency alpha (s), bandwidth per rank (bytes/s), reduction gamma (s/byte)."""

    alpha: float
    bandwidth: float
    gamma: float = 0.0


def ring_allreduce(size: float, p: int, net: Net) -> float:
    """Ring all-reduce of ``size`` bytes on ``p`` ranks: 2(p-1) alpha + 2(p-1)/p S/bw + (p-1)/p S gamma."""
    if p <= 1 or size <= 0:
        return 0.0
    return 2 * (p - 1) * net.alpha + 2 * (p - 1) / p * size / net.bandwidth + (p - 1) / p * size * net.gamma


def ring_reduce_scatter(size: float, p: int, net: Net) -> float:
    """Half of a ring all-reduce: (p-1) alpha + (p-1)/p S/bw + (p-1)/p S gamma."""
    if p <= 1 or size <= 0:
        return 0.0
    return (p - 1) * net.alpha + (p - 1) / p * size / net.bandwidth + (p - 1) / p * size * net.gamma


def ring_all_gather(size: float, p: int, net: Net) -> float:
    """The other half: (p-1) alpha + (p-1)/p S/bw, where ``size`` is the gathered total."""
    if p <= 1 or size <= 0:
        return 0.0
    return (p - 1) * net.alpha + (p - 1) / p * size / net.bandwidth


def tree_allreduce(size: float, p: int, net: Net) -> float:
    """Binary-tree reduce + broadcast: 2 ceil(log2 p)(alpha + S/bw) + ceil(log2 p) S gamma."""
    if p <= 1 or size <= 0:
        return 0.0
    depth = math.ceil(math.log2(p))
    return 2 * depth * (net.alpha + size / net.bandwidth) + depth * size * net.gamma


def double_tree_allreduce(size: float, p: int, net: Net) -> float:
    """Pipelined double binary tree: 2 ceil(log2 p) alpha + 2 S/bw + S gamma (Sanders et al. 2009)."""
    if p <= 1 or size <= 0:
        return 0.0
    return 2 * math.ceil(math.log2(p)) * net.alpha + 2 * size / net.bandwidth + size * net.gamma


def hierarchical_allreduce(size: float, nodes: int, per_node: int, intra: Net, inter: Net,
                           tree: bool = False) -> float:
    """Reduce-scatter in the node, all-reduce of S/g across nodes, all-gather in the node.

    ``inter.bandwidth`` is the node's total network bandwidth; its ``per_node`` devices share it. Across nodes
    a ring, or with ``tree`` the faster of a ring and a double binary tree (what NCCL >= 2.4 chooses by the
    same latency-bandwidth model).
    """
    g = max(per_node, 1)
    across = Net(inter.alpha, inter.bandwidth / g, inter.gamma)
    t_across = ring_allreduce(size / g, nodes, across)
    if tree:
        t_across = min(t_across, double_tree_allreduce(size / g, nodes, across))
    return ring_reduce_scatter(size, g, intra) + t_across + ring_all_gather(size, g, intra)


def torus_dims(p: int) -> tuple[int, int]:
    """The most square X x Y = p grid (X >= Y)."""
    y = int(math.isqrt(p))
    while p % y:
        y -= 1
    return p // y, y


def torus_allreduce(size: float, p: int, link: Net, links_per_chip: int = 4) -> float:
    """2-D torus all-reduce (Ying et al. 2018; Mikami et al. 2018) on the most square grid of ``p`` chips.

    Each dimension runs bidirectional rings, so a ring step uses two links: bandwidth 2 * link.bandwidth
    when the chip has 4 links (2 per dimension); a 3-D torus chip (6 links) adds its third dimension's links.
    """
    if p <= 1 or size <= 0:
        return 0.0
    x, y = torus_dims(p)
    per_dim = Net(link.alpha, link.bandwidth * links_per_chip / 2, link.gamma)
    return (ring_reduce_scatter(size, x, per_dim) + ring_allreduce(size / x, y, per_dim)
            + ring_all_gather(size, x, per_dim))


def ps_exchange(size: float, p: int, net: Net, servers: int | None = None) -> float:
    """Parameter server push + pull with ``servers`` shards (default p, co-located with the workers)."""
    if p <= 1 or size <= 0:
        return 0.0
    k = servers or p
    busiest = max(size, p * size / k)
    return 2 * (net.alpha + busiest / net.bandwidth) + p * size / k * net.gamma


def sparse_allgather(size: float, p: int, net: Net) -> float:
    """All-gather of each rank's ``size`` compressed bytes: (p-1) alpha + (p-1) S/bw."""
    if p <= 1 or size <= 0:
        return 0.0
    return (p - 1) * (net.alpha + size / net.bandwidth)


@dataclass(frozen=True)
class Compression:
    """A gradient compressor's effect on the wire: bytes factor, and whether it can be summed in flight.

    ``spec``: ``none``; ``fp16`` (x1/2 of fp32); ``sign`` (1 bit per value, Bernstein et al. 2018);
    ``qsgd:BITS`` (Alistarh et al. 2017); ``powersgd:FACTOR`` (the low-rank factor, Vogels et al. 2019;
    summable);
    ``dgc:SPARSITY`` or ``topk:SPARSITY`` (Lin et al. 2018: values + 32-bit indices of the kept fraction,
    gathered, not summed).
    """

    spec: str
    factor: float
    summable: bool

    @classmethod
    def parse(cls, spec: str | None) -> Compression:
        spec = (spec or "none").strip().lower()
        kind, _, arg = spec.partition(":")
        try:
            if kind == "none":
                return cls(spec, 1.0, True)
            if kind == "fp16":
                return cls(spec, 0.5, True)
            if kind == "sign":
                return cls(spec, 1 / 32, False)
            if kind == "qsgd":
                return cls(spec, float(arg or 8) / 32, False)
            if kind == "powersgd":
                return cls(spec, float(arg), True)
            if kind in ("dgc", "topk"):
                s = float(arg or 0.999)
                if not 0 <= s < 1:
                    raise ValueError
                return cls(spec, 2 * (1 - s), False)   # a 32-bit index per kept 32-bit value
        except ValueError:
            pass
        raise ConfigError(f"bad --compress {spec!r}; expected none, fp16, sign, qsgd:BITS, powersgd:FACTOR, "
                          "dgc:SPARSITY or topk:SPARSITY (e.g. dgc:0.999)")
