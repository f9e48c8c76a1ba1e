"""Noise-level math: time shift, mu, grid, phases, exact re-noising, conversions (values computed with numpy here)."""
import math

import numpy as np
import paddle
import pytest

from ppdiffusers_fast import schedules


def np_shift(t, mu):
    t = np.asarray(t, dtype=np.float64)
    out = np.zeros_like(t)
    positive = t > 0
    out[positive] = math.exp(mu) / (math.exp(mu) + (1.0 / t[positive] - 1.0))
    return out


# ---------------------------------------------------------------------------------------------
# time shift, mu, tokens
# ---------------------------------------------------------------------------------------------
def test_time_shift_float_numpy_tensor_agree_with_formula():
    t = np.array([0.0, 0.01, 0.25, 0.5, 0.9, 1.0])
    expected = np_shift(t, 1.15)
    assert schedules.time_shift(0.5, 1.15) == pytest.approx(expected[3], abs=1e-15)
    assert schedules.time_shift(0.0, 1.15) == 0.0
    assert schedules.time_shift(1.0, 1.15) == 1.0
    np.testing.assert_allclose(schedules.time_shift(t, 1.15), expected, atol=1e-15)
    tensor = schedules.time_shift(paddle.to_tensor(t, dtype="float32"), 1.15)
    assert isinstance(tensor, paddle.Tensor) and tensor.dtype == paddle.float32
    np.testing.assert_allclose(tensor.numpy(), expected, atol=1e-6)
    # mu = 0 is the identity; mu > 0 moves every level towards noise
    np.testing.assert_allclose(schedules.time_shift(t, 0.0), t, atol=1e-15)
    assert np.all(schedules.time_shift(t[1:-1], 0.5) > t[1:-1])


def test_time_shift_rejects_bad_arguments():
    with pytest.raises(ValueError, match="t must lie in"):
        schedules.time_shift(1.5, 1.0)
    with pytest.raises(ValueError, match="t must lie in"):
        schedules.time_shift(np.array([-0.1, 0.5]), 1.0)
    with pytest.raises(ValueError, match="mu"):
        schedules.time_shift(0.5, float("nan"))


def test_resolution_mu_and_image_seq_len():
    assert schedules.image_seq_len(1024, 1024) == 4096
    assert schedules.image_seq_len(512, 512) == 1024
    assert schedules.image_seq_len(256, 256) == 256
    assert schedules.image_seq_len(768, 1360) == 48 * 85
    assert schedules.resolution_mu(schedules.image_seq_len(1024, 1024)) == pytest.approx(1.15, abs=1e-12)
    assert schedules.resolution_mu(256) == pytest.approx(0.5, abs=1e-12)
    m = (1.15 - 0.5) / (4096 - 256)
    assert schedules.resolution_mu(1024) == pytest.approx(m * 1024 + 0.5 - 256 * m, abs=1e-12)
    assert schedules.resolution_mu(1024) == pytest.approx(0.5 + 0.65 * 768 / 3840, abs=1e-12)


@pytest.mark.parametrize("height,width", [(1000, 1024), (1024, 1032), (0, 1024), (512.0, 512)])
def test_image_seq_len_rejects_sizes_that_are_not_multiples_of_16(height, width):
    with pytest.raises(ValueError):
        schedules.image_seq_len(height, width)


def test_resolution_mu_rejects_degenerate_line():
    with pytest.raises(ValueError, match="differ"):
        schedules.resolution_mu(1024, base_seq_len=256, max_seq_len=256)
    with pytest.raises(ValueError, match="image_seq_len"):
        schedules.resolution_mu(0)


# ---------------------------------------------------------------------------------------------
# solver grid and phases
# ---------------------------------------------------------------------------------------------
def test_solver_grid_is_shifted_uniform_grid():
    grid = schedules.solver_grid(100, 1.15)
    assert list(grid.shape) == [101] and grid.dtype == paddle.float32
    np.testing.assert_allclose(grid.numpy(), np_shift(np.arange(101) / 100, 1.15), atol=1e-7)
    assert grid[0].item() == 0.0 and grid[-1].item() == 1.0
    assert np.all(np.diff(grid.numpy()) > 0)
    grid64 = schedules.solver_grid(8, 0.5, dtype="float64")
    np.testing.assert_allclose(grid64.numpy(), np_shift(np.arange(9) / 8, 0.5), atol=1e-15)


