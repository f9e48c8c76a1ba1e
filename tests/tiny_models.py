"""The tiny FLUX configuration and LoRA shape that the method and training tests build on (not a test module).

Importable from every test (``tests/`` is on ``sys.path`` through ``tests/conftest.py``); a script started in a
subprocess puts ``tests/`` on its path itself.
"""
import paddle

from ppdiffusers_fast.models.lora import LoraConfig
from ppdiffusers_fast.models.transformer_flux import FluxTransformer2DModel
from ppdiffusers_fast.pipelines.latents import latent_image_ids, text_ids

# inner dim 2 x 16 = 32; one double block and two single blocks; 16 packed latent channels (4 VAE channels x 2 x 2)
TINY_FLUX = dict(in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                 joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8))
TINY_LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.2", "proj_mlp", "proj_out")


def tiny_flux_config(**overrides):
    """``TINY_FLUX`` with some entries changed (e.g. ``num_single_layers=1``)."""
    unknown = sorted(set(overrides) - set(TINY_FLUX) - {"guidance_embeds"})
    if unknown:
        raise KeyError(f"not a tiny FLUX setting: {unknown}")
    return dict(TINY_FLUX, **overrides)


def tiny_flux(seed=0, guidance_embeds=True, **overrides):
    """A fresh tiny FLUX transformer; the same seed and settings give the same weights."""
    paddle.seed(seed)
    return FluxTransformer2DModel(guidance_embeds=guidance_embeds, **tiny_flux_config(**overrides))


def tiny_flux_inputs(batch, rows, cols, text_len, guidance=True, in_channels=TINY_FLUX["in_channels"]):
    """Random keyword inputs of a tiny FLUX transformer for a ``rows x cols`` packed-token grid and ``text_len``
    text tokens (guidance 3.5, or None)."""
    return dict(hidden_states=paddle.randn([batch, rows * cols, in_channels]),
                encoder_hidden_states=paddle.randn([batch, text_len, TINY_FLUX["joint_attention_dim"]]),
                pooled_projections=paddle.randn([batch, TINY_FLUX["pooled_projection_dim"]]),
                timestep=paddle.rand([batch]), img_ids=latent_image_ids(2 * rows, 2 * cols),
                txt_ids=text_ids(text_len), guidance=paddle.full([batch], 3.5) if guidance else None)


def tiny_lora(target_modules=TINY_LORA_TARGETS):
    """Rank-4 adapters with alpha = rank (scale 1) on ``target_modules``."""
    return LoraConfig(rank=4, alpha=4.0, target_modules=tuple(target_modules))
