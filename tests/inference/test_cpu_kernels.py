"""The project's fused CPU kernels (cpu_kernels.cc) against numpy, and the graph rewrites that insert them."""
import numpy as np
import paddle
import pytest

from ppdiffusers_fast.inference import cpu_graph, cpu_kernels, kernel_fusions
from ppdiffusers_fast.inference.compile import build_predictor
from ppdiffusers_fast.models.flux_embeddings import apply_rope, pair_rotation_matrix
from ppdiffusers_fast.models.flux_layers import layer_norm_no_affine
from saved_programs import op_names, run_saved, save_layer
from tiny_models import tiny_flux, tiny_flux_inputs


@pytest.fixture(scope="module")
def kernels():
    module = cpu_kernels.load_cpu_kernels()
    if module is None:
        pytest.skip(f"kernels unavailable: {cpu_kernels.cpu_kernels_unavailable_reason()}")
    return module


def rng_arrays(*shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for shape in shapes]


def numpy_rope(x, cos, sin):
    """``x [B, L, H, D]``, tables ``[L, D]``: pairs rotated in float32, operation by operation."""
    out = np.empty_like(x)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out[..., 0::2] = x[..., 0::2] * c[..., 0::2] - x[..., 1::2] * s[..., 0::2]
    out[..., 1::2] = x[..., 1::2] * c[..., 1::2] + x[..., 0::2] * s[..., 1::2]
    return out


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale_batch", [3, 1])
def test_layer_norm_modulate_matches_numpy(kernels, scale_batch):
    x, scale, shift = rng_arrays([3, 5, 40], [scale_batch, 1, 40], [3, 1, 40])  # 40: 2 lanes of 16 and a tail
    x = x * 3 + 1
    x64 = x.astype(np.float64)
    normed = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-6)
    expected = normed * scale + shift
    got = kernels.flux_layer_norm_modulate(*map(paddle.to_tensor, (x, scale, shift)), 1e-6).numpy()
    assert np.abs(got - expected).max() <= 2e-6


def test_gated_residual_rounds_like_the_separate_ops(kernels):
    residual, gate, y = rng_arrays([2, 7, 24], [2, 1, 24], [2, 7, 24])
    got = kernels.flux_gated_residual(*map(paddle.to_tensor, (residual, gate, y))).numpy()
    np.testing.assert_array_equal(got, residual + gate * y)


def test_rope_matches_numpy_and_the_model_exactly(kernels):
    x, cos, sin = rng_arrays([2, 5, 3, 8], [5, 8], [5, 8])
    got = kernels.flux_rope(paddle.to_tensor(x), paddle.to_tensor(cos[None, :, None]),
                            paddle.to_tensor(sin[None, :, None])).numpy()
    np.testing.assert_array_equal(got, numpy_rope(x, cos, sin))
    model = apply_rope(paddle.to_tensor(x), paddle.to_tensor(cos), paddle.to_tensor(sin)).numpy()
    np.testing.assert_array_equal(got, model)


def test_rope_pack_qkv_matches_concat_rope_stack(kernels):
    q_txt, k_txt, v_txt = rng_arrays([2, 3, 2, 8], [2, 3, 2, 8], [2, 3, 2, 8], seed=1)
    q_img, k_img, v_img = rng_arrays([2, 4, 2, 8], [2, 4, 2, 8], [2, 4, 2, 8], seed=2)
    cos, sin = rng_arrays([7, 8], [7, 8], seed=3)
    tensors = [paddle.to_tensor(a) for a in (q_txt, q_img, k_txt, k_img, v_txt, v_img)]
    got = kernels.flux_rope_pack_qkv(tensors[0:2], tensors[2:4], tensors[4:6], paddle.to_tensor(cos[None, :, None]),
                                     paddle.to_tensor(sin[None, :, None])).numpy()
    q, k, v = (np.concatenate(pair, 1) for pair in ((q_txt, q_img), (k_txt, k_img), (v_txt, v_img)))
    expected = np.stack([numpy_rope(q, cos, sin), numpy_rope(k, cos, sin), v], axis=2)
    assert got.shape == (2, 7, 3, 2, 8)
    np.testing.assert_array_equal(got, expected)