def test_phase_edge_indices():
    assert schedules.phase_edge_indices(100, 4) == [0, 25, 50, 75, 100]
    assert schedules.phase_edge_indices(100, 1) == [0, 100]  # LCM
    assert schedules.phase_edge_indices(50, 1) == [0, 50]
    assert schedules.phase_edge_indices(10, 3) == [0, 3, 6, 10]
    assert schedules.phase_edge_indices(7, 7) == list(range(8))
    for n in (50, 100):
        for k in range(1, n + 1):
            expected = np.floor(np.linspace(0, n, k, endpoint=False)).astype(int).tolist() + [n]
            assert schedules.phase_edge_indices(n, k) == expected


@pytest.mark.parametrize("n,k", [(100, 101), (100, 0), (0, 1), (100, 2.0), (True, 1)])
def test_phase_edge_indices_rejects_bad_arguments(n, k):
    with pytest.raises(ValueError):
        schedules.phase_edge_indices(n, k)


def test_phase_sigmas_descend_from_one_to_zero():
    sigmas = schedules.phase_sigmas(4, 100, 1.15)
    np.testing.assert_allclose(sigmas.numpy(), np_shift([1.0, 0.75, 0.5, 0.25, 0.0], 1.15), atol=1e-7)
    np.testing.assert_allclose(schedules.phase_sigmas(1, 100, 0.7).numpy(), [1.0, 0.0])
    grid = schedules.solver_grid(100, 0.9)
    np.testing.assert_allclose(schedules.phase_sigmas(4, 100, 0.9).numpy(),
                               grid.numpy()[[100, 75, 50, 25, 0]], atol=1e-7)
    with pytest.raises(ValueError, match="cannot exceed"):
        schedules.phase_sigmas(5, 4, 1.0)


def test_phase_of_index_and_bounds():
    edges = schedules.phase_edge_indices(100, 4)
    # e_k < i <= e_{k+1}: from i = 25 the teacher steps to 24, inside phase 0; from i = 26 it steps
    # onto the edge 25, the boundary case of phase 1
    cases = {1: 0, 24: 0, 25: 0, 26: 1, 50: 1, 51: 2, 75: 2, 76: 3, 100: 3}
    for index, phase in cases.items():
        assert schedules.phase_of_index(index, edges) == phase
        assert schedules.phase_bounds(index, edges) == (edges[phase], edges[phase + 1])
    indices = paddle.to_tensor(list(cases), dtype="int64")
    assert schedules.phase_of_index(indices, edges).numpy().tolist() == list(cases.values())
    lower, upper = schedules.phase_bounds(indices, edges)
    assert lower.numpy().tolist() == [edges[p] for p in cases.values()]
    assert upper.numpy().tolist() == [edges[p + 1] for p in cases.values()]
    # LCM: one phase, every index jumps to 0
    assert schedules.phase_bounds(37, [0, 100]) == (0, 100)


def test_phase_of_index_rejects_bad_arguments():
    edges = [0, 25, 50, 75, 100]
    for bad in (0, 101, -3):
        with pytest.raises(ValueError, match="1..100"):
            schedules.phase_of_index(bad, edges)
    with pytest.raises(ValueError, match="1..100"):
        schedules.phase_of_index(paddle.to_tensor([3, 0]), edges)
    with pytest.raises(ValueError, match="integer"):
        schedules.phase_of_index(paddle.to_tensor([3.0]), edges)
    with pytest.raises(ValueError, match="edges"):
        schedules.phase_of_index(3, [5, 10])


def test_draw_grid_index_is_uniform_over_inclusive_bounds():
    paddle.seed(0)
    index = schedules.draw_grid_index(paddle.to_tensor([1, 5] * 200), paddle.to_tensor([4, 8] * 200), 400)
    assert index.dtype == paddle.int64 and index.shape == [400]
    index = index.numpy()
    assert set(index[0::2]) == {1, 2, 3, 4} and set(index[1::2]) == {5, 6, 7, 8}
    # python-int bounds: every value of 1..N about equally often (expected 1000 each, std about 27)
    counts = np.bincount(schedules.draw_grid_index(1, 4, 4000).numpy(), minlength=5)
    assert counts[0] == 0 and counts[1:].sum() == 4000 and counts[1:].min() > 850
    assert set(schedules.draw_grid_index(3, 3, 5).numpy()) == {3}
    mixed = schedules.draw_grid_index(paddle.to_tensor([0, 6]), 7, 2).numpy()
    assert 0 <= mixed[0] <= 7 and 6 <= mixed[1] <= 7


