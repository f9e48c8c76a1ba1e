"""Adversarial component: heads per block, frozen backbone with no adapter live, gradient isolation,
exact re-noising, hinge losses against values computed by hand from the same logits."""
import math

import numpy as np
import paddle
import pytest
from lightning_toys import (HEAD_CHANNELS, base_parameters, clear_gradients, has_gradient, randomize_adapters,
                            student_denoiser, tiny_batch, tiny_denoiser, tiny_flux)

from ppdiffusers_fast.methods.adversarial import AdversarialConfig, AdversarialLearning, latent_grid_hw
from ppdiffusers_fast.methods.base import LatentBatch
from ppdiffusers_fast.models.lora import adapter_parameters, record_live_adapters, use_adapters
from ppdiffusers_fast.methods.denoiser import FluxDenoiser


def _setup(loss_type="hinge"):
    denoiser = student_denoiser()
    randomize_adapters(denoiser, ["student"])
    adversarial = AdversarialLearning(denoiser, AdversarialConfig(adv_head_channels=HEAD_CHANNELS,
                                                                  adv_loss_type=loss_type))
    batch = tiny_batch()
    cond = batch.cond.with_guidance(3.5)
    return denoiser, adversarial, batch, cond


def _student_sample(denoiser, batch, cond):
    """A fake sample with a graph into the student adapter."""
    sigma = paddle.full([batch.latents.shape[0]], 0.6)
    with use_adapters(denoiser.transformer, "student"):
        v = denoiser(batch.latents, sigma, cond)
    return batch.latents - 0.6 * v


@pytest.mark.parametrize("layers", [(1, 2), (2, 1)])
def test_one_head_per_transformer_block(layers):
    transformer = tiny_flux(guidance_embeds=False, num_layers=layers[0], num_single_layers=layers[1])
    adversarial = AdversarialLearning(FluxDenoiser(transformer), AdversarialConfig(adv_head_channels=HEAD_CHANNELS))
    assert len(adversarial.heads.heads) == sum(layers)
    assert adversarial.heads.heads[0].conv_in.weight.shape[1] == 32  # inner dim of the blocks


def test_backbone_runs_with_no_adapter_live_and_takes_no_gradient():
    denoiser, adversarial, batch, cond = _setup()
    fake = _student_sample(denoiser, batch, cond)
    r = paddle.to_tensor([0.3, 0.7])
    with record_live_adapters(denoiser.transformer) as live:
        out = adversarial.losses(batch.latents, fake, 0.0, r, cond, latent_grid_hw(batch))
    assert live == [(), ()]  # one pass for the fake side, one for the real side, base only
    student = adapter_parameters(denoiser.transformer, "student")
    heads = adversarial.trainable_parameters()

    out.generator.backward()
    assert has_gradient(student)
    assert all(p.grad is None for p in base_parameters(denoiser))
    clear_gradients(student + heads)

    out.discriminator.backward()
    assert has_gradient(heads)
    assert not has_gradient(student)
    assert all(p.grad is None for p in base_parameters(denoiser))


def test_discriminator_alone_builds_no_graph_into_the_student():
    denoiser, adversarial, batch, cond = _setup()
    fake = _student_sample(denoiser, batch, cond)
    out = adversarial.losses(batch.latents, fake, 0.0, paddle.to_tensor([0.5, 0.5]), cond, latent_grid_hw(batch),
                             generator=False, discriminator=True)
    assert out.generator is None
    out.discriminator.backward()
    assert has_gradient(adversarial.trainable_parameters())
    assert not has_gradient(adapter_parameters(denoiser.transformer, "student"))


def _exact_renoise(x, s, r, noise):
    s, r = s.reshape([-1, 1, 1]), r.reshape([-1, 1, 1])
    a = (1 - r) / (1 - s)
    return a * x + np.sqrt(r * r - a * a * s * s) * noise


