"""One network contract for every role: ``denoiser(x_t, sigma, cond) -> velocity``.

Teacher, student, EMA target, fake score and discriminator backbone are one frozen FLUX base whose
named LoRA adapters are switched explicitly with ``models.lora.use_adapters``. ``FluxDenoiser``
fixes the calling convention (B batch, L image tokens, C = in_channels):

    v = denoiser(x_t [B, L, C], sigma [B], cond)                      -> [B, L, C]
    v, feats = denoiser(..., return_block_features=True)             -> feats: one [B, L, inner] per block

``teacher_velocity`` is the guided teacher of ALGORITHMS.md: embedded guidance (FLUX.1-dev, one pass
with the guidance scale as an input) or classifier-free guidance ``v_u + w (v_c - v_u)`` with an
unconditional embedding (one pass over the doubled batch), always with no adapter live.

Gradient checkpointing lives here, not in the transformer's own switch, because the adapters live
during a block's forward must also be live when that block is recomputed in ``backward()``; the
trainer calls ``backward()`` after the method has left its ``use_adapters`` blocks. The wrapper records
the live adapters at forward time and restores them inside the recomputation.
"""
import logging
from dataclasses import dataclass, replace
from typing import Optional

import paddle
import paddle.nn as nn
from paddle.distributed.fleet.utils import recompute

from .. import schedules
from ..models.lora import live_adapters, lora_layers, use_adapters


@dataclass
class FluxCondition:
    """Text conditioning of one batch.

    Attributes:
        prompt_embeds: ``[B, L_txt, joint_attention_dim]`` T5 states.
        pooled: ``[B, pooled_projection_dim]`` pooled CLIP embedding.
        txt_ids: ``[L_txt, 3]`` text rotary ids (zeros for FLUX).
        img_ids: ``[L_img, 3]`` image rotary ids (``pipelines.latents.latent_image_ids``).
        guidance: ``[B]`` embedded guidance scale, or None (teachers without a guidance embedding).
    """

    prompt_embeds: paddle.Tensor
    pooled: paddle.Tensor
    txt_ids: paddle.Tensor
    img_ids: paddle.Tensor
    guidance: Optional[paddle.Tensor] = None

    @property
    def batch_size(self) -> int:
        return self.prompt_embeds.shape[0]

    def with_guidance(self, scale: Optional[float]) -> "FluxCondition":
        """The same condition with a constant embedded guidance ``scale`` (None removes it)."""
        guidance = None if scale is None else paddle.full([self.batch_size], float(scale), dtype="float32")
        return replace(self, guidance=guidance)

    def concat(self, other: "FluxCondition") -> "FluxCondition":
        """``[self; other]`` along the batch (same token ids; used for one-pass CFG)."""
        if list(self.prompt_embeds.shape[1:]) != list(other.prompt_embeds.shape[1:]):
            raise ValueError(f"cannot batch prompt embeddings {list(self.prompt_embeds.shape)} and "
                             f"{list(other.prompt_embeds.shape)}: the text lengths differ")
        guidance = None
        if self.guidance is not None and other.guidance is not None:
            guidance = paddle.concat([self.guidance, other.guidance])
        return FluxCondition(paddle.concat([self.prompt_embeds, other.prompt_embeds]),
                             paddle.concat([self.pooled, other.pooled]), self.txt_ids, self.img_ids, guidance)

    def select(self, start: int, end: int) -> "FluxCondition":
        """Samples ``start:end`` of the batch."""
        guidance = None if self.guidance is None else self.guidance[start:end]
        return FluxCondition(self.prompt_embeds[start:end], self.pooled[start:end], self.txt_ids, self.img_ids,
                             guidance)

    def expand_to(self, batch_size: int) -> "FluxCondition":
        """Broadcast a batch-1 condition (e.g. the empty prompt) to ``batch_size``."""
        if self.batch_size == batch_size:
            return self
        if self.batch_size != 1:
            raise ValueError(f"cannot broadcast a condition of batch {self.batch_size} to {batch_size}")
        guidance = None if self.guidance is None else self.guidance.expand([batch_size])
        return FluxCondition(self.prompt_embeds.expand([batch_size] + list(self.prompt_embeds.shape[1:])),
                             self.pooled.expand([batch_size, self.pooled.shape[1]]), self.txt_ids, self.img_ids,
                             guidance)


class _FirstBlockNotice(logging.Filter):
    """Drops Paddle's per-call warning that a block's inputs need no gradient: with a frozen base this is
    always true of the first block (only the adapters inside it train), and the block is still recomputed."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "None of the inputs to current recompute block need grad" not in record.getMessage()


def _quiet_recompute_notice() -> None:
    from paddle.distributed.fleet.utils.log_util import logger

    if not any(isinstance(f, _FirstBlockNotice) for f in logger.filters):
        logger.addFilter(_FirstBlockNotice())


class _AdapterAwareCheckpoint:
    """A block's ``forward`` that recomputes in backward with the adapters live at forward time."""

    def __init__(self, block: nn.Layer, original_forward):
        self.block = block
        self.original_forward = original_forward

    def _run(self, adapters, *args):
        if not lora_layers(self.block):
            return self.original_forward(*args)
        with use_adapters(self.block, *adapters):
            return self.original_forward(*args)

    def __call__(self, *args):
        if not (self.block.training and paddle.is_grad_enabled()):
            return self.original_forward(*args)
        adapters = live_adapters(self.block)
        return recompute(lambda *inner: self._run(adapters, *inner), *args, use_reentrant=False)