def test_draw_grid_index_rejects_bad_bounds():
    with pytest.raises(ValueError, match="low <= high"):
        schedules.draw_grid_index(4, 3, 2)
    with pytest.raises(ValueError, match="low <= high"):
        schedules.draw_grid_index(paddle.to_tensor([1, 4]), paddle.to_tensor([2, 3]), 2)
    with pytest.raises(ValueError, match="entries for a batch"):
        schedules.draw_grid_index(paddle.to_tensor([0, 1, 2]), 5, 2)


# ---------------------------------------------------------------------------------------------
# forward process, re-noising, conversions
# ---------------------------------------------------------------------------------------------
def _random(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_add_noise_with_per_sample_levels():
    x0, eps = _random((3, 4, 5), 1), _random((3, 4, 5), 2)
    s = np.array([0.0, 0.3, 1.0], dtype=np.float32)
    out = schedules.add_noise(paddle.to_tensor(x0), paddle.to_tensor(eps), paddle.to_tensor(s))
    expected = (1 - s)[:, None, None] * x0 + s[:, None, None] * eps
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)
    out_float = schedules.add_noise(paddle.to_tensor(x0), paddle.to_tensor(eps), 0.3)
    np.testing.assert_allclose(out_float.numpy(), 0.7 * x0 + 0.3 * eps, atol=1e-6)


def test_conversions_round_trip():
    x0, eps = _random((2, 6, 4), 3), _random((2, 6, 4), 4)
    s = paddle.to_tensor([0.2, 0.85])
    x0_t, eps_t = paddle.to_tensor(x0), paddle.to_tensor(eps)
    x_s = schedules.add_noise(x0_t, eps_t, s)
    v = schedules.velocity_from_x0_eps(x0_t, eps_t)
    np.testing.assert_allclose(v.numpy(), eps - x0, atol=0)
    np.testing.assert_allclose(schedules.x0_from_velocity(x_s, s, v).numpy(), x0, atol=1e-5)
    np.testing.assert_allclose(schedules.eps_from_velocity(x_s, s, v).numpy(), eps, atol=1e-5)
    # the exact velocity moves x_s along the straight path: to 0 gives x0, to 1 gives eps, to 0.5 gives x_0.5
    np.testing.assert_allclose(schedules.euler_step(x_s, s, 0.0, v).numpy(), x0, atol=1e-5)
    np.testing.assert_allclose(schedules.euler_step(x_s, s, 1.0, v).numpy(), eps, atol=1e-5)
    np.testing.assert_allclose(schedules.euler_step(x_s, s, 0.5, v).numpy(), 0.5 * x0 + 0.5 * eps, atol=1e-5)
    # float levels and numbers by hand
    x = paddle.to_tensor([[1.0, 2.0]])
    vel = paddle.to_tensor([[0.5, -1.0]])
    np.testing.assert_allclose(schedules.x0_from_velocity(x, 0.4, vel).numpy(), [[0.8, 2.4]], atol=1e-6)
    np.testing.assert_allclose(schedules.eps_from_velocity(x, 0.4, vel).numpy(), [[1.3, 1.4]], atol=1e-6)
    np.testing.assert_allclose(schedules.euler_step(x, 0.9, 0.6, vel).numpy(), [[0.85, 2.3]], atol=1e-6)


