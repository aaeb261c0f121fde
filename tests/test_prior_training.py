"""Stage 2: the MIM prior trains on a frozen stage-1 model's tokens, resumes exactly, and the
saved prior codes and decodes those tokens (prior mode of the token coder)."""

from __future__ import annotations

import numpy as np
import pytest

import train_setup

@pytest.fixture(scope="module")
def stage1(stage1_workdir):
    return stage1_workdir


prior_config = train_setup.prior_test_config


def test_prior_learns_resumes_and_codes(stage1, tmp_path):
    import jax

    from percov2_jax.entropy import schedules, token_coding
    from percov2_jax.train.prior import PriorTrainer, load_prior

    config = prior_config(stage1)
    trainer = PriorTrainer(config, str(tmp_path))
    try:
        history = trainer.train_steps(3)
        trainer.save()
        more = trainer.train_steps(2)
        tokens, caption = trainer.next_batch()
    finally:
        trainer.close()
    assert all(np.isfinite(h["bits_per_token"]) for h in history + more)
    resumed = PriorTrainer(config, str(tmp_path))
    try:
        assert resumed.step == 3
        again = resumed.train_steps(2)
    finally:
        resumed.close()
    assert [h["bits_per_token"] for h in again] == [h["bits_per_token"] for h in more]  # exact resume

    model, params = load_prior(str(tmp_path))
    probabilities = token_coding.make_step_probabilities(model.apply)
    grid = np.asarray(tokens[0])
    schedule = schedules.make_schedule("qlds", *grid.shape)
    payload, bits = token_coding.encode_with_prior(probabilities, params, grid, schedule, caption=caption[0])
    decoded, _ = token_coding.decode_with_prior(probabilities, params, payload, schedule, caption=caption[0])
    np.testing.assert_array_equal(decoded, grid)
    assert len(payload) * 8 <= sum(bits) + 16


def test_stage1_workdir_is_required(tmp_path):
    from percov2_jax.train.prior import PriorTrainer

    config = prior_config("")
    with pytest.raises(ValueError, match="stage1"):
        PriorTrainer(config, str(tmp_path))
