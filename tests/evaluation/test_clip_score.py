"""CLIP score: preprocessing, tokenization and embeddings against transformers' CLIPModel (tiny random weights)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ppdiffusers_fast.evaluation.clip_score import (
    ClipEmbedder,
    clip_scores_for_images,
    cosine_similarities,
    summarize_clip_scores,
)
from ppdiffusers_fast.evaluation.features import ClipFeatureExtractor


EVALUATION_FIXTURES = Path(__file__).parent.parent / "fixtures" / "evaluation"


@pytest.fixture(scope="module")
def reference():
    with np.load(EVALUATION_FIXTURES / "clip_embeddings.npz") as data:
        arrays = {k: data[k] for k in data.files}
    arrays["images"] = [arrays[f"image_{i}"] for i in range(int(arrays["num_images"]))]
    arrays["captions"] = [str(c) for c in arrays["captions"]]
    return arrays


@pytest.fixture(scope="module")
def embedder():
    return ClipEmbedder(EVALUATION_FIXTURES / "clip_tiny")


def test_preprocessing_matches_clip_image_processor(embedder, reference):
    pixels = embedder.preprocess(reference["images"])  # 96x128, 64x64, 150x80 -> shortest edge 64, crop 64
    assert pixels.shape == reference["pixel_values"].shape == (3, 3, 64, 64)
    np.testing.assert_allclose(pixels, reference["pixel_values"], rtol=0, atol=1e-6)


def test_image_embeddings_match_transformers(embedder, reference):
    from_pixels = embedder.image_embeddings_from_pixels(reference["pixel_values"])
    np.testing.assert_allclose(from_pixels, reference["image_embeds"], rtol=0, atol=1e-5)
    from_images = embedder.image_embeddings(reference["images"])
    np.testing.assert_allclose(from_images, reference["image_embeds"], rtol=0, atol=1e-5)


def test_tokens_and_text_embeddings_match_transformers(embedder, reference):
    np.testing.assert_array_equal(embedder.tokenize(reference["captions"]), reference["input_ids"])
    np.testing.assert_allclose(embedder.text_embeddings(reference["captions"]), reference["text_embeds"],
                               rtol=0, atol=1e-5)


def test_clip_score_formula_by_hand(embedder, reference):
    image_embeds, text_embeds = reference["image_embeds"].astype(np.float64), reference["text_embeds"].astype(np.float64)
    by_hand = [image_embeds[i] @ text_embeds[i] / np.sqrt((image_embeds[i] @ image_embeds[i]) *
                                                          (text_embeds[i] @ text_embeds[i])) for i in range(3)]
    np.testing.assert_allclose(cosine_similarities(image_embeds, text_embeds), by_hand, rtol=1e-12)
    scores = clip_scores_for_images(embedder, reference["images"], reference["captions"], batch_size=2)
    np.testing.assert_allclose(scores, by_hand, rtol=0, atol=1e-5)
    summary = summarize_clip_scores(np.array([0.3, -0.2, 0.5]))
    assert summary["clip_score"] == pytest.approx(0.2, abs=1e-15)
    assert summary["clip_score_x100"] == pytest.approx((30 + 0 + 50) / 3, abs=1e-12)
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        clip_scores_for_images(embedder, reference["images"], reference["captions"][:2])


def test_clip_feature_extractor(embedder, reference):
    extractor = ClipFeatureExtractor(embedder)
    features = extractor(reference["images"])
    assert extractor.feature_dim == 16 and features.dtype == np.float64
    np.testing.assert_allclose(features, reference["image_embeds"], rtol=0, atol=1e-5)


def test_bad_clip_folders_are_reported(tmp_path):
    source = EVALUATION_FIXTURES / "clip_tiny"
    no_weights = tmp_path / "no_weights"
    shutil.copytree(source, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        ClipEmbedder(no_weights)
    other_config = tmp_path / "other_config"
    shutil.copytree(source, other_config)
    config = json.loads((other_config / "config.json").read_text())
    config["projection_dim"] = 8
    config["text_config"]["projection_dim"] = 8
    config["vision_config"]["projection_dim"] = 8
    (other_config / "config.json").write_text(json.dumps(config))
    with pytest.raises(KeyError, match="text_projection.weight: file"):
        ClipEmbedder(other_config)
