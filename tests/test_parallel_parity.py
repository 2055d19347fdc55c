"""N real gloo workers (through the elastic launcher) against one process emulating N workers.

The contract of issue 3: N workers with per-worker batch b train exactly like one process emulating N workers with
global batch N*b: same parameters within 1e-5 relative after 50 steps, for plain BN (statistics per worker), ghost
BN (per virtual batch inside each worker) and cross-replica BN (statistics over groups of workers).

The runs are in float64. In float32 the two sides differ by rounding (~1e-7, the sums are in other orders), and a
ReLU network amplifies that whenever a pre-activation lies within rounding of zero: one sample then takes the
other side of the kink, and its gradient differs by O(1). With these data that happens for cross-replica BN at
N = 4 at step 7 (a pre-activation of 4.6e-9), after which the parameters differ by 6e-3 although both runs are
right to float32 precision. In float64 the same rounding is ~1e-16 and the comparison is tight and stable; the
float32 check is kept for plain BN, where it holds.
"""

import os
import subprocess
import sys

import pytest
import torch

from scalelab.checkpoint import load_latest
from scalelab.config import load_config
from scalelab.train import Trainer

BASE = ["data.name=synthetic", "data.n_train=2048", "data.n_test=512", "model.name=mlp", "model.width=64",
        "train.batch_size=64", "train.max_steps=50", "train.eval_every=25", "train.log_every=10",
        "recipe.base_lr=0.1", "recipe.base_batch=64", "recipe.warmup_epochs=0", "train.progress=false",
        "train.dtype=float64"]

CASES = {
    "bn": ["model.norm=bn"],
    "ghost": ["model.norm=ghost", "model.ghost_batch=8"],
    "cross-all": ["model.norm=bn", "parallel.bn_group=0"],
    "cross-pairs": ["model.norm=bn", "parallel.bn_group=2"],
}


def _params(run_dir):
    return load_latest(run_dir / "checkpoints")["model"]


_RUNS: dict[tuple, object] = {}


def _distributed(tmp_path, cache_dir, nproc, overrides):
    """A real --nproc run; the same (nproc, overrides) is run once per session and shared."""
    key = (nproc, tuple(overrides))
    if key in _RUNS:
        return _RUNS[key]
    out = tmp_path / f"ddp{nproc}"
    args = [a for o in overrides for a in ("--set", o)]
    env = {**os.environ, "SCALELAB_CACHE": str(cache_dir)}
    proc = subprocess.run([sys.executable, "-m", "scalelab", "train", "--nproc", str(nproc), "--out", str(out),
                           *args], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _RUNS[key] = out
    return out


def _emulated(tmp_path, nproc, overrides):
    out = tmp_path / f"emu{nproc}"
    cfg = load_config(None, [*overrides, f"parallel.emulate_workers={nproc}"])
    Trainer(cfg, out).run()
    return out


@pytest.mark.parametrize("nproc, case", [(2, "bn"), (4, "bn"), (2, "ghost"), (4, "ghost"), (2, "cross-all"),
                                         (4, "cross-all"), (4, "cross-pairs"), (2, "bn-float32")])
def test_workers_match_emulation(tmp_path, cache_dir, nproc, case):
    overrides = BASE + CASES[case.removesuffix("-float32")]
    if case.endswith("float32"):
        overrides.append("train.dtype=float32")
    real = _params(_distributed(tmp_path, cache_dir, nproc, overrides))
    emu = _params(_emulated(tmp_path, nproc, overrides))
    for name, p in emu.items():
        if name.endswith("num_batches_tracked") or "running" in name:
            continue  # buffers: DDP keeps rank 0's, emulation updates them once per worker group
        torch.testing.assert_close(real[name], p, rtol=1e-5, atol=1e-6, msg=f"{case} N={nproc}: {name}")


def test_parity_is_not_vacuous(tmp_path, cache_dir):
    """The check above would fail for the wrong semantics: N workers differ from one BN over the global batch."""
    real = _params(_distributed(tmp_path, cache_dir, 2, BASE + CASES["bn"]))
    plain = _params(_emulated(tmp_path, 1, BASE + CASES["bn"]))
    diffs = [(real[n] - p).abs().max().item() for n, p in plain.items() if "running" not in n
             and not n.endswith("num_batches_tracked")]
    assert max(diffs) > 1e-3


def test_world_size_one_through_the_launcher_is_the_plain_run(tmp_path, cache_dir):
    from scalelab.parallel.launch import launch_workers

    out = tmp_path / "one"
    cfg = load_config(None, BASE)
    from scalelab.config import save_config

    out.mkdir()
    save_config(cfg, out / "config.toml")
    os.environ["SCALELAB_CACHE"] = str(cache_dir)
    launch_workers(["train", "--config", str(out / "config.toml"), "--out", str(out)], nproc=1)
    # the launcher's variables were for its workers: a later plain run from this process prints its summary
    assert "SCALELAB_LAUNCHER" not in os.environ
    plain = _params(_emulated(tmp_path, 1, BASE))
    for name, p in plain.items():
        assert torch.equal(_params(out)[name], p), name
