"""Calibration runs real gloo processes: the fitted alpha-beta reproduces the measured all-reduce times."""

from __future__ import annotations

import pytest

from scalelab.perf import calibrate, comm


@pytest.mark.slow
def test_gloo_allreduce_fit_two_processes():
    fit = calibrate.allreduce_fit(2)
    assert fit["alpha_s"] > 0 and 1e6 < fit["bus_bandwidth"] < 1e12
    net = comm.Net(fit["alpha_s"], fit["bus_bandwidth"])
    small, large = calibrate.SIZES
    # the two-point fit is exact at its two points
    assert comm.ring_allreduce(large, 2, net) == pytest.approx(fit["times_s"][str(large)], rel=1e-6)
    assert comm.ring_allreduce(1e-12, 2, net) == pytest.approx(fit["times_s"][str(small)], rel=0.05)


def test_compute_step_measures_a_real_model():
    r = calibrate.compute_step(64, 1, repeats=2)
    assert r["step_s"] > 0 and r["flop_per_s"] > 1e8 and r["params"] > 4_000_000
