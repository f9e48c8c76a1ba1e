"""Memory plan: exact parameter counts, activation coefficients vs autograd, plan vs allocator peak."""
import json

import paddle
import pytest

from ppdiffusers_fast.models.discriminator import FluxDiscriminatorHeads
from ppdiffusers_fast.models.lora import LoraConfig, adapter_parameters, inject_lora
from ppdiffusers_fast.models.transformer_flux import FluxTransformer2DModel, count_parameters
from ppdiffusers_fast.training.memory_measure import peak_allocated_increase, saved_activation_elements
from ppdiffusers_fast.training.memory_plan import (
    MemoryPlanSettings, activation_bytes_per_graph, base_parameter_count, head_parameter_count,
    lora_parameter_count, plan_memory)

TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24, guidance_embeds=True,
            axes_dims_rope=[4, 4, 8])
SMALL = dict(TINY, num_layers=2, num_single_layers=4, attention_head_dim=32, num_attention_heads=4,
             joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=[8, 12, 12])


@pytest.mark.parametrize("guidance", [True, False])
def test_base_parameter_count_equals_the_built_model(guidance):
    config = dict(TINY, guidance_embeds=guidance)
    assert base_parameter_count(config) == count_parameters(FluxTransformer2DModel(**config))


def test_base_parameter_count_of_flux1_dev_equals_diffusers(fixtures_dir):
    expected = json.loads((fixtures_dir / "transformer" / "flux1_dev_param_count.json").read_text())
    config = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                  guidance_embeds=True, axes_dims_rope=[16, 56, 56])
    assert base_parameter_count(config) == expected["diffusers_parameter_count"] == 11_901_408_320
    config["guidance_embeds"] = False
    assert base_parameter_count(config) == expected["diffusers_parameter_count_without_guidance"]


def test_lora_and_head_counts_equal_the_built_layers():
    model = FluxTransformer2DModel(**TINY)
    inject_lora(model, LoraConfig(rank=3, alpha=6), "student")
    built = sum(int(p.numel()) for p in adapter_parameters(model, "student"))
    assert lora_parameter_count(TINY, 3) == built
    heads = FluxDiscriminatorHeads.for_transformer(model, hidden_channels=16)
    assert head_parameter_count(TINY, 16) == count_parameters(heads)


def test_kept_activations_by_hand_with_checkpointing():
    # 1 double + 1 single block, C = 32, grid 4x4 -> 16 image tokens + 8 text tokens = 24, batch 2, fp32.
    config = dict(TINY, num_layers=1, num_single_layers=1)
    settings = MemoryPlanSettings(height=64, width=64, batch_size=2, text_tokens=8, lora_rank=4,
                                  activation_bytes=4, gradient_checkpointing=True, fused_attention=False)
    acts = activation_bytes_per_graph(config, settings)
    block_inputs = 2 * (2 * 24 * 32) * 4  # each block keeps its inputs: B * L * C
    final_layers = 3 * 2 * 16 * 32 * 4  # norm_out / proj_out on the image tokens
    assert acts["kept"] == block_inputs + final_layers
    # recompute peak: the larger full block = double: 28 B L C + 6 B L r (fp32) + B h L^2 softmax (fp32)
    assert acts["recompute"] == (28 * 2 * 24 * 32 + 6 * 2 * 24 * 4) * 4 + 2 * 2 * 24 * 24 * 4


def test_activation_coefficients_match_what_autograd_saves():
    settings = MemoryPlanSettings(height=16 * 8, width=16 * 8, batch_size=2, text_tokens=16, lora_rank=4,
                                  activation_bytes=4, gradient_checkpointing=False, fused_attention=False)
    planned = activation_bytes_per_graph(SMALL, settings)["kept"]
    measured = 4 * saved_activation_elements(SMALL, batch=2, grid=8, text_tokens=16, lora_rank=4)
    assert abs(planned / measured - 1) < 0.03, (planned, measured)


@pytest.mark.parametrize("checkpointing,low,high", [(False, 0.85, 1.15), (True, 0.75, 1.35)])
def test_plan_is_close_to_the_allocator_peak(checkpointing, low, high):
    settings = MemoryPlanSettings(height=16 * 16, width=16 * 16, batch_size=2, text_tokens=32, lora_rank=8,
                                  weight_bytes=4, activation_bytes=4, gradient_checkpointing=checkpointing,
                                  fused_attention=False)
    plan = plan_memory(SMALL, "pcm", settings)
    planned = plan.peak_bytes - plan.components["base weights"] - 4 * lora_parameter_count(SMALL, 8)
    measured = peak_allocated_increase(SMALL, batch=2, grid=16, text_tokens=32, lora_rank=8,
                                       gradient_checkpointing=checkpointing)["peak_increase"]
    assert low < planned / measured < high, (planned, measured)
    if checkpointing:
        assert measured < 0.5 * peak_allocated_increase(SMALL, 2, 16, 32, 8, False)["peak_increase"]


def test_methods_add_what_they_hold():
    config = dict(TINY)
    plans = {m: plan_memory(config, m) for m in ("pcm", "pcm+adv", "flux_lightning", "dmd2")}
    assert plans["pcm+adv"].components["activations kept"] == 2 * plans["pcm"].components["activations kept"]
    assert plans["flux_lightning"].components["activations kept"] == 3 * plans["pcm"].components["activations kept"]
    assert plans["dmd2"].components["fake-score LoRA + AdamW"] == plans["pcm"].components["student LoRA + AdamW"]
    with pytest.raises(ValueError, match="unknown method 'sd3'"):
        plan_memory(config, "sd3")
