"""FLUX.1 transformer (rectified-flow MM-DiT of Black Forest Labs) in Paddle, numerically equal to diffusers'.

Config names and sub-layer names follow diffusers' ``FluxTransformer2DModel``, so FLUX.1-dev's
``transformer/config.json`` builds it and its weights map one to one (see ``models/weights.py``).

Data flow (B batch, L_img packed 2x2 latent tokens, L_txt T5 tokens, C = heads * head_dim):
    x [B, L_img, in_channels] --x_embedder--> [B, L_img, C]
    text [B, L_txt, joint_dim] --context_embedder--> [B, L_txt, C]
    temb [B, C] = MLP(sin(1000 t)) [+ MLP(sin(1000 g))] + MLP(pooled)
    rope from ids = [txt_ids; img_ids] (3 axes)
    num_layers double blocks, then num_single_layers single blocks (text and image in one sequence)
    AdaLN-continuous + proj_out --> velocity [B, L_img, out_channels]
"""
from dataclasses import dataclass
from typing import List, Optional, Tuple

import paddle
import paddle.nn as nn
from paddle.distributed.fleet.utils import recompute

from .flux_embeddings import TimeTextEmbedding, rope_rotations, rope_cos_sin
from .flux_layers import AdaLayerNormContinuous, FluxSingleTransformerBlock, FluxTransformerBlock, count_parameters
from .model_config import ConfigMixin, ModelOutput, register_to_config
from .ops import Linear, dense_results

__all__ = ["FluxTransformer2DModel", "FluxTransformerOutput", "count_parameters"]


@dataclass
class FluxTransformerOutput(ModelOutput):
    """sample: ``[B, L_img, out_channels]``; block_features: None or ``num_layers + num_single_layers`` tensors
    ``[B, L_img, C]`` (image tokens after each double block, then after each single block)."""

    sample: paddle.Tensor = None
    block_features: Optional[List[paddle.Tensor]] = None


