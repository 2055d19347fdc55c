"""docs/lab/combine_985.py: the seed mean and the bootstrap of its knees and of the goal."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
_spec = importlib.util.spec_from_file_location(
    "combine_985", Path(__file__).resolve().parents[1] / "docs" / "lab" / "combine_985.py")
combine = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(combine)

BATCHES = [64, 128, 256, 512, 1024]
PERFECT = [1600, 800, 400, 200, 100]          # halves with every doubling: knee at the largest batch
SGD_KNEE_128 = [1600, 800, 800, 800, 800]     # off perfect scaling after 128


def test_mean_curves_drops_a_cell_missed_in_any_seed():
    m = combine.mean_curves(BATCHES, [{"a": [10, 20, None, 4, 2]}, {"a": [30, 40, 6, None, 2]}])
    assert m == {"a": [20, 30, None, None, 2]}


def test_bootstrap_of_identical_seeds_is_certain():
    seeds = {str(i): {"sgd": SGD_KNEE_128, "kfac": PERFECT} for i in range(4)}
    b = combine.bootstrap(BATCHES, seeds, 1.25, "sgd", draws=50)
    assert b["knees"]["sgd"]["own"] == {"128": 1.0}
    assert b["knees"]["kfac"]["own"] == {"1024": 1.0}
    # 1024 = 8 x 128: met in every draw, in both readings
    assert b["goal_met"] == {"own": {"kfac": 1.0}, "common": {"kfac": 1.0}}


def test_bootstrap_shares_follow_the_seeds():
    # two seeds scale perfectly, two leave after 256 by far: the mean's knee depends on the draw
    off = [1600, 800, 400, 600, 600]
    seeds = {"0": {"sgd": SGD_KNEE_128, "kfac": PERFECT}, "1": {"sgd": SGD_KNEE_128, "kfac": PERFECT},
             "2": {"sgd": SGD_KNEE_128, "kfac": off}, "3": {"sgd": SGD_KNEE_128, "kfac": off}}
    b = combine.bootstrap(BATCHES, seeds, 1.25, "sgd", draws=400)
    shares = b["knees"]["kfac"]["own"]
    assert sum(shares.values()) == pytest.approx(1.0, abs=0.01)
    # the knee is 1024 only when every draw is a perfect seed: (1/2)^4 of the draws
    assert shares["1024"] == pytest.approx(1 / 16, abs=0.04)
    assert b["goal_met"]["own"]["kfac"] == pytest.approx(shares["1024"], abs=1e-9)
    # the knee of the mean of the four seeds themselves
    k = combine.knees(BATCHES, combine.mean_curves(BATCHES, list(seeds.values())), 1.25)
    assert k["optimizers"]["kfac"]["knee_own"] == 256
