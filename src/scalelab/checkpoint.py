"""Atomic checkpoints and exact resume.

A checkpoint is a plain dict of tensors and Python primitives, so it loads with ``torch.load(weights_only=True)``
(no pickled code runs when a checkpoint is read). It is written to a temporary file in the same directory,
flushed and fsync'ed, then renamed over its final name and the directory fsync'ed: a ``kill -9`` at any moment
leaves either the old set of checkpoints or the old set plus a complete new one, never a torn file under a
checkpoint name. Leftover temporary files are ignored and cleaned up.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from scalelab import config as config_mod
from scalelab.errors import CheckpointError

FORMAT_VERSION = 1
_NAME = re.compile(r"^ckpt-(\d{9})\.pt$")

# Config keys that may differ between a checkpoint and the run that resumes it: they change how a run is
# watched or where files are found, never the numbers it computes.
RESUME_MAY_DIFFER = (
    "train.progress", "train.threads", "train.device", "train.eval_batch", "train.keep_checkpoints",
    "data.cache_dir", "data.root", "data.download", "parallel.resize", "parallel.timeout_s",
)


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"ckpt-{step:09d}.pt"


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """Completed checkpoints in ``directory`` as (step, path), oldest first."""
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _NAME.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(directory: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``state`` atomically as the checkpoint of ``step`` and keep only the newest ``keep``.

    Raises:
        CheckpointError: when the file cannot be written (a full disk, say). The checkpoints already on
            disk are untouched and the temporary file is removed.
    """
    directory.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(directory, step)
    tmp = directory / f".{final.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(directory)
    except (OSError, RuntimeError) as e:
        # torch's zip writer turns a write error (ENOSPC...) into a RuntimeError; report the OS error under it
        cause = e
        while not isinstance(cause, OSError) and cause.__context__ is not None:
            cause = cause.__context__
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause)
        tmp.unlink(missing_ok=True)
        previous = [p.name for s, p in list_checkpoints(directory) if s != step]
        kept = f"the last good checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(f"could not write the checkpoint of step {step} in {directory}: "
                              f"{reason}; {kept}") from None
    for _, old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
    for stale in directory.glob(".ckpt-*.tmp-*"):  # left by a run killed mid-write
        if stale != tmp:
            stale.unlink(missing_ok=True)
    return final


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load one checkpoint with ``weights_only=True``; a damaged file raises CheckpointError."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged zip/pickle
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} is not a scalelab checkpoint of format {FORMAT_VERSION}")
    return state


def load_latest(directory: Path, log=print) -> dict[str, Any] | None:
    """The newest readable checkpoint in ``directory``, falling back to older ones if the newest is damaged."""
    for step, path in reversed(list_checkpoints(directory)):
        try:
            return load_checkpoint(path)
        except CheckpointError as e:
            log(f"warning: {e}; trying an older checkpoint")
    return None


def check_compatible(saved: dict[str, Any], cfg: config_mod.Config, path: Path | str) -> None:
    """Refuse to resume from a checkpoint written with a different config, naming the fields that differ."""
    try:
        old = config_mod.from_dict(saved)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {path} holds a config this version cannot read: {e}") from None
    differ = config_mod.diff(old, cfg, ignore=RESUME_MAY_DIFFER)
    if differ:
        old_d, new_d = old.to_dict(), cfg.to_dict()
        parts = []
        for key in differ:
            s, k = key.split(".")
            parts.append(f"{key} (checkpoint {old_d[s][k]!r}, now {new_d[s][k]!r})")
        raise CheckpointError(f"checkpoint {path} was written with a different config: {'; '.join(parts)}")


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
