"""CPU graph rewrites of the predictor (RMSNorm and attention fusion) and its bfloat16 option."""
import ctypes

import numpy as np
import paddle
import pytest

from ppdiffusers_fast.inference import cpu_graph
from ppdiffusers_fast.inference.compile import _OneDNNMathMode, bfloat16_available, build_predictor
from ppdiffusers_fast.models.flux_layers import RMSNorm, attention_math
from saved_programs import op_names, run_saved
from tiny_models import tiny_flux, tiny_flux_inputs


class NormThenAttention(paddle.nn.Layer):
    """``attention(RMSNorm_q(q), RMSNorm_k(k), v)`` on ``[B, L, H, D]``: both patterns the rewrites look for."""

    def __init__(self, head_dim):
        super().__init__()
        self.norm_q = RMSNorm(head_dim)
        self.norm_k = RMSNorm(head_dim)

    def forward(self, q, k, v):
        return attention_math(self.norm_q(q), self.norm_k(k), v)


def numpy_reference(q, k, v, weight_q, weight_k, eps=1e-6):
    def rms(x, w):
        return x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + eps) * w

    q, k = rms(q, weight_q), rms(k, weight_k)
    scores = np.einsum("blhd,bmhd->bhlm", q, k) / np.sqrt(q.shape[-1])
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhlm,bmhd->blhd", probs, v).reshape(q.shape[0], q.shape[1], -1)


@pytest.fixture(scope="module")
def saved_layer(tmp_path_factory):
    paddle.seed(3)
    layer = NormThenAttention(8)
    for norm in (layer.norm_q, layer.norm_k):
        norm.weight.set_value(paddle.rand([8]) + 0.5)
    spec = [paddle.static.InputSpec([None, None, 2, 8], "float32", name) for name in ("q", "k", "v")]
    prefix = tmp_path_factory.mktemp("layer") / "layer"
    paddle.jit.save(paddle.jit.to_static(layer, input_spec=spec, full_graph=True), str(prefix))
    weights = (layer.norm_q.weight.numpy(), layer.norm_k.weight.numpy())
    return prefix, weights


def test_rewrites_keep_the_values_computed_by_hand(saved_layer):
    prefix, (weight_q, weight_k) = saved_layer
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal([2, 5, 2, 8]).astype(np.float32) for _ in range(3)]
    expected = numpy_reference(*arrays, weight_q, weight_k)
    assert np.abs(run_saved(prefix, arrays) - expected).max() <= 1e-5  # the graph as saved

    assert cpu_graph.fuse_rms_norm(prefix.with_suffix(".json")) == 2
    names = op_names(prefix.with_suffix(".json"))
    assert "pd_op.rsqrt" not in names and "pd_op.mean" not in names
    assert np.abs(run_saved(prefix, arrays) - expected).max() <= 1e-5

    fused = cpu_graph.fuse_attention(prefix.with_suffix(".json"))
    if not cpu_graph.attention_fusion_available():
        assert fused == 0
        pytest.skip("no AVX-512: Paddle's fused CPU attention kernel is not used")
    assert fused == 1
    names = op_names(prefix.with_suffix(".json"))
    assert "pd_op.softmax" not in names and "pd_op.transpose" not in names
    assert names.count("pd_op.self_dp_attention") == 1
    for length in (5, 1, 13):  # dynamic token count
        arrays = [rng.standard_normal([1, length, 2, 8]).astype(np.float32) for _ in range(3)]
        expected = numpy_reference(*arrays, weight_q, weight_k)
        assert np.abs(run_saved(prefix, arrays) - expected).max() <= 1e-5


def test_rewrites_leave_other_programs_alone(tmp_path):
    """A product that only looks like an RMSNorm (no mean of squares) is not touched; .pdmodel files neither."""

    class NotANorm(paddle.nn.Layer):
        def forward(self, x, y):
            return x * paddle.rsqrt(paddle.mean(x * y, axis=-1, keepdim=True) + 1e-6) * paddle.ones([4])

    spec = [paddle.static.InputSpec([None, 4], "float32", name) for name in ("x", "y")]
    prefix = tmp_path / "other"
    paddle.jit.save(paddle.jit.to_static(NotANorm(), input_spec=spec, full_graph=True), str(prefix))
    before = prefix.with_suffix(".json").read_bytes()
    assert cpu_graph.fuse_rms_norm(prefix.with_suffix(".json")) == 0
    assert cpu_graph.fuse_attention(prefix.with_suffix(".json")) == 0
    assert prefix.with_suffix(".json").read_bytes() == before
    assert set(cpu_graph.rewrite_for_cpu(tmp_path / "missing.pdmodel").values()) == {0}


def transformer_args(batch, rows, cols, text_len):
    return tiny_flux_inputs(batch, rows, cols, text_len, in_channels=64)


@pytest.fixture(scope="module")
def model():
    model = tiny_flux(5, in_channels=64)
    model.eval()
    return model


def test_predictor_fuses_every_norm_and_attention_of_the_transformer(model, tmp_path):
    predictor = build_predictor(model, tmp_path)
    attentions = 3 if cpu_graph.attention_fusion_available() else 0
    assert predictor.rewrites["rms_norm"] == 4 + 2 * 2  # double block: q, k, added q, added k; 2 single: q, k
    assert predictor.rewrites["attention"] == attentions
    names = op_names(predictor.save_dir / "transformer.json")
    assert "pd_op.rsqrt" not in names and names.count("pd_op.self_dp_attention") == attentions
    with paddle.no_grad():
        for shape in [(2, 3, 4, 6), (1, 2, 2, 3)]:
            args = transformer_args(*shape)
            assert np.abs(predictor(**args).sample.numpy() - model(**args).sample.numpy()).max() <= 1e-4


def test_precision_is_checked(model):
    with pytest.raises(ValueError, match="precision must be one of"):
        build_predictor(model, precision="float16")
    with pytest.raises(ValueError, match="onednn=True"):
        build_predictor(model, onednn=False, precision="bfloat16")


def default_math_mode() -> int:
    mode = ctypes.c_int(-1)
    assert _OneDNNMathMode.library().dnnl_get_default_fpmath_mode(ctypes.byref(mode)) == 0
    return mode.value


@pytest.mark.skipif(not bfloat16_available(), reason="the CPU has no native bfloat16")
def test_bfloat16_predictor_is_close_and_leaves_float32_predictors_exact(model, tmp_path):
    exact = build_predictor(model, tmp_path / "fp32")
    fast = build_predictor(model, tmp_path / "bf16", precision="bfloat16")
    assert fast.precision == "bfloat16" and exact.precision == "float32"
    args = transformer_args(2, 4, 4, 8)
    with paddle.no_grad():
        expected = model(**args).sample.numpy()
        for _ in range(2):  # interleaved: the math mode of one never leaks into the other
            bf16_error = np.abs(fast(**args).sample.numpy() - expected).max() / np.abs(expected).max()
            assert default_math_mode() == 0
            assert np.abs(exact(**args).sample.numpy() - expected).max() <= 1e-4
            assert 1e-6 < bf16_error < 3e-2  # bfloat16 rounding (8 mantissa bits) in the matrix products
