"""Streaming correlation of features across all models, in float64.

Every image and spatial position is one sample. Per batch the Gram matrix is
computed in the features' dtype and added to float64 running sums; data are
shifted by the first batch's mean so that E[xx] - E[x]E[x] does not cancel.
"""
from __future__ import annotations

import torch


def as_samples(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` or ``[B, C]`` -> ``[samples, C]``."""
    if x.dim() == 2:
        return x
    return x.movedim(1, -1).reshape(-1, x.shape[1])


class CorrelationAccumulator:
    """Running sums of x and x x^T over the concatenated features of all models."""

    def __init__(self, num_features: int, device="cpu"):
        self.n = 0
        self.shift: torch.Tensor | None = None
        self.sum = torch.zeros(num_features, dtype=torch.float64, device=device)
        self.gram = torch.zeros(num_features, num_features, dtype=torch.float64, device=device)

    def update(self, features: list[torch.Tensor]) -> None:
        """Add one batch: ``features[i]`` is model i's ``[B, C, ...]`` activation."""
        x = torch.cat([as_samples(f.detach()) for f in features], dim=1).float()  # (P, n*C)
        if self.shift is None:
            self.shift = x.mean(0)
        x = x - self.shift
        self.n += x.shape[0]
        self.sum += x.sum(0, dtype=torch.float64)
        self.gram += (x.T @ x).double()

    def covariance(self) -> torch.Tensor:
        if self.n == 0:
            raise ValueError("no samples were accumulated")
        mean = self.sum / self.n
        return self.gram / self.n - torch.outer(mean, mean)

    def correlation(self) -> torch.Tensor:
        cov = self.covariance()
        raw_mean = self.sum / self.n + self.shift.double()
        return correlation_from_covariance(cov, cov.diagonal() + raw_mean ** 2)


def correlation_from_covariance(cov: torch.Tensor, second_moment: torch.Tensor | None = None) -> torch.Tensor:
    """Pearson correlation; constant (dead) features correlate 0 with everything, 1 with themselves."""
    var = cov.diagonal().clamp_min(0)
    scale = second_moment.abs() if second_moment is not None else var  # E[x^2] of the unshifted data
    alive = var > 1e-10 * scale.clamp_min(1e-30)
    std = torch.where(alive, var.sqrt(), torch.ones_like(var))
    corr = cov / torch.outer(std, std)
    corr = torch.where(alive[:, None] & alive[None, :], corr, torch.zeros_like(corr)).clamp(-1, 1)
    corr.fill_diagonal_(1.0)
    return corr
