"""The exact epsilon model of Gaussian data: a closed-form baseline and the ground truth of the tests.

For data x0 ~ N(mu, Sigma) (in the [-1, 1] data space) the VP marginal at time t is
N(sqrt(ab) mu, ab Sigma + sigma^2 I) with ab = alpha_bar(t), sigma^2 = 1 - ab, so the optimal epsilon
prediction is eps(x_t, t) = -sigma * score = sigma (ab Sigma + sigma^2 I)^-1 (x_t - sqrt(ab) mu).
With Sigma = U diag(lambda) U^T this is two matrix products per call. Fitted to CIFAR-10 it is the best
*linear* denoiser of natural images (a Wiener filter): a real, honest purifier model, only weaker than a
learned score network, and exact on Gaussian data, which is what the sampler tests need.
"""
import torch
from torch import nn

from rdp_core.sampling.schedule import VP


class GaussianEpsModel(nn.Module):
    def __init__(self, mean, eigvals, eigvecs, sample_shape, schedule=VP):
        super().__init__()
        dim = mean.numel()
        if eigvals.shape != (dim,) or eigvecs.shape != (dim, dim):
            raise ValueError(
                f"mean has {dim} entries, so eigvals must be ({dim},) and eigvecs ({dim}, {dim}); "
                f"got {tuple(eigvals.shape)} and {tuple(eigvecs.shape)}"
            )
        if int(torch.tensor(sample_shape).prod()) != dim:
            raise ValueError(f"sample_shape {tuple(sample_shape)} does not hold {dim} values")
        self.sample_shape = tuple(sample_shape)
        self.schedule = schedule
        self.register_buffer("mean", mean.reshape(dim).clone())
        self.register_buffer("eigvals", eigvals.clamp_min(0.0).clone())
        self.register_buffer("eigvecs", eigvecs.clone())

    @classmethod
    def from_covariance(cls, mean, cov, schedule=VP):
        """Model of N(mean, cov); `mean` has the per-sample shape, cov is (dim, dim)."""
        eigvals, eigvecs = torch.linalg.eigh(cov.to(torch.float64))
        dtype = mean.dtype
        return cls(mean, eigvals.to(dtype), eigvecs.to(dtype), mean.shape, schedule)

    @classmethod
    def fit(cls, data, schedule=VP, dtype=torch.float32):
        """Maximum-likelihood Gaussian of `data` (n, *sample_shape) given in the [-1, 1] data space."""
        if data.shape[0] < 2:
            raise ValueError(f"fitting a Gaussian needs at least 2 samples, got {data.shape[0]}")
        flat = data.reshape(data.shape[0], -1).to(torch.float64)
        mean = flat.mean(dim=0)
        centered = (flat - mean).to(torch.float32)  # centred first, so float32 products lose nothing material
        cov = (centered.T @ centered).to(torch.float64) / flat.shape[0]
        eigvals, eigvecs = torch.linalg.eigh(cov)
        return cls(mean.to(dtype), eigvals.to(dtype), eigvecs.to(dtype), data.shape[1:], schedule)

    def forward(self, x, t):
        if tuple(x.shape[1:]) != self.sample_shape:
            raise ValueError(f"expected samples of shape {self.sample_shape}, got {tuple(x.shape[1:])}")
        dtype = self.mean.dtype
        log_ab = self.schedule.log_alpha_bar(t.to(dtype))[:, None]
        ab, sigma2 = torch.exp(log_ab), -torch.expm1(log_ab)
        residual = x.reshape(x.shape[0], -1).to(dtype) - ab.sqrt() * self.mean
        coords = residual @ self.eigvecs
        coords = coords * (sigma2.sqrt() / (ab * self.eigvals + sigma2))
        return (coords @ self.eigvecs.T).reshape(x.shape).to(x.dtype)
