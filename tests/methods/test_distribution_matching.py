"""Distribution matching component: the DMD loss and the fake-score loss against numpy on the same network
outputs, which adapters are live in each pass, and which parameters each loss reaches."""
import numpy as np
import paddle
import pytest
from lightning_toys import (TINY_LORA, base_parameters, clear_gradients, has_gradient, randomize_adapters,
                            student_denoiser, tiny_batch, tiny_denoiser)

from ppdiffusers_fast import schedules
from ppdiffusers_fast.methods.distribution_matching import (FAKE_SCORE_ADAPTER, DistributionMatching,
                                                            DistributionMatchingConfig)
from ppdiffusers_fast.models.lora import adapter_parameters, inject_lora, record_live_adapters, use_adapters


def _setup(fake_score):
    denoiser = student_denoiser()
    dmd = DistributionMatching(denoiser, DistributionMatchingConfig(dmd_fake_score=fake_score), "student",
                               guidance_scale=3.5, guidance_mode="embedded", lora_config=TINY_LORA)
    randomize_adapters(denoiser, ["student"] + ([FAKE_SCORE_ADAPTER] if fake_score == "adapter" else []))
    batch = tiny_batch()
    return denoiser, dmd, batch


def _fixed(batch, seed=7):
    rng = np.random.RandomState(seed)
    shape = batch.latents.shape
    return rng.randn(*shape).astype("float32"), rng.randn(*shape).astype("float32"), np.array([0.3, 0.8], "float32")


def _velocity(denoiser, x, s, cond, *adapters):
    with paddle.no_grad(), use_adapters(denoiser.transformer, *adapters):
        return denoiser(paddle.to_tensor(x), paddle.to_tensor(s), cond).numpy()


@pytest.mark.parametrize("fake_score", ["student", "adapter"])
def test_dmd_loss_and_gradient_equal_hand_computed_values(fake_score):
    denoiser, dmd, batch = _setup(fake_score)
    x0_np, noise_np, s_np = _fixed(batch)
    x0_hat = paddle.to_tensor(x0_np, stop_gradient=False)
    cond = batch.cond
    student_cond = cond.with_guidance(3.5)
    out = dmd.generator_loss(x0_hat, cond, student_cond, paddle.to_tensor(s_np), paddle.to_tensor(noise_np))

    s = s_np.reshape([-1, 1, 1])
    x_s = (1 - s) * x0_np + s * noise_np
    v_real = _velocity(denoiser, x_s, s_np, cond.with_guidance(3.5))
    v_fake = _velocity(denoiser, x_s, s_np, student_cond, dmd.fake_score_adapter())
    x0_real, x0_fake = x_s - s * v_real, x_s - s * v_fake
    normaliser = np.abs(x0_np - x0_real).mean(axis=(1, 2), keepdims=True)
    direction = (x0_fake - x0_real) / normaliser
    np.testing.assert_allclose(out.loss.item(), 0.5 * np.mean(direction ** 2), rtol=1e-4)
    assert out.loss.item() > 0
    out.loss.backward()  # d/dx0_hat of 0.5 mean((x0_hat - stopgrad(x0_hat - g))^2) = g / numel
    np.testing.assert_allclose(x0_hat.grad.numpy(), direction / direction.size, rtol=1e-3, atol=1e-9)


@pytest.mark.parametrize("fake_score, fake_adapter", [("student", "student"), ("adapter", FAKE_SCORE_ADAPTER)])
def test_teacher_has_no_adapter_live_and_the_fake_score_its_own(fake_score, fake_adapter):
    denoiser, dmd, batch = _setup(fake_score)
    x0_np, _, s_np = _fixed(batch)
    with record_live_adapters(denoiser.transformer) as live:
        dmd.generator_loss(paddle.to_tensor(x0_np), batch.cond, batch.cond.with_guidance(3.5), paddle.to_tensor(s_np))
    assert live == [(), (fake_adapter,)]


def test_generator_loss_reaches_only_the_student_and_fake_score_loss_only_its_adapter():
    denoiser, dmd, batch = _setup("adapter")
    student = adapter_parameters(denoiser.transformer, "student")
    fake = dmd.trainable_parameters()
    assert {id(p) for p in fake} == {id(p) for p in adapter_parameters(denoiser.transformer, FAKE_SCORE_ADAPTER)}
    student_cond = batch.cond.with_guidance(3.5)
    s = paddle.to_tensor([0.4, 0.6])
    with use_adapters(denoiser.transformer, "student"):
        v = denoiser(batch.latents, paddle.to_tensor([1.0, 1.0]), student_cond)
    x0_hat = batch.latents - v  # a generated sample with a graph into the student

    dmd.generator_loss(x0_hat, batch.cond, student_cond, s).loss.backward()
    assert has_gradient(student) and not has_gradient(fake)
    assert all(p.grad is None for p in base_parameters(denoiser))
    clear_gradients(student)

    with use_adapters(denoiser.transformer, "student"):
        v = denoiser(batch.latents, paddle.to_tensor([1.0, 1.0]), student_cond)
    with record_live_adapters(denoiser.transformer) as live:
        loss = dmd.fake_score_loss(batch.latents - v, student_cond, s)
    assert live == [(FAKE_SCORE_ADAPTER,)]
    loss.backward()
    assert has_gradient(fake) and not has_gradient(student)
    assert all(p.grad is None for p in base_parameters(denoiser))


