"""Discriminator heads: grid layout and the head's arithmetic against a numpy re-computation."""
import numpy as np
import paddle
import pytest

from ppdiffusers_fast.models.discriminator import DiscriminatorHead, FluxDiscriminatorHeads, tokens_to_grid


def _numpy_group_norm(x, groups, weight, bias, eps=1e-5):
    batch, channels, height, width = x.shape
    grouped = x.reshape(batch, groups, -1)
    mean = grouped.mean(axis=2, keepdims=True)
    var = grouped.var(axis=2, keepdims=True)
    normed = ((grouped - mean) / np.sqrt(var + eps)).reshape(batch, channels, height, width)
    return normed * weight[None, :, None, None] + bias[None, :, None, None]


def _numpy_conv1x1(x, conv):
    weight = conv.weight.numpy()[:, :, 0, 0]  # [out, in]
    return np.einsum("oi,bihw->bohw", weight, x) + conv.bias.numpy()[None, :, None, None]


def _leaky(x, slope=0.2):
    return np.where(x > 0, x, slope * x)


def test_tokens_to_grid_is_row_major_on_a_non_square_grid():
    batch, height, width, channels = 2, 3, 5, 4
    grid = np.random.randn(batch, channels, height, width).astype("float32")
    tokens = grid.transpose(0, 2, 3, 1).reshape(batch, height * width, channels)
    out = tokens_to_grid(paddle.to_tensor(tokens), (height, width)).numpy()
    np.testing.assert_array_equal(out, grid)
    # token (row 1, col 4) sits at index 1 * width + 4
    np.testing.assert_array_equal(out[:, :, 1, 4], tokens[:, 1 * width + 4, :])


def test_tokens_to_grid_rejects_a_wrong_grid():
    with pytest.raises(ValueError, match="15 image tokens.*4x4"):
        tokens_to_grid(paddle.zeros([1, 15, 8]), (4, 4))


def test_head_matches_numpy_recomputation():
    head = DiscriminatorHead(in_channels=12, hidden_channels=64)
    for parameter in head.parameters():  # non-trivial norm affine parameters
        parameter.set_value(paddle.randn(parameter.shape) * 0.5)
    features = np.random.randn(2, 3 * 4, 12).astype("float32")
    logits = head(paddle.to_tensor(features), (3, 4)).numpy()

    x = features.reshape(2, 3, 4, 12).transpose(0, 3, 1, 2)
    y1 = _leaky(_numpy_group_norm(_numpy_conv1x1(x, head.conv_in), 32, head.norm_in.weight.numpy(), head.norm_in.bias.numpy()))
    y2 = y1 + _leaky(_numpy_group_norm(_numpy_conv1x1(y1, head.conv_mid), 32, head.norm_mid.weight.numpy(), head.norm_mid.bias.numpy()))
    expected = _numpy_conv1x1(y2, head.conv_out)
    assert logits.shape == (2, 1, 3, 4)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_heads_count_and_feature_count_must_agree():
    heads = FluxDiscriminatorHeads(num_blocks=3, in_channels=8, hidden_channels=16)
    features = [paddle.randn([1, 6, 8]) for _ in range(3)]
    logits = heads(features, (2, 3))
    assert [tuple(map(int, l.shape)) for l in logits] == [(1, 1, 2, 3)] * 3
    with pytest.raises(ValueError, match="2 block feature maps for 3"):
        heads(features[:2], (2, 3))
