"""LoRA files: parity with diffusers / peft in both directions (alpha != rank), kohya import, exact save/load,
and one error test per kind of bad file.

Fixtures: ``scripts/reference/make_lora_fixtures.py`` (PyTorch) and ``make_ours_exported_lora.py`` (Paddle).
"""
import json
import re

import numpy as np
import paddle
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from ppdiffusers_fast.models.lora import (
    LoraConfig, adapter_modules, adapter_names, adapter_parameters, inject_lora, use_adapters,
)
from ppdiffusers_fast.models.lora_io import export_diffusers_lora, import_lora, kohya_targets, load_lora, save_lora
from ppdiffusers_fast.models.weights import load_flux_transformer

PARITY_ATOL = 1e-5
SAMPLING = {"num_inference_steps": 4, "multiphase": 4, "num_euler_timesteps": 100, "guidance_scale": 3.5,
            "lora_scale": 0.8}


def read(path):
    with safe_open(str(path), framework="np") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()


def assert_same_tensors(path, committed_path):
    """The safetensors file ``path`` holds exactly the keys and values of ``committed_path``; returns both."""
    written, _ = read(path)
    committed, _ = read(committed_path)
    assert sorted(written) == sorted(committed)
    for key in committed:
        np.testing.assert_array_equal(written[key], committed[key])
    return written, committed


@pytest.fixture
def lora_dir(fixtures_dir):
    return fixtures_dir / "lora"


@pytest.fixture
def model(lora_dir):
    return load_flux_transformer(lora_dir / "base")


@pytest.fixture
def inputs(lora_dir):
    return {k: paddle.to_tensor(v) for k, v in read(lora_dir / "inputs.safetensors")[0].items()}


@pytest.fixture
def torch_outputs(lora_dir):
    outputs = read(lora_dir / "outputs.safetensors")[0]
    outputs.update(read(lora_dir / "ours_exported_output.safetensors")[0])
    return outputs


def run(model, inputs, *adapters):
    with use_adapters(model, *adapters):
        return model(**inputs).sample.numpy()


def max_abs(a, b):
    return float(np.abs(a - b).max())


# ----------------------------------------------------------------------------------------------------------------
# Parity with the PyTorch reference
# ----------------------------------------------------------------------------------------------------------------


def test_base_model_matches_reference(model, inputs, torch_outputs):
    assert max_abs(run(model, inputs), torch_outputs["base"]) < PARITY_ATOL


def test_peft_adapter_saved_by_diffusers_loads_with_same_output(model, inputs, torch_outputs, lora_dir):
    info = import_lora(model, lora_dir / "peft_adapter.safetensors", "peft")
    assert info["style"] == "peft"
    assert info["alphas"]["transformer_blocks.0.attn.to_q"] == 8.0 and info["ranks"]["x_embedder"] == 4
    assert info["alphas"]["x_embedder"] == 3.0  # alpha_pattern
    assert info["ranks"]["single_transformer_blocks.0.proj_mlp"] == 2  # rank_pattern
    out = run(model, inputs, "peft")
    assert max_abs(out, torch_outputs["base"]) > 0.1  # the adapter matters
    assert max_abs(out, torch_outputs["peft"]) < PARITY_ATOL


