"""Checkpoints: atomic writes, retention, weights_only loading, damaged files, config mismatch, full disk."""

import os
import subprocess

import pytest
import torch

from scalelab import checkpoint as ckpt
from scalelab.config import load_config
from scalelab.errors import CheckpointError


def _state(step, size=4):
    cfg = load_config()
    return {"format": ckpt.FORMAT_VERSION, "config": cfg.to_dict(), "model": {"w": torch.full((size,), step)},
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
            "counters": {"step": step}, "rng": ckpt.rng_state()}


def test_save_keeps_last_k_and_loads_weights_only(tmp_path):
    for step in (10, 20, 30, 40):
        ckpt.save_checkpoint(tmp_path, step, _state(step), keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [30, 40]
    latest = ckpt.load_latest(tmp_path)
    assert latest["counters"]["step"] == 40
    # the file is loadable by plain torch with weights_only=True: no pickled code inside
    raw = torch.load(ckpt.checkpoint_path(tmp_path, 40), weights_only=True)
    assert torch.equal(raw["model"]["w"], torch.full((4,), 40))
    assert not list(tmp_path.glob(".*tmp*"))


def test_damaged_newest_falls_back_to_older(tmp_path):
    ckpt.save_checkpoint(tmp_path, 1, _state(1), keep=3)
    ckpt.save_checkpoint(tmp_path, 2, _state(2), keep=3)
    ckpt.checkpoint_path(tmp_path, 2).write_bytes(b"garbage")
    msgs = []
    state = ckpt.load_latest(tmp_path, log=msgs.append)
    assert state["counters"]["step"] == 1
    assert "ckpt-000000002.pt is unreadable" in msgs[0]
    with pytest.raises(CheckpointError, match="is unreadable"):
        ckpt.load_checkpoint(ckpt.checkpoint_path(tmp_path, 2))


def test_leftover_temporary_file_is_ignored_and_cleaned(tmp_path):
    ckpt.save_checkpoint(tmp_path, 5, _state(5), keep=3)
    torn = tmp_path / ".ckpt-000000006.pt.tmp-99999"
    torn.write_bytes(b"half a checkpoint")  # what kill -9 during a write leaves
    assert ckpt.load_latest(tmp_path)["counters"]["step"] == 5
    ckpt.save_checkpoint(tmp_path, 7, _state(7), keep=3)
    assert not torn.exists()


def test_config_mismatch_names_fields():
    saved = load_config().to_dict()
    now = load_config(None, ["train.batch_size=512", "recipe.optimizer=lars", "train.progress=false"])
    with pytest.raises(CheckpointError) as e:
        ckpt.check_compatible(saved, now, "runs/x")
    msg = str(e.value)
    assert "recipe.optimizer (checkpoint 'sgd', now 'lars')" in msg
    assert "train.batch_size (checkpoint 256, now 512)" in msg
    assert "progress" not in msg  # watching a run differently is allowed
    ckpt.check_compatible(saved, load_config(None, ["train.progress=false"]), "runs/x")


@pytest.fixture
def tiny_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_full_disk_keeps_previous_checkpoint(tiny_disk):
    ckpt.save_checkpoint(tiny_disk, 1, _state(1, size=8), keep=3)
    with pytest.raises(CheckpointError) as e:
        ckpt.save_checkpoint(tiny_disk, 2, _state(2, size=200_000), keep=3)  # 800 kB > 256 kB disk
    assert "could not write the checkpoint of step 2" in str(e.value)
    assert "last good checkpoint ckpt-000000001.pt is intact" in str(e.value)
    assert [s for s, _ in ckpt.list_checkpoints(tiny_disk)] == [1]
    assert ckpt.load_latest(tiny_disk)["counters"]["step"] == 1
    assert not [p for p in os.listdir(tiny_disk) if "tmp" in p]
