"""Named LoRA adapters: forward math, live-adapter switching, gradients, merge, run-time scale, FLUX targets."""
import json

import numpy as np
import paddle
import paddle.nn as nn
import pytest

from ppdiffusers_fast.models.lora import (
    DEFAULT_TARGET_MODULES, LoraConfig, LoraLinear, adapter_parameters, inject_lora, live_adapters, lora_layers,
    matches_target, merge_adapter, record_live_adapters, resolve_target_modules, set_adapter_scale, unmerge_adapter,
    use_adapters,
)
from ppdiffusers_fast.models.transformer_flux import FluxTransformer2DModel


class TwoLayer(nn.Layer):
    """x [B, 6] -> fc1 (6 -> 5) -> tanh -> blocks.0.proj (5 -> 4)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.blocks = nn.LayerList([nn.Layer()])
        self.blocks[0].proj = nn.Linear(5, 4)

    def forward(self, x):
        return self.blocks[0].proj(paddle.tanh(self.fc1(x)))


TARGETS = ("fc1", "blocks.0.proj")


def randomize(model, adapter_name, seed):
    rng = np.random.default_rng(seed)
    for param in adapter_parameters(model, adapter_name):
        param.set_value(paddle.to_tensor(0.3 * rng.standard_normal(param.shape).astype("float32")))


def numpy_forward(model, x, adapters):
    """The LoRA forward by hand: adapters = [(name, scale * alpha / rank)], weights read from the layers."""
    def linear(layer, h):
        out = h @ layer.weight.numpy() + layer.bias.numpy()
        for name, factor in adapters:
            a = layer.lora_adapters[name]
            out = out + factor * (h @ a.lora_A.numpy() @ a.lora_B.numpy())
        return out
    return linear(model.blocks[0].proj, np.tanh(linear(model.fc1, x)))


def forward(model, x, *adapters):
    """``model(x)`` as numpy with exactly ``adapters`` live."""
    with use_adapters(model, *adapters):
        return model(x).numpy()


@pytest.fixture
def small():
    model = TwoLayer()
    x = paddle.randn([3, 6])
    base_out = model(x).numpy()
    inject_lora(model, LoraConfig(rank=2, alpha=3.0, target_modules=TARGETS), "student")
    inject_lora(model, LoraConfig(rank=3, alpha=1.5, target_modules=TARGETS), "fake_score")
    return model, x, base_out


def test_fresh_adapter_leaves_output_unchanged(small):
    model, x, base_out = small
    np.testing.assert_array_equal(forward(model, x, "student", "fake_score"), base_out)


def test_forward_matches_hand_computation_with_alpha_not_rank(small):
    model, x, _ = small
    randomize(model, "student", 1)
    randomize(model, "fake_score", 2)
    out = forward(model, x, "student")
    np.testing.assert_allclose(out, numpy_forward(model, x.numpy(), [("student", 3.0 / 2)]), atol=1e-6)
    both = forward(model, x, "student", "fake_score")
    expected = numpy_forward(model, x.numpy(), [("student", 1.5), ("fake_score", 1.5 / 3)])
    np.testing.assert_allclose(both, expected, atol=1e-6)


def test_no_live_adapter_gives_exactly_the_base_output(small):
    model, x, base_out = small
    randomize(model, "student", 1)
    assert live_adapters(model) == ()
    np.testing.assert_array_equal(model(x).numpy(), base_out)
    with use_adapters(model, "student"):
        assert not np.array_equal(model(x).numpy(), base_out)
        with use_adapters(model):
            np.testing.assert_array_equal(model(x).numpy(), base_out)
        assert live_adapters(model) == ("student",)
    assert live_adapters(model) == ()


def test_adapter_on_part_of_the_model_and_sub_layer_switching(small):
    model, x, _ = small
    inject_lora(model, LoraConfig(rank=2, alpha=2.0, target_modules=("fc1",)), "partial")
    block = model.blocks[0]
    with use_adapters(model, "student", "partial"):
        assert live_adapters(block) == ("student",)  # the block holds no "partial"
        with use_adapters(block, *live_adapters(block)):  # as a per-block recomputation does
            assert live_adapters(model) == ("student", "partial")
        with use_adapters(block):
            assert live_adapters(block) == () and live_adapters(model.fc1) == ("student", "partial")
        assert live_adapters(block) == ("student",) and live_adapters(model) == ("student", "partial")
    assert live_adapters(model) == ()


def test_switching_reads_the_cached_lora_layers_and_wrapping_refreshes_them(monkeypatch):
    model = TwoLayer()
    x = paddle.randn([3, 6])
    inject_lora(model, LoraConfig(rank=2, alpha=2.0, target_modules=("fc1",)), "first")
    randomize(model, "first", 1)
    assert [name for name, _ in lora_layers(model)] == ["fc1"] and lora_layers(model.blocks) == []
    walks = []
    for layer in (model, model.blocks):
        walk = layer.named_sublayers
        monkeypatch.setattr(layer, "named_sublayers", lambda *a, _walk=walk, **kw: walks.append(1) or _walk(*a, **kw))
    for _ in range(5):
        with use_adapters(model, "first"):
            assert live_adapters(model) == ("first",)
        with use_adapters(model.blocks):
            pass
    assert walks == []  # every switch read the cached list: no walk over the sub-layers
    # wrapping another Linear (a second adapter on new targets) refreshes the cache of the model and its sub-layers
    inject_lora(model, LoraConfig(rank=2, alpha=2.0, target_modules=("blocks.0.proj",)), "second")
    randomize(model, "second", 2)
    assert [name for name, _ in lora_layers(model)] == ["fc1", "blocks.0.proj"]
    assert [layer for _, layer in lora_layers(model.blocks)] == [model.blocks[0].proj]
    with use_adapters(model, "first", "second"):
        assert live_adapters(model.blocks) == ("second",)
        out = model(x).numpy()

    def linear(layer, name, h):  # alpha / rank = 1
        a = layer.lora_adapters[name]
        return h @ layer.weight.numpy() + layer.bias.numpy() + h @ a.lora_A.numpy() @ a.lora_B.numpy()
    expected = linear(model.blocks[0].proj, "second", np.tanh(linear(model.fc1, "first", x.numpy())))
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_base_state_dict_names_unchanged_and_base_frozen():
    model = TwoLayer()
    before = dict(model.state_dict())
    inject_lora(model, LoraConfig(rank=2, alpha=4.0, target_modules=TARGETS), "student")
    after = model.state_dict()
    assert isinstance(model.fc1, LoraLinear) and isinstance(model.fc1, nn.Linear)
    for key, value in before.items():
        assert after[key] is value or np.array_equal(after[key].numpy(), value.numpy())
    assert sorted(set(after) - set(before)) == [
        "blocks.0.proj.lora_adapters.student.lora_A", "blocks.0.proj.lora_adapters.student.lora_B",
        "fc1.lora_adapters.student.lora_A", "fc1.lora_adapters.student.lora_B"]
    assert all(p.stop_gradient for p in (model.fc1.weight, model.fc1.bias, model.blocks[0].proj.weight))
    assert all(not p.stop_gradient for p in adapter_parameters(model, "student"))
    assert model.fc1.lora_adapters["student"].lora_B.numpy().max() == 0.0  # B = 0
    bound = 1 / np.sqrt(6)
    assert np.abs(model.fc1.lora_adapters["student"].lora_A.numpy()).max() <= bound


def test_only_live_adapter_parameters_get_gradients(small):
    model, x, _ = small
    randomize(model, "student", 1)
    randomize(model, "fake_score", 2)
    with use_adapters(model, "fake_score"):
        model(x).square().mean().backward()
    for param in adapter_parameters(model, "fake_score"):
        assert param.grad is not None and np.abs(param.grad.numpy()).max() > 0
    for param in adapter_parameters(model, "student"):
        assert param.grad is None
    assert model.fc1.weight.grad is None and model.blocks[0].proj.bias.grad is None


def test_record_live_adapters_per_top_level_forward(small):
    model, x, _ = small
    with record_live_adapters(model) as record:
        with use_adapters(model, "student"):
            model(x)
        model(x)
        with use_adapters(model, "fake_score", "student"):
            model(x)
            model.fc1(x)  # a sub-layer call is not a top-level forward
    model(x)  # after the block: not recorded
    assert record == [("student",), (), ("fake_score", "student")]


def test_merge_then_unmerge_restores_base_weights(small):
    model, x, base_out = small
    randomize(model, "student", 1)
    weights = [model.fc1.weight.numpy().copy(), model.blocks[0].proj.weight.numpy().copy()]
    live_out = forward(model, x, "student")
    expected_merged = numpy_forward(model, x.numpy(), [("student", 0.5 * 1.5)])
    merge_adapter(model, "student", scale=0.5)
    np.testing.assert_allclose(model(x).numpy(), expected_merged, atol=1e-6)  # base now carries 0.5 * delta
    # a merged adapter is not added twice
    np.testing.assert_allclose(forward(model, x, "student"), expected_merged, atol=1e-6)
    with pytest.raises(RuntimeError, match="already merged"):
        merge_adapter(model, "student")
    unmerge_adapter(model, "student")
    np.testing.assert_allclose(model.fc1.weight.numpy(), weights[0], atol=1e-6, rtol=0)
    np.testing.assert_allclose(model.blocks[0].proj.weight.numpy(), weights[1], atol=1e-6, rtol=0)
    np.testing.assert_allclose(model(x).numpy(), base_out, atol=1e-6)
    np.testing.assert_allclose(forward(model, x, "student"), live_out, atol=1e-6)
    with pytest.raises(RuntimeError, match="not merged"):
        unmerge_adapter(model, "student")


def test_run_time_scale(small):
    model, x, base_out = small
    randomize(model, "student", 1)
    set_adapter_scale(model, "student", 0.25)
    out = forward(model, x, "student")
    np.testing.assert_allclose(out, numpy_forward(model, x.numpy(), [("student", 0.25 * 1.5)]), atol=1e-6)
    set_adapter_scale(model, "student", 0.0)
    np.testing.assert_array_equal(forward(model, x, "student"), base_out)


def test_dropout_only_in_training():
    model = TwoLayer()
    x = paddle.randn([64, 6])
    inject_lora(model, LoraConfig(rank=2, alpha=2.0, dropout=0.5, target_modules=TARGETS), "student")
    randomize(model, "student", 3)
    model.eval()
    with use_adapters(model, "student"):
        np.testing.assert_allclose(model(x).numpy(), numpy_forward(model, x.numpy(), [("student", 1.0)]), atol=1e-6)
        model.train()
        assert not np.allclose(model(x).numpy(), numpy_forward(model, x.numpy(), [("student", 1.0)]), atol=1e-3)


def test_errors_name_the_problem(small):
    model, _, _ = small
    with pytest.raises(ValueError, match="'blocks.0.nope'"):
        inject_lora(model, LoraConfig(rank=2, alpha=2, target_modules=("fc1", "blocks.0.nope")), "other")
    with pytest.raises(ValueError, match="'student' already exists"):
        inject_lora(model, LoraConfig(rank=2, alpha=2, target_modules=TARGETS), "student")
    with pytest.raises(ValueError, match="identifier"):
        inject_lora(model, LoraConfig(rank=2, alpha=2, target_modules=TARGETS), "bad.name")
    with pytest.raises(KeyError, match="teacher"):
        with use_adapters(model, "teacher"):
            pass
    with pytest.raises(KeyError, match="'ghost'"):
        adapter_parameters(model, "ghost")
    with pytest.raises(ValueError, match="rank"):
        LoraConfig(rank=0, alpha=1)
    with pytest.raises(ValueError, match="target_modules"):
        LoraConfig(rank=2, alpha=2, target_modules="fc1")


def test_matches_target():
    assert matches_target("transformer_blocks.0.attn.to_q", "attn.to_q")
    assert matches_target("transformer_blocks.0.attn.to_q", "to_q")
    assert not matches_target("transformer_blocks.0.attn.to_qk", "to_q")
    assert matches_target("single_transformer_blocks.7.proj_out", "single_transformer_blocks.*.proj_out")
    assert not matches_target("proj_out", "single_transformer_blocks.*.proj_out")
    assert not matches_target("single_transformer_blocks.7.attn.proj_out", "single_transformer_blocks.*.proj_out")


# ----------------------------------------------------------------------------------------------------------------
# FLUX transformer
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def flux(fixtures_dir):
    config = json.loads((fixtures_dir / "lora" / "base" / "config.json").read_text())
    model = FluxTransformer2DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    inputs = dict(
        hidden_states=paddle.randn([2, 16, 16]), encoder_hidden_states=paddle.randn([2, 8, 32]),
        pooled_projections=paddle.randn([2, 32]), timestep=paddle.to_tensor([0.3, 0.9]),
        img_ids=paddle.concat([paddle.zeros([16, 1]), paddle.arange(16, dtype="float32").reshape([16, 1]) // 4,
                               paddle.arange(16, dtype="float32").reshape([16, 1]) % 4], axis=1),
        txt_ids=paddle.zeros([8, 3]), guidance=paddle.to_tensor([3.5, 3.5]))
    return model, inputs


def test_flux_default_targets(flux):
    model, _ = flux
    wrapped = inject_lora(model, LoraConfig(rank=4, alpha=8.0), "student")
    expected = []
    for i in range(2):
        block = f"transformer_blocks.{i}"
        expected += [f"{block}.attn.{n}" for n in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                                   "add_v_proj", "to_add_out")]
        expected += [f"{block}.ff.net.0.proj", f"{block}.ff.net.2", f"{block}.ff_context.net.0.proj",
                     f"{block}.ff_context.net.2"]
    for i in range(2):
        block = f"single_transformer_blocks.{i}"
        expected += [f"{block}.attn.to_q", f"{block}.attn.to_k", f"{block}.attn.to_v", f"{block}.proj_mlp",
                     f"{block}.proj_out"]
    assert sorted(wrapped) == sorted(expected)
    assert not isinstance(model.proj_out, LoraLinear) and not isinstance(model.x_embedder, LoraLinear)
    assert len(DEFAULT_TARGET_MODULES) == 14
    trainable = [p for p in model.parameters() if not p.stop_gradient]
    assert len(trainable) == 2 * len(expected)


def test_target_presets_on_flux(flux):
    model, _ = flux
    reference = inject_lora(model, LoraConfig(rank=2, alpha=2.0, target_modules=resolve_target_modules("reference")),
                            "reference")
    # 2 double blocks x 12 layers + 2 single blocks x q/k/v
    assert len(reference) == 2 * 12 + 2 * 3
    assert not any(name.endswith(("proj_mlp", "proj_out")) for name in reference)
    extended = inject_lora(model, LoraConfig(rank=2, alpha=2.0, target_modules=resolve_target_modules("extended")),
                           "extended")
    modulation = [f"transformer_blocks.{i}.{n}" for i in range(2) for n in ("norm1.linear", "norm1_context.linear")]
    modulation += [f"single_transformer_blocks.{i}.norm.linear" for i in range(2)] + ["norm_out.linear", "proj_out"]
    single_mlp = [f"single_transformer_blocks.{i}.{n}" for i in range(2) for n in ("proj_mlp", "proj_out")]
    assert sorted(extended) == sorted(reference + single_mlp + modulation)
    assert not isinstance(model.x_embedder, LoraLinear) and not isinstance(model.context_embedder, LoraLinear)
    attention = inject_lora(model, LoraConfig(rank=2, alpha=2.0, target_modules=resolve_target_modules("attention")),
                            "attention")
    # 2 double blocks x q/k/v/out of both streams + 2 single blocks x q/k/v: the reference without the MLPs
    assert sorted(attention) == sorted(name for name in reference if ".ff" not in name) and len(attention) == 22
    assert resolve_target_modules(" attn.to_q , proj_mlp ,") == ("attn.to_q", "proj_mlp")
    with pytest.raises(ValueError, match="preset"):
        resolve_target_modules(" , ")


def test_flux_teacher_student_fake_score_on_one_base(flux):
    model, inputs = flux
    base_out = model(**inputs).sample.numpy()
    inject_lora(model, LoraConfig(rank=4, alpha=8.0), "student")
    inject_lora(model, LoraConfig(rank=2, alpha=2.0), "fake_score")
    randomize(model, "student", 5)
    randomize(model, "fake_score", 6)
    model.train()
    with record_live_adapters(model) as record:
        with use_adapters(model, "student"):
            student_loss = model(**inputs).sample.square().mean()
            student_loss.backward()
        with use_adapters(model):
            teacher = model(**inputs).sample
        with use_adapters(model, "fake_score"):
            fake = model(**inputs).sample
    assert record == [("student",), (), ("fake_score",)]
    np.testing.assert_array_equal(teacher.numpy(), base_out)
    assert not np.allclose(fake.numpy(), base_out, atol=1e-3)
    assert all(p.grad is not None for p in adapter_parameters(model, "student"))
    assert all(p.grad is None for p in adapter_parameters(model, "fake_score"))
    assert all(p.grad is None for p in model.parameters() if p.stop_gradient)


def test_flux_gradient_checkpointing_gives_the_same_adapter_gradients(flux):
    model, inputs = flux
    inject_lora(model, LoraConfig(rank=4, alpha=8.0), "student")
    randomize(model, "student", 5)
    model.train()
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.enable_gradient_checkpointing()
        with use_adapters(model, "student"):  # backward inside the block: recompute re-runs the adapters
            model(**inputs).sample.square().mean().backward()
        grads.append([p.grad.numpy().copy() for p in adapter_parameters(model, "student")])
        model.clear_gradients()
    for without, with_ in zip(*grads):
        np.testing.assert_allclose(with_, without, atol=1e-6)
