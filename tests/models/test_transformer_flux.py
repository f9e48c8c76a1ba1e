"""FLUX transformer: parity with diffusers (fixtures from scripts/reference/make_transformer_fixtures.py),
block features, gradient checkpointing, rotary and timestep embeddings, LazyGuard parameter count."""
import json
import math

import numpy as np
import paddle
import pytest

from ppdiffusers_fast.models import flux_embeddings, flux_layers
from ppdiffusers_fast.models.transformer_flux import FluxTransformer2DModel, count_parameters
from ppdiffusers_fast.models.weights import load_flux_transformer

CASES = ["tiny_guidance", "tiny_no_guidance"]


def _case(fixtures_dir, name):
    folder = fixtures_dir / "transformer" / name
    return folder, dict(np.load(folder / "io.npz"))


def _run(model, io, **kwargs):
    guidance = paddle.to_tensor(io["guidance"]) if "guidance" in io else None
    with paddle.no_grad():
        return model(
            paddle.to_tensor(io["hidden_states"]), paddle.to_tensor(io["encoder_hidden_states"]),
            paddle.to_tensor(io["pooled_projections"]), paddle.to_tensor(io["timestep"]),
            paddle.to_tensor(io["img_ids"]), paddle.to_tensor(io["txt_ids"]), guidance=guidance, **kwargs,
        )


def _max_abs(a, b):
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


@pytest.fixture
def reference_time_frequencies(monkeypatch):
    """Use the float32 timestep frequencies torch computed, to compare models without exp's last-bit noise."""

    def install(io):
        table = io["time_frequencies"]
        monkeypatch.setattr(flux_embeddings, "timestep_frequencies", lambda *args, **kwargs: paddle.to_tensor(table))

    return install


@pytest.mark.parametrize("name", CASES)
def test_parity_with_diffusers_and_block_features(fixtures_dir, name, reference_time_frequencies):
    folder, io = _case(fixtures_dir, name)
    reference_time_frequencies(io)
    model = load_flux_transformer(folder / "transformer")
    config = model.config
    assert config.num_layers >= 2 and config.num_single_layers >= 2
    assert io["hidden_states"].shape[0] == 2 and io["img_ids"][:, 1].max() != io["img_ids"][:, 2].max()

    out = _run(model, io, return_block_features=True)
    assert _max_abs(out.sample.numpy(), io["sample"]) <= 1e-5

    features = out.block_features
    assert len(features) == config.num_layers + config.num_single_layers == io["block_features"].shape[0]
    for index, (ours, ref) in enumerate(zip(features, io["block_features"])):
        assert list(ours.shape) == [2, io["hidden_states"].shape[1], model.inner_dim]
        # residual-stream states grow to ~10 with these random weights: 1e-5 relative to their scale
        assert _max_abs(ours.numpy(), ref) <= 1e-5 * max(1.0, float(np.abs(ref).max())), f"block {index}"


@pytest.mark.parametrize("name", CASES)
def test_parity_with_own_timestep_frequencies(fixtures_dir, name):
    """Default path: frequencies correctly rounded; torch's float32 exp differs by <= 1 ulp at a few entries."""
    folder, io = _case(fixtures_dir, name)
    ours = flux_embeddings.timestep_frequencies(256).numpy()
    np.testing.assert_array_max_ulp(ours, io["time_frequencies"], maxulp=1)
    out = _run(load_flux_transformer(folder / "transformer"), io)
    # guidance * 1000 = 5000 turns a 1-ulp frequency difference into ~1e-4 rad; without guidance 1e-5 holds
    tolerance = 1e-4 if "guidance" in io else 1e-5
    assert _max_abs(out.sample.numpy(), io["sample"]) <= tolerance


def test_return_forms_and_input_errors(fixtures_dir):
    folder, io = _case(fixtures_dir, "tiny_guidance")
    model = load_flux_transformer(folder / "transformer")
    sample_only = _run(model, io, return_dict=False)
    assert isinstance(sample_only, tuple) and len(sample_only) == 1
    sample, features = _run(model, io, return_dict=False, return_block_features=True)
    assert len(features) == 4 and np.array_equal(sample.numpy(), sample_only[0].numpy())
    assert _run(model, io).block_features is None

    without_guidance = {k: v for k, v in io.items() if k != "guidance"}
    with pytest.raises(ValueError, match="guidance"):
        _run(model, without_guidance)
    bad = dict(io, hidden_states=io["hidden_states"][..., :8])
    with pytest.raises(ValueError, match="hidden_states"):
        _run(model, bad)
    bad_ids = dict(io, img_ids=io["img_ids"][:-1])
    with pytest.raises(ValueError, match="img_ids"):
        _run(model, bad_ids)


