"""models/ops.py: the addmm linear, expanded modulation and gates against the plain expressions (numpy)."""
import numpy as np
import paddle

from ppdiffusers_fast.models.ops import Linear, gated_add, linear, modulate


def test_linear_equals_matmul_plus_bias_and_its_gradients():
    rng = np.random.default_rng(0)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ([2, 5, 3], [3, 4], [4]))
    xt, wt, bt = (paddle.to_tensor(a, stop_gradient=False) for a in (x, w, b))
    out = linear(xt, wt, bt)
    assert out.shape == [2, 5, 4]
    np.testing.assert_allclose(out.numpy(), x @ w + b, rtol=1e-6, atol=1e-6)
    (out * paddle.to_tensor(np.arange(40, dtype=np.float32).reshape(2, 5, 4))).sum().backward()
    upstream = np.arange(40, dtype=np.float32).reshape(2, 5, 4)
    np.testing.assert_allclose(bt.grad.numpy(), upstream.sum((0, 1)), rtol=1e-6)
    np.testing.assert_allclose(wt.grad.numpy(), np.einsum("bli,blo->io", x, upstream), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(xt.grad.numpy(), upstream @ w.T, rtol=1e-5, atol=1e-5)


def test_linear_layer_keeps_nn_linear_parameters():
    layer = Linear(3, 4)
    assert isinstance(layer, paddle.nn.Linear) and layer.weight.shape == [3, 4] and layer.bias.shape == [4]
    x = paddle.randn([7, 3])
    np.testing.assert_allclose(layer(x).numpy(), x.numpy() @ layer.weight.numpy() + layer.bias.numpy(), atol=1e-6)
    no_bias = Linear(3, 4, bias_attr=False)
    np.testing.assert_allclose(no_bias(x).numpy(), x.numpy() @ no_bias.weight.numpy(), atol=1e-6)


def test_modulation_and_gate_equal_the_broadcast_expressions_exactly():
    rng = np.random.default_rng(1)
    x, y = (rng.standard_normal([2, 6, 4]).astype(np.float32) for _ in range(2))
    scale, shift, gate = (rng.standard_normal([2, 4]).astype(np.float32) for _ in range(3))
    t = paddle.to_tensor
    np.testing.assert_array_equal(modulate(t(x), t(scale), t(shift)).numpy(),
                                  x * (1 + scale[:, None]) + shift[:, None])
    np.testing.assert_array_equal(gated_add(t(x), t(gate), t(y)).numpy(), x + gate[:, None] * y)


def test_linear_with_a_frozen_bias_gives_the_input_gradient_and_leaves_the_bias_alone():
    rng = np.random.default_rng(2)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ([6, 3], [3, 4], [4]))
    xt = paddle.to_tensor(x, stop_gradient=False)
    wt, bt = paddle.to_tensor(w), paddle.to_tensor(b)  # frozen, as a LoRA base layer
    out = linear(xt, wt, bt)
    (out * out).sum().backward()
    np.testing.assert_allclose(xt.grad.numpy(), (2 * (x @ w + b)) @ w.T, rtol=1e-5, atol=1e-5)
    assert bt.grad is None and wt.grad is None


def test_dense_results_turns_strided_views_off_inside_and_restores_the_flag():
    from ppdiffusers_fast.models.ops import dense_results

    flag = "FLAGS_use_stride_kernel"
    before = paddle.get_flags([flag])[flag]
    x = paddle.arange(24, dtype="float32").reshape([2, 3, 4])
    with dense_results():
        assert paddle.get_flags([flag])[flag] is False
        inside = x.transpose([0, 2, 1])
        assert inside.is_contiguous()
    assert paddle.get_flags([flag])[flag] == before
    np.testing.assert_array_equal(inside.numpy(), x.numpy().transpose(0, 2, 1))
