"""Clipping and noising: the pure math of the Gaussian mechanism.

The same two operations serve DP-SGD on a client (per-sample gradients,
Abadi et al. 2016) and DP-FedAvg on the coordinator (per-client updates,
McMahan et al. 2018). Accountants never see these values, only events.
"""

from __future__ import annotations

import torch

from fedtrain.privacy.noise import NoiseSource

NORM_FLOOR = 1e-12
"""Guards the division by a zero norm: a zero row stays zero."""


def clip_factors(norms: torch.Tensor, bound: float) -> torch.Tensor:
    """``min(1, bound / norm)`` per row; rows of zero norm get factor 1."""
    if bound <= 0:
        raise ValueError(f"clip bound = {bound}: must be > 0")
    return (bound / norms.clamp_min(NORM_FLOOR)).clamp(max=1.0)


def clip_rows_(rows: torch.Tensor, bound: float) -> torch.Tensor:
    """Scale each row of ``rows`` (in place) to L2 norm at most ``bound``;
    returns the norms before clipping."""
    if rows.dim() == 1:
        norms = rows.norm().reshape(1)
        rows.mul_(clip_factors(norms, bound)[0])
        return norms
    norms = rows.norm(dim=1)
    rows.mul_(clip_factors(norms, bound).unsqueeze(1))
    return norms


def per_sample_clipped_sum(
    grad_samples: list[torch.Tensor], bound: float
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Sum over the batch of per-sample gradients, each sample's whole
    gradient (all tensors together) clipped to L2 norm ``bound``.

    ``grad_samples[k]`` has shape ``(B, *param_k.shape)``. Returns the summed
    gradient per parameter and the per-sample norms before clipping.
    """
    batch = grad_samples[0].shape[0]
    flat = [g.reshape(batch, -1) for g in grad_samples]
    norms = torch.linalg.vector_norm(torch.cat(flat, dim=1) if len(flat) > 1 else flat[0], dim=1)
    factors = clip_factors(norms, bound)
    summed = [(factors @ f).view(g.shape[1:]) for f, g in zip(flat, grad_samples)]
    return summed, norms


def add_gaussian_(vector: torch.Tensor, std: float, noise: NoiseSource) -> torch.Tensor:
    """``vector += N(0, std² I)`` in place, noise from ``noise``; returns ``vector``."""
    if std > 0:
        vector.add_(noise.gaussian(vector.numel(), std, vector.device).view_as(vector))
    return vector
