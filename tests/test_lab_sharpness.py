"""Keskar et al.'s epsilon-sharpness: exact on quadratics, and end to end on a run directory."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scalelab.lab.sharpness import epsilon_sharpness


def quadratic(h: np.ndarray, c: np.ndarray, f_min: float = 0.0):
    return lambda w: (f_min + 0.5 * float(h @ (w - c) ** 2), h * (w - c))


@pytest.mark.parametrize("eps", [1e-3, 5e-4, 0.05])
def test_sharpness_of_a_known_quadratic(eps):
    """At the minimum c of 0.5 sum h_i (w_i - c_i)^2 + f_min the box maximum is at a corner:
    0.5 sum h_i eps^2 (|c_i| + 1)^2 -- the box is relative to |x_i| + 1, so it grows with the weights."""
    rng = np.random.default_rng(0)
    h, c, f_min = rng.uniform(0.1, 10, 50), rng.normal(0, 3, 50), 0.7
    r = epsilon_sharpness(quadratic(h, c, f_min), c, eps)
    expected = 100 * 0.5 * float(h @ (eps * (np.abs(c) + 1)) ** 2) / (1 + f_min)
    assert r["sharpness"] == pytest.approx(expected, rel=1e-6)
    assert r["f0"] == pytest.approx(f_min)
    # a box of fixed size eps (ignoring |x_i|) would give a clearly different value
    assert 100 * 0.5 * float(h @ np.full(50, eps) ** 2) / (1 + f_min) < 0.5 * expected
    # sharper curvature, sharper minimum
    assert epsilon_sharpness(quadratic(4 * h, c, f_min), c, eps)["sharpness"] == pytest.approx(4 * expected)


def test_sharpness_in_a_random_subspace_is_bounded_by_its_box():
    rng = np.random.default_rng(1)
    h, c = rng.uniform(0.5, 2, 30), np.zeros(30)
    A = rng.standard_normal((30, 5))
    r = epsilon_sharpness(quadratic(h, c), c, 1e-2, A=A)
    # max over |y_i| <= eps of 0.5 y^T (A^T H A) y is at most 0.5 eps^2 * sum |A^T H A|
    bound = 100 * 0.5 * 1e-4 * float(np.abs(A.T @ np.diag(h) @ A).sum())
    assert 0 < r["sharpness"] <= bound * (1 + 1e-9)


def test_sharpness_command_on_trained_runs(tmp_path):
    from scalelab.cli import main
    from scalelab.config import load_config
    from scalelab.train import train

    for b in (32, 256):
        cfg = load_config(None, ["data.name=synthetic", "data.n_train=1024", "model.name=mlp", "model.width=16",
                                 f"train.batch_size={b}", "train.epochs=2", "train.progress=false",
                                 "train.threads=1"])
        train(cfg, tmp_path / f"b{b}")
    assert main(["sharpness", str(tmp_path / "b32"), str(tmp_path / "b256"), "--samples", "512"]) == 0
    r = json.loads((tmp_path / "b32" / "sharpness.json").read_text())
    big, small = r["results"]
    assert big["eps"] == 1e-3 and small["eps"] == 5e-4
    assert big["sharpness"] > small["sharpness"] > 0
    assert main(["sharpness", str(tmp_path / "missing")]) == 2
