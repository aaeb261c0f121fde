"""Test-session setup: a persistent XLA compilation cache shared by the test process and its
subprocesses and unoptimised kernels (compiles dominate test time on 2 CPU cores;
tests/xla_env.py), quiet torch threading, and every
Cloud Storage client pointed at a local emulator (tests/gcs_emulator.py) before any Google
library is imported, and a guard that fails any Python connection or name lookup outside
127.0.0.1 (tests/network_guard.py; tests/sitecustomize.py installs it in test subprocesses)."""

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

import network_guard  # noqa: E402
import xla_env  # noqa: E402

# Before jax starts: fast compiles for every test process (tests/xla_env.py).
os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), xla_env.FAST_COMPILE]))

network_guard.install()  # any connection or lookup outside 127.0.0.1 fails, naming the address

import gcs_emulator  # noqa: E402

# One port for the whole session: fsspec caches its filesystem objects and tensorstore reads its
# URL once. The server itself starts only when a test asks for it (the `gcs` fixture).
GCS_URL = gcs_emulator.configure_environment(gcs_emulator.free_port())

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


@pytest.fixture(scope="session")
def gcs():
    """The Cloud Storage emulator on 127.0.0.1 (`gcs_emulator.Emulator`); ``gcs.create_bucket()``
    gives a fresh ``gs://`` bucket."""
    emulator = gcs_emulator.Emulator(GCS_URL).start()
    yield emulator
    emulator.stop()
