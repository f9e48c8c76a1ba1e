"""DMD2: two time-scale schedule, backward simulation on the sampler's levels, each group updated only by its
own loss (generator: student adapter, fake score: its adapter, discriminator: the heads), and the export."""
import numpy as np
import paddle
import pytest
from lightning_toys import (TINY_LORA, base_parameters, changed, group_values, groups_reached, tiny_schedule,
                            randomize_adapters, run_trainer, tiny_batch, tiny_denoiser, tiny_dmd2)

from ppdiffusers_fast import schedules
from ppdiffusers_fast.methods.adversarial import AdversarialConfig
from ppdiffusers_fast.methods.distribution_matching import FAKE_SCORE_ADAPTER, DistributionMatchingConfig
from ppdiffusers_fast.methods.dmd2 import DMD2, DMD2Config
from ppdiffusers_fast.models.lora import live_adapters, use_adapters
from ppdiffusers_fast.models.lora_io import load_lora


def _randomized(**kw):
    method = tiny_dmd2(**kw)
    randomize_adapters(method.denoiser, ["student", FAKE_SCORE_ADAPTER])
    return method


def test_two_time_scale_schedule():
    method = tiny_dmd2(fake_score_updates=3)
    assert sorted(method.parameter_groups()) == ["discriminator", "fake_score", "generator"]
    assert [method.update_schedule(s) for s in range(4)] == [
        ["generator", "fake_score", "discriminator"], ["fake_score", "discriminator"],
        ["fake_score", "discriminator"], ["generator", "fake_score", "discriminator"]]
    assert sorted(tiny_dmd2(gan_weight=0.0).parameter_groups()) == ["fake_score", "generator"]


def test_each_result_reaches_only_its_group():
    method = _randomized()
    results = {r.group: r for r in method.train_step(tiny_batch(), 0)}
    assert sorted(results) == ["discriminator", "fake_score", "generator"]
    assert list(results["generator"].losses) == ["dmd", "adv_g"]
    assert results["generator"].losses["dmd"].item() > 0
    np.testing.assert_allclose(results["generator"].losses["adv_g"].item(),
                               0.1 * results["generator"].metrics["adv_g_unweighted"], rtol=1e-6)

    assert groups_reached(method, results["fake_score"]) == {"fake_score"}
    assert groups_reached(method, results["discriminator"]) == {"discriminator"}
    # the generator's GAN loss flows through the heads too: the trainer discards those gradients
    assert groups_reached(method, results["generator"]) == {"generator", "discriminator"}
    assert all(p.grad is None for p in base_parameters(method.denoiser))


def test_trainer_updates_groups_on_schedule_and_never_the_base(tmp_path):
    method = _randomized(fake_score_updates=2)
    base = [p.numpy().copy() for p in base_parameters(method.denoiser)]
    before = group_values(method)
    run_trainer(method, tiny_batch(), tmp_path / "first", steps=1)
    after_first = group_values(method)
    assert changed(before, after_first) == {"generator": True, "fake_score": True, "discriminator": True}
    method.update_schedule = lambda step: ["fake_score", "discriminator"]  # a non-generator step of the cycle
    run_trainer(method, tiny_batch(), tmp_path / "second", steps=1)
    assert changed(after_first, group_values(method)) == {"generator": False, "fake_score": True,
                                                          "discriminator": True}
    assert all(np.array_equal(a, p.numpy()) for a, p in zip(base, base_parameters(method.denoiser)))


