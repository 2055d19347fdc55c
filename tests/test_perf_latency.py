"""Performance model, fixed costs at scale: kernels per step, per-bucket collective latency, double binary
trees, monotonicity in devices, and the held-out records file."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from scalelab.perf import comm
from scalelab.perf.catalog import load_catalog
from scalelab.perf.project import REDUCE_BYTES_PER_BYTE, Setup, project
from scalelab.perf.records import predict_records, read_records
from scalelab.perf.stats import Steps
from scalelab.perf.workload import Workload, count_module, workload

REPO = Path(__file__).resolve().parents[1]
HOLDOUT = REPO / "src" / "scalelab" / "perf" / "records_holdout.csv"
NET = comm.Net(alpha=1e-5, bandwidth=1e9, gamma=0.0)


def test_kernels_counted_by_hand():
    # Linear(4,3) -> ReLU -> Linear(3,2), loss = sum. Forward: addmm, relu, addmm (3). Backward: the loss sum,
    # its ones_like seed, layer 2 mm (input grad) + mm (weight grad) + sum (bias grad), threshold_backward,
    # layer 1 mm (weight grad; the input needs none) + sum (bias grad): 8. Fused: the 2 addmm and 3 mm.
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    c = count_module(net, torch.zeros(2, 4))
    assert (c["kernels_unfused"], c["kernels_fused"]) == (11, 5)
    wl = workload("resnet50", "imagenet")
    # 53 convolutions + 3 matmuls forward; 53 convolution_backward (input and weight grads in one op) backward
    assert wl.kernels_fused == 53 + 3 + 53
    assert wl.kernels_unfused == 405 and wl.kernels(fused=True) == 109


def test_double_tree_by_hand():
    # p = 8: depth 3; 2*3*10 us + 2 * 100 MB / 1 GB/s = 60 us + 0.2 s
    assert comm.double_tree_allreduce(100e6, 8, NET) == pytest.approx(60e-6 + 0.2)
    assert comm.double_tree_allreduce(100e6, 5, NET) == pytest.approx(60e-6 + 0.2)   # ceil(log2 5) = 3
    assert comm.double_tree_allreduce(100e6, 8, replace(NET, gamma=1e-9)) == pytest.approx(60e-6 + 0.2 + 0.1)
    assert comm.double_tree_allreduce(100e6, 1, NET) == 0.0


def test_hierarchical_takes_the_faster_of_ring_and_tree():
    intra, inter = comm.Net(1e-6, 100e9), comm.Net(14e-6, 8e9)
    s, g = 8e6, 8
    for nodes in (2, 4, 64, 512):
        across = comm.Net(14e-6, 1e9)
        ring = comm.ring_allreduce(s / g, nodes, across)
        tree = comm.double_tree_allreduce(s / g, nodes, across)
        ends = comm.ring_reduce_scatter(s, g, intra) + comm.ring_all_gather(s, g, intra)
        assert comm.hierarchical_allreduce(s, nodes, g, intra, inter) == pytest.approx(ends + ring)
        assert comm.hierarchical_allreduce(s, nodes, g, intra, inter, tree=True) == pytest.approx(
            ends + min(ring, tree))
    # at 512 nodes the ring's 2 * 511 hops of 14 us (14.3 ms) dwarf the tree's 2 * 9 hops
    assert comm.ring_allreduce(1e6, 512, comm.Net(14e-6, 1e9)) > 7 * comm.double_tree_allreduce(
        1e6, 512, comm.Net(14e-6, 1e9))


def _tiny_workload(params: int) -> Workload:
    return Workload(name="tiny", dataset="imagenet", flops_fwd=1e9, flops=3e9, bytes_unfused=1e8,
                    bytes_fused=5e7, bytes_unfused_step=0.0, bytes_fused_step=0.0, boundary_bytes=0.0,
                    layers=1,
                    kernels_unfused=100, kernels_fused=10, params=params, dataset_size=1_000_000)


def test_kernel_overhead_by_hand_and_independent_of_batch():
    cat = load_catalog()
    fam = cat.families["volta"]
    cat.families["volta"] = replace(fam, kernel_s=1e-3)
    wl = _tiny_workload(1000)
    for batch in (1, 64):
        with_k = project(Setup(wl, "v100", 1, batch, Steps(epochs=1), 1), cat)
        assert with_k.kernel_overhead_s == pytest.approx(100 * 1e-3)       # 100 un-fused kernels x 1 ms
        cat.families["volta"] = replace(fam, kernel_s=0.0)
        without = project(Setup(wl, "v100", 1, batch, Steps(epochs=1), 1), cat)
        cat.families["volta"] = replace(fam, kernel_s=1e-3)
        assert with_k.compute_s - without.compute_s == pytest.approx(0.1)
    # a TPU counts fused kernels (XLA): 10 x its kernel_s
    tpu = project(Setup(wl, "tpu-v3", 1, 8, Steps(epochs=1), 1), cat)
    assert tpu.kernel_overhead_s == pytest.approx(10 * cat.families["tpu"].kernel_s)


def test_every_bucket_pays_the_collective_latency():
    # 25e6 parameters in fp16 = 50 MB = 2 buckets of 25 MB; 4 V100 in one node: a ring over NVLink 2.
    cat = load_catalog()
    fam, acc, link = cat.families["volta"], cat.accelerators["v100"], cat.links["nvlink2"]
    p = project(Setup(_tiny_workload(25_000_000), "v100", 4, 64, Steps(epochs=1), 4, "ib-edr"), cat)
    net = comm.Net(link.latency, link.bandwidth, REDUCE_BYTES_PER_BYTE / acc.memory_bw)
    one = comm.ring_allreduce(25e6, 4, net) + fam.collective_base_s
    assert p.buckets == 2 and p.algorithm == "ring"
    assert p.comm_s == pytest.approx(2 * one)
    assert p.comm_exposed_s == pytest.approx(max(2 * one - p.backward_s, one))


def test_per_step_overheads_never_shrink_with_devices():
    cat = load_catalog()
    wl = workload("resnet50", "imagenet")
    for acc, per_node, net in (("v100", 4, "2xib-edr"), ("a100", 8, "8xib-hdr"), ("tpu-v3", 4, "ici-v3")):
        ps = [project(Setup(wl, acc, n, 32 * n, Steps(epochs=90), per_node, net), cat)
              for n in (8, 32, 128, 512, 2048, 8192)]
        comm_s = [p.comm_s for p in ps]
        assert all(a <= b * (1 + 1e-12) for a, b in zip(comm_s, comm_s[1:])), (acc, comm_s)
        assert len({p.kernel_overhead_s for p in ps}) == 1      # kernels per step do not depend on devices
        assert all(a.step_s <= b.step_s * (1 + 1e-12) for a, b in zip(ps, ps[1:]))


def test_more_hop_latency_never_faster():
    cat = load_catalog()
    wl = workload("resnet50", "imagenet")
    fam = cat.families["volta"]
    times = []
    for hop in (0.0, 5e-6, 14e-6, 50e-6):
        cat.families["volta"] = replace(fam, net_hop_latency_s=hop)
        times.append(project(Setup(wl, "v100", 2048, 65536, Steps(epochs=90), 4, "2xib-edr"), cat).comm_s)
    assert all(a <= b for a, b in zip(times, times[1:])) and times[0] < times[-1]


def test_holdout_records_parse_and_are_held_out():
    held = read_records(HOLDOUT)
    shipped = {r.name for r in read_records(REPO / "records.csv")}
    names = [r.name for r in held]
    assert len(names) >= 15 and len(set(names)) == len(names)
    assert not shipped & set(names)
    assert {r.accelerator for r in held} >= {"p100", "p40", "knl", "v100", "a100", "h100", "tpu-v3", "tpu-v4"}
    results = predict_records(held)
    assert all(0 < r["predicted_s"] < float("inf") and r["actual_s"] > 0 for r in results)


def test_comment_lines_before_the_header(tmp_path):
    f = tmp_path / "r.csv"
    f.write_text("# a comment\n# another\n"
                 "name,accelerator,count,per_node,interconnect,global_batch,epochs,time_s,note\n"
                 "x,h100,64,8,8xib-ndr,3200,35,100,\"a, b\"\n"
                 "y,h100,sixty,8,8xib-ndr,3200,35,100,n\n")
    with pytest.raises(Exception, match=r"r.csv:5: count must be an integer"):
        read_records(f)
