"""Power-law fits (Hestness et al. 2017) recover known exponents; the command trains, fits and checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scalelab.lab.scaling_law import fit_power_law, predict

SIZES = np.array([500, 1000, 2000, 4000, 8000, 16000, 32000])


@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.9])
def test_log_log_fit_recovers_exponent_with_honest_uncertainty(alpha):
    rng = np.random.default_rng(int(alpha * 10))
    err = 3.0 * SIZES ** -alpha * np.exp(rng.normal(0, 0.03, len(SIZES)))
    f = fit_power_law(SIZES, err)
    assert abs(f["alpha"] - alpha) < 4 * f["alpha_se"] + 1e-9
    assert 0 < f["alpha_se"] < 0.05
    exact = fit_power_law(SIZES, 3.0 * SIZES ** -alpha)
    assert exact["alpha"] == pytest.approx(alpha, abs=1e-9) and exact["a"] == pytest.approx(3.0, rel=1e-9)


def test_fit_with_floor_recovers_exponent_and_floor_where_the_line_cannot():
    rng = np.random.default_rng(3)
    true = 2.0 * SIZES ** -0.6 + 0.01
    sigma = 0.02 * true
    err = true + rng.normal(0, 1, len(SIZES)) * sigma
    f = fit_power_law(SIZES, err, sigma, floor=True)
    assert f["alpha"] == pytest.approx(0.6, abs=max(0.1, 3 * f["alpha_se"]))
    assert f["c"] == pytest.approx(0.01, abs=0.004)
    line = fit_power_law(SIZES, err, sigma)
    assert line["alpha"] < 0.45  # the floor flattens a pure power law: it would get the exponent wrong
    p = predict(f, 128000)
    assert p["lo"] < p["pred"] < p["hi"]
    assert p["pred"] == pytest.approx(2.0 * 128000 ** -0.6 + 0.01, abs=3e-3)


def test_scaling_law_command_end_to_end(tmp_path):
    from scalelab.cli import main

    out = tmp_path / "sl"
    args = ["scaling-law", "--set", "data.name=synthetic", "--set", "data.n_train=4096", "--set",
            "model.name=mlp", "--set", "train.batch_size=64", "--n-train", "128,256,512", "--widths", "16",
            "--steps", "20", "--predict", "1024", "--out", str(out)]
    assert main(args) == 0
    r = json.loads((out / "scaling.json").read_text())
    assert len(r["points"]) == 3 and r["fits"]["best"]["error"]["alpha"] > 0
    assert "measured" in r["prediction"] and (out / "scaling.png").stat().st_size > 0
    mtime = (out / "runs" / "w16-n128" / "point.json").stat().st_mtime
    assert main(args) == 0  # rerun: finished points are reused, not retrained
    assert (out / "runs" / "w16-n128" / "point.json").stat().st_mtime == mtime
    assert main(args[:-4] + ["--predict", "100", "--out", str(out)]) == 2