def test_kernels_name_the_wrong_shapes(kernels):
    x = paddle.zeros([2, 5, 3, 8])
    with pytest.raises(Exception, match=r"cos and sin must be \[1, 5, 1, 8\], got \[5, 8\]"):
        kernels.flux_rope(x, paddle.zeros([5, 8]), paddle.zeros([5, 8]))
    with pytest.raises(Exception, match=r"scale must be \[2, 1, 6\] \(or batch 1\), got \[2, 2, 6\]"):
        kernels.flux_layer_norm_modulate(paddle.zeros([2, 4, 6]), paddle.zeros([2, 2, 6]), paddle.zeros([2, 1, 6]),
                                         1e-6)
    same_shape = r"residual and y must be the same \[B, L, C\], got \[2, 4, 6\] and \[2, 1, 6\]"
    with pytest.raises(Exception, match=same_shape):
        kernels.flux_gated_residual(paddle.zeros([2, 4, 6]), paddle.zeros([2, 1, 6]), paddle.zeros([2, 1, 6]))
    with pytest.raises(Exception, match=r"part 0 must be \[1, L, 3, 8\] in q, k and v alike, got \[1, 4, 3, 8\]"):
        kernels.flux_rope_pack_qkv([paddle.zeros([1, 5, 3, 8])], [paddle.zeros([1, 4, 3, 8])],
                                   [paddle.zeros([1, 5, 3, 8])], paddle.zeros([1, 5, 1, 8]), paddle.zeros([1, 5, 1, 8]))


# ----------------------------------------------------------------------------------------------------------------
# Graph rewrites
# ----------------------------------------------------------------------------------------------------------------


class ModulatedBlock(paddle.nn.Layer):
    """The three FLUX patterns on small tensors: adaLN modulation, a gated residual and a rotary embedding.

    ``forward(x [B, L, C], temb [B, C], q [B, L, H, D], cos [L, D], sin [L, D])`` -> ``[B, L, C + H * D]``."""

    def __init__(self, channels, rotation=None):
        super().__init__()
        self.linear = paddle.nn.Linear(channels, 3 * channels)
        self.rotation = rotation

    def forward(self, x, temb, q, cos, sin):
        shift, scale, gate = paddle.chunk(self.linear(temb), 3, axis=1)
        modulated = layer_norm_no_affine(x) * (1 + scale[:, None]) + shift[:, None]
        x = x + gate[:, None] * modulated
        if self.rotation is None:
            rotated = apply_rope(q, cos, sin)
        else:  # same arithmetic with another constant matrix: must stay unfused
            rotated = q * cos[None, :, None] + paddle.matmul(q, paddle.to_tensor(self.rotation)) * sin[None, :, None]
        return paddle.concat([x, rotated.reshape([0, 0, -1])], axis=2)


def block_specs(channels, heads, dim):
    spec = paddle.static.InputSpec
    return [spec([None, None, channels], "float32", "x"), spec([None, channels], "float32", "temb"),
            spec([None, None, heads, dim], "float32", "q"), spec([None, dim], "float32", "cos"),
            spec([None, dim], "float32", "sin")]


def block_arrays(batch, length, channels=12, heads=2, dim=8, seed=0):
    return rng_arrays([batch, length, channels], [batch, channels], [batch, length, heads, dim], [length, dim],
                      [length, dim], seed=seed)


def test_fusions_keep_the_block_values(kernels, tmp_path):
    paddle.seed(1)
    block = ModulatedBlock(12)
    prefix = save_layer(block, block_specs(12, 2, 8), tmp_path)
    model_file = prefix.with_suffix(".json")
    counts = kernel_fusions.fuse_with_cpu_kernels(model_file)
    assert counts == {"layer_norm_modulate": 1, "gated_residual": 1, "rope": 1, "rope_pack_qkv": 0}
    names = op_names(model_file)
    assert "pd_op.layer_norm" not in names and "pd_op.matmul" in names  # the rotation product is gone:
    assert names.count("pd_op.matmul") == 1  # only the linear layer's is left
    for batch, length in [(2, 5), (1, 1), (3, 9)]:
        arrays = block_arrays(batch, length, seed=batch)
        with paddle.no_grad():
            expected = block(*map(paddle.to_tensor, arrays)).numpy()
        assert np.abs(run_saved(prefix, arrays) - expected).max() <= 1e-5


