"""Where DMD acts inside FLUX-Lightning, on 1-D Gaussian data where every score is known in closed form.

Data x0 ~ N(0, 1). The teacher's flow (the exact probability-flow ODE) maps level a to level b linearly,
x_b = (m(b) / m(a)) x_a with m(t)^2 = (1 - t)^2 + t^2 the marginal variance; for a clean distribution N(0, g^2)
the x0 prediction at x_s is E[x0 | x_s] = (1 - s) g^2 / ((1 - s)^2 g^2 + s^2) x_s.

PCM's optimum in phase k >= 1 (here sigma_i = 0.75 -> edge sigma_e = 0.5) jumps along the teacher's flow, so
v = (x_e - x_i) / (sigma_e - sigma_i). Then (hand-computed):
    m(0.75)^2 = 0.625, m(0.5)^2 = 0.5, x_e / x_i = sqrt(0.8) = 0.894427
    x0_hat = x_i - 0.75 v = (1 - 0.75 (1 - 0.894427) / 0.25) x_i = 0.683282 x_i, std 0.683282 sqrt(0.625) = 0.540183
so the clean estimate has 54% of the data's spread. A fake score that has learnt the student's samples then
disagrees with the teacher: at s = 0.5, E[x0 | x_s] = 1.0 x_s (teacher) vs 0.5 * 0.291798 / (0.25 * 0.291798 +
0.25) = 0.451766 x_s (fake), and DMD pushes x0_hat's spread up, away from PCM's optimum. On the phase-end
prediction x_e (exactly the teacher's marginal at 0.5), re-noised with the exact kernel, both scores agree and
the DMD term vanishes: PCM's optimum is a stationary point.
"""
import numpy as np
import paddle

from ppdiffusers_fast import schedules
from ppdiffusers_fast.methods.distribution_matching import dmd_loss_at_level

SIGMA_I, SIGMA_E, S = 0.75, 0.5, 0.5


def marginal_std(t):
    return np.sqrt((1 - t) ** 2 + t ** 2)


def gaussian_velocity(x_s, s, clean_var):
    """Velocity of the flow whose clean distribution is N(0, clean_var): (x_s - E[x0 | x_s]) / s."""
    x0 = (1 - s) * clean_var / ((1 - s) ** 2 * clean_var + s ** 2) * x_s
    return (x_s - x0) / s


def clean_variance_behind(x_s, s):
    """The clean variance g^2 whose marginal at s has the samples' variance: ((var - s^2) / (1 - s)^2)."""
    return (np.var(x_s) - s ** 2) / (1 - s) ** 2


def pcm_optimum(num_samples=200_000, seed=0):
    """``x_i`` at sigma_i, the student's phase-end prediction x_e and clean estimate x0_hat at PCM's optimum."""
    rng = np.random.default_rng(seed)
    x_i = (marginal_std(SIGMA_I) * rng.standard_normal([num_samples, 1])).astype("float32")
    x_e = x_i * marginal_std(SIGMA_E) / marginal_std(SIGMA_I)  # the teacher's flow from 0.75 to 0.5
    v = (x_e - x_i) / (SIGMA_E - SIGMA_I)
    x_i_t, v_t = paddle.to_tensor(x_i), paddle.to_tensor(v)
    x_e_student = schedules.euler_step(x_i_t, SIGMA_I, SIGMA_E, v_t)  # f_theta(x_i, sigma_i)
    x0_hat = schedules.x0_from_velocity(x_i_t, paddle.full([num_samples], SIGMA_I), v_t)
    return x_e_student, x0_hat, rng


def dmd_on(sample, level, rng):
    """DMD loss (library ``dmd_loss_at_level``) with the exact teacher score and a fake score that has learnt the
    distribution of the re-noised samples; returns (loss, fake x0 coefficient at x_s)."""
    noise = paddle.to_tensor(rng.standard_normal(sample.shape).astype("float32"))
    x_s = schedules.renoise(sample, level, S, noise) if level > 0 else schedules.add_noise(sample, noise, S)
    x_s_np = x_s.numpy()
    fake_var = clean_variance_behind(x_s_np, S)
    v_real = paddle.to_tensor(gaussian_velocity(x_s_np, S, 1.0).astype("float32"))
    v_fake = paddle.to_tensor(gaussian_velocity(x_s_np, S, fake_var).astype("float32"))
    loss, _, _ = dmd_loss_at_level(sample.reshape([1, -1]), x_s.reshape([1, -1]), S, level,
                                   v_real.reshape([1, -1]), v_fake.reshape([1, -1]))
    coefficient = (1 - S) * fake_var / ((1 - S) ** 2 * fake_var + S ** 2)
    return loss.item(), coefficient


def test_pcm_optimum_clean_estimate_has_54_percent_of_the_data_spread():
    x_e, x0_hat, _ = pcm_optimum()
    np.testing.assert_allclose(np.std(x_e.numpy()), np.sqrt(0.5), rtol=1e-2)  # the teacher's marginal at 0.5
    np.testing.assert_allclose(np.std(x0_hat.numpy()), 0.540183, rtol=1e-2)  # not the data's std 1


def test_exact_kernel_keeps_the_teacher_marginal():
    x_e, _, rng = pcm_optimum()
    noise = paddle.to_tensor(rng.standard_normal(x_e.shape).astype("float32"))
    x_r = schedules.renoise(x_e, SIGMA_E, 0.8, noise).numpy()
    np.testing.assert_allclose(np.var(x_r), 0.68, rtol=1.5e-2)  # m(0.8)^2 = 0.04 + 0.64


def test_dmd_on_the_phase_end_prediction_vanishes_at_pcm_optimum():
    x_e, _, rng = pcm_optimum()
    loss, fake_coefficient = dmd_on(x_e, SIGMA_E, rng)
    np.testing.assert_allclose(fake_coefficient, 1.0, atol=2e-2)  # fake score = teacher score
    assert loss < 1e-3


def test_dmd_on_the_clean_estimate_pulls_against_pcm_optimum():
    x_e, x0_hat, rng = pcm_optimum()
    loss, fake_coefficient = dmd_on(x0_hat, 0.0, rng)
    np.testing.assert_allclose(fake_coefficient, 0.451766, rtol=2e-2)  # vs the teacher's 1.0
    assert loss > 0.1
    x = paddle.to_tensor(x0_hat.numpy().reshape([1, -1]), stop_gradient=False)
    noise = paddle.to_tensor(rng.standard_normal(x.shape).astype("float32"))
    x_s = schedules.add_noise(x, noise, S)
    x_s_np = x_s.numpy()
    v_real = paddle.to_tensor(gaussian_velocity(x_s_np, S, 1.0).astype("float32"))
    v_fake = paddle.to_tensor(gaussian_velocity(x_s_np, S, clean_variance_behind(x_s_np, S)).astype("float32"))
    dmd_loss_at_level(x, x_s.detach(), S, 0.0, v_real, v_fake)[0].backward()
    # the gradient is (0.451766 - 1) x_s / (normaliser * numel), anti-correlated with x: a step x <- x - lr * grad
    # widens the samples. corr(x_s, x) = (1 - s) std(x) / std(x_s) = 0.270092 / sqrt(0.25 * 0.291798 + 0.25)
    # = 0.474990, so corr(grad, x) = -0.474990
    np.testing.assert_allclose(np.corrcoef(x.grad.numpy().ravel(), x.numpy().ravel())[0, 1], -0.474990, atol=1e-2)