def test_backward_simulation_runs_the_students_own_steps_without_a_graph():
    method = _randomized()
    batch = tiny_batch()
    cond = method.student_condition(batch.cond)
    levels = [float(v) for v in method.generator_levels(batch.latents.shape[1]).numpy()]
    assert levels[0] == 1.0 and levels[-1] == 0.0 and len(levels) == 3
    transformer = method.denoiser.transformer
    calls = []
    hook = transformer.register_forward_pre_hook(
        lambda layer, inputs: calls.append((live_adapters(transformer), paddle.is_grad_enabled())))
    paddle.seed(4)
    x_1 = method.generator_input(batch.latents, 1, levels, cond)
    hook.remove()
    assert calls == [(("student",), False)]
    paddle.seed(4)
    noise = paddle.randn(batch.latents.shape, dtype="float32")
    with paddle.no_grad(), use_adapters(transformer, "student"):
        v = method.denoiser(noise, paddle.full([2], 1.0), cond)
    np.testing.assert_allclose(x_1.numpy(), (noise + (levels[1] - 1.0) * v).numpy(), rtol=1e-5, atol=1e-6)

    data_noised = DMD2(tiny_denoiser(), TINY_LORA, tiny_schedule(), DistributionMatchingConfig(),
                       AdversarialConfig(adv_head_channels=8), DMD2Config(dmd2_backward_simulation=False))
    paddle.seed(4)
    x = data_noised.generator_input(batch.latents, 1, levels, cond)
    np.testing.assert_allclose(x.numpy(), schedules.add_noise(batch.latents, noise, levels[1]).numpy(), rtol=1e-6)


def test_configuration_errors_and_export(tmp_path):
    with pytest.raises(ValueError, match="--dmd_fake_score adapter"):
        DMD2(tiny_denoiser(), TINY_LORA, tiny_schedule(), DistributionMatchingConfig(dmd_fake_score="student"),
             AdversarialConfig(), DMD2Config())
    with pytest.raises(ValueError, match="no_use_dmd_loss"):
        DMD2(tiny_denoiser(), TINY_LORA, tiny_schedule(), DistributionMatchingConfig(use_dmd_loss=False),
             AdversarialConfig(), DMD2Config())
    with pytest.raises(ValueError, match="--adv_weight, --dmd_weight"):
        DMD2(tiny_denoiser(), TINY_LORA, tiny_schedule(), DistributionMatchingConfig(dmd_weight=1.0),
             AdversarialConfig(adv_weight=0.5), DMD2Config())
    method = _randomized()
    path = method.export(str(tmp_path))
    fresh = tiny_denoiser(seed=9).transformer
    info = load_lora(fresh, path, "student")
    assert info["sampling"]["num_inference_steps"] == 2 and info["sampling"]["num_euler_timesteps"] == 8
    sample = method.sample(paddle.randn([1, 8, 16]), tiny_batch(1).cond)
    assert list(sample.shape) == [1, 8, 16]


