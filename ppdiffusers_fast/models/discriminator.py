"""Discriminator heads on the FLUX transformer blocks (FLUX-Lightning, ALGORITHMS.md "Adversarial loss").

The backbone is the frozen teacher (no LoRA adapter live) run once with ``return_block_features=True``;
it yields one image-token feature map per block (19 double + 38 single = 57 for FLUX.1). Each map
``[B, h * w, C]`` is laid out on the packed latent grid ``[B, C, h, w]`` (``h = latent_height / 2``,
``w = latent_width / 2``, not assumed square) and judged by its own small convolutional head:

    y1 = LeakyReLU(GroupNorm(Conv1x1(x)))
    y2 = y1 + LeakyReLU(GroupNorm(Conv1x1(y1)))      (residual second block)
    logits = Conv1x1(y2)                              ([B, 1, h, w], one logit per position)

Only the heads are trained; the backbone's weights never receive a gradient (the method runs it with
its parameters frozen, and the real/fake inputs carry no graph back into the student during a
discriminator update).
"""
from typing import List, Sequence, Tuple

import paddle
import paddle.nn as nn


def tokens_to_grid(features: paddle.Tensor, grid_hw: Tuple[int, int]) -> paddle.Tensor:
    """Lay image tokens out on the latent grid.

    Args:
        features: ``[B, h * w, C]`` image-token hidden states, row-major over the grid.
        grid_hw: ``(h, w)``, the packed latent grid (tokens per column, tokens per row).
    Returns:
        ``[B, C, h, w]``.
    """
    batch, num_tokens, channels = features.shape
    height, width = grid_hw
    if height * width != num_tokens:
        raise ValueError(
            f"block feature has {num_tokens} image tokens but the latent grid is {height}x{width} "
            f"= {height * width}; pass the grid of the latents that produced these features"
        )
    return features.reshape([batch, height, width, channels]).transpose([0, 3, 1, 2])


def _group_count(channels: int, preferred: int = 32) -> int:
    """Largest group count <= ``preferred`` that divides ``channels`` (32 for real FLUX heads)."""
    for groups in range(min(preferred, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


class DiscriminatorHead(nn.Layer):
    """One head: ``[B, h*w, in_channels]`` block features -> ``[B, 1, h, w]`` logits."""

    def __init__(self, in_channels: int, hidden_channels: int = 256, negative_slope: float = 0.2):
        super().__init__()
        groups = _group_count(hidden_channels)
        self.conv_in = nn.Conv2D(in_channels, hidden_channels, kernel_size=1)
        self.norm_in = nn.GroupNorm(groups, hidden_channels)
        self.conv_mid = nn.Conv2D(hidden_channels, hidden_channels, kernel_size=1)
        self.norm_mid = nn.GroupNorm(groups, hidden_channels)
        self.act = nn.LeakyReLU(negative_slope)
        self.conv_out = nn.Conv2D(hidden_channels, 1, kernel_size=1)

    def forward(self, features: paddle.Tensor, grid_hw: Tuple[int, int]) -> paddle.Tensor:
        x = tokens_to_grid(features, grid_hw)
        x = self.act(self.norm_in(self.conv_in(x)))
        x = x + self.act(self.norm_mid(self.conv_mid(x)))
        return self.conv_out(x)


class FluxDiscriminatorHeads(nn.Layer):
    """One :class:`DiscriminatorHead` per transformer block.

    Args:
        num_blocks: number of block feature maps (``num_layers + num_single_layers``; 57 for FLUX.1).
        in_channels: transformer inner dim (``num_attention_heads * attention_head_dim``; 3072 for FLUX.1).
        hidden_channels: width of each head.
    """

    def __init__(self, num_blocks: int, in_channels: int, hidden_channels: int = 256,
                 negative_slope: float = 0.2):
        super().__init__()
        self.heads = nn.LayerList(
            [DiscriminatorHead(in_channels, hidden_channels, negative_slope) for _ in range(num_blocks)]
        )

    @classmethod
    def for_transformer(cls, transformer, hidden_channels: int = 256) -> "FluxDiscriminatorHeads":
        """Heads sized from a FLUX transformer's config (one per double and single block)."""
        config = transformer.config
        num_blocks = config.num_layers + config.num_single_layers
        inner_dim = config.num_attention_heads * config.attention_head_dim
        return cls(num_blocks, inner_dim, hidden_channels)

    def forward(self, block_features: Sequence[paddle.Tensor], grid_hw: Tuple[int, int]) -> List[paddle.Tensor]:
        """Args: ``block_features``: one ``[B, h*w, C]`` map per block. Returns one ``[B, 1, h, w]`` logit map per head."""
        if len(block_features) != len(self.heads):
            raise ValueError(
                f"got {len(block_features)} block feature maps for {len(self.heads)} discriminator heads"
            )
        return [head(features, grid_hw) for head, features in zip(self.heads, block_features)]