def test_rope_matches_formula():
    axes = [4, 4, 8]
    ids = np.array([[0, 0, 0], [1, 2, 3], [0, 5, 1], [2, 0, 7]], dtype=np.float32)
    cos, sin = flux_embeddings.rope_cos_sin(paddle.to_tensor(ids), axes, theta=10000.0)
    expected_angles = []
    for axis, dim in enumerate(axes):
        inv_freq = 1.0 / 10000.0 ** (np.arange(0, dim, 2) / dim)
        expected_angles.append(ids[:, axis : axis + 1] * inv_freq[None])
    angles = np.concatenate(expected_angles, axis=1)  # [L, D / 2]: one angle per channel pair
    np.testing.assert_allclose(cos.numpy(), np.cos(angles), atol=1e-7)
    np.testing.assert_allclose(sin.numpy(), np.sin(angles), atol=1e-7)

    x = np.random.randn(2, 4, 3, 16).astype(np.float32)
    rotations = flux_embeddings.rope_rotations(cos, sin, 2, 3)
    assert rotations.shape == [2, 4, 3, 8] and rotations.dtype == paddle.complex64
    rotated = flux_embeddings.apply_rope(paddle.to_tensor(x), rotations).numpy()
    pairs_in, pairs_out = x.reshape(2, 4, 3, 8, 2), rotated.reshape(2, 4, 3, 8, 2)
    a = angles.reshape(1, 4, 1, 8)
    np.testing.assert_allclose(pairs_out[..., 0], pairs_in[..., 0] * np.cos(a) - pairs_in[..., 1] * np.sin(a),
                               atol=1e-6)
    np.testing.assert_allclose(pairs_out[..., 1], pairs_in[..., 0] * np.sin(a) + pairs_in[..., 1] * np.cos(a),
                               atol=1e-6)


def test_rope_equals_the_reference_form_to_the_last_bit():
    """apply_rope against diffusers' ``x * cos + rot(x) * sin`` with the per-channel (repeated) tables, in numpy
    float32: the same float operations, so equal to the last bit."""
    x = (np.random.randn(2, 5, 3, 6) * 10).astype(np.float32)
    cos, sin = (np.random.randn(5, 3).astype(np.float32) for _ in range(2))
    rotated = np.stack([-x[..., 1::2], x[..., 0::2]], axis=-1).reshape(x.shape)
    cos_full, sin_full = np.repeat(cos, 2, axis=1), np.repeat(sin, 2, axis=1)
    expected = x * cos_full[None, :, None, :] + rotated * sin_full[None, :, None, :]
    rotations = flux_embeddings.rope_rotations(paddle.to_tensor(cos), paddle.to_tensor(sin), 2, 3)
    out = flux_embeddings.apply_rope(paddle.to_tensor(x), rotations).numpy()
    np.testing.assert_array_equal(out, expected)

    # the gradient is the inverse rotation of the upstream gradient (a rotation is orthogonal)
    x_t = paddle.to_tensor(x, stop_gradient=False)
    upstream = np.random.randn(*x.shape).astype(np.float32)
    (flux_embeddings.apply_rope(x_t, rotations) * paddle.to_tensor(upstream)).sum().backward()
    up = upstream.reshape(2, 5, 3, 3, 2)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    expected_grad = np.stack([up[..., 0] * c + up[..., 1] * s, up[..., 1] * c - up[..., 0] * s], -1)
    np.testing.assert_allclose(x_t.grad.numpy(), expected_grad.reshape(x.shape), rtol=1e-5, atol=1e-5)


def test_timestep_embedding_matches_formula():
    t = np.array([0.0, 250.0, 1000.0], dtype=np.float32)
    emb = flux_embeddings.sinusoidal_timestep_embedding(paddle.to_tensor(t), 8).numpy()
    freqs = np.exp(-math.log(10000.0) * np.arange(4) / 4)
    angles = t[:, None].astype(np.float64) * freqs[None]
    np.testing.assert_allclose(emb, np.concatenate([np.cos(angles), np.sin(angles)], axis=1), atol=2e-4)


def test_attention_matches_numpy():
    q, k, v = (np.random.randn(2, 5, 3, 4).astype(np.float32) for _ in range(3))
    out = flux_layers.attention(paddle.to_tensor(q), paddle.to_tensor(k), paddle.to_tensor(v)).numpy()
    scores = np.einsum("blhd,bmhd->bhlm", q, k) / 2.0
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    expected = np.einsum("bhlm,bmhd->blhd", probs, v).reshape(2, 5, 12)
    np.testing.assert_allclose(out, expected, atol=1e-6)
    # the written-out reference form agrees on layout and values
    written = flux_layers.attention_math(paddle.to_tensor(q), paddle.to_tensor(k), paddle.to_tensor(v)).numpy()
    np.testing.assert_allclose(written, expected, atol=1e-6)


def test_attention_in_chunks_equals_one_pass_forward_and_backward(monkeypatch):
    """Chunks of 2 (batch, head) pairs (3 chunks for 2 x 3 pairs, the last one shorter) against
    F.scaled_dot_product_attention in one pass: same values and the same input gradients."""
    monkeypatch.setattr(flux_layers, "SCORE_CHUNK_BYTES", 2 * 4 * 5 * 5)
    arrays = [np.random.randn(2, 5, 3, 4).astype(np.float32) for _ in range(3)]
    upstream = paddle.to_tensor(np.random.randn(2, 5, 12).astype(np.float32))
    results = []
    for fn in (flux_layers.attention_in_chunks,
               lambda q, k, v: paddle.nn.functional.scaled_dot_product_attention(q, k, v).reshape([0, 0, 12])):
        inputs = [paddle.to_tensor(a, stop_gradient=False) for a in arrays]
        out = fn(*inputs)
        (out * upstream).sum().backward()
        results.append([out.numpy()] + [t.grad.numpy() for t in inputs])
    for mine, reference in zip(*results):
        np.testing.assert_allclose(mine, reference, rtol=1e-6, atol=1e-6)