class FluxTransformer2DModel(nn.Layer, ConfigMixin):
    """The FLUX.1 transformer. Defaults are FLUX.1-dev's (19 double + 38 single blocks, 24 heads x 128)."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        patch_size: int = 1,
        in_channels: int = 64,
        out_channels: Optional[int] = None,
        num_layers: int = 19,
        num_single_layers: int = 38,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 4096,
        pooled_projection_dim: int = 768,
        guidance_embeds: bool = False,
        axes_dims_rope: Tuple[int, int, int] = (16, 56, 56),
    ):
        super().__init__()
        if sum(axes_dims_rope) != attention_head_dim:
            raise ValueError(
                f"sum(axes_dims_rope)={sum(axes_dims_rope)} must equal attention_head_dim={attention_head_dim}"
            )
        self.out_channels = out_channels or in_channels
        self.inner_dim = num_attention_heads * attention_head_dim
        self.axes_dims_rope = [int(d) for d in axes_dims_rope]

        self.time_text_embed = TimeTextEmbedding(self.inner_dim, pooled_projection_dim, with_guidance=guidance_embeds)
        self.context_embedder = Linear(joint_attention_dim, self.inner_dim)
        self.x_embedder = Linear(in_channels, self.inner_dim)
        self.transformer_blocks = nn.LayerList(
            [FluxTransformerBlock(self.inner_dim, num_attention_heads, attention_head_dim) for _ in range(num_layers)]
        )
        self.single_transformer_blocks = nn.LayerList(
            [
                FluxSingleTransformerBlock(self.inner_dim, num_attention_heads, attention_head_dim)
                for _ in range(num_single_layers)
            ]
        )
        self.norm_out = AdaLayerNormContinuous(self.inner_dim, self.inner_dim)
        self.proj_out = Linear(self.inner_dim, patch_size * patch_size * self.out_channels)
        self.gradient_checkpointing = False

    # ------------------------------------------------------------------ gradient checkpointing
    def enable_gradient_checkpointing(self) -> None:
        """Recompute every block's activations in the backward pass (``fleet.utils.recompute`` per block)."""
        self.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return bool(self.gradient_checkpointing)

    def num_parameters_total(self) -> int:
        """Number of scalars in all parameters (also valid under ``paddle.LazyGuard``)."""
        return count_parameters(self)

    # ------------------------------------------------------------------ forward
    @paddle.jit.not_to_static  # plain Python under to_static: dynamic dims read -1 and the raises stay untraced
    def _check_inputs(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                      guidance):
        cfg = self.config
        if hidden_states.ndim != 3 or hidden_states.shape[-1] != cfg.in_channels:
            raise ValueError(f"hidden_states must be [B, L_img, {cfg.in_channels}], got {list(hidden_states.shape)}")
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != cfg.joint_attention_dim:
            raise ValueError(
                f"encoder_hidden_states must be [B, L_txt, {cfg.joint_attention_dim}], "
                f"got {list(encoder_hidden_states.shape)}"
            )
        if pooled_projections.ndim != 2 or pooled_projections.shape[-1] != cfg.pooled_projection_dim:
            raise ValueError(
                f"pooled_projections must be [B, {cfg.pooled_projection_dim}], got {list(pooled_projections.shape)}"
            )
        if timestep.ndim != 1:
            raise ValueError(f"timestep must be [B], got {list(timestep.shape)}")
        for name, ids, tokens in (("img_ids", img_ids, hidden_states.shape[1]),
                                  ("txt_ids", txt_ids, encoder_hidden_states.shape[1])):
            if ids.ndim != 2 or ids.shape[-1] != len(self.axes_dims_rope):
                raise ValueError(f"{name} must be [L, {len(self.axes_dims_rope)}], got {list(ids.shape)}")
            if ids.shape[0] > 0 and tokens > 0 and ids.shape[0] != tokens:
                raise ValueError(f"{name} has {ids.shape[0]} rows but the sequence has {tokens} tokens")
        if cfg.guidance_embeds and guidance is None:
            raise ValueError("this transformer has a guidance embedding (guidance_embeds=True): pass guidance [B]")
        if not cfg.guidance_embeds and guidance is not None:
            raise ValueError("this transformer has no guidance embedding (guidance_embeds=False): pass guidance=None")

    def _run_block(self, block, hidden_states, encoder_hidden_states, temb, rope):
        if self.gradient_checkpointing and self.training and paddle.is_grad_enabled():
            return recompute(block, hidden_states, encoder_hidden_states, temb, rope,
                             use_reentrant=False)
        return block(hidden_states, encoder_hidden_states, temb, rope)

    def forward(
        self,
        hidden_states: paddle.Tensor,
        encoder_hidden_states: paddle.Tensor,
        pooled_projections: paddle.Tensor,
        timestep: paddle.Tensor,
        img_ids: paddle.Tensor,
        txt_ids: paddle.Tensor,
        guidance: Optional[paddle.Tensor] = None,
        return_block_features: bool = False,
        return_dict: bool = True,
    ):
        """Predict the flow-matching velocity.

        Args:
            hidden_states: ``[B, L_img, in_channels]`` packed 2x2 latents.
            encoder_hidden_states: ``[B, L_txt, joint_attention_dim]`` T5 states.
            pooled_projections: ``[B, pooled_projection_dim]`` pooled CLIP embedding.
            timestep: ``[B]`` sigma in [0, 1] (multiplied by 1000 inside).
            img_ids: ``[L_img, 3]``; txt_ids: ``[L_txt, 3]`` rotary positions (a leading batch axis is dropped).
            guidance: ``[B]`` raw guidance scale (e.g. 3.5; multiplied by 1000 inside) or None.
            return_block_features: also return the image tokens after every block.
        Returns:
            :class:`FluxTransformerOutput`, or ``(sample,)`` / ``(sample, block_features)`` when ``return_dict=False``.
        """
        if not paddle.in_dynamic_mode():
            return self._forward(hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids,
                                 txt_ids, guidance, return_block_features, return_dict)
        with dense_results():
            return self._forward(hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids,
                                 txt_ids, guidance, return_block_features, return_dict)

    def _forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                 guidance, return_block_features, return_dict):
        if img_ids.ndim == 3:
            img_ids = img_ids[0]
        if txt_ids.ndim == 3:
            txt_ids = txt_ids[0]
        self._check_inputs(hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                           guidance)

        hidden_states = self.x_embedder(hidden_states)
        timestep = timestep.astype(hidden_states.dtype) * 1000
        if guidance is not None:
            guidance = guidance.astype(hidden_states.dtype) * 1000
        temb = self.time_text_embed(timestep, pooled_projections, guidance)
        encoder_hidden_states = self.context_embedder(encoder_hidden_states)
        rope_cos, rope_sin = rope_cos_sin(paddle.concat([txt_ids, img_ids], axis=0), self.axes_dims_rope)
        batch = hidden_states.shape[0] if paddle.in_dynamic_mode() else paddle.shape(hidden_states)[0]
        rope = rope_rotations(rope_cos, rope_sin, batch, self.config.num_attention_heads)

        block_features = [] if return_block_features else None
        for block in list(self.transformer_blocks) + list(self.single_transformer_blocks):
            encoder_hidden_states, hidden_states = self._run_block(
                block, hidden_states, encoder_hidden_states, temb, rope
            )
            if block_features is not None:
                block_features.append(hidden_states)

        sample = self.proj_out(self.norm_out(hidden_states, temb))
        if not return_dict:
            return (sample, block_features) if return_block_features else (sample,)
        return FluxTransformerOutput(sample=sample, block_features=block_features)