@pytest.mark.parametrize("loss_type", ["hinge", "non_saturating"])
def test_losses_equal_hand_computed_values_with_the_exact_kernel(loss_type):
    denoiser, adversarial, batch, cond = _setup(loss_type)
    rng = np.random.RandomState(3)
    shape = batch.latents.shape
    real, fake = rng.randn(*shape).astype("float32"), rng.randn(*shape).astype("float32")
    real_noise, fake_noise = rng.randn(*shape).astype("float32"), rng.randn(*shape).astype("float32")
    level, r = np.array([0.2, 0.5], "float32"), np.array([0.45, 0.9], "float32")
    grid = latent_grid_hw(batch)
    out = adversarial.losses(paddle.to_tensor(real), paddle.to_tensor(fake), paddle.to_tensor(level),
                             paddle.to_tensor(r), cond, grid, real_noise=paddle.to_tensor(real_noise),
                             fake_noise=paddle.to_tensor(fake_noise))

    def logits_of(x):
        with paddle.no_grad():
            return [l.numpy() for l in adversarial.logits(paddle.to_tensor(x.astype("float32")), paddle.to_tensor(r),
                                                           cond, grid)]

    real_logits = logits_of(_exact_renoise(real, level, r, real_noise))
    fake_logits = logits_of(_exact_renoise(fake, level, r, fake_noise))
    expected_d = np.mean([np.maximum(0, 1 - lr).mean() + np.maximum(0, 1 + lf).mean()
                          for lr, lf in zip(real_logits, fake_logits)])
    if loss_type == "hinge":
        expected_g = np.mean([np.maximum(0, 1 - lf).mean() for lf in fake_logits])
    else:
        expected_g = -np.mean([lf.mean() for lf in fake_logits])
    np.testing.assert_allclose(out.discriminator.item(), expected_d, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.generator.item(), expected_g, rtol=1e-5, atol=1e-6)
    for got, want in zip(out.real_logits, real_logits):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)

    # the reference's kernel ((1 - r) x + (r - s) eps) / (1 - s) feeds the heads something else
    s_, r_ = level.reshape([-1, 1, 1]), r.reshape([-1, 1, 1])
    reference = logits_of(((1 - r_) * fake + (r_ - s_) * fake_noise) / (1 - s_))
    assert max(np.abs(a - b).max() for a, b in zip(reference, fake_logits)) > 1e-3


def test_exact_kernel_keeps_the_marginal_noise_level():
    # x_s of a zero image has noise std s; re-noised to r it must have std r (0.75), not the reference's 0.56
    denoiser, adversarial, batch, cond = _setup()
    captured = []
    adversarial.backbone_features = lambda x_r, r, c: captured.append(x_r) or [paddle.zeros([x_r.shape[0], 8, 32])] * 3
    paddle.seed(0)
    x_s = 0.5 * paddle.randn([2, 4096, 16])
    adversarial.losses(x_s, x_s, 0.5, paddle.to_tensor([0.75, 0.75]), cond, (2, 4), generator=False)
    stds = [x.std().item() for x in captured]
    assert all(abs(s - 0.75) < 0.01 for s in stds), stds


def test_logits_follow_a_non_square_latent_grid():
    denoiser, adversarial, batch, cond = _setup()
    assert latent_grid_hw(batch) == (2, 4)
    no_size = LatentBatch(batch.latents, batch.cond)  # grid read from the image rotary ids
    assert latent_grid_hw(no_size) == (2, 4)
    out = adversarial.losses(batch.latents, batch.latents, 0.0, paddle.to_tensor([0.5, 0.5]), cond, (2, 4))
    assert [list(l.shape) for l in out.fake_logits] == [[2, 1, 2, 4]] * 3
    with pytest.raises(ValueError, match="latent grid"):
        adversarial.losses(batch.latents, batch.latents, 0.0, paddle.to_tensor([0.5, 0.5]), cond, (4, 4))


def test_heads_optimizer_settings_and_config_checks():
    denoiser = tiny_denoiser()
    adversarial = AdversarialLearning(denoiser, AdversarialConfig(adv_head_channels=HEAD_CHANNELS))
    assert adversarial.optimizer_overrides() == {"learning_rate": 1e-5, "beta1": 0.0, "beta2": 0.999,
                                                 "max_grad_norm": 1.0}
    assert all(p.stop_gradient for p in denoiser.transformer.parameters())
    with pytest.raises(ValueError, match="adv_loss_type"):
        AdversarialConfig(adv_loss_type="wasserstein").validate()
    with pytest.raises(ValueError, match="generator loss, the discriminator loss or both"):
        adversarial.losses(paddle.zeros([1, 8, 16]), paddle.zeros([1, 8, 16]), 0.0, paddle.to_tensor([0.5]),
                           tiny_batch(1).cond.with_guidance(3.5), (2, 4), generator=False, discriminator=False)
    assert math.isclose(AdversarialConfig().adv_weight, 0.1)
