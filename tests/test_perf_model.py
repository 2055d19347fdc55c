"""Performance model: all-reduce formulas by hand, FLOP counts against layer formulas, monotonicity."""

from __future__ import annotations

import math
import re
from dataclasses import replace

import pytest
import torch
from torch import nn

from scalelab.errors import ConfigError
from scalelab.perf import comm
from scalelab.perf.catalog import load_catalog, parse_network_spec
from scalelab.perf.project import Setup, parse_parallel, project
from scalelab.perf.stats import Steps, mccandlish_steps
from scalelab.perf.workload import count_module, workload

NET = comm.Net(alpha=1e-5, bandwidth=1e9, gamma=0.0)


# --- all-reduce formulas against hand-computed values ---
def test_ring_allreduce_by_hand():
    # p = 4, S = 100 MB at 1 GB/s, alpha 10 us: 2*3*10us + 2*3/4 * 0.1 s = 60 us + 0.15 s
    assert comm.ring_allreduce(100e6, 4, NET) == pytest.approx(60e-6 + 0.15)
    # with reduction cost gamma = 1 ns/byte: + 3/4 * 100e6 * 1e-9 = 0.075 s
    assert comm.ring_allreduce(100e6, 4, replace(NET, gamma=1e-9)) == pytest.approx(60e-6 + 0.15 + 0.075)
    assert comm.ring_allreduce(100e6, 1, NET) == 0.0


def test_tree_allreduce_by_hand():
    # p = 8: depth 3; 2*3*(10us + 0.1 s) = 0.60006 s
    assert comm.tree_allreduce(100e6, 8, NET) == pytest.approx(6 * (1e-5 + 0.1))
    assert comm.tree_allreduce(100e6, 5, NET) == pytest.approx(6 * (1e-5 + 0.1))  # ceil(log2 5) = 3


def test_hierarchical_allreduce_by_hand():
    intra = comm.Net(1e-6, 100e9)
    inter = comm.Net(1e-5, 8e9)  # node bandwidth, shared by its 8 devices -> 1 GB/s each
    s, g, n = 80e6, 8, 4
    rs = 7 * 1e-6 + 7 / 8 * s / 100e9
    ar = 2 * 3 * 1e-5 + 2 * 3 / 4 * (s / 8) / 1e9
    assert comm.hierarchical_allreduce(s, n, g, intra, inter) == pytest.approx(2 * rs + ar)


def test_torus_allreduce_by_hand():
    link = comm.Net(1e-6, 50e9)
    assert comm.torus_dims(16) == (4, 4) and comm.torus_dims(32) == (8, 4)
    s = 64e6
    # 4 links: bidirectional rings, 2 links (100 GB/s) per dimension
    expected = (3 * 1e-6 + 3 / 4 * s / 100e9) * 2 + 2 * 3 * 1e-6 + 2 * 3 / 4 * (s / 4) / 100e9
    assert comm.torus_allreduce(s, 16, link) == pytest.approx(expected)
    assert comm.torus_allreduce(s, 16, link) < comm.ring_allreduce(s, 16, link)   # latency: 12 vs 30 hops


def test_parameter_server_and_sparse_by_hand():
    # one server: every worker's 10 MB lands on its link: 2 * (10us + 8 * 10 MB / 1 GB/s)
    assert comm.ps_exchange(10e6, 8, NET, servers=1) == pytest.approx(2 * (1e-5 + 0.08))
    assert comm.ps_exchange(10e6, 8, NET) == pytest.approx(2 * (1e-5 + 0.01))  # sharded over 8
    assert comm.sparse_allgather(1e6, 5, NET) == pytest.approx(4 * (1e-5 + 1e-3))


def test_compression_specs():
    assert comm.Compression.parse("dgc:0.999").factor == pytest.approx(0.002)
    assert not comm.Compression.parse("dgc:0.999").summable
    assert comm.Compression.parse(None).factor == 1.0
    assert comm.Compression.parse("fp16").factor == 0.5
    with pytest.raises(ConfigError, match="bad --compress"):
        comm.Compression.parse("zip:3")


# --- FLOP counts of known layers ---
def test_linear_flops_match_formula():
    n, fin, fout = 8, 32, 16
    c = count_module(nn.Linear(fin, fout), torch.randn(n, fin, requires_grad=True))
    # forward 2*fin*fout per sample (multiply-add = 2); backward: input grad + weight grad, twice that
    assert c["flops_fwd"] == 2 * fin * fout
    assert c["flops"] == 6 * fin * fout
    # a first layer has no input gradient: forward + weight gradient only
    assert count_module(nn.Linear(fin, fout), torch.randn(n, fin))["flops"] == 4 * fin * fout
    assert c["params"] == fin * fout + fout


