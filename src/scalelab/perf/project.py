"""The projection: time-to-train of a workload on a hardware configuration, with its breakdown.

Per optimizer step, for one device (all devices do the same work in synchronous data parallelism):

1. Compute (roofline; Williams, Waterman & Patterson 2009, "Roofline", CACM 52(4)): every sample costs
   ``max(F / (peak * compute_eff), M / (memory_bw * memory_eff))`` where F is the counted forward+backward
   FLOPs, M the bytes moved (un-fused, or fused for XLA-style families) in the family's training dtype,
   and the two efficiencies are the family constants of the catalog. ``b`` samples per device cost ``b``
   times that. On top, every kernel of the step costs a fixed ``kernel_s`` whatever its size (launch gap,
   ramp-up and tail: the latency term of the kernel, as alpha is of a message; Hockney 1994), times the
   kernels per step counted from the model (op by op, or only the convolutions/matmuls when fused). This is
   why a device is less efficient at a small per-device batch: ``throughput(b) = b / (K kernel_s + b t_1)``.
   On an accelerator with ``onchip_memory`` (TPU v4's CMEM), M is the HBM traffic left after the kernels'
   reads of tensors still on chip (:meth:`scalelab.perf.workload.Workload.memory_bytes`): it depends on the
   per-device batch, no longer ``b`` times a per-sample figure.
2. Optimizer update: ``params * 20 bytes`` (read fp32 weight, gradient, momentum; write weight, momentum)
   at the memory bandwidth, plus the family's fixed per-step overhead.
3. Communication: the gradient all-reduce (``comm``) in the communication dtype, after compression. It
   overlaps with backward in buckets as gradients become ready (Goyal et al. 2017, Section 4; Li et al.
   2020, "PyTorch Distributed", VLDB 13(12), 25 MB buckets):
   exposed = ``max(t_comm - t_backward, t_last_bucket)``. Every bucket is one collective call and pays the
   latency terms again: the library's fixed ``collective_base_s`` and, per ring step across the network,
   ``max(network latency, net_hop_latency_s)`` (the collective library's per-step latency, e.g. NCCL's).
4. Model parallelism: ``hybrid:MxD`` (Gholami et al. 2017, "Integrated Model, Batch and Domain Parallelism",
   arXiv 1712.04432) splits every layer across M devices, which exchange activations (all-gather forward,
   reduce-scatter backward) and all-reduce only 1/M of the gradient across D replicas. ``pipeline:S`` (Huang
   et al. 2019, "GPipe", arXiv 1811.06965) splits the layers into S stages run on m micro-batches: the bubble
   makes compute ``(m + S - 1) / m`` times the ideal 1/S share.
5. Input pipeline: if a per-node input rate is given, a step cannot be faster than the node's samples over it
   (prefetching overlaps it with everything else).

``total = steps * step`` with steps from :mod:`scalelab.perf.stats`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from scalelab.errors import ConfigError
from scalelab.perf import comm
from scalelab.perf.catalog import Catalog, load_catalog
from scalelab.perf.stats import Steps
from scalelab.perf.workload import DTYPE_BYTES, Workload

OPTIMIZER_BYTES_PER_PARAM = 20    # fp32 weight, grad, momentum read; weight, momentum written
REDUCE_BYTES_PER_BYTE = 3         # a + b -> c: read two, write one
BUCKET_BYTES = 25e6               # PyTorch DDP default bucket_cap_mb = 25


@dataclass
class Setup:
    """Everything a projection needs. ``per_node`` / ``interconnect`` None: the accelerator's defaults."""

    workload: Workload
    accelerator: str
    devices: int
    batch: int
    steps: Steps
    per_node: int | None = None
    interconnect: str | None = None
    compress: str | None = None
    parallel: str = "data"
    algorithm: str = "auto"
    microbatches: int | None = None
    comm_dtype: str | None = None
    input_rate: float | None = None   # samples/s per node; None = keeps up