class FluxDenoiser(nn.Layer):
    """Velocity network ``v(x_t, sigma, cond)`` around a ``FluxTransformer2DModel``."""

    def __init__(self, transformer: nn.Layer):
        super().__init__()
        self.transformer = transformer
        self._checkpointing = False

    @property
    def has_guidance_embedding(self) -> bool:
        return bool(self.transformer.config.guidance_embeds)

    @property
    def num_blocks(self) -> int:
        return len(self.transformer.transformer_blocks) + len(self.transformer.single_transformer_blocks)

    def _blocks(self):
        return list(self.transformer.transformer_blocks) + list(self.transformer.single_transformer_blocks)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each block in backward, with the adapters that were live in its forward."""
        if self._checkpointing:
            return
        _quiet_recompute_notice()
        self.transformer.disable_gradient_checkpointing()
        for block in self._blocks():
            block.forward = _AdapterAwareCheckpoint(block, block.forward)
        self._checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        if not self._checkpointing:
            return
        for block in self._blocks():
            block.forward = block.forward.original_forward
        self._checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self._checkpointing

    def forward(self, x_t, sigma, cond: FluxCondition, *, return_block_features: bool = False):
        """Velocity at ``(x_t, sigma)``.

        Args:
            x_t: ``[B, L, C]`` packed latent tokens at noise level ``sigma``.
            sigma: ``[B]`` levels in [0, 1] (a python float is broadcast).
            cond: the batch's :class:`FluxCondition`; its guidance is passed only when the transformer
                has a guidance embedding (required then).
            return_block_features: also return the image tokens after every block.
        Returns:
            ``v [B, L, C]``, or ``(v, [num_blocks x [B, L, inner_dim]])``.
        """
        batch = x_t.shape[0]
        if not isinstance(sigma, paddle.Tensor):
            sigma = paddle.full([batch], float(sigma), dtype="float32")
        if cond.batch_size != batch:
            raise ValueError(f"condition batch {cond.batch_size} does not match x_t batch {batch}")
        guidance = cond.guidance if self.has_guidance_embedding else None
        if self.has_guidance_embedding and guidance is None:
            raise ValueError("the transformer has a guidance embedding: the condition needs a guidance scale "
                             "(FluxCondition.with_guidance)")
        out = self.transformer(
            hidden_states=x_t, encoder_hidden_states=cond.prompt_embeds, pooled_projections=cond.pooled,
            timestep=sigma, img_ids=cond.img_ids, txt_ids=cond.txt_ids, guidance=guidance,
            return_block_features=return_block_features, return_dict=True)
        if return_block_features:
            return out.sample, out.block_features
        return out.sample


def resolve_guidance_mode(denoiser: FluxDenoiser, requested: str) -> str:
    """``"embedded"`` or ``"cfg"`` from ``auto|embedded|cfg`` and the transformer's config."""
    if requested == "auto":
        return "embedded" if denoiser.has_guidance_embedding else "cfg"
    if requested == "embedded" and not denoiser.has_guidance_embedding:
        raise ValueError("teacher_guidance=embedded needs a transformer with guidance_embeds=True")
    if requested == "cfg" and denoiser.has_guidance_embedding:
        raise ValueError("teacher_guidance=cfg is for teachers without a guidance embedding; "
                         "this transformer is guidance-distilled (use embedded)")
    if requested not in ("embedded", "cfg"):
        raise ValueError(f"teacher guidance must be auto, embedded or cfg, got {requested!r}")
    return requested


def teacher_velocity(denoiser: FluxDenoiser, x_t, sigma, cond: FluxCondition, guidance_scale: float,
                     mode: str, unconditional: Optional[FluxCondition] = None):
    """The guided teacher velocity, computed with no adapter live.

    ``mode="embedded"``: ``v(x_t, sigma, cond, guidance=w)`` (one pass).
    ``mode="cfg"``: ``v_u + w (v_c - v_u)`` over the doubled batch ``[uncond; cond]`` (one pass);
    ``w = 1`` is the conditional velocity alone.

    Args:
        x_t: ``[B, L, C]``; sigma: ``[B]``.
        unconditional: batch-1 or batch-B condition of the empty prompt (required for ``cfg``).
    Returns:
        ``[B, L, C]``.
    """
    with use_adapters(denoiser.transformer):
        if mode == "embedded":
            return denoiser(x_t, sigma, cond.with_guidance(guidance_scale))
        if mode != "cfg":
            raise ValueError(f"guidance mode must be embedded or cfg, got {mode!r}")
        if guidance_scale == 1.0:
            return denoiser(x_t, sigma, cond)
        if unconditional is None:
            raise ValueError("classifier-free guidance needs the unconditional (empty prompt) embedding")
        batch = x_t.shape[0]
        both = unconditional.expand_to(batch).concat(cond)
        v_uncond, v_cond = paddle.split(denoiser(paddle.concat([x_t, x_t]), paddle.concat([sigma, sigma]), both), 2)
        return schedules.classifier_free_guidance(v_uncond, v_cond, guidance_scale)


def student_condition(cond: FluxCondition, guidance_mode: str, guidance_scale: float) -> FluxCondition:
    """The condition a student sees: with the teacher's guidance scale as input when the base has a guidance
    embedding (``guidance_mode="embedded"``); a CFG teacher's student sees the condition alone."""
    return cond.with_guidance(guidance_scale) if guidance_mode == "embedded" else cond


def check_unconditional(guidance_mode: str, guidance_scale: float, unconditional: Optional[FluxCondition]) -> None:
    """A CFG teacher guided with ``guidance_scale != 1`` needs the empty prompt's condition: refuse it missing."""
    if guidance_mode == "cfg" and guidance_scale != 1.0 and unconditional is None:
        raise ValueError("a CFG teacher (no guidance embedding) needs the unconditional embedding of the "
                         "empty prompt")