def test_conv2d_flops_match_formula():
    n, cin, cout, k, h = 2, 3, 8, 3, 10
    conv = nn.Conv2d(cin, cout, k, padding=1, bias=False)
    c = count_module(conv, torch.randn(n, cin, h, h, requires_grad=True))
    per_sample = 2 * cin * cout * k * k * h * h
    assert c["flops_fwd"] == per_sample and c["flops"] == 3 * per_sample


def test_resnet50_forward_flops():
    """He et al. 2016 Table 1: 3.8-4.1 G multiply-adds per 224x224 image (v1.5 strides the 3x3: ~4.1 G);
    FlopCounterMode counts 2 FLOPs per multiply-add."""
    wl = workload("resnet50", "imagenet")
    assert wl.flops_fwd / 2 == pytest.approx(4.09e9, rel=0.02)
    assert wl.flops / wl.flops_fwd == pytest.approx(3.0, rel=0.03)
    assert wl.params == 25_557_032
    assert wl.memory_bytes("fp16", False, 32) == pytest.approx(wl.memory_bytes("fp32", False, 32) / 2)
    assert wl.bytes_fused < wl.bytes_unfused


# --- projection properties ---
def _base(**kw) -> Setup:
    wl = workload("resnet50", "imagenet")
    return Setup(wl, kw.pop("accelerator", "h100"), kw.pop("devices", 64), kw.pop("batch", 3200),
                 Steps(epochs=35), **({"per_node": 8, "interconnect": "8xib-ndr"} | kw))


def test_more_bandwidth_never_slower():
    cat = load_catalog()
    times = []
    for links in (1, 2, 4, 8, 16):
        times.append(project(_base(interconnect=f"{links}xeth-10g", devices=256, batch=8192), cat).total_s)
    assert all(a >= b for a, b in zip(times, times[1:]))
    assert times[0] > times[-1]                       # and it matters on a slow network


def test_more_devices_at_fixed_per_device_batch_never_more_steps():
    cat = load_catalog()
    ps = [project(_base(devices=n, batch=32 * n), cat) for n in (8, 16, 64, 256, 1024)]
    assert all(a.steps >= b.steps for a, b in zip(ps, ps[1:]))
    assert all(a.per_device_batch == 32 for a in ps)


def test_compression_never_slower_and_faster_devices_faster():
    cat = load_catalog()
    plain = project(_base(interconnect="eth-10g", devices=64, batch=2048), cat)
    dgc = project(_base(interconnect="eth-10g", devices=64, batch=2048, compress="dgc:0.999"), cat)
    assert dgc.comm_s < plain.comm_s and dgc.total_s <= plain.total_s
    v100 = project(_base(accelerator="v100"), cat)
    h100 = project(_base(accelerator="h100"), cat)
    assert h100.total_s < v100.total_s


def test_single_device_has_no_communication():
    p = project(_base(devices=1, batch=32, per_node=1), load_catalog())
    assert p.comm_s == 0 and p.algorithm == "none"
    assert p.total_s == pytest.approx(p.steps * p.step_s)


def test_pipeline_bubble_and_hybrid():
    cat = load_catalog()
    p = project(_base(parallel="pipeline:4", microbatches=16), cat)
    assert p.bubble_fraction == pytest.approx(3 / 19)
    h = project(_base(parallel="hybrid:2x32"), cat)
    assert h.model_parallel_s > 0 and h.comm_bytes == pytest.approx(project(_base(), cat).comm_bytes / 2)
    assert parse_parallel("hybrid:4x16", 64) == ("hybrid", 4, 16)
    with pytest.raises(ConfigError, match="must equal"):
        parse_parallel("hybrid:4x4", 64)


def test_assumptions_are_stated():
    setup = _base(per_node=None, interconnect=None, accelerator="knl", devices=16, batch=256)
    p = project(setup, load_catalog())
    assert any("interconnect not given" in a for a in p.assumptions)
    assert any("per_node not given" in a for a in p.assumptions)


def test_mccandlish_steps():
    assert mccandlish_steps(1000, 1000, 500) == 1000      # B = B_noise: twice S_min
    assert Steps(noise_scale=1000, min_steps=500).steps(1e9, 1) == pytest.approx(500, rel=1e-5)
    assert Steps(epochs=2).steps(100, 1000) == 20
    with pytest.raises(ConfigError):
        Steps()