def test_peft_model_prefix_with_adapter_config_json(model, inputs, torch_outputs, lora_dir, tmp_path):
    tensors, metadata = read(lora_dir / "peft_adapter.safetensors")
    config = {k[len("transformer."):]: v for k, v in json.loads(metadata["lora_adapter_metadata"]).items()}
    renamed = {"base_model.model." + k[len("transformer."):]: v for k, v in tensors.items()}
    save_file(renamed, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    import_lora(model, tmp_path, "peft")  # a PEFT folder
    assert max_abs(run(model, inputs, "peft"), torch_outputs["peft"]) < PARITY_ATOL


def test_kohya_adapter_with_bfl_names_matches_merged_reference(model, inputs, torch_outputs, lora_dir):
    info = import_lora(model, lora_dir / "kohya_adapter.safetensors", "kohya")
    assert info["style"] == "kohya"
    # fused qkv / linear1 split into separate modules with a shared lora_down
    assert {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
            "single_transformer_blocks.0.proj_mlp", "norm_out.linear"} <= set(info["modules"])
    a_q = model.transformer_blocks[0].attn.to_q.lora_adapters["kohya"].lora_A.numpy()
    a_v = model.transformer_blocks[0].attn.to_v.lora_adapters["kohya"].lora_A.numpy()
    np.testing.assert_array_equal(a_q, a_v)
    assert info["alphas"]["transformer_blocks.0.ff.net.2"] == 4.0  # no .alpha key: alpha = rank
    assert max_abs(run(model, inputs, "kohya"), torch_outputs["kohya"]) < PARITY_ATOL


def test_our_export_loads_in_diffusers_with_same_output(model, inputs, torch_outputs, lora_dir, tmp_path):
    metadata = load_lora(model, lora_dir / "ours_adapter.safetensors", "ours")
    assert metadata["rank"] == 4 and metadata["alpha"] == 8.0
    out = run(model, inputs, "ours")
    assert max_abs(out, torch_outputs["base"]) > 0.1
    assert max_abs(out, torch_outputs["ours_exported"]) < PARITY_ATOL
    # exporting again reproduces the committed file that diffusers loaded
    export_diffusers_lora(model, "ours", tmp_path / "again.safetensors")
    _, committed = assert_same_tensors(tmp_path / "again.safetensors", lora_dir / "ours_exported.safetensors")
    a = model.transformer_blocks[0].attn.to_q.lora_adapters["ours"]
    np.testing.assert_array_equal(committed["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"],
                                  a.lora_A.numpy().T)  # PyTorch orientation [rank, in]
    np.testing.assert_allclose(committed["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"],
                               (a.lora_B.numpy() * 2.0).T, rtol=1e-7)  # alpha / rank = 8 / 4 folded into B


def test_export_with_mixed_ranks_and_alphas_loads_in_diffusers(model, inputs, torch_outputs, lora_dir, tmp_path):
    import_lora(model, lora_dir / "kohya_adapter.safetensors", "kohya")
    export_diffusers_lora(model, "kohya", tmp_path / "mixed.safetensors")
    exported, _ = assert_same_tensors(tmp_path / "mixed.safetensors", lora_dir / "ours_exported_mixed.safetensors")
    assert {v.shape[0] for k, v in exported.items() if k.endswith("lora_A.weight")} == {4}  # padded to one rank
    assert max_abs(run(model, inputs, "kohya"), torch_outputs["ours_exported_mixed"]) < PARITY_ATOL
    import_lora(model, tmp_path / "mixed.safetensors", "again")
    assert max_abs(run(model, inputs, "again"), run(model, inputs, "kohya")) < 1e-6


# ----------------------------------------------------------------------------------------------------------------
# Our format
# ----------------------------------------------------------------------------------------------------------------


def test_save_then_load_is_exact(model, inputs, lora_dir, tmp_path):
    inject_lora(model, LoraConfig(rank=3, alpha=5.0), "student")
    rng = np.random.default_rng(0)
    for param in adapter_parameters(model, "student"):
        param.set_value(paddle.to_tensor(0.1 * rng.standard_normal(param.shape).astype("float32")))
    expected = run(model, inputs, "student")
    save_lora(model, "student", tmp_path / "student.safetensors", sampling=SAMPLING)

    fresh = load_flux_transformer(lora_dir / "base")
    metadata = load_lora(fresh, tmp_path / "student.safetensors", "student")
    assert metadata["sampling"] == SAMPLING
    assert (metadata["rank"], metadata["alpha"]) == (3, 5.0)
    assert metadata["target_modules"] == list(adapter_modules(model, "student"))
    np.testing.assert_array_equal(run(fresh, inputs, "student"), expected)
    for a, b in zip(adapter_parameters(model, "student"), adapter_parameters(fresh, "student")):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert all(not p.stop_gradient for p in adapter_parameters(fresh, "student"))
    # loading into the existing adapter (resume) overwrites its values
    for param in adapter_parameters(fresh, "student"):
        param.set_value(paddle.zeros_like(param))
    load_lora(fresh, tmp_path / "student.safetensors", "student")
    np.testing.assert_array_equal(run(fresh, inputs, "student"), expected)


def test_save_rejects_unknown_sampling_keys(model, tmp_path):
    inject_lora(model, LoraConfig(rank=2, alpha=2.0), "student")
    with pytest.raises(ValueError, match="num_steps"):
        save_lora(model, "student", tmp_path / "x.safetensors", sampling={"num_steps": 4})
    assert not (tmp_path / "x.safetensors").exists()


def test_kohya_mapping_table():
    assert kohya_targets("double_blocks_3_txt_attn_qkv") == [
        "transformer_blocks.3.attn.add_q_proj", "transformer_blocks.3.attn.add_k_proj",
        "transformer_blocks.3.attn.add_v_proj"]
    assert kohya_targets("single_blocks_37_linear1")[-1] == "single_transformer_blocks.37.proj_mlp"
    assert kohya_targets("final_layer_adaLN_modulation_1") == ["norm_out.linear"]
    assert kohya_targets("double_blocks_0_img_attn_norm") is None


# ----------------------------------------------------------------------------------------------------------------
# Bad files: each error names the offending key, and the model is left untouched
# ----------------------------------------------------------------------------------------------------------------

Q = "transformer.transformer_blocks.0.attn.to_q"  # Linear 32 -> 32
TE_KEY = "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"


def peft_pair(module=Q, rank=4, in_features=32, out_features=32, b_rank=None):
    rng = np.random.default_rng(0)
    return {f"{module}.lora_A.weight": rng.standard_normal((rank, in_features)).astype("float32"),
            f"{module}.lora_B.weight": rng.standard_normal((out_features, b_rank or rank)).astype("float32")}


def kohya_pair(name, rank=4, in_features=32, out_features=96, up_rank=None):
    rng = np.random.default_rng(0)
    return {f"lora_unet_{name}.lora_down.weight": rng.standard_normal((rank, in_features)).astype("float32"),
            f"lora_unet_{name}.lora_up.weight": rng.standard_normal((out_features, up_rank or rank)).astype("float32")}


BAD_FILES = {
    "peft_unknown_module": ({**peft_pair(), **peft_pair("transformer.transformer_blocks.0.attn.to_z")},
                            "transformer.transformer_blocks.0.attn.to_z.lora_A.weight"),
    "peft_text_encoder": ({**peft_pair(), **peft_pair("text_encoder.text_model.fc", in_features=8, out_features=8)},
                          "text_encoder.text_model.fc.lora_A.weight"),
    "peft_unknown_suffix": ({**peft_pair(), f"{Q}.lora_B.bias": np.zeros(32, "float32")}, f"{Q}.lora_B.bias"),
    "peft_wrong_shape": (peft_pair(in_features=16), f"{Q}.lora_A.weight"),
    "peft_rank_mismatch": (peft_pair(b_rank=3), f"{Q}.lora_A.weight"),
    "peft_partial": ({**peft_pair(), f"{Q.replace('to_q', 'to_k')}.lora_A.weight": np.zeros((4, 32), "float32")},
                     "transformer.transformer_blocks.0.attn.to_k.lora_A.weight"),
    "not_a_linear": (peft_pair("transformer.transformer_blocks.0.attn.norm_q"), "attn.norm_q.lora_A.weight"),
    "kohya_unknown_name": ({**kohya_pair("double_blocks_0_img_attn_qkv"),
                            **kohya_pair("double_blocks_0_img_attn_norm")},
                           "lora_unet_double_blocks_0_img_attn_norm.lora_down.weight"),
    "kohya_text_encoder": ({**kohya_pair("double_blocks_0_img_attn_qkv"), TE_KEY: np.zeros((4, 8), "float32")}, TE_KEY),
    "kohya_wrong_fused_rows": (kohya_pair("double_blocks_0_img_attn_qkv", out_features=90),
                               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"),
    "kohya_rank_mismatch": (kohya_pair("single_blocks_1_linear2", in_features=160, out_features=32, up_rank=2),
                            "lora_unet_single_blocks_1_linear2.lora_down.weight"),
    "kohya_partial": ({**kohya_pair("double_blocks_0_img_attn_qkv"),
                       "lora_unet_double_blocks_1_img_attn_proj.lora_up.weight": np.zeros((32, 4), "float32"),
                       "lora_unet_double_blocks_1_img_attn_proj.alpha": np.array(4.0, "float32")},
                      "lora_unet_double_blocks_1_img_attn_proj.lora_up.weight"),
    "kohya_block_out_of_range": (kohya_pair("double_blocks_7_img_attn_proj", out_features=32),
                                 "lora_unet_double_blocks_7_img_attn_proj.lora_down.weight"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_interchange_file_names_the_key(case, model, tmp_path):
    tensors, offending_key = BAD_FILES[case]
    path = tmp_path / f"{case}.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(ValueError) as error:
        import_lora(model, path, "imported")
    assert offending_key in str(error.value)
    assert adapter_names(model) == []  # nothing was injected


def test_bad_own_format_files_name_the_key(model, tmp_path):
    inject_lora(model, LoraConfig(rank=2, alpha=4.0), "student")
    save_lora(model, "student", tmp_path / "good.safetensors")
    tensors, metadata = read(tmp_path / "good.safetensors")
    key_a = "transformer_blocks.0.attn.to_q.lora_A"
    cases = {
        "partial": ({k: v for k, v in tensors.items() if k != key_a}, "transformer_blocks.0.attn.to_q.lora_B"),
        "unknown": ({**tensors, "transformer_blocks.0.attn.to_q.lora_C": tensors[key_a]},
                    "transformer_blocks.0.attn.to_q.lora_C"),
        "shape": ({**tensors, key_a: np.zeros((16, 2), "float32")}, key_a),
        "rank": ({**tensors, key_a: np.zeros((32, 3), "float32")}, key_a),
    }
    for name, (bad, offending_key) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(bad, str(path), metadata=metadata)
        with pytest.raises(ValueError) as error:
            load_lora(model, path, "other")
        assert offending_key in str(error.value), name
        assert adapter_names(model) == ["student"]


def test_not_a_lora_file(model, tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("not safetensors")
    with pytest.raises(ValueError, match="notes.safetensors"):
        import_lora(model, path, "x")
    save_file({"weight": np.zeros((2, 2), "float32")}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="no LoRA weights"):
        import_lora(model, tmp_path / "plain.safetensors", "x")
    with pytest.raises(ValueError, match="not a ppdiffusers_fast LoRA"):
        load_lora(model, tmp_path / "plain.safetensors", "x")


def test_non_finite_adapters_are_never_written_nor_loaded(model, tmp_path):
    inject_lora(model, LoraConfig(rank=2, alpha=2.0), "student")
    save_lora(model, "student", tmp_path / "good.safetensors")
    key = "transformer_blocks.0.attn.to_q.lora_B"
    dict(adapter_modules(model, "student"))["transformer_blocks.0.attn.to_q"].lora_B.set_value(
        paddle.full([2, 32], float("nan")))
    for write in (lambda path: save_lora(model, "student", path),
                  lambda path: export_diffusers_lora(model, "student", path)):
        with pytest.raises(ValueError, match=r"refusing to write .*NaN or infinite values in 1 tensor \(.*to_q"):
            write(tmp_path / "bad.safetensors")
        assert not (tmp_path / "bad.safetensors").exists()
    tensors, metadata = read(tmp_path / "good.safetensors")
    tensors[key] = np.full(tensors[key].shape, np.inf, "float32")
    save_file(tensors, str(tmp_path / "inf.safetensors"), metadata=metadata)
    for load in (load_lora, import_lora):
        with pytest.raises(ValueError, match=f"inf.safetensors holds NaN or infinite values in 1 tensor \\({key}\\)"):
            load(model, tmp_path / "inf.safetensors", "other")
    assert adapter_names(model) == ["student"]


# ----------------------------------------------------------------------------------------------------------------
# ComfyUI names, kohya names with diffusers modules, several LoRAs live (fixtures: make_lora_fixtures.py interop)
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def interop_outputs(lora_dir):
    return read(lora_dir / "interop_outputs.safetensors")[0]


def test_comfyui_file_matches_diffusers_loading_it(model, inputs, interop_outputs, torch_outputs, lora_dir):
    info = import_lora(model, lora_dir / "comfyui_adapter.safetensors", "comfy")  # has an all-zero .diff_b
    assert info["style"] == "comfyui" and info["sampling"] == {}
    assert {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v"} <= set(info["modules"])
    out = run(model, inputs, "comfy")
    assert max_abs(out, torch_outputs["base"]) > 0.1
    assert max_abs(out, interop_outputs["comfyui"]) < PARITY_ATOL


def comfyui_renamed(tensors, up_down=("lora_up", "lora_down")):
    """kohya BFL keys -> ComfyUI's ``diffusion_model.<dotted BFL name>`` keys (same values)."""
    dotted = {"img_attn_qkv": "img_attn.qkv", "img_attn_proj": "img_attn.proj", "img_mlp_0": "img_mlp.0",
              "img_mlp_2": "img_mlp.2", "img_mod_lin": "img_mod.lin", "modulation_lin": "modulation.lin",
              "time_in_in_layer": "time_in.in_layer", "time_in_out_layer": "time_in.out_layer",
              "vector_in_in_layer": "vector_in.in_layer", "vector_in_out_layer": "vector_in.out_layer",
              "guidance_in_in_layer": "guidance_in.in_layer", "guidance_in_out_layer": "guidance_in.out_layer",
              "final_layer_linear": "final_layer.linear",
              "final_layer_adaLN_modulation_1": "final_layer.adaLN_modulation.1"}
    dotted.update({k.replace("img", "txt"): v.replace("img", "txt") for k, v in dotted.items() if "img_" in k[:4]})
    renamed = {}
    for key, value in tensors.items():
        stem, _, part = key[len("lora_unet_"):].partition(".")
        block = next((b for b in ("double_blocks", "single_blocks") if stem.startswith(b + "_")), None)
        if block:
            index, rest = stem[len(block) + 1:].split("_", 1)
            name = f"{block}.{index}.{dotted.get(rest, rest)}"
        else:
            name = dotted.get(stem, stem)
        part = part.replace("lora_up", up_down[0]).replace("lora_down", up_down[1])
        renamed[f"diffusion_model.{name}.{part}"] = value
    return renamed


@pytest.mark.parametrize("up_down", [("lora_up", "lora_down"), ("lora_B", "lora_A")])
def test_comfyui_names_of_every_kohya_module_match_kohya_reference(model, inputs, torch_outputs, lora_dir, tmp_path,
                                                                   up_down):
    """Every BFL module (fused qkv / linear1, embedders, final layer with its shift/scale swap) under ComfyUI names,
    with kohya or PEFT suffixes: the torch kohya reference (merged into the fused BFL weights by hand)."""
    kohya, _ = read(lora_dir / "kohya_adapter.safetensors")
    save_file(comfyui_renamed(kohya, up_down), str(tmp_path / "comfy.safetensors"))
    assert import_lora(model, tmp_path / "comfy.safetensors", "comfy")["style"] == "comfyui"
    assert max_abs(run(model, inputs, "comfy"), torch_outputs["kohya"]) < PARITY_ATOL


def test_comfyui_nonzero_full_difference_is_refused_by_key(model, lora_dir, tmp_path):
    tensors, _ = read(lora_dir / "comfyui_adapter.safetensors")
    tensors["diffusion_model.double_blocks.0.img_attn.qkv.diff_b"] = np.full([96], 0.1, np.float32)
    save_file(tensors, str(tmp_path / "diff.safetensors"))
    with pytest.raises(ValueError, match=r"double_blocks\.0\.img_attn\.qkv\.diff_b: a full weight difference"):
        import_lora(model, tmp_path / "diff.safetensors", "comfy")
    assert adapter_names(model) == []


@pytest.mark.parametrize("prefix", ["lora_transformer_", "lora_unet_"])
def test_kohya_names_with_diffusers_modules_match_diffusers(model, inputs, interop_outputs, lora_dir, tmp_path,
                                                            prefix):
    tensors, _ = read(lora_dir / "kohya_diffusers_names_adapter.safetensors")
    save_file({prefix + k[len("lora_transformer_"):]: v for k, v in tensors.items()}, str(tmp_path / "k.safetensors"))
    info = import_lora(model, tmp_path / "k.safetensors", "named")
    assert info["style"] == "kohya"
    assert info["alphas"]["transformer_blocks.0.attn.to_v"] == 1.0 and "norm_out.linear" in info["modules"]
    assert max_abs(run(model, inputs, "named"), interop_outputs["kohya_diffusers_names"]) < PARITY_ATOL


def test_two_adapters_live_match_torch_with_one_merged_and_one_live(model, inputs, interop_outputs, torch_outputs,
                                                                    lora_dir):
    import_lora(model, lora_dir / "kohya_adapter.safetensors", "kohya")
    import_lora(model, lora_dir / "peft_adapter.safetensors", "peft")
    both = run(model, inputs, "kohya", "peft")
    assert max_abs(both, torch_outputs["kohya"]) > 0.1 and max_abs(both, torch_outputs["peft"]) > 0.1
    assert max_abs(both, interop_outputs["kohya_merged_plus_peft"]) < PARITY_ATOL
    assert max_abs(run(model, inputs, "peft", "kohya"), both) < 1e-6  # order of the live list does not matter


@pytest.mark.parametrize("key, module", [
    ("transformer.transformer_blocks.7.attn.to_q.lora_A.weight", "transformer_blocks.7.attn.to_q"),
    ("lora_unet_double_blocks_5_img_attn_proj.lora_down.weight", "transformer_blocks.5.attn.to_out.0"),
    ("diffusion_model.single_blocks.3.linear2.lora_down.weight", "single_transformer_blocks.3.proj_out"),
    ("lora_transformer_transformer_blocks_0_attn_to_z.lora_down.weight", "transformer_blocks_0_attn_to_z"),
])
def test_lora_for_modules_the_model_lacks_names_the_module(model, tmp_path, key, module):
    up_key = key.replace("lora_A", "lora_B").replace("lora_down", "lora_up")
    save_file({key: np.ones([2, 32], np.float32), up_key: np.ones([32, 2], np.float32)},
              str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match=re.escape(module)):
        import_lora(model, tmp_path / "x.safetensors", "x")
    assert adapter_names(model) == []
