"""Reflow component: exact re-noising to a level inside the phase, the jump starts from that level, the
phase-end prediction is a stop-gradient target, and the loss equals a hand-computed pseudo-Huber value."""
import numpy as np
import paddle
import pytest
from lightning_toys import base_parameters, has_gradient, randomize_adapters, student_denoiser, tiny_batch

from ppdiffusers_fast import schedules
from ppdiffusers_fast.methods.reflow import Reflow, ReflowConfig
from ppdiffusers_fast.models.lora import adapter_parameters, record_live_adapters, use_adapters


def _setup():
    denoiser = student_denoiser()
    randomize_adapters(denoiser, ["student"])
    return denoiser, Reflow(denoiser, "student", "huber", 0.001), tiny_batch()


def test_loss_equals_hand_computed_value_and_the_jump_starts_at_r():
    denoiser, reflow, _ = _setup()
    batch = tiny_batch(3)
    grid = schedules.solver_grid(8, 0.5)
    lower, upper = paddle.to_tensor([0, 4, 4]), paddle.to_tensor([4, 8, 8])
    # r = sigma_3 inside phase 0, r = sigma_8 = 1 at the top of phase 1, r = sigma_6 inside phase 1
    index = paddle.to_tensor([3, 8, 6])
    edge = paddle.gather(grid, lower)
    rng = np.random.RandomState(2)
    x_end_np = rng.randn(*batch.latents.shape).astype("float32")
    noise_np = rng.randn(*batch.latents.shape).astype("float32")
    cond = batch.cond.with_guidance(3.5)

    timesteps = []
    original = denoiser.forward

    def spy(x_t, sigma, c, **kw):
        timesteps.append(sigma.numpy().copy())
        return original(x_t, sigma, c, **kw)

    denoiser.forward = spy
    with record_live_adapters(denoiser.transformer) as live:
        out = reflow.loss(paddle.to_tensor(x_end_np), edge, grid, lower, upper, cond,
                          noise=paddle.to_tensor(noise_np), index=index)
    denoiser.forward = original
    assert live == [("student",)]

    g = grid.numpy()
    s, r = g[[0, 4, 4]].reshape([-1, 1, 1]), g[[3, 8, 6]].reshape([-1, 1, 1])
    assert len(timesteps) == 1
    np.testing.assert_allclose(timesteps[0], r.reshape([-1]), rtol=0, atol=0)  # the student runs at r itself
    a = (1 - r) / (1 - s)
    x_r = a * x_end_np + np.sqrt(r * r - a * a * s * s) * noise_np  # exact kernel
    np.testing.assert_allclose(out.x_r.numpy(), x_r, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.x_r.numpy()[1], noise_np[1], atol=1e-6)  # r = 1 is pure noise
    with paddle.no_grad(), use_adapters(denoiser.transformer, "student"):
        v = denoiser(paddle.to_tensor(x_r.astype("float32")), paddle.to_tensor(r.reshape([-1])), cond).numpy()
    jump = x_r + (s - r) * v
    expected = np.mean(np.sqrt((jump - x_end_np) ** 2 + 0.001 ** 2) - 0.001)
    np.testing.assert_allclose(out.loss.item(), expected, rtol=1e-5)
    # above level 0 the reference's kernel would have started the jump from another point
    reference_x_r = ((1 - r) * x_end_np + (r - s) * noise_np) / (1 - s)
    assert np.abs(reference_x_r[2] - x_r[2]).max() > 1e-2


def test_the_phase_end_prediction_is_a_stop_gradient_target():
    denoiser, reflow, batch = _setup()
    grid = schedules.solver_grid(8, 0.5)
    lower, upper = paddle.to_tensor([0, 4]), paddle.to_tensor([4, 8])
    x_end = paddle.to_tensor(batch.latents.numpy(), stop_gradient=False)
    out = reflow.loss(x_end, paddle.gather(grid, lower), grid, lower, upper, batch.cond.with_guidance(3.5))
    out.loss.backward()
    assert x_end.grad is None
    assert has_gradient(adapter_parameters(denoiser.transformer, "student"))
    assert all(p.grad is None for p in base_parameters(denoiser))


def test_levels_are_drawn_strictly_above_the_lower_edge_up_to_the_upper_edge():
    denoiser, reflow, batch = _setup()
    paddle.seed(0)
    # the draw Reflow.loss makes when no index is given (schedules.draw_grid_index is tested in test_schedules)
    index = schedules.draw_grid_index(paddle.to_tensor([0, 4] * 200) + 1, paddle.to_tensor([4, 8] * 200), 400).numpy()
    assert set(index[0::2]) == {1, 2, 3, 4} and set(index[1::2]) == {5, 6, 7, 8}
    grid = schedules.solver_grid(8, 0.5)
    lower, upper = paddle.to_tensor([0, 4]), paddle.to_tensor([4, 8])
    with paddle.no_grad():
        out = reflow.loss(batch.latents, paddle.gather(grid, lower), grid, lower, upper, batch.cond.with_guidance(3.5))
    drawn = out.index.numpy()
    assert 0 < drawn[0] <= 4 and 4 < drawn[1] <= 8
    np.testing.assert_array_equal(out.r.numpy(), grid.numpy()[drawn])
    with pytest.raises(ValueError, match="reflow_loss_weight"):
        ReflowConfig(reflow_loss_weight=-1.0).validate()