def test_look_alikes_are_left_unfused(kernels, tmp_path):
    """A rotation by another constant matrix is not the rotary embedding; a gate that is a full tensor is not a
    [B, 1, C] gate; a LayerNorm with weights is not adaLN's."""

    class LookAlikes(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.norm = paddle.nn.LayerNorm(12)

        def forward(self, x, gate, q, cos, sin):
            x = self.norm(x) * (1 + gate[:, :1]) + gate[:, :1]
            x = x + gate * x
            turned = paddle.matmul(q, paddle.to_tensor(np.eye(8, dtype=np.float32)))
            rotated = q * cos[None, :, None] + turned * sin[None, :, None]
            return paddle.concat([x, rotated.reshape([0, 0, -1])], axis=2)

    spec = paddle.static.InputSpec
    specs = [spec([None, None, 12], "float32", "x"), spec([None, None, 12], "float32", "gate"),
             spec([None, None, 2, 8], "float32", "q"), spec([None, 8], "float32", "cos"),
             spec([None, 8], "float32", "sin")]
    prefix = save_layer(LookAlikes(), specs, tmp_path)
    before = prefix.with_suffix(".json").read_bytes()
    assert set(kernel_fusions.fuse_with_cpu_kernels(prefix.with_suffix(".json")).values()) == {0}
    assert prefix.with_suffix(".json").read_bytes() == before


def test_the_pair_rotation_check_reads_the_constant(kernels, tmp_path):
    """Same graph as the model's rotary embedding but a sign flipped in R: not fused."""
    rotation = pair_rotation_matrix(8)
    rotation[1, 0] = 1.0
    prefix = save_layer(ModulatedBlock(12, rotation=rotation), block_specs(12, 2, 8), tmp_path)
    assert kernel_fusions.fuse_rope(prefix.with_suffix(".json")) == 0
    correct = save_layer(ModulatedBlock(12, rotation=pair_rotation_matrix(8)), block_specs(12, 2, 8), tmp_path,
                         "correct")
    assert kernel_fusions.fuse_rope(correct.with_suffix(".json")) == 1


def test_without_kernels_nothing_is_fused_and_the_predictor_still_matches(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernels, "_state", {"loaded": True, "module": None, "reason": "turned off for a test"})
    model = tiny_flux(5, in_channels=64)
    model.eval()
    predictor = build_predictor(model, tmp_path)
    assert all(predictor.rewrites[name] == 0 for name in kernel_fusions.KERNEL_FUSIONS)
    assert predictor.rewrites["expanded"] > 0  # the broadcasts are expanded instead
    args = tiny_flux_inputs(2, 2, 3, 4, in_channels=64)
    with paddle.no_grad():
        assert np.abs(predictor(**args).sample.numpy() - model(**args).sample.numpy()).max() <= 1e-4


def test_turning_the_kernels_off_by_environment(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_state", {"loaded": False, "module": None, "reason": None})
    monkeypatch.setenv("PPDIFFUSERS_FAST_CPU_KERNELS", "0")
    assert cpu_kernels.load_cpu_kernels() is None
    assert "PPDIFFUSERS_FAST_CPU_KERNELS=0" in cpu_kernels.cpu_kernels_unavailable_reason()


# ----------------------------------------------------------------------------------------------------------------
# In-place reshapes
# ----------------------------------------------------------------------------------------------------------------


def test_reshape_in_place_only_where_the_input_dies(tmp_path):
    class Reshapes(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.linear = paddle.nn.Linear(8, 8)

        def forward(self, x):
            dies = self.linear(x).reshape([0, 0, 2, 4])  # in place
            kept = x * 2.0
            read_twice = kept.reshape([0, 0, 2, 4])  # `kept` is read again below: copied
            from_input = x.reshape([0, 0, 2, 4])  # a graph input: copied
            return dies + read_twice + from_input + kept.reshape([0, 0, 2, 4])

    layer = Reshapes()
    prefix = save_layer(layer, [paddle.static.InputSpec([None, None, 8], "float32", "x")], tmp_path)
    assert cpu_graph.reshape_in_place(prefix.with_suffix(".json")) == 1
    names = op_names(prefix.with_suffix(".json"))
    assert names.count("pd_op.reshape_") == 1 and names.count("pd_op.reshape") == 3
    (x,) = rng_arrays([2, 3, 8])
    with paddle.no_grad():
        expected = layer(paddle.to_tensor(x)).numpy()
    np.testing.assert_allclose(run_saved(prefix, [x]), expected, rtol=0, atol=1e-6)
