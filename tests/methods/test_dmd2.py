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
