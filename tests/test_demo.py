"""`make demo` keeps working: the demo job end to end at a smaller image size."""

from __future__ import annotations

import importlib.util
import os

from percov2_jax import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_runs_and_agrees(tmp_path):
    spec = importlib.util.spec_from_file_location("demo_config", os.path.join(ROOT, "configs", "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.image_size = 64
    errors = demo.run(config, str(tmp_path))
    assert set(errors) == {"VAE latents (scaled)", "MM-DiT velocity", "decoded image"}
    assert max(errors.values()) <= 1e-5
    assert (tmp_path / "demo.png").stat().st_size > 0