@dataclass
class Projection:
    """The predicted time-to-train and its breakdown (seconds; per step unless named total)."""

    total_s: float
    steps: float
    steps_per_epoch: float
    step_s: float
    compute_s: float
    compute_bound: str
    forward_s: float
    backward_s: float
    optimizer_s: float
    comm_s: float
    comm_exposed_s: float
    comm_overlap_s: float
    model_parallel_s: float
    bubble_fraction: float
    kernel_overhead_s: float
    buckets: int
    input_s: float
    per_device_batch: float
    algorithm: str
    dtype: str
    comm_bytes: float
    hbm_bytes: float          # one device's HBM traffic per step (after on-chip memory, if the device has one)
    peak_flops: float
    achieved_flops: float
    setup: dict = field(default_factory=dict)
    assumptions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def parse_parallel(spec: str, devices: int) -> tuple[str, int, int]:
    """``data`` -> (data, 1, n); ``hybrid:MxD`` -> (hybrid, M, D); ``pipeline:S`` -> (pipeline, S, n/S)."""
    kind, _, arg = spec.strip().lower().partition(":")
    try:
        if kind == "data" and not arg:
            return "data", 1, devices
        if kind == "hybrid":
            m, d = (int(v) for v in arg.split("x"))
            if m < 1 or d < 1 or m * d != devices:
                raise ConfigError(f"--parallel {spec}: M x D = {m * d} must equal --devices {devices}")
            return "hybrid", m, d
        if kind == "pipeline":
            s = int(arg)
            if s < 1 or devices % s:
                raise ConfigError(f"--parallel {spec}: {s} stages must divide --devices {devices}")
            return "pipeline", s, devices // s
    except ValueError:
        pass
    raise ConfigError(f"bad --parallel {spec!r}; expected data, hybrid:MxD or pipeline:S")


def project(setup: Setup, catalog: Catalog | None = None) -> Projection:
    """Predict time-to-train for ``setup`` (see the module docstring for the model)."""
    cat = catalog or load_catalog()
    wl = setup.workload
    acc = cat.accelerator(setup.accelerator)
    fam = cat.family(acc.family)
    notes: list[str] = []
    if setup.devices < 1 or setup.batch < 1:
        raise ConfigError(f"--devices and --batch must be >= 1, got {setup.devices} and {setup.batch}")

    per_node = setup.per_node
    if per_node is None:
        per_node = min(acc.default_per_node, setup.devices)
        notes.append(f"per_node not given: assumed {per_node} ({acc.name} default)")
    if per_node < 1:
        raise ConfigError(f"per_node must be >= 1, got {per_node}")
    per_node = min(per_node, setup.devices)
    nodes = math.ceil(setup.devices / per_node)
    net_name = setup.interconnect
    if not net_name:
        net_name = acc.default_network
        notes.append(f"interconnect not given: assumed {net_name} ({acc.name} default)")
    network = cat.network_spec(net_name)
    link = cat.link(acc.node_link) if acc.node_link in cat.links else cat.network(acc.node_link)

    kind, mp, replicas = parse_parallel(setup.parallel, setup.devices)
    dtype = fam.dtype
    peak = acc.peak_for(dtype)
    comm_dtype = setup.comm_dtype or ("fp16" if DTYPE_BYTES[dtype] == 2 else "fp32")
    compression = comm.Compression.parse(setup.compress)

    # 1. compute: roofline per sample, on this device's share of the batch
    b = setup.batch / replicas
    t_flops = b * wl.flops / (peak * fam.compute_eff)
    hbm = wl.memory_bytes(dtype, fam.fused, b, acc.onchip_memory)
    t_mem = hbm / (acc.memory_bw * fam.memory_eff)
    bound = "compute" if t_flops >= t_mem else "memory"
    bubble = 0.0
    kernels = wl.kernels(fam.fused if fam.fused_kernels is None else fam.fused_kernels)
    t_kernels = kernels * fam.kernel_s            # every device runs (its share of) every kernel
    t_compute = max(t_flops, t_mem) / mp
    t_mp = 0.0
    gamma = REDUCE_BYTES_PER_BYTE / acc.memory_bw
    intra = comm.Net(link.latency, link.bandwidth, gamma)
    inter = comm.Net(network.latency, network.bandwidth, gamma)
    mp_net = intra if mp <= per_node else comm.Net(network.latency, network.bandwidth / per_node, gamma)
    act_bytes = DTYPE_BYTES[dtype] / 4
    if kind == "hybrid" and mp > 1:
        per_layer = b * wl.boundary_bytes * act_bytes / max(wl.layers, 1)
        t_mp = wl.layers * (comm.ring_all_gather(per_layer, mp, mp_net)
                            + comm.ring_reduce_scatter(per_layer, mp, mp_net))
    elif kind == "pipeline" and mp > 1:
        m = setup.microbatches or 4 * mp
        bubble = (mp - 1) / (m + mp - 1)
        t_compute = t_compute * (m + mp - 1) / m
        t_kernels = kernels / mp * (m + mp - 1) * fam.kernel_s   # a stage's kernels per micro-batch slot
        boundary = b * wl.boundary_bytes * act_bytes / max(wl.layers, 1)   # one layer's output, whole batch
        t_mp = 2 * (m * mp_net.alpha + boundary / mp_net.bandwidth)
        if setup.microbatches is None:
            notes.append(f"micro-batches not given: assumed {m} = 4 x stages (GPipe)")
    t_compute += t_kernels
    bwd_frac = (wl.flops - wl.flops_fwd) / wl.flops if wl.flops else 2 / 3
    t_fwd = t_compute * (1 - bwd_frac)
    t_bwd = t_compute * bwd_frac

    # 2. optimizer update on this device's share of the parameters
    shard = wl.params / mp
    t_opt = shard * OPTIMIZER_BYTES_PER_PARAM / (acc.memory_bw * fam.memory_eff) + fam.step_overhead_s

    # 3. gradient exchange among the replicas of each shard, one collective per bucket of the gradient
    raw = shard * DTYPE_BYTES[comm_dtype]
    buckets = max(1, math.ceil(raw / BUCKET_BYTES))
    size = raw * compression.factor
    inter_lat = comm.Net(max(inter.alpha, fam.net_hop_latency_s), inter.bandwidth, inter.gamma)
    last_bucket, algo = _allreduce(size / buckets, replicas, per_node // mp if mp <= per_node else 1, nodes,
                                   intra, inter_lat, acc, setup.algorithm, compression.summable,
                                   mp if mp <= per_node else per_node, fam.tree_allreduce)
    if last_bucket > 0:
        last_bucket += fam.collective_base_s
    t_comm = buckets * last_bucket
    exposed = max(t_comm - t_bwd, last_bucket) if t_comm > 0 else 0.0

    # 5. input pipeline
    t_input = 0.0
    if setup.input_rate:
        t_input = setup.batch / nodes / setup.input_rate
    step = max(t_compute + t_mp + exposed + t_opt, t_input)

    n_steps = setup.steps.steps(setup.batch, wl.dataset_size)
    achieved = setup.batch * wl.flops / step / setup.devices
    return Projection(
        total_s=n_steps * step, steps=n_steps, steps_per_epoch=wl.dataset_size / setup.batch, step_s=step,
        compute_s=t_compute, compute_bound=bound, forward_s=t_fwd, backward_s=t_bwd, optimizer_s=t_opt,
        comm_s=t_comm, comm_exposed_s=exposed, comm_overlap_s=t_comm - exposed, model_parallel_s=t_mp,
        bubble_fraction=bubble, kernel_overhead_s=t_kernels, buckets=buckets, input_s=t_input,
        per_device_batch=b / (mp if kind == "pipeline" else 1),
        algorithm=algo, dtype=dtype, comm_bytes=size, hbm_bytes=hbm, peak_flops=peak, achieved_flops=achieved,
        setup={"model": wl.name, "dataset": wl.dataset, "accelerator": acc.name, "devices": setup.devices,
               "per_node": per_node, "nodes": nodes, "interconnect": net_name, "batch": setup.batch,
               "parallel": setup.parallel, "compress": compression.spec, "comm_dtype": comm_dtype,
               "steps_rule": setup.steps.describe(), "family": fam.name, "compute_eff": fam.compute_eff,
               "memory_eff": fam.memory_eff, "kernel_s": fam.kernel_s,
               "net_hop_latency_s": fam.net_hop_latency_s, "collective_base_s": fam.collective_base_s,
               "onchip_memory": acc.onchip_memory,
               "onchip_saving": wl.memory_bytes(dtype, fam.fused, b) / hbm if acc.onchip_memory else 1.0},
        assumptions=notes)


