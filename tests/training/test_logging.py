"""Logging pieces: the non-finite check, VisualDL output, latent previews, validation samples."""
import math

import numpy as np
import paddle
import pytest
from training_toys import latent_stream, tiny_pcm

from ppdiffusers_fast.training.logging import NonFiniteLossError, TrainingLogger, check_finite
from ppdiffusers_fast.training.validation import Validator, latent_preview


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_check_finite_names_the_loss_and_step(value):
    with pytest.raises(NonFiniteLossError) as info:
        check_finite({"pcm": 0.1, "adv_g": value}, 17)
    assert f"loss 'adv_g' is {value} at step 17" in str(info.value)
    assert info.value.name == "adv_g" and info.value.step == 17
    check_finite({"pcm": 0.1}, 3)  # finite: no error


def test_visualdl_scalars_and_images_are_written(tmp_path):
    logger = TrainingLogger(str(tmp_path / "logs"), enabled=True, total_steps=2, report_to="visualdl")
    logger.log_scalars(1, {"loss/pcm": 0.5, "lr/generator": 1e-3})
    logger.log_images(1, "validation", [np.zeros((8, 8, 3), np.uint8)])
    logger.close()
    files = [p for p in (tmp_path / "logs").rglob("*") if p.is_file()]
    assert files and sum(p.stat().st_size for p in files) > 0
    assert logger.history == [{"loss/pcm": 0.5, "lr/generator": 1e-3, "step": 1}]
    with pytest.raises(ValueError, match="report_to"):
        TrainingLogger(None, enabled=True, total_steps=1, report_to="wandb")


def test_latent_preview_scales_each_image_to_uint8():
    tokens = paddle.to_tensor(np.random.RandomState(0).randn(2, 4, 16).astype("float32"))  # 4x4 latent, 4 channels
    images = latent_preview(tokens, (4, 4))
    assert len(images) == 2 and images[0].shape == (4, 4, 3) and images[0].dtype == np.uint8
    assert images[0].min() == 0 and images[0].max() == 255


def test_validator_samples_fixed_prompts_with_the_student():
    method = tiny_pcm()
    batch = next(latent_stream(num_samples=2, batch_size=2))
    noise = paddle.randn(batch.latents.shape)
    validator = Validator(batch.cond, noise, lambda tokens: latent_preview(tokens, batch.latent_size))
    method.train()
    first, second = validator(method), validator(method)
    one_at_a_time = Validator(batch.cond, noise, lambda t: latent_preview(t, batch.latent_size), batch_size=1)
    for a, b in zip(first, one_at_a_time(method)):  # --sample_batch_size only changes the chunking
        np.testing.assert_array_equal(a, b)
    assert method.training  # restored after sampling in eval mode
    assert len(first) == 2 and first[0].shape == (4, 4, 3)
    np.testing.assert_array_equal(first[0], second[0])  # fixed noise: the same images
    assert not math.isnan(float(first[0].mean()))