def test_levels_are_validated():
    x = paddle.zeros([2, 3])
    with pytest.raises(ValueError, match="s must lie in"):
        schedules.add_noise(x, x, 1.5)
    with pytest.raises(ValueError, match="s must lie in"):
        schedules.x0_from_velocity(x, paddle.to_tensor([0.5, -0.1]), x)
    with pytest.raises(ValueError, match=r"expected \[B\]"):
        schedules.add_noise(x, x, paddle.to_tensor([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="floating"):
        schedules.add_noise(x, x, paddle.to_tensor([0, 1]))
    with pytest.raises(ValueError, match="same shape"):
        schedules.add_noise(x, paddle.zeros([2, 4]), 0.5)


def test_renoise_marginal_has_std_r_and_scales_the_mean_by_a():
    s, r = 0.5, 0.75
    a = (1 - r) / (1 - s)
    n = 400_000
    x0 = np.full((1, n), 0.8, dtype=np.float32)
    eps, eps_prime = _random((1, n), 5), _random((1, n), 6)
    x_s = schedules.add_noise(paddle.to_tensor(x0), paddle.to_tensor(eps), s)
    x_r = schedules.renoise(x_s, s, r, paddle.to_tensor(eps_prime)).numpy()
    noise_part = x_r - (1 - r) * x0
    assert abs(noise_part.mean()) < 0.005
    assert noise_part.std() == pytest.approx(r, abs=0.005)
    # the reference's kernel ((1 - r) x + (r - s) eps') / (1 - s) gets std 0.56 here, not 0.75
    reference = ((1 - r) * x_s.numpy() + (r - s) * eps_prime) / (1 - s) - (1 - r) * x0
    assert reference.std() == pytest.approx(math.sqrt(0.0625 + 0.25), abs=0.005)
    # given x_s: mean a * x_s, std sqrt(r^2 - a^2 s^2)
    fixed = np.linspace(-2, 2, 8, dtype=np.float32)
    draws = 50_000
    x_fixed = paddle.to_tensor(np.tile(fixed, (draws, 1)))
    x_r_given = schedules.renoise(x_fixed, s, r, paddle.to_tensor(_random((draws, 8), 7))).numpy()
    np.testing.assert_allclose(x_r_given.mean(axis=0), a * fixed, atol=0.015)
    np.testing.assert_allclose(x_r_given.std(axis=0), np.full(8, math.sqrt(r * r - a * a * s * s)), atol=0.01)


def test_renoise_per_sample_levels_match_formula():
    x, noise = _random((3, 5), 8), _random((3, 5), 9)
    s = np.array([0.0, 0.2, 0.6], dtype=np.float32)
    r = np.array([0.5, 0.2, 1.0], dtype=np.float32)
    out = schedules.renoise(paddle.to_tensor(x), paddle.to_tensor(s), paddle.to_tensor(r), paddle.to_tensor(noise))
    a = (1 - r) / (1 - s)
    std = np.sqrt(np.maximum(r * r - a * a * s * s, 0))
    np.testing.assert_allclose(out.numpy(), a[:, None] * x + std[:, None] * noise, atol=1e-6)
    np.testing.assert_allclose(out.numpy()[1], x[1], atol=1e-6)  # r = s: unchanged
    np.testing.assert_allclose(out.numpy()[2], noise[2], atol=1e-6)  # r = 1: pure noise


def test_renoise_rejects_bad_levels():
    x = paddle.zeros([2, 3])
    with pytest.raises(ValueError, match="r >= s"):
        schedules.renoise(x, 0.75, 0.5, x)
    with pytest.raises(ValueError, match="r >= s"):
        schedules.renoise(x, paddle.to_tensor([0.2, 0.6]), paddle.to_tensor([0.3, 0.5]), x)
    with pytest.raises(ValueError, match="s < 1"):
        schedules.renoise(x, 1.0, 1.0, x)
    with pytest.raises(ValueError, match="r must lie in"):
        schedules.renoise(x, 0.5, 1.2, x)


def test_static_time_shift_by_hand():
    # shift 3 at t = 0.5: 3 * 0.5 / (1 + 2 * 0.5) = 0.75; shift 1 is the identity; the ends stay fixed
    assert schedules.static_time_shift(0.5, 3.0) == 0.75
    t = np.array([0.0, 0.25, 1.0], dtype=np.float32)
    shifted = schedules.static_time_shift(t, 3.0)
    assert shifted.dtype == np.float32
    np.testing.assert_allclose(shifted, [0.0, 0.5, 1.0], atol=0)  # 0.75 / 1.5 = 0.5
    np.testing.assert_allclose(schedules.static_time_shift(paddle.to_tensor(t), 1.0).numpy(), t, atol=0)
    with pytest.raises(ValueError, match="shift must be a positive"):
        schedules.static_time_shift(0.5, 0.0)
    with pytest.raises(ValueError, match="t must lie in"):
        schedules.static_time_shift(1.5, 2.0)


def test_classifier_free_guidance_by_hand():
    v_uncond = paddle.to_tensor([[1.0, -2.0]])
    v_cond = paddle.to_tensor([[2.0, 0.0]])
    # u + w (c - u) with w = 3: [1 + 3 * 1, -2 + 3 * 2]
    np.testing.assert_allclose(schedules.classifier_free_guidance(v_uncond, v_cond, 3.0).numpy(), [[4.0, 4.0]])
    np.testing.assert_allclose(schedules.classifier_free_guidance(v_uncond, v_cond, 1.0).numpy(), v_cond.numpy())
    with pytest.raises(ValueError, match="same shape"):
        schedules.classifier_free_guidance(v_uncond, paddle.zeros([2, 2]), 3.0)