def _allreduce(size: float, replicas: int, local: int, nodes: int, intra: comm.Net, inter: comm.Net, acc,
               algo: str, summable: bool, sharers: int, tree: bool = False) -> tuple[float, str]:
    """Time of one gradient exchange of ``size`` bytes among ``replicas`` and the algorithm used.

    ``local`` replicas of a shard share a node; ``sharers`` shards share the node's network links; ``tree``:
    the hierarchical all-reduce may use a double binary tree across nodes when it is faster.
    """
    if algo not in comm.ALGORITHMS:
        raise ConfigError(f"unknown --algorithm {algo!r}; known: {', '.join(comm.ALGORITHMS)}")
    if replicas <= 1:
        return 0.0, "none"
    local = max(1, min(local, replicas))
    groups = max(1, replicas // local)
    inter = comm.Net(inter.alpha, inter.bandwidth / max(sharers, 1), inter.gamma)
    flat = comm.Net(inter.alpha, inter.bandwidth / local, inter.gamma) if groups > 1 else intra
    if algo == "auto":
        algo = "torus" if acc.torus else ("hierarchical" if groups > 1 and local > 1 else "ring")
    if not summable:
        return comm.sparse_allgather(size, replicas, flat), "allgather"
    if algo == "ring":
        return comm.ring_allreduce(size, replicas, flat), algo
    if algo == "tree":
        return comm.tree_allreduce(size, replicas, flat), algo
    if algo == "ps":
        return comm.ps_exchange(size, replicas, flat), algo
    if algo == "torus":
        return comm.torus_allreduce(size, replicas, inter, 2 * max(acc.torus, 2)), algo
    return comm.hierarchical_allreduce(size, groups, local, intra, inter, tree), algo
