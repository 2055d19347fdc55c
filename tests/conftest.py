"""Shared fixtures: a private data cache per test session and a helper that runs the real CLI."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One data cache for the session, so generated MNIST-1D is made once and reused like a user's cache."""
    return tmp_path_factory.mktemp("scalelab-cache")


@pytest.fixture
def run_cli(cache_dir):
    """Run ``python -m scalelab ARGS`` in a subprocess, as a user would, and return the CompletedProcess."""

    def run(*args, timeout=300, check=False):
        env = {**os.environ, "SCALELAB_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "-m", "scalelab", *map(str, args)], capture_output=True,
                              text=True, env=env, timeout=timeout, cwd=REPO)
        if check and proc.returncode != 0:
            raise AssertionError(f"scalelab {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    return run
