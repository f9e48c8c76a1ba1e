"""Every loss against numbers computed here with numpy (and a few by hand), on small fixed tensors."""
import math

import numpy as np
import paddle
import pytest

from ppdiffusers_fast.losses import (
    consistency_loss,
    dmd_direction,
    dmd_loss,
    flow_matching_loss,
    hinge_d_loss,
    hinge_g_loss,
    l2_loss,
    nonsaturating_g_loss,
    pseudo_huber_loss,
    reflow_jump,
    reflow_loss,
    reflow_start,
)

PRED = np.array([[0.0, 1.0, 2.0], [-1.0, 0.5, 3.0]], dtype=np.float32)
TARGET = np.array([[0.5, 1.0, 0.0], [0.0, 0.0, 3.0]], dtype=np.float32)


def t(array, grad=False):
    tensor = paddle.to_tensor(np.asarray(array, dtype=np.float32))
    tensor.stop_gradient = not grad
    return tensor


def rand(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# consistency
# ---------------------------------------------------------------------------------------------
def test_pseudo_huber_by_hand():
    # differences: -0.5, 0, 2, -1, 0.5, 0
    c = 0.001
    by_hand = (2 * (math.sqrt(0.25 + c * c) - c) + 2 * 0 + (math.sqrt(4 + c * c) - c) + (math.sqrt(1 + c * c) - c)) / 6
    assert pseudo_huber_loss(t(PRED), t(TARGET)).item() == pytest.approx(by_hand, rel=1e-6)
    assert consistency_loss(t(PRED), t(TARGET)).item() == pytest.approx(by_hand, rel=1e-6)
    c = 0.5
    diff = PRED.astype(np.float64) - TARGET
    expected = np.mean(np.sqrt(diff ** 2 + c ** 2) - c)
    loss = consistency_loss(t(PRED), t(TARGET), loss_type="huber", huber_c=c)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert loss.dtype == paddle.float32 and list(loss.shape) == []


def test_pseudo_huber_gradient():
    c = 0.1
    pred = t(PRED, grad=True)
    pseudo_huber_loss(pred, t(TARGET), huber_c=c).backward()
    diff = PRED.astype(np.float64) - TARGET
    np.testing.assert_allclose(pred.grad.numpy(), diff / np.sqrt(diff ** 2 + c ** 2) / diff.size, atol=1e-7)


def test_l2_by_hand():
    by_hand = (0.25 + 0 + 4 + 1 + 0.25 + 0) / 6
    assert l2_loss(t(PRED), t(TARGET)).item() == pytest.approx(by_hand, rel=1e-6)
    assert consistency_loss(t(PRED), t(TARGET), loss_type="l2").item() == pytest.approx(by_hand, rel=1e-6)


def test_consistency_loss_rejects_bad_arguments():
    with pytest.raises(ValueError, match="loss_type"):
        consistency_loss(t(PRED), t(TARGET), loss_type="l1")
    with pytest.raises(ValueError, match="huber_c"):
        consistency_loss(t(PRED), t(TARGET), huber_c=0.0)
    with pytest.raises(ValueError, match="same shape"):
        consistency_loss(t(PRED), t(TARGET[:, :2]))


# ---------------------------------------------------------------------------------------------
# flow matching
# ---------------------------------------------------------------------------------------------
def test_flow_matching_loss():
    v_pred, x0, eps = rand((2, 4, 3), 1), rand((2, 4, 3), 2), rand((2, 4, 3), 3)
    expected = np.mean((v_pred.astype(np.float64) - (eps - x0)) ** 2)
    assert flow_matching_loss(t(v_pred), t(x0), t(eps)).item() == pytest.approx(expected, rel=1e-6)
    # by hand: v = [1, 2], x0 = [0, 1], eps = [1, 1] -> target [1, 0], errors [0, 2] -> mean 2
    assert flow_matching_loss(t([[1.0, 2.0]]), t([[0.0, 1.0]]), t([[1.0, 1.0]])).item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="same shape"):
        flow_matching_loss(t(v_pred), t(x0[:1]), t(eps))


# ---------------------------------------------------------------------------------------------
# adversarial
# ---------------------------------------------------------------------------------------------
REAL = [np.array([[[[2.0, 0.5], [-0.5, 1.0]]]], dtype=np.float32),  # head 1: [1, 1, 2, 2]
        np.array([[[[0.0, 3.0, -2.0]]]], dtype=np.float32)]  # head 2: [1, 1, 1, 3]
FAKE = [np.array([[[[-2.0, -0.5], [0.5, 1.0]]]], dtype=np.float32),
        np.array([[[[1.0, -3.0, 0.0]]]], dtype=np.float32)]


def test_hinge_d_loss_by_hand():
    # head 1: relu(1 - real) = [0, .5, 1.5, 0] -> .5; relu(1 + fake) = [0, .5, 1.5, 2] -> 1.0
    # head 2: relu(1 - real) = [1, 0, 3] -> 4/3;     relu(1 + fake) = [2, 0, 1] -> 1.0
    by_hand = ((0.5 + 1.0) + (4 / 3 + 1.0)) / 2
    assert hinge_d_loss([t(r) for r in REAL], [t(f) for f in FAKE]).item() == pytest.approx(by_hand, rel=1e-6)
    expected = np.mean([np.mean(np.maximum(0, 1 - r)) + np.mean(np.maximum(0, 1 + f)) for r, f in zip(REAL, FAKE)])
    assert hinge_d_loss([t(r) for r in REAL], [t(f) for f in FAKE]).item() == pytest.approx(expected, rel=1e-6)
    # a single tensor is one head
    assert hinge_d_loss(t(REAL[0]), t(FAKE[0])).item() == pytest.approx(1.5, rel=1e-6)


