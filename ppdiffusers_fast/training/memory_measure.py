"""Measure what ``memory_plan`` predicts, on small configs on the CPU.

Two measurements of one student training step (LoRA live, forward + backward + AdamW step):
- ``saved_activation_elements``: elements of the distinct non-parameter tensors autograd saves for backward
  (``paddle.autograd.saved_tensors_hooks``), to check the per-block activation coefficients exactly;
- ``peak_allocated_increase``: growth of the peak of Paddle's own allocator over the step (the host allocator's
  statistics on CPU; on GPU the same quantity is ``paddle.device.cuda.max_memory_allocated``), to check the whole
  accounting, transient buffers included.
"""
import math
from typing import Dict

import paddle
from paddle.base import core

from ..models.lora import LoraConfig, adapter_parameters, inject_lora, use_adapters
from ..models.transformer_flux import FluxTransformer2DModel
from ..pipelines.latents import latent_image_ids


def _allocated_now() -> int:
    return core.host_memory_stat_current_value("Allocated", 0)


def _allocated_peak() -> int:
    return core.host_memory_stat_peak_value("Allocated", 0)


def build_student(config: dict, lora_rank: int, seed: int = 0) -> FluxTransformer2DModel:
    paddle.seed(seed)
    model = FluxTransformer2DModel(**config)
    inject_lora(model, LoraConfig(rank=lora_rank, alpha=lora_rank), "student")
    model.train()
    return model


def _inputs(config: dict, batch: int, grid: int, text_tokens: int):
    tokens = grid * grid
    cond = dict(
        hidden_states=paddle.randn([batch, tokens, config["in_channels"]]),
        encoder_hidden_states=paddle.randn([batch, text_tokens, config["joint_attention_dim"]]),
        pooled_projections=paddle.randn([batch, config["pooled_projection_dim"]]),
        timestep=paddle.rand([batch]),
        img_ids=latent_image_ids(2 * grid, 2 * grid),
        txt_ids=paddle.zeros([text_tokens, 3]),
    )
    if config.get("guidance_embeds"):
        cond["guidance"] = paddle.full([batch], 3.5)
    return cond


def saved_activation_elements(config: dict, batch: int, grid: int, text_tokens: int, lora_rank: int) -> int:
    """Elements saved for backward by one forward (no checkpointing), parameters excluded, storage counted once."""
    model = build_student(config, lora_rank)
    parameter_storage = {p.data_ptr() for p in model.parameters()}
    inputs = _inputs(config, batch, grid, text_tokens)
    saved = {}

    def pack(tensor):
        if tensor.data_ptr() not in parameter_storage:
            saved[tensor.data_ptr()] = math.prod(tensor.shape)
        return tensor

    with use_adapters(model, "student"), paddle.autograd.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**inputs)
    return sum(saved.values())


def peak_allocated_increase(config: dict, batch: int, grid: int, text_tokens: int, lora_rank: int,
                            gradient_checkpointing: bool) -> Dict[str, int]:
    """Bytes the allocator's peak rises above what is allocated before one student step (weights, inputs)."""
    model = build_student(config, lora_rank)
    if gradient_checkpointing:
        model.enable_gradient_checkpointing()
    params = adapter_parameters(model, "student")
    optimizer = paddle.optimizer.AdamW(learning_rate=1e-4, parameters=params)
    inputs = _inputs(config, batch, grid, text_tokens)
    before = _allocated_now()
    core.host_memory_stat_reset_peak_value("Allocated", 0)
    with use_adapters(model, "student"):  # backward inside: recomputed blocks need the same live adapter
        loss = model(**inputs).sample.square().mean()
        loss.backward()
    optimizer.step()
    optimizer.clear_grad()
    return {"allocated_before": before, "peak_increase": _allocated_peak() - before}
