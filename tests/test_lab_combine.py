"""docs/lab/combine_985.py: the seed mean and the bootstrap of its knees and of the goal."""

import importlib.util
from pathlib import Path

import pytest

from scalelab.lab.sweep import LRGuess

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


_spec_low = importlib.util.spec_from_file_location(
    "low_edges", Path(__file__).resolve().parents[1] / "docs" / "lab" / "low_edges.py")
low_edges = importlib.util.module_from_spec(_spec_low)
_spec_low.loader.exec_module(low_edges)


def _sweep_csv(d: Path, rows: list[tuple]) -> Path:
    d.mkdir()
    lines = ["batch,optimizer,steps_to_target,lr,status"]
    lines += [",".join("" if v is None else str(v) for v in r) for r in rows]
    (d / "sweep.csv").write_text("\n".join(lines) + "\n")
    return d


UNIT = {"sgd": LRGuess(1.0, 64, "none"), "kfac": LRGuess(1.0, 64, "none")}  # mult == lr at every batch


def test_low_edges_lists_cells_won_by_their_lowest_lr(tmp_path):
    d = _sweep_csv(tmp_path / "s", [
        (64, "sgd", 900, 0.25, "reached"), (64, "sgd", 1000, 0.5, "reached"),   # lowest wins: listed
        (128, "sgd", 600, 0.5, "reached"), (128, "sgd", 500, 1, "reached"),     # inside the grid: not listed
        (256, "sgd", 300, 0.5, "reached"), (256, "sgd", 300, 1, "reached"),     # tie at the lowest: listed
        (512, "sgd", None, 0.5, "missed"), (512, "sgd", None, 1, "pruned"),     # nothing reached: no best point
        (64, "kfac", 800, 0.25, "reached"), (64, "kfac", None, 0.125, "pruned")])  # lowest tried did not win
    assert low_edges.edges([d], UNIT) == {"sgd": ([64, 256], [0.0625, 0.125, 0.25])}


def test_low_edges_pools_the_parts_of_a_sweep_by_lr_and_names_a_missing_one(tmp_path):
    a = _sweep_csv(tmp_path / "a", [(64, "kfac", 900, 0.25, "reached")])
    b = _sweep_csv(tmp_path / "b", [(64, "kfac", 700, 0.0625, "reached")])
    assert low_edges.edges([a, b], UNIT) == {"kfac": ([64], [0.015625, 0.03125])}
    # the multipliers are of the next sweep's guess, whatever guesses the parts used: LR 0.025 at 256 is
    # 0.25 x (0.025 x 256/64), the default K-FAC guess of the 98.5% sweeps
    c = _sweep_csv(tmp_path / "c", [(256, "kfac", 300, 0.025, "reached"), (256, "kfac", 400, 0.2, "reached")])
    assert low_edges.edges([c]) == {"kfac": ([256], [0.0625, 0.125])}
    with pytest.raises(SystemExit, match="no sweep.csv"):
        low_edges.edges([tmp_path / "nowhere"])
    with pytest.raises(SystemExit, match="no guess for lamb"):
        low_edges.edges([_sweep_csv(tmp_path / "d", [(64, "lamb", 900, 0.25, "reached")])])


def test_low_edges_names_a_broken_sweep_csv(tmp_path):
    d = tmp_path / "cols"
    d.mkdir()
    (d / "sweep.csv").write_text("batch,optimizer\n64,sgd\n")
    with pytest.raises(SystemExit, match="lacks the columns lr, status, steps_to_target"):
        low_edges.edges([d])
    d = _sweep_csv(tmp_path / "nums", [(64, "sgd", 900, 0.25, "reached"), ("x", "sgd", 800, 0.5, "reached")])
    with pytest.raises(SystemExit, match="line 3: batch, lr .* got 'x'"):
        low_edges.edges([d])


def test_spread_of_seeds_per_cell():
    s = combine.spread([64, 128], [{"a": [100, None]}, {"a": [300, 50]}, {"a": [200, None]}])
    assert s["a"]["64"] == {"reached": 3, "mean_reached": 200, "max_over_min": 3.0, "cv": pytest.approx(100 / 200)}
    assert s["a"]["128"] == {"reached": 1, "mean_reached": 50, "max_over_min": 1.0, "cv": None}
