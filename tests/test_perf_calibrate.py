"""Calibration runs real gloo processes: DDP's real bucket layout is probed and sent, and the fitted alpha-beta
reproduces the measured all-reduce times."""

from __future__ import annotations

import pytest

from scalelab.perf import calibrate, comm


@pytest.mark.slow
def test_probe_two_processes_uses_ddp_buckets_and_fits_alpha_beta():
    r = calibrate.probe(2, steps=1, repeats=1)
    params = calibrate.compute_step(8, 1, repeats=1)["params"]
    # the buckets are DDP's own: every gradient byte once, the first bucket closed past DDP's 1 MB first cap
    assert sum(r["bucket_bytes"]) == params * 4 and len(r["bucket_bytes"]) == 2
    assert r["bucket_bytes"][0] > 1024 * 1024
    # two BatchNorm1d(2048): running mean and variance in fp32, and a 64-bit step counter each
    assert r["buffer_bytes"] == {"torch.float32": 2 * 2 * 2048 * 4, "torch.int64": 2 * 8}
    assert r["threads"] == max(1, (calibrate.os.cpu_count() or 1) // 2)
    assert r["local_s"] == pytest.approx(r["compute_s"] + r["ddp_local_s"])
    assert r["compute_s"] > 0 and r["comm_s"] > 0
    assert r["alpha_s"] > 0 and 1e6 < r["bus_bandwidth"] < 1e12
    net = comm.Net(r["alpha_s"], r["bus_bandwidth"])
    small, large = calibrate.SIZES
    # the two-point fit is exact at its two points
    assert comm.ring_allreduce(large, 2, net) == pytest.approx(r["times_s"][str(large)], rel=1e-6)
    assert comm.ring_allreduce(1e-12, 2, net) == pytest.approx(r["times_s"][str(small)], rel=0.05)


def test_compute_step_measures_a_real_model():
    r = calibrate.compute_step(64, 1, repeats=2)
    assert r["step_s"] > 0 and r["flop_per_s"] > 1e8 and r["params"] > 4_000_000
