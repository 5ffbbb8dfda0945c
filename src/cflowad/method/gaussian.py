"""The appendix's Gaussian model as a decoder: one Gaussian per feature position (PaDiM).

Appendix A of the paper writes CFLOW-AD's objective against the Gaussian density
(5.2), ``log p(z) = -D/2 log 2pi + log det Sigma^-1/2 - M^2(z) / 2``; a flow with a
linear ``g`` is exactly this model. :class:`GaussianDecoder` fits it per scale with
one mean and covariance per position (as PaDiM), because the flows are conditioned
on position too: both decoders then see the same information and differ only in
the density family. One Gaussian shared by all positions would blur an edge region
into the background's statistics.

Each covariance is the Ledoit-Wolf shrinkage of the position's sample covariance
towards a scaled identity (the shrinkage is estimated from the data, no parameter),
so it stays invertible with fewer images than dimensions (5 training images against
320 channels at stride 32). Fitting runs in float64 from the cached features; the
model keeps the mean, the whitening factor ``C^-1`` (``Sigma = C C^T``) and
``log det Sigma^-1`` per position in float32.

Memory (float32 buffers, what the model stores; the fit holds twice as much in
float64 for the positions it processes at once): a 320-channel stride-32 scale at
8 x 8 positions is 64 x 320 x 320 x 4 B = 26 MB; Lite0's stride-8 scale (40
channels) at 32 x 32 positions is 1024 x 40 x 40 x 4 B = 6.6 MB.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["GaussianDecoder", "ledoit_wolf"]

# float64 entries of the positions fitted at once: bounds the fit's memory (about 512 MB)
_FIT_CHUNK_ENTRIES = 64 * 2**20


class GaussianDecoder(nn.Module):
    """log p(z) of eq. (5.2) with one Gaussian per position of a scale.

    Args:
        dim: feature dimension D.
        positions: H_k * W_k positions of the scale, in row-major order.
    """

    mean: Tensor
    whiten: Tensor
    log_det_precision: Tensor

    def __init__(self, dim: int, positions: int) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("mean", torch.zeros(positions, dim))
        self.register_buffer("whiten", torch.eye(dim).repeat(positions, 1, 1))
        self.register_buffer("log_det_precision", torch.zeros(positions))

    @torch.no_grad()
    def fit(self, features: np.ndarray) -> None:
        """Fit from (N, P, D) features (any float dtype) of N training images."""
        n, positions, dim = features.shape
        chunk = max(1, _FIT_CHUNK_ENTRIES // max(1, n * dim + dim * dim))
        for start in range(0, positions, chunk):
            x = torch.from_numpy(np.asarray(features[:, start : start + chunk], np.float64))
            x = x.transpose(0, 1)  # (p, N, D)
            mean = x.mean(dim=1)
            covariance = ledoit_wolf(x - mean[:, None])
            # a floor for constant features (a channel that is 0 at every training image)
            scale = torch.diagonal(covariance, dim1=1, dim2=2).mean(dim=1).clamp(min=1e-12)
            covariance = covariance + 1e-6 * scale[:, None, None] * torch.eye(dim, dtype=x.dtype)
            factor = torch.linalg.cholesky(covariance)
            identity = torch.eye(dim, dtype=x.dtype).expand_as(factor)
            whiten = torch.linalg.solve_triangular(factor, identity, upper=False)
            log_det = -2 * torch.log(torch.diagonal(factor, dim1=1, dim2=2)).sum(dim=1)
            self.mean[start : start + chunk] = mean.float()
            self.whiten[start : start + chunk] = whiten.float()
            self.log_det_precision[start : start + chunk] = log_det.float()

    def log_prob(self, z: Tensor) -> Tensor:
        """(B, P, D) features -> (B, P) log-densities, eq. (5.2)."""
        # a batched product over positions, not einsum: ONNX Runtime's Einsum took 20 of
        # a Gaussian export's 25 ms (256 x 256, batch 1), slower than PyTorch
        y = torch.matmul((z - self.mean).transpose(0, 1), self.whiten.transpose(1, 2))
        squared_mahalanobis = (y * y).sum(dim=-1).transpose(0, 1)
        constant = -0.5 * self.dim * math.log(2 * math.pi)
        return constant + 0.5 * self.log_det_precision - 0.5 * squared_mahalanobis


def ledoit_wolf(x: Tensor) -> Tensor:
    """Ledoit-Wolf shrunk covariances of centred samples x (P, N, D) -> (P, D, D).

    The closed form of Ledoit and Wolf (2004), as scikit-learn computes it, for P
    sample sets at once: ``(1 - s) S + s mu I`` with S the sample covariance (divided
    by N), mu its mean eigenvalue and s estimated from the samples.
    """
    _, n, dim = x.shape
    covariance = x.transpose(1, 2) @ x / n
    squares = x * x
    trace = squares.sum(dim=(1, 2)) / n  # trace of S
    mu = trace / dim
    beta_ = (squares.sum(dim=2) ** 2).sum(dim=1)  # sum of the entries of X2^T X2
    delta_ = (covariance * covariance).sum(dim=(1, 2))  # ||X^T X||_F^2 / n^2
    beta = (beta_ / n - delta_) / (dim * n)
    delta = (delta_ - 2 * mu * trace + dim * mu * mu) / dim
    beta = torch.minimum(beta, delta)
    shrinkage = torch.where(delta > 0, beta / delta.clamp(min=1e-300), torch.zeros_like(delta))
    eye = torch.eye(dim, dtype=x.dtype)
    return (1 - shrinkage)[:, None, None] * covariance + (shrinkage * mu)[:, None, None] * eye