def test_generator_losses_by_hand():
    # hinge: head 1 relu(1 - fake) = [3, 1.5, .5, 0] -> 1.25; head 2 = [0, 4, 1] -> 5/3
    assert hinge_g_loss([t(f) for f in FAKE]).item() == pytest.approx((1.25 + 5 / 3) / 2, rel=1e-6)
    # non-saturating linear: -(mean fake): head 1 mean -0.25, head 2 mean -2/3
    assert nonsaturating_g_loss([t(f) for f in FAKE]).item() == pytest.approx(-(-0.25 - 2 / 3) / 2, rel=1e-6)
    expected = np.mean([np.mean(np.maximum(0, 1 - f)) for f in FAKE])
    assert hinge_g_loss([t(f) for f in FAKE]).item() == pytest.approx(expected, rel=1e-6)


def test_generator_loss_gradient_reaches_only_fake_logits():
    fake = t(FAKE[0], grad=True)
    nonsaturating_g_loss([fake]).backward()
    np.testing.assert_allclose(fake.grad.numpy(), np.full(FAKE[0].shape, -1 / FAKE[0].size), atol=1e-7)


def test_adversarial_losses_reject_bad_arguments():
    with pytest.raises(ValueError, match="heads"):
        hinge_d_loss([t(REAL[0])], [t(FAKE[0]), t(FAKE[1])])
    with pytest.raises(ValueError, match="same shape"):
        hinge_d_loss([t(REAL[0])], [t(FAKE[1])])
    with pytest.raises(ValueError, match="empty"):
        hinge_g_loss([])


# ---------------------------------------------------------------------------------------------
# distribution matching
# ---------------------------------------------------------------------------------------------
def test_dmd_loss_value_direction_and_gradient():
    x0_hat, x0_real, x0_fake = rand((2, 3, 4), 4), rand((2, 3, 4), 5), rand((2, 3, 4), 6)
    norm = np.mean(np.abs(x0_hat.astype(np.float64) - x0_real), axis=(1, 2), keepdims=True)
    g = (x0_fake.astype(np.float64) - x0_real) / norm
    expected_loss = 0.5 * np.mean((x0_hat - (x0_hat - g)) ** 2)  # = 0.5 * mean(g^2)

    hat, real, fake = t(x0_hat, grad=True), t(x0_real, grad=True), t(x0_fake, grad=True)
    np.testing.assert_allclose(dmd_direction(hat, real, fake).numpy(), g, rtol=1e-5)
    loss = dmd_loss(hat, real, fake)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-5)
    loss.backward()
    np.testing.assert_allclose(hat.grad.numpy(), g / g.size, rtol=1e-5, atol=1e-9)
    assert real.grad is None and fake.grad is None  # g is a stop-gradient direction


def test_dmd_loss_by_hand():
    # one sample: x0_hat = [1, 3], x0_real = [0, 1] -> norm = (1 + 2) / 2 = 1.5
    # x0_fake = [1.5, -2] -> g = ([1.5, -3]) / 1.5 = [1, -2] -> loss = 0.5 * (1 + 4) / 2 = 1.25
    loss = dmd_loss(t([[1.0, 3.0]]), t([[0.0, 1.0]]), t([[1.5, -2.0]]))
    assert loss.item() == pytest.approx(1.25, rel=1e-6)


def test_dmd_loss_is_finite_when_the_normaliser_vanishes():
    x = t(rand((2, 5), 7))
    assert dmd_loss(x, x, x).item() == 0.0
    assert np.isfinite(dmd_loss(x, x, x + 1e-3).item())
    with pytest.raises(ValueError, match="same shape"):
        dmd_loss(x, x, t(rand((2, 4), 8)))
    with pytest.raises(ValueError, match="non-batch"):
        dmd_loss(t([1.0, 2.0]), t([1.0, 2.0]), t([1.0, 2.0]))


# ---------------------------------------------------------------------------------------------
# reflow
# ---------------------------------------------------------------------------------------------
def test_reflow_start_jump_and_loss():
    x_end, noise, velocity = rand((2, 3, 2), 9), rand((2, 3, 2), 10), rand((2, 3, 2), 11)
    edge = np.array([0.25, 0.0], dtype=np.float32)
    r = np.array([0.6, 0.3], dtype=np.float32)
    a = (1 - r) / (1 - edge)
    std = np.sqrt(r * r - a * a * edge * edge)
    x_r_expected = a[:, None, None] * x_end + std[:, None, None] * noise
    jump_expected = x_r_expected + (edge - r)[:, None, None] * velocity
    diff = jump_expected.astype(np.float64) - x_end
    loss_expected = np.mean(np.sqrt(diff ** 2 + 0.001 ** 2) - 0.001)

    end = t(x_end, grad=True)
    x_r = reflow_start(end, t(edge), t(r), t(noise))
    np.testing.assert_allclose(x_r.numpy(), x_r_expected, atol=1e-6)
    assert x_r.stop_gradient  # the start is built from the detached phase end
    vel = t(velocity, grad=True)
    jump = reflow_jump(x_r, t(r), t(edge), vel)
    np.testing.assert_allclose(jump.numpy(), jump_expected, atol=1e-6)
    loss = reflow_loss(jump, end)
    assert loss.item() == pytest.approx(loss_expected, rel=1e-5)
    loss.backward()
    assert end.grad is None and vel.grad is not None
    assert reflow_loss(jump, end, loss_type="l2").item() == pytest.approx(np.mean(diff ** 2), rel=1e-5)


def test_reflow_start_rejects_a_level_below_the_edge():
    x = t(rand((1, 4), 12))
    with pytest.raises(ValueError, match="r >= s"):
        reflow_start(x, 0.5, 0.25, x)
