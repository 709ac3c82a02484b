"""Evaluation metrics the field reports, computed from feature vectors: Fréchet distance, precision / recall,
density / coverage, and reference statistics files.

- Fréchet distance (FID when the features are Inception-v3 pool features, FD-DINOv2 with DINOv2 ones): the
  distance between the Gaussians fitted to two feature sets, |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)). In
  float64, with the matrix square root taken through a symmetric eigendecomposition, so it is real by construction
  and equals the standard implementations (scipy's sqrtm in pytorch-fid and the ADM evaluator) to ~1e-10.
- Precision / recall (Kynkäänniemi et al. 2019): the share of generated samples inside the real samples' k-NN
  manifold (each real point's ball out to its k-th nearest real neighbour), and the share of real samples inside
  the generated samples' manifold.
- Density / coverage (Naeem et al. 2020): how many real balls a generated sample falls into, over k; the share of
  real balls that hold at least one generated sample.
Features are (n, d) float tensors or arrays; statistics (mu (d,), sigma (d, d)) are float64.

    python -m pytest -q test_eval.py
"""
import numpy as np
import torch

import ckpt


# ----------------------------------------------------------------------------- statistics and the Fréchet distance
def feature_stats(features):
    """(n, d) features -> (mu (d,), sigma (d, d)): their mean and unbiased covariance, in float64."""
    x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"feature_stats: expected (n >= 2, d) features, got shape {tuple(x.shape)}")
    return x.mean(0), torch.cov(x.T).reshape(x.shape[1], x.shape[1])


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), as a float.
    tr((S1 S2)^(1/2)) = tr((A S2 A)^(1/2)) with A = S1^(1/2): A S2 A is symmetric positive semi-definite, so its
    square root's trace is the sum of the square roots of its eigenvalues (negatives are rounding, clamped to 0)."""
    mu1, mu2, s1, s2 = (torch.as_tensor(np.asarray(v), dtype=torch.float64) for v in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(f"frechet_distance: shapes mu {tuple(mu1.shape)}, {tuple(mu2.shape)}, sigma "
                         f"{tuple(s1.shape)}, {tuple(s2.shape)} do not describe two Gaussians of one dimension")
    w, v = torch.linalg.eigh((s1 + s1.T) / 2)  # S1 = V diag(w) V^T
    a = (v * w.clamp_min(0).sqrt()) @ v.T  # S1^(1/2)
    root_trace = torch.linalg.eigvalsh(a @ s2 @ a).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * root_trace)


def save_stats(path, mu, sigma):
    ckpt.save_safetensors(path, {"mu": torch.as_tensor(mu, dtype=torch.float64),
                                 "sigma": torch.as_tensor(sigma, dtype=torch.float64)})


def load_stats(path):
    """(mu, sigma) from our safetensors (save_stats) or from an .npz with arrays mu and sigma: the reference batch
    statistics of the ADM evaluator (VIRTUAL_imagenet256_labeled.npz), so ImageNet FIDs compare with the papers'."""
    if str(path).endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as f:  # no pickled objects: arrays only
                stats = {k: torch.from_numpy(f[k]).double() for k in ("mu", "sigma") if k in f.files}
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a readable .npz ({type(e).__name__}: {e})") from None
    else:
        stats = ckpt.read_safetensors(path)
    d = stats["mu"].numel() if "mu" in stats else None
    problems = [f"missing key '{k}'" for k in ("mu", "sigma") if k not in stats]
    if not problems and (stats["mu"].ndim != 1 or stats["sigma"].shape != (d, d)):
        problems.append(f"key 'sigma' has shape {tuple(stats['sigma'].shape)}, key 'mu' {tuple(stats['mu'].shape)}: "
                        f"expected (d, d) and (d,)")
    ckpt.report(path, problems)
    return stats["mu"].double(), stats["sigma"].double()


# ----------------------------------------------------------------------------- k-NN manifolds
def _kth_radius(x, k):
    """Distance of each row of x (n, d) to its k-th nearest other row: (n,)."""
    d = torch.cdist(x, x)  # (n, n), the diagonal is each point itself
    return d.kthvalue(k + 1, dim=1).values


def precision_recall(real, fake, k=3):
    """Kynkäänniemi et al.'s improved precision and recall with k-NN balls (k = 3, as they recommend): (precision,
    recall) in [0, 1]."""
    real, fake = (torch.as_tensor(np.asarray(v), dtype=torch.float64) for v in (real, fake))
    d = torch.cdist(fake, real)  # (n_fake, n_real)
    precision = (d <= _kth_radius(real, k)[None]).any(1).double().mean()  # fake inside some real ball
    recall = (d.T <= _kth_radius(fake, k)[None]).any(1).double().mean()  # real inside some fake ball
    return float(precision), float(recall)


def density_coverage(real, fake, k=5):
    """Naeem et al.'s density (mean number of real balls a fake sample falls in, over k; about 1 when the two sets
    match, above 1 where fakes crowd dense regions) and coverage (share of real balls holding a fake; k = 5, their
    recommendation)."""
    real, fake = (torch.as_tensor(np.asarray(v), dtype=torch.float64) for v in (real, fake))
    inside = torch.cdist(fake, real) <= _kth_radius(real, k)[None]  # (n_fake, n_real)
    return float(inside.sum() / (k * fake.shape[0])), float(inside.any(0).double().mean())
