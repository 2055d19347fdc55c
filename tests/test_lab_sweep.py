"""The batch-size sweep: the LR search rules, failed trials kept and marked, resume after kill -9, outputs."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scalelab.lab.sweep import SweepSpec, best_of, next_mults


def spec(**kw) -> SweepSpec:
    from scalelab.config import Config

    base = dict(base=Config().to_dict(), batches=[32], optimizers=["sgd"], target_acc=0.9,
                guesses={"sgd": {"lr": 0.1, "batch": 32, "rule": "linear"}}, lr_mults=[0.5, 1, 2], extend=1)
    base.update(kw)
    return SweepSpec(**base)


def r(mult: float, status: str = "reached", steps: int | None = None) -> dict:
    return {"mult": mult, "lr": 0.1 * mult, "status": status, "steps_to_target": steps}


def test_search_order_edges_and_divergence():
    s = spec()
    assert next_mults(s, [], set()) == [1]                            # the centre first
    assert next_mults(s, [], {1}) == []                               # ... and nothing else until it is back
    assert next_mults(s, [r(1, steps=100)], set()) == [0.5, 2]        # then the rest of the grid
    assert next_mults(s, [r(1, steps=100), r(0.5, "pruned")], {2}) == []
    # the fastest point is on the upper edge: one more point beyond it, then stop (extend=1)
    done = [r(1, steps=100), r(0.5, "pruned"), r(2, steps=60)]
    assert next_mults(s, done, set()) == [4]
    assert next_mults(s, done + [r(4, steps=50)], set()) == []
    # a tie at the evaluation resolution is no reason to go further out
    assert next_mults(s, [r(1, steps=100), r(0.5, steps=100), r(2, "pruned")], set()) == []
    # everything diverged: go lower
    assert next_mults(s, [r(m, "diverged") for m in (0.5, 1, 2)], set()) == [0.25]
    # nothing reached: towards the edge with the best accuracy, if an edge has it
    missed = [dict(r(m, "missed"), best_test_acc=a) for m, a in ((0.5, 0.8), (1, 0.6), (2, 0.1))]
    assert next_mults(s, missed, set()) == [0.25]
    missed[1]["best_test_acc"] = 0.9
    assert next_mults(s, missed, set()) == []
    assert best_of(done)["mult"] == 2
    with pytest.raises(Exception):
        spec(target_acc=1.5)


def test_search_without_progress_looks_both_ways():
    """Momentum SGD at batch 4096 in the 95% sweep: the linear rule's LRs all stayed near chance (10 classes), and
    the best of them (0.26 at x0.5, inside the grid) gave the search no direction, so it stopped."""
    s = spec(target_acc=0.95, extend=3)
    stuck = [dict(r(m, "missed"), best_test_acc=a) for m, a in ((0.25, 0.2145), (0.5, 0.264), (1, 0.2265),
                                                                   (2, 0.1565))]
    assert next_mults(s, stuck, set(), chance=0.1) == [0.125, 4]      # near chance: one more point on each side
    # the lower point made progress (>= 0.1 + (0.95 - 0.1) / 2): from there on, towards it only
    more = stuck + [dict(r(0.125, "missed"), best_test_acc=0.9), dict(r(4, "missed"), best_test_acc=0.1)]
    assert next_mults(s, more, set(), chance=0.1) == [0.0625]
    # still nothing anywhere: both sides until --extend is used up on each
    none = stuck + [dict(r(0.125, "missed"), best_test_acc=0.2), dict(r(4, "missed"), best_test_acc=0.1)]
    assert next_mults(s, none, set(), chance=0.1) == [0.0625, 8]
    none += [dict(r(0.0625, "missed"), best_test_acc=0.2), dict(r(8, "missed"), best_test_acc=0.1)]
    assert next_mults(s, none, set(), chance=0.1) == [16]            # 3 points below the grid: only up
    assert next_mults(s, none + [dict(r(16, "missed"), best_test_acc=0.1)], set(), chance=0.1) == []


def test_budget_is_the_larger_of_epochs_and_steps():
    s = spec(budget_epochs=10, budget_steps=400)
    assert s.budget(8192, 45000) == 400        # 10 epochs would be 50 steps
    assert s.budget(1024, 45000) == 430        # 10 epochs of 43 steps: more than 400, unchanged
    assert s.budget(32, 45000) == 14060
    assert spec(budget_epochs=10).budget(8192, 45000) == 50   # epochs only, as before
    assert spec(budget_epochs=0.01).budget(8192, 45000) == 1
    with pytest.raises(Exception, match="--budget-steps"):
        spec(budget_steps=-1)


def test_warmup_searched_only_at_large_batches():
    s = spec(batches=[256, 1024, 2048], warmups=[1, 0.25, 4], warmup_search_from=1024)
    assert s.cells() == [("sgd", 256, 1, None), ("sgd", 1024, 1, None), ("sgd", 1024, 0.25, None),
                         ("sgd", 1024, 4, None), ("sgd", 2048, 1, None), ("sgd", 2048, 0.25, None),
                         ("sgd", 2048, 4, None)]
    assert len(spec(batches=[256, 1024], warmups=[1, 4]).cells()) == 4     # default: every batch


def test_horizons_are_cells_with_their_own_budget_and_schedule_length():
    from scalelab.config import load_config
    from scalelab.errors import ConfigError
    from scalelab.lab.sweep import Trial, trial_config

    cosine = load_config(None, ["recipe.schedule=cosine"]).to_dict()
    s = spec(base=cosine, batches=[64, 2048], horizons=[1, 8], budget_steps=100)
    assert s.cells() == [("sgd", 64, 1.0, 1), ("sgd", 64, 1.0, 8), ("sgd", 2048, 1.0, 1), ("sgd", 2048, 1.0, 8)]
    assert s.budget(64, 45000, 1) == 703 and s.budget(64, 45000, 8) == 5624     # the horizon in steps ...
    assert s.budget(2048, 45000, 8) == 168 and s.budget(2048, 45000, 1) == 100  # ... at least budget_steps
    t = Trial("sgd", 2048, 1.0, 1.0, 0.4, horizon=8)
    assert t.id == "sgd-b2048-w1-h8-x1" and Trial("sgd", 2048, 1.0, 1.0, 0.4).id == "sgd-b2048-w1-x1"
    cfg = trial_config(s, t, None, s.budget(2048, 45000, 8))
    assert cfg["train"]["epochs"] == 8 and cfg["train"]["max_steps"] == cfg["train"]["schedule_steps"] == 168
    cfg = trial_config(s, t, 50, s.budget(2048, 45000, 8))   # pruned at 50 steps: the schedule stays 168 long
    assert cfg["train"]["max_steps"] == 50 and cfg["train"]["schedule_steps"] == 168
    constant = load_config(None, ["recipe.schedule=constant"]).to_dict()
    with pytest.raises(ConfigError, match="decaying LR"):
        spec(base=constant, horizons=[1, 2])      # a constant LR: a longer budget only adds steps
    with pytest.raises(ConfigError, match="> 0 and distinct"):
        spec(base=cosine, horizons=[1, 1])


def test_a_pruned_trial_is_the_full_trial_cut_short(tmp_path):
    """``train.schedule_steps``: a run stopped part-way through its LR schedule has the parameters the full run
    had at that step (checked against the full run's checkpoint), and a run whose schedule ends there has not."""
    from scalelab.checkpoint import checkpoint_path, load_checkpoint
    from scalelab.config import load_config
    from scalelab.data import load_dataset
    from scalelab.models import build_model
    from scalelab.train import params_sha256, train

    common = ["data.name=digits", "model.name=mlp", "model.width=32", "recipe.schedule=cosine",
              "recipe.warmup_epochs=0", "recipe.base_lr=0.2", "train.batch_size=64", "train.threads=1",
              "train.progress=false", "train.eval_every=4"]
    cfg = load_config(None, common + ["train.max_steps=20", "train.checkpoint_every=8"])
    data = load_dataset(cfg.data)
    train(cfg, tmp_path / "full", data=data)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    model.load_state_dict(load_checkpoint(checkpoint_path(tmp_path / "full" / "checkpoints", 8))["model"])
    cut = train(load_config(None, common + ["train.schedule_steps=20", "train.max_steps=8"]), data=data)
    short = train(load_config(None, common + ["train.max_steps=8"]), data=data)
    assert cut["steps"] == short["steps"] == 8
    assert cut["params_sha256"] == params_sha256(model)          # the full run's trajectory, cut at step 8
    assert short["params_sha256"] != cut["params_sha256"]         # an 8-step cosine decays faster


def test_quasi_random_trials_cover_the_ranges_and_are_the_same_in_every_cell():
    from scalelab.config import load_config
    from scalelab.errors import ConfigError
    from scalelab.lab.sweep import cell_of, next_trials

    cosine = load_config(None, ["recipe.schedule=cosine"]).to_dict()
    constant = load_config(None, ["recipe.schedule=constant"]).to_dict()
    s = spec(base=cosine, batches=[64, 256], search="quasi-random", trials=8, lr_range=[0.25, 4],
             horizon_range=[0.5, 8])
    assert s.cells() == [("sgd", 64, 1.0, None), ("sgd", 256, 1.0, None)]
    a, b = (s.quasi_trials(c) for c in s.cells())
    assert [t.id for t in a] == [f"sgd-b64-w1-q{i}" for i in range(8)] and a == s.quasi_trials(s.cells()[0])
    assert [(t.mult, t.horizon) for t in a] == [(t.mult, t.horizon) for t in b]   # the same points per cell
    assert all(0.25 <= t.mult <= 4 and 0.5 <= t.horizon <= 8 for t in a)
    assert all(t.lr == pytest.approx(0.1 * 64 / 32 * t.mult, rel=1e-12) for t in a)  # guess(B) x multiplier
    # log-uniform and low-discrepancy: each quarter of the log range of each value holds 2 of the 8 points
    for vals, (lo, hi) in (([t.mult for t in a], (0.25, 4)), ([t.horizon for t in a], (0.5, 8))):
        quarters = [int(4 * math.log(v / lo) / math.log(hi / lo)) for v in vals]
        assert sorted(quarters) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert cell_of({"optimizer": "sgd", "batch": 64, "warmup": 1.0, "horizon": 3.7, "index": 2}) == s.cells()[0]
    done = [{"id": a[0].id}, {"id": a[2].id}]
    assert [t.index for t in next_trials(s, s.cells()[0], done, [a[1]])] == [3, 4, 5, 6, 7]
    assert spec(search="quasi-random", trials=3).quasi_trials(("sgd", 32, 1.0, None))[0].horizon is None
    for kw, msg in ((dict(search="random"), "allowed: grid, quasi-random"),
                    (dict(search="quasi-random", lr_range=[2, 1]), "0 < LO <= HI"),
                    (dict(search="quasi-random", trials=0), "--trials"),
                    (dict(search="quasi-random", lr_range=[1, 1]), "every trial would be the same"),
                    (dict(base=constant, search="quasi-random", horizon_range=[1, 2]), "decaying LR"),
                    (dict(base=cosine, horizon_range=[1, 2]), "--search quasi-random"),
                    (dict(base=cosine, search="quasi-random", horizons=[1, 2]), "--horizon-range")):
        with pytest.raises(ConfigError, match=msg):
            spec(**kw)


def test_quasi_random_sweep_over_lr_and_horizon_runs_and_resumes(tmp_path):
    from scalelab.cli import main

    out = tmp_path / "sweep"
    args = ["sweep", "--set", "data.name=digits", "--set", "model.name=mlp", "--set", "model.width=32",
            "--set", "recipe.schedule=cosine", "--set", "recipe.warmup_epochs=0", "--batch", "64",
            "--target-acc", "0.8", "--lr-guess", "sgd=0.1@64", "--search", "quasi-random", "--trials", "4",
            "--lr-range", "0.5,2", "--horizon-range", "1,4", "--eval-examples", "128", "--jobs", "1",
            "--no-progress", "--out", str(out)]
    assert main(args) == 0
    rows = list(csv.DictReader((out / "sweep.csv").read_text().splitlines()))
    assert len(rows) == 4 and len({r["horizon"] for r in rows}) == 4
    first = min(rows, key=lambda r: r["id"])                         # q0 runs first, with no cap
    assert first["id"] == "sgd-b64-w0-q0" and first["status"] != "pruned"
    reached = [r for r in rows if r["status"] == "reached"]
    assert reached, rows
    fastest = min(int(r["steps_to_target"]) for r in reached)
    # later trials are stopped at the best so far, across horizons, and never beat it afterwards
    assert all(r["status"] in ("reached", "pruned", "missed") for r in rows)
    pruned = [r for r in rows if r["status"] == "pruned"]
    assert pruned and all(int(r["steps"]) == int(r["cap"]) < int(r["budget"]) for r in pruned)
    assert all(int(r["cap"]) >= fastest for r in pruned)
    best = list(csv.DictReader((out / "best.csv").read_text().splitlines()))
    assert int(best[0]["steps_to_target"]) == fastest
    assert sum(r["best"] == "True" for r in rows) == 1
    before = _files(out)
    assert main(args) == 0 and _files(out) == before                 # resumed: nothing to run again
    assert main([a if a != "1,4" else "1,8" for a in args]) == 2     # another range: refused
    assert main([a for a in args if a not in ("--search", "quasi-random")]) == 2   # --trials without the search
    assert main(["report", str(out)]) == 0                           # the report names the search it shows
    page = (out / "report.html").read_text()
    assert "quasi-random search: 4 points per cell" in page and "drawn from 1-4 epochs" in page
    assert "<th>horizon</th>" in page                                # each trial's own horizon is shown


def test_sweep_over_horizons_takes_the_best_and_resumes(tmp_path):
    from scalelab.cli import main

    out = tmp_path / "sweep"
    args = ["sweep", "--set", "data.name=digits", "--set", "model.name=mlp", "--set", "model.width=32",
            "--set", "recipe.schedule=cosine", "--set", "recipe.warmup_epochs=0", "--batch", "64",
            "--target-acc", "0.8", "--lr-guess", "sgd=0.1@64", "--lr-mults", "1", "--extend", "0",
            "--horizons", "0.5,4", "--eval-examples", "128", "--jobs", "1", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    rows = list(csv.DictReader((out / "sweep.csv").read_text().splitlines()))
    assert sorted((float(r["horizon"]), int(r["budget"])) for r in rows) == [(0.5, 12), (4.0, 92)]
    reached = [r for r in rows if r["steps_to_target"]]
    assert reached, rows                          # 4 epochs of digits at batch 64 reach 80%
    best = list(csv.DictReader((out / "best.csv").read_text().splitlines()))
    fastest = min(reached, key=lambda r: int(r["steps_to_target"]))
    assert best[0]["steps_to_target"] == fastest["steps_to_target"] and best[0]["horizon"] == fastest["horizon"]
    before = _files(out)
    assert main(args) == 0                        # resumed: nothing to run again
    assert _files(out) == before and json.loads((out / "sweep.json").read_text())["resumed_trials"] == 2
    assert main([a if a != "0.5,4" else "0.5,8" for a in args]) == 2   # other horizons: refused


def test_failed_trials_are_kept_and_marked(tmp_path):
    from scalelab.config import load_config
    from scalelab.lab.sweep import Trial, load_trials, run_trial, trial_config

    base = load_config(None, ["data.name=digits", "model.name=mlp", "recipe.schedule=constant"]).to_dict()
    s = spec(base=base, target_acc=0.99, budget_epochs=0.1, budget_steps=8, eval_examples=256)
    budget = s.budget(64, 1500)
    assert budget == 8                           # 0.1 epoch of digits at batch 64 is 2 steps
    for mult, status, cap in [(1e12, "diverged", None), (1.0, "missed", None), (1.0, "pruned", 5),
                              (1.0, "missed", 20)]:  # a pruning limit above the budget: the budget ends it
        t = Trial("sgd", 64, 0.0, mult, 0.05 * mult)
        res = run_trial(t, trial_config(s, t, cap, budget), cap, budget, str(tmp_path))
        assert res["status"] == status and res["steps_to_target"] is None
        assert res["budget"] == 8 and res["cap"] == min(cap or budget, budget)
        if status != "diverged":
            assert res["steps"] == res["cap"]    # it ran exactly the steps it was allowed
        assert load_trials(tmp_path)[t.id]["status"] == status   # written to its own file


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((d / "trials").glob("*.json"))}


def test_sweep_killed_then_resumed_does_not_redo_finished_trials(tmp_path):
    out = tmp_path / "sweep"
    args = ["sweep", "--set", "data.name=digits", "--set", "model.name=mlp", "--set", "model.width=32",
            "--set", "recipe.schedule=constant", "--set", "recipe.warmup_epochs=0.2", "--batch", "32,64",
            "--target-acc", "0.85", "--optimizers", "sgd", "--lr-guess", "sgd=0.05@32",
            "--lr-mults", "0.5,1", "--extend", "0", "--budget-epochs", "4", "--eval-examples", "128",
            "--jobs", "1", "--no-progress", "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    proc = subprocess.Popen([sys.executable, "-m", "scalelab", *args], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while len(_files(out)) < 1 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)          # the sweep and its worker, as kill -9 would
    proc.wait()
    before = _files(out)
    assert 1 <= len(before) < 4 and not (out / "sweep.json").exists()

    from scalelab.cli import main
    from scalelab.lab.sweep import load_trials

    assert main(args) == 0
    after = _files(out)
    assert len(after) == 4
    assert all(after[name] == data for name, data in before.items())   # finished trials were not run again
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["resumed_trials"] == len(before)
    assert set(load_trials(out)) == {json.loads(v)["id"] for v in after.values()}
    rows = list(csv.DictReader((out / "sweep.csv").read_text().splitlines()))
    assert len(rows) == 4 and {"batch", "optimizer", "steps_to_target", "best", "cap"} <= set(rows[0])
    # budget max(4 epochs, 0 steps): 4 epochs of 1500 // B steps
    assert {int(r["batch"]): int(r["budget"]) for r in rows} == {32: 4 * 46, 64: 4 * 23}
    best = list(csv.DictReader((out / "best.csv").read_text().splitlines()))
    assert [int(b["batch"]) for b in best] == [32, 64] and all(b["steps_to_target"] for b in best)
    assert summary["knees"]["sgd"]["ref_batch"] == 32
    from scalelab.perf.stats import read_steps_table   # the perf model reads the sweep's steps table

    table = read_steps_table(out / "steps_sgd.csv")
    assert [b for b, _ in table.table] == [32, 64]
    assert read_steps_table(out).table == table.table          # the sweep directory itself: its one optimizer
    assert (out / "plots" / "steps_to_target.png").stat().st_size > 0
    # the report on a sweep directory writes the HTML page
    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "Steps to target" in page and "Partial" not in page
    # other settings in the same directory are refused in one line
    assert main([a if a != "0.85" else "0.8" for a in args]) == 2
    assert main(args + ["--budget-steps", "500"]) == 2
    # a sweep started before --budget-steps existed (no such key in its spec) resumes with the default
    from scalelab.lab.sweep import SweepSpec, _check_spec

    spec_path = out / "sweep_spec.json"
    old = json.loads(spec_path.read_text())
    mine = SweepSpec(**old)
    del old["budget_steps"]
    spec_path.write_text(json.dumps(old))
    _check_spec(mine, out)                                   # no error: the missing key is at its default
    with pytest.raises(Exception, match="budget_steps"):
        _check_spec(SweepSpec(**{**mine.__dict__, "budget_steps": 500}), out)


def test_steps_reached_at_the_first_evaluation_are_flagged_as_upper_bounds():
    """With ``--eval-examples 2048`` batch 32 is evaluated every 64 steps: a cell whose best trial reached the
    target at its first evaluation only says "at most 64 steps", and the table says so."""
    from scalelab.lab.sweep import format_table, summarize

    s = spec(batches=[32, 64])
    def trial(batch, mult, steps):
        return {"id": f"sgd-b{batch}-x{mult}", "optimizer": "sgd", "batch": batch, "warmup": 1.0,
                "mult": mult, "lr": 0.1 * mult, "status": "reached", "steps_to_target": steps,
                "examples_to_target": steps * batch, "time_to_target_s": 1.0, "budget": 1000}
    out = summarize(s, [trial(32, 1, 64), trial(32, 2, 128), trial(64, 1, 96), trial(64, 2, 64)])
    rows = {r["batch"]: r for r in out["best"]}
    assert s.eval_every(32) == 64 and s.eval_every(64) == 32
    assert rows[32]["first_eval"] and not rows[64]["first_eval"]  # 64 steps at 64 is the second evaluation
    table = format_table(out)
    assert "note: sgd at 32 reached the target at the first evaluation" in table and "sgd at 64" not in table