def test_fake_score_loss_is_flow_matching_on_the_generated_sample():
    denoiser, dmd, batch = _setup("adapter")
    x0_np, noise_np, s_np = _fixed(batch)
    student_cond = batch.cond.with_guidance(3.5)
    loss = dmd.fake_score_loss(paddle.to_tensor(x0_np), student_cond, paddle.to_tensor(s_np),
                               paddle.to_tensor(noise_np))
    s = s_np.reshape([-1, 1, 1])
    x_s = (1 - s) * x0_np + s * noise_np
    v = _velocity(denoiser, x_s, s_np, student_cond, FAKE_SCORE_ADAPTER)
    np.testing.assert_allclose(loss.item(), np.mean((v - (noise_np - x0_np)) ** 2), rtol=1e-5)


def test_levels_and_configuration_checks():
    grid = schedules.solver_grid(8, 0.5)
    paddle.seed(0)
    levels = DistributionMatching.draw_levels(grid, 400).numpy()
    inner = set(np.round(grid.numpy()[1:-1], 6))
    assert set(np.round(levels, 6)) == inner  # every inner grid level, never 0 or 1

    denoiser = tiny_denoiser()
    inject_lora(denoiser.transformer, TINY_LORA, "student")
    with pytest.raises(ValueError, match="resolve dmd_fake_score"):
        DistributionMatching(denoiser, DistributionMatchingConfig(), "student", 3.5, "embedded")
    with pytest.raises(ValueError, match="LoraConfig"):
        DistributionMatching(denoiser, DistributionMatchingConfig(dmd_fake_score="adapter"), "student", 3.5,
                             "embedded")
    student_fake = DistributionMatching(denoiser, DistributionMatchingConfig(dmd_fake_score="student"), "student",
                                        3.5, "embedded")
    assert student_fake.trainable_parameters() == []
    with pytest.raises(RuntimeError, match="no loss of its own"):
        student_fake.fake_score_loss(paddle.zeros([1, 8, 16]), None, paddle.to_tensor([0.5]))
    with pytest.raises(ValueError, match="dmd_fake_score_updates"):
        DistributionMatchingConfig(dmd_fake_score_updates=0).validate()
    config = DistributionMatchingConfig()
    assert config.with_default_fake_score("adapter").trains_fake_score
    assert not DistributionMatchingConfig(dmd_fake_score="student").with_default_fake_score("adapter").trains_fake_score


def test_dmd_on_a_sample_at_a_level_equals_hand_computed_values():
    """Phase-end placement: x_s by the exact kernel from the sample's level, predictions taken back to it."""
    denoiser, dmd, batch = _setup("student")
    x_np, noise_np, s_np = _fixed(batch)
    level_np = np.array([0.2, 0.5], "float32")
    x_gen = paddle.to_tensor(x_np, stop_gradient=False)
    student_cond = batch.cond.with_guidance(3.5)
    out = dmd.generator_loss(x_gen, batch.cond, student_cond, paddle.to_tensor(s_np), paddle.to_tensor(noise_np),
                             level=paddle.to_tensor(level_np))

    s, level = s_np.reshape([-1, 1, 1]), level_np.reshape([-1, 1, 1])
    a = (1 - s) / (1 - level)  # renoise from 0.2 to 0.3: a = 0.875; from 0.5 to 0.8: a = 0.4
    x_s = a * x_np + np.sqrt(s ** 2 - a ** 2 * level ** 2) * noise_np
    np.testing.assert_allclose(out.x_s.numpy(), x_s, rtol=1e-5, atol=1e-6)
    v_real = _velocity(denoiser, x_s, s_np, batch.cond.with_guidance(3.5))
    v_fake = _velocity(denoiser, x_s, s_np, student_cond, "student")
    x_real, x_fake = x_s + (level - s) * v_real, x_s + (level - s) * v_fake
    direction = (x_fake - x_real) / np.abs(x_np - x_real).mean(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(out.loss.item(), 0.5 * np.mean(direction ** 2), rtol=1e-4)
    out.loss.backward()
    np.testing.assert_allclose(x_gen.grad.numpy(), direction / direction.size, rtol=1e-3, atol=1e-9)


def test_dmd_at_level_zero_is_the_clean_sample_loss():
    _, dmd, batch = _setup("student")
    x_np, noise_np, s_np = _fixed(batch)
    args = (batch.cond, batch.cond.with_guidance(3.5), paddle.to_tensor(s_np), paddle.to_tensor(noise_np))
    clean = dmd.generator_loss(paddle.to_tensor(x_np), *args)
    at_zero = dmd.generator_loss(paddle.to_tensor(x_np), *args, level=paddle.zeros([2]))
    np.testing.assert_allclose(at_zero.loss.item(), clean.loss.item(), rtol=1e-6)


def test_levels_above_a_phase_edge_lie_strictly_above_it():
    grid = schedules.solver_grid(8, 0.5)
    lower = paddle.to_tensor([0, 2, 4, 6] * 50, dtype="int64")
    s = DistributionMatching.draw_levels_above(grid, lower).numpy()
    edge = grid.numpy()[lower.numpy()]
    assert (s > edge).all() and (s <= grid.numpy()[7] + 1e-7).all()
    assert set(np.round(s[lower.numpy() == 6], 6)) == {np.round(grid.numpy()[7], 6)}


def test_phase_end_placement_refuses_an_adapter_fake_score():
    with pytest.raises(ValueError, match="--dmd_placement phase_end needs --dmd_fake_score student"):
        DistributionMatchingConfig(dmd_placement="phase_end", dmd_fake_score="adapter").validate()
