"""Frechet distance against an independent float64 reference, statistics files, FID between folders."""
import logging

import numpy as np
import paddle
import pytest
from PIL import Image

from ppdiffusers_fast.evaluation import fid as fid_module
from ppdiffusers_fast.evaluation.features import NetworkFeatureExtractor
from ppdiffusers_fast.evaluation.fid import (
    ActivationStatistics,
    activation_statistics,
    fid_between_folders,
    frechet_distance,
    frechet_distance_from_statistics,
    load_statistics,
    save_statistics,
)


def reference_frechet(mu1, sigma1, mu2, sigma2):
    """Independent reference: Tr((S1 S2)^1/2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)), symmetric eigh in float64."""
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
    diff = mu1 - mu2
    return diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt


def random_gaussian(rng, dim, num_samples, scale=1.0):
    mixing = rng.standard_normal((dim, dim)) * scale / np.sqrt(dim)
    samples = rng.standard_normal((num_samples, dim)) @ mixing + rng.standard_normal(dim)
    return samples.mean(axis=0), np.cov(samples, rowvar=False)


@pytest.mark.parametrize("dim, num_samples", [(16, 500), (64, 1000), (128, 40), (200, 20)])
def test_frechet_distance_matches_float64_reference(dim, num_samples):
    # num_samples < dim gives rank-deficient (singular) covariances: the near-singular case.
    rng = np.random.default_rng(dim)
    mu1, sigma1 = random_gaussian(rng, dim, num_samples)
    mu2, sigma2 = random_gaussian(rng, dim, num_samples, scale=2.0)
    expected = reference_frechet(mu1, sigma1, mu2, sigma2)
    got = frechet_distance(mu1, sigma1, mu2, sigma2)
    assert abs(got - expected) <= 1e-6 * abs(expected)


@pytest.mark.parametrize("dim, num_samples", [(64, 1000), (128, 40)])
def test_eigh_method_agrees_with_sqrtm(dim, num_samples):
    rng = np.random.default_rng(dim + 1)
    mu1, sigma1 = random_gaussian(rng, dim, num_samples)
    mu2, sigma2 = random_gaussian(rng, dim, num_samples, scale=0.5)
    by_sqrtm = frechet_distance(mu1, sigma1, mu2, sigma2, method="sqrtm")
    by_eigh = frechet_distance(mu1, sigma1, mu2, sigma2, method="eigh")
    assert abs(by_eigh - by_sqrtm) <= 1e-6 * abs(by_sqrtm)
    with pytest.raises(ValueError, match="not positive semi-definite"):
        frechet_distance(mu1, -sigma1, mu2, sigma2, method="eigh")
    with pytest.raises(ValueError, match="method must be one of"):
        frechet_distance(mu1, sigma1, mu2, sigma2, method="svd")


def test_exactly_singular_covariances_with_shared_null_space():
    rng = np.random.default_rng(3)
    basis = np.linalg.qr(rng.standard_normal((32, 32)))[0][:, :5]  # both live in the same 5-d subspace
    sigma1 = basis @ np.diag([3.0, 2.0, 1.0, 0.5, 0.1]) @ basis.T
    sigma2 = basis @ np.diag([1.0, 1.0, 2.0, 0.2, 0.3]) @ basis.T
    mu1, mu2 = rng.standard_normal(32), rng.standard_normal(32)
    expected = reference_frechet(mu1, sigma1, mu2, sigma2)
    for method in ("sqrtm", "eigh"):
        assert abs(frechet_distance(mu1, sigma1, mu2, sigma2, method=method) - expected) <= 1e-6 * abs(expected)


def test_one_dimensional_closed_form():
    # d^2 = (m1 - m2)^2 + (s1 - s2)^2 for variances s1^2, s2^2.
    got = frechet_distance(np.array([1.5]), np.array([[4.0]]), np.array([-0.5]), np.array([[0.25]]))
    assert got == pytest.approx((1.5 + 0.5) ** 2 + (2.0 - 0.5) ** 2, rel=1e-12)


def test_fid_of_a_set_against_itself_is_zero():
    features = np.random.default_rng(0).standard_normal((300, 48)) * 3.0
    stats = activation_statistics(features, extractor="demo")
    distance = frechet_distance_from_statistics(stats, stats)
    assert abs(distance) < 1e-9 * np.trace(stats.sigma)


