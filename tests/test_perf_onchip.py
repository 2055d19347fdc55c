"""Performance model, on-chip memory (TPU v4 CMEM): the least-recently-used replay of a kernel trace by hand,
exactly the plain byte count without on-chip memory, and never slower with more of it on ResNet-50."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scalelab.perf.catalog import load_catalog
from scalelab.perf.project import Setup, project
from scalelab.perf.stats import Steps
from scalelab.perf.workload import count_module, hbm_bytes, workload

MiB = 2**20


def test_replay_by_hand():
    # kernel 1 writes A (100 B/sample); kernel 2 reads A, writes B (300 B/sample); kernel 3 reads A and B, reads
    # the weights W (50 B per step) and writes C (100 B/sample). Batch 1, fp32 (scale 1).
    trace = (((0, 100.0, 0.0, True),),
             ((0, 100.0, 0.0, False), (1, 300.0, 0.0, True)),
             ((0, 100.0, 0.0, False), (1, 300.0, 0.0, False), (2, 0.0, 50.0, False), (3, 100.0, 0.0, True)))
    everything = 100 + 100 + 300 + 100 + 300 + 50 + 100
    assert hbm_bytes(trace, 1, 0) == everything
    # 1,000 B hold all: only the writes (500) and the first read of W (50) reach HBM
    assert hbm_bytes(trace, 1, 1000) == 100 + 300 + 50 + 100
    # 350 B: A (100) stays for kernel 2; writing B (300) evicts A (400 > 350), so kernel 3 reads A again (100),
    # which evicts B, read again (300)...: only kernel 2's read of A is saved
    assert hbm_bytes(trace, 1, 350) == everything - 100
    # 200 B: B (300) never fits and bypasses; A stays and both of its reads are saved
    assert hbm_bytes(trace, 1, 200) == everything - 200
    # batch 2 doubles the per-sample sizes, bf16 halves every size
    assert hbm_bytes(trace, 2, 0, scale=0.5) == (2 * (everything - 50) + 50) / 2


def test_replay_without_onchip_memory_is_the_plain_count():
    net = nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten(), nn.Linear(24, 5))
    c = count_module(net, torch.zeros(2, 2, 8))
    for kind in ("fused", "unfused"):
        raw = sum(size for _, accesses in c[f"trace_{kind}"] for _, size, _ in accesses)
        assert raw == pytest.approx(c[f"bytes_{kind}"] * 2)      # the trace holds every byte of the count
    wl = workload("resnet50", "imagenet")
    for fused in (True, False):
        for b in (1, 19, 256):
            assert wl.memory_bytes("bf16", fused, b, onchip=1e-9) == pytest.approx(wl.memory_bytes("bf16", fused, b))


def test_fused_trace_follows_a_tensor_through_the_ops_fused_into_it():
    # Linear -> ReLU -> Linear: the second addmm reads the ReLU's output, which in the fused trace is the first
    # addmm's output, so with room for it that read is free
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    c = count_module(net, torch.zeros(2, 4))
    (_, first), (_, second) = c["trace_fused"][:2]
    written = {key for key, _, w in first if w}
    assert any(key in written for key, _, w in second if not w)


def test_more_onchip_memory_never_more_traffic_on_resnet50():
    wl = workload("resnet50", "imagenet")
    for fused in (True, False):
        for b in (8, 19, 32, 256):
            traffic = [wl.memory_bytes("bf16", fused, b, m * MiB) for m in (0, 4, 16, 64, 128, 512, 4096)]
            assert all(a >= c for a, c in zip(traffic, traffic[1:]))
            assert traffic[-1] < traffic[0]


def test_tpu_v4_cmem_speeds_up_small_per_chip_batches(tmp_path):
    wl = workload("resnet50", "imagenet")
    user = tmp_path / "nocmem.toml"
    user.write_text('[accelerator.tpu-v4-nocmem]\nfamily = "tpu"\npeak = { bf16 = 275e12 }\nmemory = 32e9\n'
                    'memory_bw = 1200e9\nnode_link = "ici-v4"\ndefault_per_node = 4\ndefault_network = "ici-v4"\n'
                    'torus = 3\n')
    cat = load_catalog(user)
    assert cat.accelerator("tpu-v4").onchip_memory == 128 * MiB
    def step(acc: str, per_chip: int) -> float:
        return project(Setup(wl, acc, 1024, 1024 * per_chip, Steps(epochs=1)), cat).compute_s
    # at 16 images per chip the activations of a layer fit in 128 MiB: much less HBM traffic; at 1024 far less so
    assert step("tpu-v4-nocmem", 16) / step("tpu-v4", 16) > 1.4
    assert 1.0 <= step("tpu-v4-nocmem", 1024) / step("tpu-v4", 1024) < 1.1


def test_projection_reports_the_hbm_traffic_and_the_saving(run_cli):
    proc = run_cli("project", "--model", "resnet50", "--hardware", "tpu-v4", "--devices", 64, "--batch", 1216,
                   "--epochs", 1, check=True)
    wl = workload("resnet50", "imagenet")
    hbm = wl.memory_bytes("bf16", False, 19, 128 * MiB)
    saving = wl.memory_bytes("bf16", False, 19) / hbm
    assert f"tensors kept in 128 MiB on chip between kernels: {saving:.2f}x less" in proc.stdout
    assert f"HBM traffic        {hbm / 1e9:9.2f} GB" in proc.stdout
