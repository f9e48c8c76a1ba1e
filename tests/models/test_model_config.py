"""models/model_config.py: the transformer's config without ppdiffusers, and what it saves a process."""
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from ppdiffusers_fast.models.model_config import FrozenConfig
from ppdiffusers_fast.models.transformer_flux import FluxTransformer2DModel, FluxTransformerOutput
from ppdiffusers_fast.models.weights import load_flux_transformer, save_paddle_safetensors

REPO = Path(__file__).resolve().parents[2]
TINY = dict(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=12, pooled_projection_dim=10, axes_dims_rope=[2, 2, 4])


def test_config_holds_arguments_and_defaults_and_is_read_only():
    model = FluxTransformer2DModel(**TINY)
    assert model.config.in_channels == 16 and model.config.num_attention_heads == 2
    assert model.config.patch_size == 1 and model.config.out_channels is None and model.config.guidance_embeds is False
    assert model.config["axes_dims_rope"] == [2, 2, 4]
    with pytest.raises(TypeError, match="read-only"):
        model.config["in_channels"] = 4
    with pytest.raises(TypeError, match="read-only"):
        model.config.in_channels = 4
    with pytest.raises(AttributeError, match="no field 'hidden_size'"):
        model.config.hidden_size


def test_from_config_drops_bookkeeping_and_names_unknown_keys(caplog):
    config = {**TINY, "_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.35.2",
              "out_channels": None, "some_future_option": True}
    with caplog.at_level(logging.WARNING, logger="ppdiffusers_fast.models.model_config"):
        model = FluxTransformer2DModel.from_config(config, guidance_embeds=True)
    assert "some_future_option" in caplog.text and "_class_name" not in caplog.text
    assert model.config.guidance_embeds is True and model.time_text_embed.guidance_embedder is not None
    assert "some_future_option" not in model.config
    assert FluxTransformer2DModel.from_config(model.config).config == model.config


def test_saved_config_reads_back(tmp_path):
    model = FluxTransformer2DModel(**TINY)
    save_paddle_safetensors(model, tmp_path / "diffusion_pytorch_model.safetensors")
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["_class_name"] == "FluxTransformer2DModel" and written["joint_attention_dim"] == 12
    assert dict(load_flux_transformer(tmp_path).config) == dict(model.config)


def test_output_reads_by_field_and_position():
    out = FluxTransformerOutput(sample="s")
    assert out.sample == "s" and out[0] == "s" and out.to_tuple() == ("s",)
    both = FluxTransformerOutput(sample="s", block_features=["f"])
    assert both[1] == ["f"] and len(both.to_tuple()) == 2


def test_frozen_config_is_a_plain_dict_for_json():
    assert json.loads(json.dumps(FrozenConfig(a=1, b=[2]))) == {"a": 1, "b": [2]}


def test_transformer_lora_and_trainer_import_neither_ppdiffusers_nor_paddlenlp():
    code = ("import sys, resource\n"
            "import ppdiffusers_fast.models.transformer_flux, ppdiffusers_fast.models.lora\n"
            "import ppdiffusers_fast.models.weights, ppdiffusers_fast.training.trainer\n"
            "print(sorted(m for m in ('ppdiffusers', 'paddlenlp') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