def test_catalog_names_and_errors():
    cat = load_catalog()
    for name in ("p100", "p40", "v100", "a100", "h100", "knl", "tpu-v2", "tpu-v3", "tpu-v4"):
        assert cat.accelerator(name).source
    for name in ("eth-10g", "eth-25g", "eth-50g", "eth-100g", "ib-fdr", "ib-edr", "ib-hdr", "ib-ndr",
                 "ici-v2", "ici-v3", "ici-v4"):
        assert cat.network(name).bandwidth > 0
    for name in ("pcie3", "pcie4", "pcie5", "nvlink1", "nvlink2", "nvlink3", "nvlink4"):
        assert cat.link(name).bandwidth > 0
    assert cat.accelerator("h100").peak_for("bf16") == pytest.approx(989.4e12)
    assert parse_network_spec("8xib-ndr") == (8, "ib-ndr")
    with pytest.raises(ConfigError, match="known: .*h100"):
        cat.accelerator("h200")
    assert math.isclose(cat.network_spec("2xib-fdr").bandwidth, 13.6e9)


B200 = ('[accelerator.b200]\nfamily = "hopper"\npeak = { bf16 = 2250e12 }\nmemory = 192e9\nmemory_bw = 8e12\n'
        'node_link = "nvlink4"\ndefault_per_node = 8\ndefault_network = "8xib-ndr"\n')


def test_user_catalog_adds_entries(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text(B200)
    cat = load_catalog(f)
    assert project(_base(accelerator="b200"), cat).total_s < project(_base(), cat).total_s
    f.write_text('[accelerator.x]\nfamily = "nope"\n')
    with pytest.raises(ConfigError):
        load_catalog(f)


@pytest.mark.parametrize("line, message", [
    ('onchip_memory = "big"', "onchip_memory = 'big': expected a number"),
    ("memory_bw = -5", "memory_bw = -5: must be > 0"),
    ("memory_bw = 0", "memory_bw = 0: must be > 0"),
    ("default_per_node = 4.5", "default_per_node = 4.5: expected an integer"),
    ("torus = true", "torus = True: expected an integer"),
    ("peak = { bf16 = 0 }", "peak = {'bf16': 0}: expected a table of FLOP/s > 0 per dtype"),
    ("node_link = 3", "node_link = 3: expected a string"),
])
def test_user_catalog_bad_values_are_one_line_errors(tmp_path, line, message):
    key = line.split(" =")[0]
    body = "".join(l + "\n" for l in B200.splitlines() if not l.startswith(key + " ")) + line + "\n"
    f = tmp_path / "mine.toml"
    f.write_text(body)
    with pytest.raises(ConfigError, match=f"mine.toml: \\[accelerator.b200\\] {re.escape(message)}"):
        load_catalog(f)


def test_workshop_answer_is_consistent():
    from scalelab.perf.workshop import workshop

    r = workshop()
    h100 = next(a for a in r["at_100_pflops"] if a["accelerator"] == "h100")
    assert 90 < h100["peak_pflops"] < 110 and h100["mccandlish"]["epochs"] == pytest.approx(35.0)
    for u in r["under_a_minute"]:
        if u["devices"]:
            assert u["devices"] >= 8
    # larger batches need more epochs, so the McCandlish answer never needs fewer devices
    need = {(u["accelerator"], u["rule"]): u["devices"] for u in r["under_a_minute"]}
    assert all(need[(a, "mccandlish")] >= need[(a, "35-epochs")] for a in ("h100", "v100", "a100", "tpu-v4"))


def test_steps_table_interpolates_in_log_log(tmp_path):
    from scalelab.errors import DataError
    from scalelab.perf.stats import read_steps_table

    f = tmp_path / "steps.csv"
    f.write_text("batch,steps\n1024,4000\n256,16000\n4096,2000\n")
    st = read_steps_table(f)
    assert st.steps(256, 1) == 16000 and st.steps(4096, 1) == 2000
    assert st.steps(512, 1) == pytest.approx(8000)              # halfway in log-log between 256 and 1024
    assert st.steps(128, 1) == pytest.approx(32000)             # perfect scaling below the table
    assert st.steps(65536, 1) == 2000                           # no gain beyond the largest measured batch
    f.write_text("batch,steps\n1024,lots\n")
    with pytest.raises(DataError, match="steps.csv:2"):
        read_steps_table(f)
    # a directory is read as a sweep's output: one steps_<optimizer>.csv, or an error naming the choices
    with pytest.raises(DataError, match="without steps_<optimizer>.csv"):
        read_steps_table(tmp_path)
    for opt in ("sgd", "lamb"):
        (tmp_path / f"steps_{opt}.csv").write_text("batch,steps\n256,100\n")
    with pytest.raises(DataError, match="steps for 2 optimizers: give one of .*steps_lamb.csv, .*steps_sgd.csv"):
        read_steps_table(tmp_path)
