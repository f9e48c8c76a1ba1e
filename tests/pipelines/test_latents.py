"""FLUX latent packing, position ids and seeded noise, against index arithmetic written out by hand; the VAE
decode of packed latents against the VAE called by hand."""
from pathlib import Path

import numpy as np
import paddle
import pytest

from ppdiffusers_fast.models.flux_folder import load_vae
from ppdiffusers_fast.pipelines.latents import (
    decode_latents,
    latent_image_ids,
    pack_latents,
    resolve_seeds,
    seeded_noise,
    text_ids,
    unpack_latents,
)


def test_pack_puts_each_2x2_patch_in_one_token_channel_major():
    batch, channels, height, width = 2, 3, 4, 6
    latents = np.random.randn(batch, channels, height, width).astype(np.float32)
    tokens = pack_latents(paddle.to_tensor(latents)).numpy()
    assert tokens.shape == (batch, (height // 2) * (width // 2), 4 * channels)
    for b in range(batch):
        for i in range(height // 2):
            for j in range(width // 2):
                token = tokens[b, i * (width // 2) + j]
                for c in range(channels):
                    for dy in range(2):
                        for dx in range(2):
                            assert token[c * 4 + dy * 2 + dx] == latents[b, c, 2 * i + dy, 2 * j + dx]


def test_unpack_inverts_pack():
    latents = paddle.randn([3, 16, 8, 6])
    back = unpack_latents(pack_latents(latents), 8, 6)
    np.testing.assert_array_equal(back.numpy(), latents.numpy())


def test_latent_image_ids_are_zero_row_col():
    ids = latent_image_ids(6, 4).numpy()
    expected = np.array([[0, i, j] for i in range(3) for j in range(2)], dtype=np.float32)
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_array_equal(text_ids(5).numpy(), np.zeros([5, 3], dtype=np.float32))


@pytest.mark.parametrize("shape", [[1, 4, 5, 4], [1, 4, 4, 3]])
def test_pack_rejects_odd_latent_sizes(shape):
    with pytest.raises(ValueError, match="even"):
        pack_latents(paddle.zeros(shape))


def test_unpack_rejects_wrong_token_count():
    with pytest.raises(ValueError, match="cannot fill"):
        unpack_latents(paddle.zeros([1, 5, 64]), 4, 4)


def test_seeds_per_image():
    assert resolve_seeds(7, 3) == [7, 8, 9]
    assert resolve_seeds([4, 2], 2) == [4, 2]
    assert len(set(resolve_seeds(None, 4))) == 4
    with pytest.raises(ValueError, match="2 seeds for 3 images"):
        resolve_seeds([1, 2], 3)


def test_seeded_noise_depends_only_on_the_image_seed():
    together = seeded_noise([11, 12], [4, 2, 2]).numpy()
    alone = seeded_noise([12], [4, 2, 2]).numpy()
    np.testing.assert_array_equal(together[1], alone[0])
    expected = np.random.default_rng(11).standard_normal([4, 2, 2], dtype=np.float32)
    np.testing.assert_array_equal(together[0], expected)


def test_decode_latents_unscales_unshifts_and_decodes():
    vae = load_vae(Path(__file__).resolve().parents[1] / "fixtures" / "pipeline" / "tiny_flux")
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor
    assert scale != 1.0 and shift != 0.0  # the fixture VAE makes both steps visible
    rng = np.random.RandomState(0)
    latents = paddle.to_tensor(rng.randn(2, vae.config.latent_channels, 4, 6).astype("float32"))
    with paddle.no_grad():
        expected = vae.decode(latents / scale + shift).sample.numpy()
    images = decode_latents(vae, pack_latents(latents), 4, 6)
    assert images.dtype == paddle.float32 and list(images.shape) == [2, 3, 32, 48]  # 8x the latent grid
    np.testing.assert_allclose(images.numpy(), expected, atol=1e-6, rtol=0)