def test_gradient_checkpointing_gives_equal_gradients(fixtures_dir, monkeypatch):
    from ppdiffusers_fast.models import transformer_flux

    recompute_calls = []
    real_recompute = transformer_flux.recompute

    def counting_recompute(block, *args, **kwargs):
        recompute_calls.append(type(block).__name__)
        return real_recompute(block, *args, **kwargs)

    monkeypatch.setattr(transformer_flux, "recompute", counting_recompute)
    folder, io = _case(fixtures_dir, "tiny_guidance")
    model = load_flux_transformer(folder / "transformer")
    model.train()

    def gradients(checkpointing):
        if checkpointing:
            model.enable_gradient_checkpointing()
        else:
            model.disable_gradient_checkpointing()
        model.clear_gradients()
        x = paddle.to_tensor(io["hidden_states"], stop_gradient=False)
        out = model(x, paddle.to_tensor(io["encoder_hidden_states"]), paddle.to_tensor(io["pooled_projections"]),
                    paddle.to_tensor(io["timestep"]), paddle.to_tensor(io["img_ids"]),
                    paddle.to_tensor(io["txt_ids"]), guidance=paddle.to_tensor(io["guidance"]),
                    return_block_features=True)
        loss = (out.sample ** 2).mean() + sum((f * 0.01).mean() for f in out.block_features)
        loss.backward()
        grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
        return loss.item(), x.grad.numpy().copy(), grads

    loss_plain, x_grad_plain, grads_plain = gradients(False)
    assert recompute_calls == []
    loss_ckpt, x_grad_ckpt, grads_ckpt = gradients(True)
    assert model.is_gradient_checkpointing
    assert recompute_calls == ["FluxTransformerBlock"] * 2 + ["FluxSingleTransformerBlock"] * 2
    assert loss_plain == loss_ckpt
    np.testing.assert_allclose(x_grad_ckpt, x_grad_plain, rtol=0, atol=1e-6)
    assert set(grads_plain) == set(grads_ckpt) and len(grads_plain) > 0
    for name in grads_plain:
        assert np.abs(grads_plain[name]).max() > 0, name
        np.testing.assert_allclose(grads_ckpt[name], grads_plain[name], rtol=0, atol=1e-6, err_msg=name)


def test_lazy_parameter_count_equals_diffusers(fixtures_dir):
    record = json.loads((fixtures_dir / "transformer" / "flux1_dev_param_count.json").read_text())
    with paddle.LazyGuard():
        dev = FluxTransformer2DModel(**record["config"])
        schnell = FluxTransformer2DModel(**dict(record["config"], guidance_embeds=False))
    assert count_parameters(dev) == record["diffusers_parameter_count"]
    assert count_parameters(schnell) == record["diffusers_parameter_count_without_guidance"]


def test_defaults_are_flux1_dev_shapes():
    with paddle.LazyGuard():
        model = FluxTransformer2DModel()
    assert len(model.transformer_blocks) == 19 and len(model.single_transformer_blocks) == 38
    assert model.inner_dim == 3072 and model.out_channels == 64
    assert model.time_text_embed.guidance_embedder is None
    shapes = {n: list(p.shape) for n, p in model.named_parameters()}
    assert shapes["x_embedder.weight"] == [64, 3072]
    assert shapes["context_embedder.weight"] == [4096, 3072]
    assert shapes["single_transformer_blocks.0.proj_out.weight"] == [3072 + 4 * 3072, 3072]
    assert shapes["transformer_blocks.0.attn.norm_added_q.weight"] == [128]


def test_gradient_checkpointing_with_frozen_base_still_reaches_inner_parameters(fixtures_dir):
    """Frozen inputs and a frozen base with one trainable inner weight (the LoRA situation)."""
    folder, io = _case(fixtures_dir, "tiny_guidance")
    model = load_flux_transformer(folder / "transformer")
    model.train()
    for name, param in model.named_parameters():
        param.stop_gradient = not name.startswith("single_transformer_blocks.0.attn.to_q")
    grads = []
    for checkpointing in (False, True):
        model.gradient_checkpointing = checkpointing
        model.clear_gradients()
        inputs = [paddle.to_tensor(io[k]) for k in ("hidden_states", "encoder_hidden_states", "pooled_projections",
                                                     "timestep", "img_ids", "txt_ids")]
        model(*inputs, guidance=paddle.to_tensor(io["guidance"])).sample.square().mean().backward()
        grads.append(model.single_transformer_blocks[0].attn.to_q.weight.grad.numpy().copy())
    assert np.abs(grads[0]).max() > 0
    np.testing.assert_allclose(grads[1], grads[0], rtol=0, atol=1e-7)