def test_renoise_backward_simulation_and_sampling_use_fresh_noise(tmp_path):
    method = _randomized(dmd2_sampler="renoise")
    batch = tiny_batch()
    cond = method.student_condition(batch.cond)
    levels = [float(v) for v in method.generator_levels(batch.latents.shape[1]).numpy()]
    paddle.seed(4)
    x_1 = method.generator_input(batch.latents, 1, levels, cond)
    paddle.seed(4)
    noise = paddle.randn(batch.latents.shape, dtype="float32")
    fresh = paddle.randn(batch.latents.shape, dtype="float32")
    with paddle.no_grad(), use_adapters(method.denoiser.transformer, "student"):
        v = method.denoiser(noise, paddle.full([2], 1.0), cond)
    x0_hat = noise - v  # x - t_0 v at t_0 = 1
    np.testing.assert_allclose(x_1.numpy(), ((1 - levels[1]) * x0_hat + levels[1] * fresh).numpy(),
                               rtol=1e-5, atol=1e-6)
    # sampling: the same rule, then the last step to 0 is the clean prediction
    paddle.seed(7)
    start = paddle.randn([1, 8, 16], dtype="float32")
    paddle.seed(8)
    sample = method.sample(start, tiny_batch(1).cond)
    paddle.seed(8)
    eps = paddle.randn([1, 8, 16], dtype="float32")
    student_cond = method.student_condition(tiny_batch(1).cond)
    with paddle.no_grad(), use_adapters(method.denoiser.transformer, "student"):
        x = (1 - levels[1]) * (start - method.denoiser(start, paddle.full([1], 1.0), student_cond)) + levels[1] * eps
        expected = x - levels[1] * method.denoiser(x, paddle.full([1], levels[1]), student_cond)
    np.testing.assert_allclose(sample.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    info = load_lora(tiny_denoiser(seed=9).transformer, method.export(str(tmp_path)), "student")
    assert info["sampling"]["sampler"] == "renoise"
    assert load_lora(tiny_denoiser(seed=9).transformer, _randomized().export(str(tmp_path / "e")),
                     "student")["sampling"]["sampler"] == "euler"
    with pytest.raises(ValueError, match="--dmd2_sampler"):
        DMD2Config(dmd2_sampler="ddim").validate()


def test_generator_diagnostics_by_hand():
    from types import SimpleNamespace

    from ppdiffusers_fast.methods.dmd2 import generator_diagnostics

    x0_hat = paddle.to_tensor([[1.0, 3.0]])
    out = SimpleNamespace(x0_real=paddle.to_tensor([[0.0, 1.0]]), x0_fake=paddle.to_tensor([[1.0, 0.0]]))
    got = generator_diagnostics(x0_hat, paddle.to_tensor([[0.0, 2.0]]), out)
    # gap = mean(|1|, |-1|) = 1; scale = mean(|1|, |2|) = 1.5; stds (unbiased) of [1, 3] and [0, 2]: sqrt(2)
    assert got["dmd_gap"] == pytest.approx(1.0) and got["dmd_gap_relative"] == pytest.approx(1 / 1.5, rel=1e-6)
    assert got["x0_hat_std"] == pytest.approx(2 ** 0.5, rel=1e-6) and got["data_std"] == pytest.approx(2 ** 0.5)
    assert got["x0_hat_mean"] == pytest.approx(2.0)


def test_fake_score_rank_keeps_the_students_scale():
    from ppdiffusers_fast.methods.distribution_matching import fake_score_lora
    from ppdiffusers_fast.models.lora import LoraConfig, layers_with_adapter

    student = LoraConfig(rank=16, alpha=8.0)
    wide = fake_score_lora(student, 64)
    assert (wide.rank, wide.alpha, wide.alpha / wide.rank) == (64, 32.0, 0.5)
    assert fake_score_lora(student, None) is student
    method = DMD2(tiny_denoiser(), TINY_LORA, tiny_schedule(), DistributionMatchingConfig(dmd_fake_score_rank=6),
                  AdversarialConfig(adv_head_channels=8), DMD2Config())
    for _, layer in layers_with_adapter(method.denoiser.transformer, FAKE_SCORE_ADAPTER):
        assert layer.lora_adapters[FAKE_SCORE_ADAPTER].lora_A.shape[1] == 6
        assert layer.lora_adapters["student"].lora_A.shape[1] == TINY_LORA.rank
    with pytest.raises(ValueError, match="--dmd_fake_score_rank"):
        DistributionMatchingConfig(dmd_fake_score_rank=0).validate()


def test_generator_ema_is_updated_on_generator_steps_and_exported(tmp_path):
    from ppdiffusers_fast.methods.base import STUDENT_EMA
    from ppdiffusers_fast.models.lora import adapter_parameters

    method = tiny_dmd2(dmd2_ema_decay=0.75)
    transformer = method.denoiser.transformer
    student, ema = adapter_parameters(transformer, "student"), adapter_parameters(transformer, STUDENT_EMA)
    assert all(np.array_equal(s.numpy(), e.numpy()) for s, e in zip(student, ema))
    assert all(e.stop_gradient for e in ema) and not any(id(e) in {id(p) for g in method.parameter_groups().values()
                                                                    for p in g} for e in ema)
    assert len(method.extra_checkpoint_tensors()) == len(ema)
    start = ema[0].numpy().copy()
    with paddle.no_grad():
        student[0].set_value(paddle.full(student[0].shape, 2.0))
    method.after_update(1, ["fake_score", "discriminator"])  # no generator update: unchanged
    np.testing.assert_array_equal(ema[0].numpy(), start)
    method.after_update(0, ["generator", "fake_score"])
    np.testing.assert_allclose(ema[0].numpy(), 0.75 * start + 0.25 * 2.0, rtol=1e-6)
    info = load_lora(tiny_denoiser(seed=9).transformer, method.export(str(tmp_path)), "student")
    assert info["sampling"]["num_inference_steps"] == 2
    fresh = tiny_denoiser(seed=9).transformer
    load_lora(fresh, str(tmp_path / "dmd2_lora.safetensors"), "student")
    np.testing.assert_allclose(adapter_parameters(fresh, "student")[0].numpy(), ema[0].numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="--dmd2_ema_decay"):
        DMD2Config(dmd2_ema_decay=1.0).validate()
