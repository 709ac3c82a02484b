"""Tests of eval.py against the standard implementations and known answers (CPU, seconds).

The Fréchet distance is compared with the formula of pytorch-fid and the ADM evaluator, which take the matrix square
root with scipy.linalg.sqrtm and drop its imaginary rounding; the k-NN metrics with sets whose answer is known.
"""
import numpy as np
import pytest
import scipy.linalg
import torch

import eval as metrics
from conftest import one_line_naming


def reference_fd(mu1, sigma1, mu2, sigma2):
    """pytorch-fid's calculate_frechet_distance (and the ADM evaluator's), with scipy's sqrtm."""
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * 1e-6
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    covmean = covmean.real
    diff = mu1 - mu2
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


@pytest.mark.parametrize("n,d", [(500, 16), (300, 64), (2000, 128)])
def test_frechet_distance_equals_the_standard_implementation(n, d):
    rng = np.random.default_rng(d)
    a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) / np.sqrt(d)  # correlated features
    b = rng.normal(loc=0.3, size=(n, d)) @ rng.normal(size=(d, d)) / np.sqrt(d)
    mu1, s1 = (t.numpy() for t in metrics.feature_stats(a))
    mu2, s2 = (t.numpy() for t in metrics.feature_stats(b))
    np.testing.assert_allclose(mu1, a.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s1, np.cov(a, rowvar=False), rtol=1e-10, atol=1e-12)
    ours, ref = metrics.frechet_distance(mu1, s1, mu2, s2), reference_fd(mu1, s1, mu2, s2)
    assert abs(ours - ref) <= 1e-6 * abs(ref), (ours, ref)


def test_frechet_distance_exact_cases():
    """Equal Gaussians: 0. Means apart, equal covariances: |mu1 - mu2|^2. Diagonal covariances: the sum of
    (sqrt(s1) - sqrt(s2))^2. Rank-deficient covariances (fewer samples than dimensions) stay real and finite."""
    rng = np.random.default_rng(0)
    m = rng.normal(size=8)
    c = np.cov(rng.normal(size=(100, 8)), rowvar=False)
    assert abs(metrics.frechet_distance(m, c, m, c)) < 1e-9
    assert abs(metrics.frechet_distance(m, c, m + 1, c) - 8) < 1e-9
    d1, d2 = rng.uniform(0.1, 2, 8), rng.uniform(0.1, 2, 8)
    expected = ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum()
    assert abs(metrics.frechet_distance(m, np.diag(d1), m, np.diag(d2)) - expected) < 1e-9
    few = [metrics.feature_stats(rng.normal(size=(5, 32))) for _ in range(2)]
    fd = metrics.frechet_distance(*few[0], *few[1])
    assert np.isfinite(fd) and fd > 0
    with pytest.raises(ValueError, match="do not describe two Gaussians"):
        metrics.frechet_distance(m, c, m[:4], c[:4, :4])


def test_stats_files_round_trip_and_read_adm_npz(tmp_path):
    rng = np.random.default_rng(1)
    mu, sigma = metrics.feature_stats(rng.normal(size=(50, 6)))
    metrics.save_stats(str(tmp_path / "ref.safetensors"), mu, sigma)
    got = metrics.load_stats(str(tmp_path / "ref.safetensors"))
    assert torch.equal(got[0], mu) and torch.equal(got[1], sigma)
    np.savez(tmp_path / "VIRTUAL_ref.npz", mu=mu.numpy().astype(np.float32), sigma=sigma.numpy())  # ADM's layout
    got = metrics.load_stats(str(tmp_path / "VIRTUAL_ref.npz"))
    assert got[0].dtype == torch.float64 and torch.allclose(got[0], mu, atol=1e-6) and torch.equal(got[1], sigma)
    np.savez(tmp_path / "bad.npz", mu=mu.numpy(), sigma=sigma.numpy()[:3])
    with pytest.raises(ValueError) as e:
        metrics.load_stats(str(tmp_path / "bad.npz"))
    one_line_naming(e, str(tmp_path / "bad.npz"), "'sigma'")
    np.savez(tmp_path / "none.npz", x=mu.numpy())
    with pytest.raises(ValueError) as e:
        metrics.load_stats(str(tmp_path / "none.npz"))
    one_line_naming(e, "missing key 'mu'", "missing key 'sigma'")


def test_precision_recall_density_coverage_known_answers():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(400, 8))
    # the same set: every sample lies in its own ball
    p, r = metrics.precision_recall(real, real)
    density, coverage = metrics.density_coverage(real, real)
    assert p == r == 1.0 and coverage == 1.0 and density >= 1.0
    # far away: nothing inside the other's manifold
    far = real + 100
    assert metrics.precision_recall(real, far) == (0.0, 0.0)
    assert metrics.density_coverage(real, far) == (0.0, 0.0)
    # mode collapse: the fakes are the real samples with x0 > 1 (70 of 400) -> precision 1, recall and coverage far
    # below 1 (above the 70 / 400 of the points themselves: k-NN balls reach past the edge of the kept region)
    part = real[real[:, 0] > 1]
    p, r = metrics.precision_recall(real, part)
    density, coverage = metrics.density_coverage(real, part)
    assert p == 1.0 and len(part) / len(real) < r < 0.6 and len(part) / len(real) < coverage < 0.6
    # a fresh sample of the same distribution scores high on all four, a shifted one lower on each
    fresh, shifted = rng.normal(size=(400, 8)), rng.normal(loc=1.5, size=(400, 8))
    good, bad = metrics.precision_recall(real, fresh), metrics.precision_recall(real, shifted)
    assert min(good) > 0.6 and all(g > b for g, b in zip(good, bad))
    good, bad = metrics.density_coverage(real, fresh), metrics.density_coverage(real, shifted)
    assert 0.7 < good[0] < 1.3 and good[1] > 0.8 and all(g > b for g, b in zip(good, bad))
