"""Test-session setup: a persistent XLA compilation cache shared by the test process and its
subprocesses (compiles dominate test time on 2 CPU cores), and quiet torch threading."""

from __future__ import annotations

import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
CACHE = ROOT / ".jax_cache"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(ROOT / "tests"))

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", str(CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

try:
    import torch  # noqa: E402

    torch.set_num_threads(2)
except ImportError:  # the parity tests import torch themselves and fail loudly
    pass

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def stage1_workdir(tmp_path_factory):
    """One briefly trained stage-1 run (tests/train_setup.py) shared by the codec and prior tests."""
    import train_setup

    return train_setup.trained_stage1(tmp_path_factory.mktemp("stage1"))


@pytest.fixture(scope="session")
def prior_workdir(stage1_workdir):
    """A stage-2 prior trained a few steps on that run's tokens, in ``STAGE1/prior``."""
    import train_setup

    return train_setup.trained_prior(stage1_workdir, os.path.join(stage1_workdir, "prior"))