def test_eps_offset_fallback_when_sqrtm_fails(monkeypatch, caplog):
    rng = np.random.default_rng(5)
    mu1, sigma1 = random_gaussian(rng, 24, 200)
    mu2, sigma2 = random_gaussian(rng, 24, 200)
    real_sqrtm = fid_module.scipy.linalg.sqrtm
    calls = []

    def failing_once(matrix):
        calls.append(matrix)
        if len(calls) == 1:
            return np.full_like(matrix, np.nan)
        return real_sqrtm(matrix)

    monkeypatch.setattr(fid_module.scipy.linalg, "sqrtm", failing_once)
    eps = 1e-6
    with caplog.at_level(logging.WARNING):
        got = frechet_distance(mu1, sigma1, mu2, sigma2, eps=eps)
    offset = eps * np.eye(24)
    expected = reference_frechet(mu1, sigma1 + offset, mu2, sigma2 + offset)
    expected -= 2 * 24 * eps  # the offset enters the root only, not the traces of S1 and S2
    assert len(calls) == 2
    assert "eps" in caplog.text or "adding" in caplog.text
    assert abs(got - expected) <= 1e-6 * abs(expected)


def test_covariances_without_real_square_root_are_rejected():
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), -np.eye(3))


@pytest.mark.parametrize("mu2, sigma2, message", [
    (np.zeros(4), np.eye(3), "mu must be"),
    (np.zeros(3), np.eye(3) * np.nan, "NaN"),
])
def test_bad_statistics_are_named(mu2, sigma2, message):
    with pytest.raises(ValueError, match=message):
        frechet_distance(np.zeros(3), np.eye(3), mu2, sigma2)


def test_activation_statistics_match_numpy_by_hand():
    features = np.random.default_rng(1).standard_normal((50, 6))
    stats = activation_statistics(features)
    centered = features - features.mean(axis=0)
    np.testing.assert_allclose(stats.mu, features.mean(axis=0), rtol=0, atol=1e-15)
    np.testing.assert_allclose(stats.sigma, centered.T @ centered / 49, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="at least 2"):
        activation_statistics(features[:1])


def test_statistics_npz_round_trip(tmp_path):
    stats = ActivationStatistics(mu=np.arange(3.0), sigma=np.eye(3) * 2, num_samples=7, extractor="demo")
    save_statistics(tmp_path / "s.npz", stats, metadata={"images": "abc"})
    loaded, metadata = load_statistics(tmp_path / "s.npz")
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    assert (loaded.num_samples, loaded.extractor, metadata) == (7, "demo", {"images": "abc"})
    np.savez(tmp_path / "bad.npz", mu=np.zeros(3))
    with pytest.raises(KeyError, match="sigma"):
        load_statistics(tmp_path / "bad.npz")
    other = ActivationStatistics(mu=np.arange(3.0), sigma=np.eye(3), num_samples=7, extractor="other")
    with pytest.raises(ValueError, match="different feature extractors"):
        frechet_distance_from_statistics(stats, other)


class TinyNet(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.conv = paddle.nn.Conv2D(3, 4, 3, stride=2)
        self.fc = paddle.nn.Linear(4 * 7 * 7, 5)

    def forward(self, x):
        return self.fc(paddle.nn.functional.relu(self.conv(x)).flatten(1))


def test_fid_between_folders_equals_distance_of_the_features(tmp_path):
    rng = np.random.default_rng(2)
    folders = [tmp_path / "a", tmp_path / "b"]
    for shift, folder in zip((0, 60), folders):
        folder.mkdir()
        for i in range(12):
            pixels = np.clip(rng.integers(0, 196, (20, 20, 3)) + shift, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    extractor = NetworkFeatureExtractor(TinyNet(), name="tiny", feature_dim=5, input_size=(16, 16))
    distance, stats_a, stats_b = fid_between_folders(folders[0], folders[1], extractor, batch_size=5,
                                                     show_progress=False)
    features = []
    for folder in folders:
        images = [np.asarray(Image.open(folder / f"{i:03d}.png")) for i in range(12)]
        features.append(extractor(images))
    expected = reference_frechet(features[0].mean(0), np.cov(features[0], rowvar=False),
                                 features[1].mean(0), np.cov(features[1], rowvar=False))
    assert distance == pytest.approx(expected, rel=1e-6)
    assert distance > 0
    itself, _, _ = fid_between_folders(folders[0], folders[0], extractor, show_progress=False)
    assert abs(itself) < 1e-9 * np.trace(stats_a.sigma)
    assert (stats_a.num_samples, stats_b.num_samples) == (12, 12)
