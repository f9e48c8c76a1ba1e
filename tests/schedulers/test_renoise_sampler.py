"""DMD2's re-noising sampler: the rule by hand, its loop against a hand-run, its noise by seed and step."""
import numpy as np
import paddle
import pytest

from ppdiffusers_fast.pipelines.latents import seeded_noise, seeded_step_noise
from ppdiffusers_fast.schedulers.samplers import (few_step_sampler, renoise_update, sample_euler, sample_x0_renoise,
                                                  sampler_name)


def _t(values):
    return paddle.to_tensor(np.asarray(values, dtype=np.float32))


def test_renoise_update_by_hand():
    # x0 = x - 0.8 v = [0.8, -1.4]; x_next = 0.5 x0 + 0.5 eps' = [0.9, -1.7]
    x, v, eps = _t([[2.0, -1.0]]), _t([[1.5, 0.5]]), _t([[1.0, -2.0]])
    np.testing.assert_allclose(renoise_update(x, 0.8, 0.5, v, eps).numpy(), [[0.9, -1.7]], rtol=1e-6)
    # to level 0 the noise drops out: the clean prediction itself
    np.testing.assert_allclose(renoise_update(x, 0.8, 0.0, v, eps).numpy(), [[0.8, -1.4]], rtol=1e-6)
    with pytest.raises(ValueError, match="noise"):
        renoise_update(x, 0.8, 0.5, v, _t([[1.0]]))


def test_renoise_loop_by_hand_and_against_euler():
    calls = []

    def noise_fn(i, shape):
        calls.append((i, shape))
        return paddle.full(shape, 3.0, dtype="float32")

    def velocity(x, s):  # v = x
        return x

    # step 1 (s = 1): x0 = 2 - 2 = 0, x = 0.5 * 0 + 0.5 * 3 = 1.5; step 2 (s = 0.5): x0 = 1.5 - 0.75 = 0.75
    out = sample_x0_renoise(velocity, _t([[2.0]]), [1.0, 0.5, 0.0], noise_fn)
    np.testing.assert_allclose(out.numpy(), [[0.75]], rtol=1e-6)
    assert calls == [(0, [1, 1])]  # no noise for the last step to 0
    # Euler on the same levels: 2 - 0.5 * 2 = 1, then 1 - 0.5 * 1 = 0.5 (the noise implied by x is kept)
    np.testing.assert_allclose(sample_euler(velocity, _t([[2.0]]), [1.0, 0.5, 0.0]).numpy(), [[0.5]], rtol=1e-6)
    # one step to 0: both samplers are the same map
    x = _t([[0.3, -1.2]])
    np.testing.assert_allclose(sample_x0_renoise(velocity, x, [1.0, 0.0], noise_fn).numpy(),
                               sample_euler(velocity, x, [1.0, 0.0]).numpy(), rtol=1e-6)


def test_few_step_sampler_follows_the_metadata():
    assert few_step_sampler({}) is sample_euler
    assert few_step_sampler({"sampler": "euler"}) is sample_euler
    assert sampler_name({"sampler": "renoise"}) == "renoise"
    with pytest.raises(ValueError, match="noise_fn"):
        few_step_sampler({"sampler": "renoise"})
    with pytest.raises(ValueError, match="'ddim'"):
        few_step_sampler({"sampler": "ddim"})
    loop = few_step_sampler({"sampler": "renoise"}, lambda i, shape: paddle.full(shape, 3.0, dtype="float32"))
    np.testing.assert_allclose(loop(lambda x, s: x, _t([[2.0]]), [1.0, 0.5, 0.0]).numpy(), [[0.75]], rtol=1e-6)


def test_step_noise_depends_on_seed_and_step_only():
    both = seeded_step_noise([5, 6], 1, [2, 3])
    np.testing.assert_array_equal(both.numpy()[1:], seeded_step_noise([6], 1, [2, 3]).numpy())
    np.testing.assert_array_equal(both.numpy()[0], np.random.default_rng([5, 2]).standard_normal([2, 3],
                                                                                                  dtype=np.float32))
    assert not np.allclose(seeded_step_noise([5], 0, [2, 3]).numpy(), seeded_step_noise([5], 1, [2, 3]).numpy())
    assert not np.allclose(seeded_step_noise([5], 0, [2, 3]).numpy(), seeded_noise([5], [2, 3]).numpy())
    with pytest.raises(ValueError, match="step"):
        seeded_step_noise([5], -1, [2])
