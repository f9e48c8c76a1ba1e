"""FLUX latent layout: 2x2 packing of VAE latents into tokens, their rotary position ids, seeded noise, and
the VAE decode of packed latents (:func:`decode_latents`, the inverse of ``data.encoders.VaeLatentEncoder``).

A VAE latent ``[B, C, H, W]`` (C = 16 for FLUX, H = image height / 8) becomes ``(H/2) * (W/2)`` tokens of
``4C`` features: token ``(i, j)`` (row-major) holds the 2x2 patch at rows ``2i, 2i+1`` and columns
``2j, 2j+1``, features ordered channel-major, then patch row, then patch column (as diffusers' FLUX).
Its position id is ``(0, i, j)``; text tokens have ids ``(0, 0, 0)``.
"""
import numbers
from typing import List, Sequence, Union

import numpy as np
import paddle

__all__ = ["pack_latents", "unpack_latents", "latent_image_ids", "text_ids", "seeded_noise", "seeded_step_noise",
           "resolve_seeds", "decode_latents"]


def _check_even(value, name):
    if not isinstance(value, numbers.Integral) or value <= 0 or value % 2:
        raise ValueError(f"{name} must be a positive even integer (2x2 packing), got {value!r}")
    return int(value)


def pack_latents(latents: paddle.Tensor) -> paddle.Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/2) * (W/2), 4C]`` (2x2 patches, row-major tokens)."""
    if latents.ndim != 4:
        raise ValueError(f"latents must be [B, C, H, W], got {list(latents.shape)}")
    batch, channels, height, width = latents.shape
    _check_even(height, "latent height")
    _check_even(width, "latent width")
    patches = latents.reshape([batch, channels, height // 2, 2, width // 2, 2])
    patches = patches.transpose([0, 2, 4, 1, 3, 5])
    return patches.reshape([batch, (height // 2) * (width // 2), channels * 4])


def unpack_latents(tokens: paddle.Tensor, latent_height: int, latent_width: int) -> paddle.Tensor:
    """Inverse of :func:`pack_latents`: ``[B, (H/2) * (W/2), 4C]`` -> ``[B, C, H, W]``.

    Args:
        latent_height, latent_width: H and W of the VAE latent (image size / 8), both even.
    """
    _check_even(latent_height, "latent_height")
    _check_even(latent_width, "latent_width")
    if tokens.ndim != 3 or tokens.shape[-1] % 4:
        raise ValueError(f"tokens must be [B, L, 4C], got {list(tokens.shape)}")
    batch, length, features = tokens.shape
    rows, cols = latent_height // 2, latent_width // 2
    if length != rows * cols:
        raise ValueError(f"{length} tokens cannot fill a {latent_height}x{latent_width} latent "
                         f"({rows}x{cols} = {rows * cols} tokens)")
    patches = tokens.reshape([batch, rows, cols, features // 4, 2, 2])
    patches = patches.transpose([0, 3, 1, 4, 2, 5])
    return patches.reshape([batch, features // 4, latent_height, latent_width])


def latent_image_ids(latent_height: int, latent_width: int, dtype: str = "float32") -> paddle.Tensor:
    """Rotary ids of the packed image tokens: ``[(H/2) * (W/2), 3]`` with row ``(0, i, j)`` for token ``(i, j)``."""
    rows = _check_even(latent_height, "latent_height") // 2
    cols = _check_even(latent_width, "latent_width") // 2
    ids = np.zeros([rows, cols, 3], dtype=np.float32)
    ids[..., 1] = np.arange(rows, dtype=np.float32)[:, None]
    ids[..., 2] = np.arange(cols, dtype=np.float32)[None, :]
    return paddle.to_tensor(ids.reshape([rows * cols, 3]), dtype=dtype)


def text_ids(num_text_tokens: int, dtype: str = "float32") -> paddle.Tensor:
    """Rotary ids of the text tokens: zeros ``[L_txt, 3]``."""
    return paddle.zeros([int(num_text_tokens), 3], dtype=dtype)


def resolve_seeds(seed: Union[None, int, Sequence[int]], num_images: int) -> List[int]:
    """One seed per image: ``seed + i`` for an int, the list itself (length checked), or fresh random seeds."""
    if seed is None:
        return [int(s) for s in np.random.SeedSequence().generate_state(num_images, dtype=np.uint32)]
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        return [int(seed) + i for i in range(num_images)]
    seeds = [int(s) for s in seed]
    if len(seeds) != num_images:
        raise ValueError(f"got {len(seeds)} seeds for {num_images} images (batch x num_images_per_prompt)")
    return seeds


def seeded_noise(seeds: Sequence[int], shape: Sequence[int], dtype: str = "float32") -> paddle.Tensor:
    """Standard normal noise ``[len(seeds), *shape]``, image ``i`` drawn from ``seeds[i]`` alone.

    Drawn with numpy's PCG64 generator so that an image depends only on its seed and its size, on every
    device and for every batch composition.
    """
    draws = [np.random.default_rng(int(s)).standard_normal(list(shape), dtype=np.float32) for s in seeds]
    return paddle.to_tensor(np.stack(draws)).astype(dtype)


def seeded_step_noise(seeds: Sequence[int], step: int, shape: Sequence[int], dtype: str = "float32") -> paddle.Tensor:
    """The fresh noise ``[len(seeds), *shape]`` a re-noising sampler adds after step ``step`` (0-based).

    Image ``i`` draws from numpy's PCG64 seeded with the pair ``(seeds[i], step + 1)``: independent of the start
    noise (:func:`seeded_noise`, seeded with ``seeds[i]`` alone) and of the other steps, and the same for every
    batch composition.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    draws = [np.random.default_rng([int(s), int(step) + 1]).standard_normal(list(shape), dtype=np.float32)
             for s in seeds]
    return paddle.to_tensor(np.stack(draws)).astype(dtype)


def decode_latents(vae, tokens: paddle.Tensor, latent_height: int, latent_width: int) -> paddle.Tensor:
    """Packed latents -> images with the VAE: ``vae.decode(unpack(x) / scaling_factor + shift_factor)``.

    Args:
        vae: an ``AutoencoderKL`` whose config has ``scaling_factor`` and ``shift_factor`` (None counts as 0).
        tokens: ``[B, (H/2) * (W/2), 64]`` packed latents (any float dtype).
        latent_height, latent_width: H and W of the VAE latent (image size / 8).
    Returns:
        ``[B, 3, 8H, 8W]`` float32 images in the VAE's range (about [-1, 1], not clipped); no graph.
    """
    config = vae.config
    latents = unpack_latents(tokens, latent_height, latent_width).astype("float32")
    latents = latents / config.scaling_factor + (config.shift_factor or 0.0)
    with paddle.no_grad():
        return vae.decode(latents.astype(vae.dtype)).sample.astype("float32")
