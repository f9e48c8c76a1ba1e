"""FLUX text conditioning: CLIP pooled embedding and T5 token states.

- CLIP (``CLIPTextModel``, no projection): prompts padded to the tokenizer's ``model_max_length`` (77);
  the pooled output is the final hidden state at the end-of-text token, ``[B, 768]`` for FLUX.1.
- T5 (``T5EncoderModel``): prompts padded / truncated to ``max_sequence_length`` (512 for FLUX.1-dev),
  no attention mask (padding tokens are encoded too, as FLUX was trained), states ``[B, L_txt, 4096]``.
"""
import logging
from dataclasses import dataclass
from typing import List, Sequence

import paddle

__all__ = ["PromptEmbeddings", "encode_prompts", "repeat_per_image"]

logger = logging.getLogger(__name__)


@dataclass
class PromptEmbeddings:
    """pooled: ``[B, pooled_dim]`` (CLIP); sequence: ``[B, L_txt, joint_dim]`` (T5)."""

    pooled: paddle.Tensor
    sequence: paddle.Tensor


def _token_ids(tokenizer, prompts: List[str], max_length: int, name: str) -> paddle.Tensor:
    encoded = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                        return_attention_mask=False)
    full = tokenizer(prompts, padding=False, truncation=False, return_attention_mask=False)
    for prompt, ids in zip(prompts, full["input_ids"]):
        if len(ids) > max_length:
            logger.warning("%s: the prompt %r is %d tokens long and was cut to %d", name, prompt[:60], len(ids),
                           max_length)
    return paddle.to_tensor(encoded["input_ids"], dtype="int64")


def encode_prompts(prompts: Sequence[str], tokenizer, text_encoder, tokenizer_2, text_encoder_2,
                   max_sequence_length: int = 512, dtype: str = "float32") -> PromptEmbeddings:
    """Encode ``B`` prompts into FLUX's two text conditions (cast to ``dtype``)."""
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    if not 0 < max_sequence_length <= 512:
        raise ValueError(f"max_sequence_length must be in 1..512, got {max_sequence_length}")
    clip_ids = _token_ids(tokenizer, prompts, int(tokenizer.model_max_length), "CLIP")
    t5_ids = _token_ids(tokenizer_2, prompts, int(max_sequence_length), "T5")
    with paddle.no_grad():
        pooled = text_encoder(clip_ids, return_dict=True).pooler_output
        sequence = text_encoder_2(t5_ids, return_dict=True).last_hidden_state
    return PromptEmbeddings(pooled=pooled.astype(dtype), sequence=sequence.astype(dtype))


def repeat_per_image(embeddings: PromptEmbeddings, num_images_per_prompt: int) -> PromptEmbeddings:
    """Repeat each prompt's embeddings ``num_images_per_prompt`` times (prompt-major order, as diffusers)."""
    n = int(num_images_per_prompt)
    return PromptEmbeddings(pooled=paddle.repeat_interleave(embeddings.pooled, n, axis=0),
                            sequence=paddle.repeat_interleave(embeddings.sequence, n, axis=0))
