"""Compiled transformer (to_static, Paddle Inference predictor) against the dygraph model."""
import numpy as np
import paddle
import pytest

from ppdiffusers_fast.inference.compile import (build_predictor, compile_transformer, kept_buffer_bytes,
                                                predictor_cache_key, transformer_input_spec)
from ppdiffusers_fast.models.lora import LoraConfig, inject_lora, merge_adapter, set_live_adapters
from tiny_models import tiny_flux, tiny_flux_inputs


def tiny_transformer(guidance_embeds=True):
    model = tiny_flux(1, guidance_embeds, in_channels=64)
    model.eval()
    return model


def inputs(batch, rows, cols, text_len, guidance=True):
    return tiny_flux_inputs(batch, rows, cols, text_len, guidance, in_channels=64)


@pytest.fixture(scope="module")
def model():
    return tiny_transformer()


@pytest.fixture(scope="module")
def predictor(model, tmp_path_factory):
    return build_predictor(model, tmp_path_factory.mktemp("predictor"))


def test_to_static_matches_dygraph_for_several_shapes(model, capsys):
    compiled = compile_transformer(model, use_cinn=True)
    if not paddle.is_compiled_with_cinn():
        lines = [line for line in capsys.readouterr().out.splitlines() if "CINN" in line]
        assert len(lines) == 1 and "not available" in lines[0]
    with paddle.no_grad():
        for shape in [(2, 3, 4, 16), (1, 2, 2, 7)]:  # batch, token rows, token cols, text tokens: one graph
            args = inputs(*shape)
            expected = model(**args).sample.numpy()
            got = compiled(**args).sample.numpy()
            assert got.shape == expected.shape
            assert np.abs(got - expected).max() <= 1e-4
            assert compiled(**args, return_dict=False)[0].shape == list(expected.shape)


def test_predictor_matches_dygraph_for_several_shapes(model, predictor):
    assert (predictor.save_dir / "transformer.pdiparams").is_file()
    with paddle.no_grad():
        for shape in [(2, 3, 4, 16), (3, 1, 2, 5)]:
            args = inputs(*shape)
            first = predictor(**args).sample
            kept = first.numpy().copy()
            expected = model(**args).sample.numpy()
            assert np.abs(kept - expected).max() <= 1e-4
            predictor(**inputs(1, 2, 2, 3))  # a later call leaves an earlier output untouched
            np.testing.assert_array_equal(first.numpy(), kept)


def test_model_without_guidance_embedding():
    model = tiny_transformer(guidance_embeds=False)
    assert len(transformer_input_spec(model)) == 6
    compiled = compile_transformer(model, use_cinn=False)
    args = inputs(1, 2, 3, 4, guidance=False)
    with paddle.no_grad():
        assert np.abs(compiled(**args).sample.numpy() - model(**args).sample.numpy()).max() <= 1e-4
    with pytest.raises(ValueError, match="guidance must be None"):
        compiled(**inputs(1, 2, 3, 4))


def test_live_lora_must_be_merged_first():
    model = tiny_transformer()
    inject_lora(model, LoraConfig(rank=2, alpha=2.0, target_modules=("attn.to_q",)), "student")
    set_live_adapters(model, "student")
    with pytest.raises(ValueError, match="merge"):
        compile_transformer(model)
    merge_adapter(model, "student", scale=0.5)
    compiled = compile_transformer(model, use_cinn=False)
    args = inputs(1, 2, 2, 4)
    with paddle.no_grad():
        assert np.abs(compiled(**args).sample.numpy() - model(**args).sample.numpy()).max() <= 1e-4


def test_predictor_output_survives_a_later_call_with_the_same_shapes(model, predictor):
    """True CFG calls the transformer twice per step with equal shapes: the first velocity must stay intact."""
    first_args, second_args = inputs(2, 2, 3, 4), inputs(2, 2, 3, 4)
    with paddle.no_grad():
        first = predictor(**first_args).sample
        kept = first.numpy().copy()
        second = predictor(**second_args).sample
        np.testing.assert_array_equal(first.numpy(), kept)
        assert np.abs(second.numpy() - model(**second_args).sample.numpy()).max() <= 1e-4
        assert np.abs(second.numpy() - kept).max() > 1e-3  # different inputs, different outputs


def test_predictor_is_reused_from_disk_under_the_same_key(model, tmp_path):
    """A second build with the same key loads the saved graph without exporting; another key exports again."""
    key = predictor_cache_key(model, ["weights.safetensors 123 456"])
    first = build_predictor(model, tmp_path / "cached", cache_key=key)
    assert not first.reused and (tmp_path / "cached" / "cache_key.txt").read_text().strip() == key
    saved = (tmp_path / "cached" / "transformer.pdiparams").stat().st_mtime_ns
    second = build_predictor(model, tmp_path / "cached", cache_key=key)
    assert second.reused and (tmp_path / "cached" / "transformer.pdiparams").stat().st_mtime_ns == saved
    args = inputs(1, 2, 3, 4)
    with paddle.no_grad():
        np.testing.assert_array_equal(second(**args).sample.numpy(), first(**args).sample.numpy())
    other = predictor_cache_key(model, ["weights.safetensors 123 457"])
    assert other != key and predictor_cache_key(model, ["weights.safetensors 123 456"]) == key
    third = build_predictor(model, tmp_path / "cached", cache_key=other)
    assert not third.reused and (tmp_path / "cached" / "cache_key.txt").read_text().strip() == other
    assert not list(tmp_path.glob(".cached.*"))  # no staging folder left behind


def test_kept_buffer_estimate_by_hand():
    cfg = tiny_transformer().config  # 1 + 2 blocks, 2 heads x 16: inner dim 32
    batch, tokens = 2, 12 + 4
    per_block = 100 * batch * tokens * 32 + 4 * batch * 2 * tokens * tokens
    assert kept_buffer_bytes(cfg, batch, 12, 4) == 4 * 3 * per_block


def test_buffer_keeping_is_decided_at_the_first_call_and_restores_the_flag(model, tmp_path):
    flag = "FLAGS_eager_delete_tensor_gb"
    before = paddle.get_flags([flag])[flag]
    kept = build_predictor(model, tmp_path / "kept")
    freed = build_predictor(model, tmp_path / "freed", keep_buffers_limit_mb=0)
    with paddle.no_grad():
        for shape in [(1, 1, 2, 3), (3, 3, 4, 9), (2, 2, 2, 5)]:  # buffers grow, then shrink again
            args = inputs(*shape)
            expected = model(**args).sample.numpy()
            for compiled in (kept, freed):
                assert np.abs(compiled(**args).sample.numpy() - expected).max() <= 1e-4
    assert kept._run.keeps_buffers is True and freed._run.keeps_buffers is False
    assert paddle.get_flags([flag])[flag] == before
    assert kept.onednn and freed.onednn
