"""The CPU path: a differentiable rasterizer and the MCMC strategy ops without CUDA kernels.

On CUDA the trainer uses `gsplat.rasterization`. Without CUDA, gsplat's own pure-PyTorch path cannot serve:
`gsplat.rendering._rasterization` still calls the CUDA `isect_tiles` and `rasterize_to_indices_in_range` kernels
and needs nerfacc (not installable without CUDA), and the pure `_isect_tiles` in `gsplat/cuda/_torch_impl.py` is a
Python loop over every Gaussian and tile (seconds per frame for a few hundred Gaussians). So the CPU path uses
gsplat's pure-torch projection (`_quat_scale_to_covar_preci`, `_fully_fused_projection`, `_spherical_harmonics`,
identical maths to the CUDA kernels, EWA with the same 0.3 px² dilation and 3.33σ radii) and a small compositor of
our own (`composite_sorted_pairs`): it enumerates (Gaussian, pixel) pairs inside each projected radius, drops
alphas below 1/255, sorts by (pixel, depth) and computes transmittance with a segmented exclusive cumulative sum
of log(1−α) in float64, stopping at T < 1e-4 as the CUDA kernel does. Autograd provides the backward pass,
including the screen-space `means2d` gradient that `DefaultStrategy` densifies on.

MCMC without CUDA: `MCMCStrategy` calls two CUDA kernels (`compute_relocation`, `quat_scale_to_covar_preci`)
through `gsplat.strategy.ops`; on CPU they are swapped, only for the duration of the strategy call, for gsplat's
torch covariance and a torch version of the paper's Eq. 9 relocation (`relocation_torch`).
"""

from __future__ import annotations

import contextlib
from typing import Any
from unittest import mock

import torch


def composite_sorted_pairs(means2d: torch.Tensor, conics: torch.Tensor, opacities: torch.Tensor,
                           colors: torch.Tensor, depths: torch.Tensor, radii: torch.Tensor,
                           width: int, height: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Front-to-back alpha compositing of projected Gaussians, differentiable by autograd.

    means2d (N,2) px, conics (N,3) upper triangle of the inverse 2D covariance, opacities (N,), colors (N,C),
    depths (N,), radii (N,2) int px (0 = culled). Returns image (H,W,C) and alpha (H,W,1).

    Candidate pixels are those of the box where the Gaussian's alpha can reach 1/255 (the CUDA kernel's
    cut-off): the ellipse d^T Σ^-1 d <= 2 ln(255 o), tighter than the 3.33σ radius for low opacities. All
    per-pair quantities come from one gather of a packed per-Gaussian tensor, which keeps the backward pass
    to a single scatter.
    """
    device = means2d.device
    channels = colors.shape[-1]
    visible = (radii > 0).all(dim=-1) & (opacities.detach() * 255.0 > 1.0)
    ids = visible.nonzero()[:, 0]
    ids = ids[torch.argsort(depths[ids].detach(), stable=True)]  # depth rank -> Gaussian id
    packed = torch.cat([means2d, conics, opacities[:, None], colors], dim=1)[ids]  # (R, 6+C)

    with torch.no_grad():
        center, conic, opacity = packed[:, 0:2], packed[:, 2:5], packed[:, 5]
        determinant = (conic[:, 0] * conic[:, 2] - conic[:, 1] ** 2).clamp_min(1e-12)
        reach = torch.sqrt(2.0 * torch.log(255.0 * opacity))
        half_w = torch.minimum(reach * torch.sqrt(conic[:, 2] / determinant), radii[ids, 0].float())
        half_h = torch.minimum(reach * torch.sqrt(conic[:, 0] / determinant), radii[ids, 1].float())
        x0 = (center[:, 0] - half_w).floor().clamp(0, width).long()
        x1 = (center[:, 0] + half_w).ceil().clamp(0, width).long()
        y0 = (center[:, 1] - half_h).floor().clamp(0, height).long()
        y1 = (center[:, 1] + half_h).ceil().clamp(0, height).long()
        box_w = x1 - x0
        area = box_w * (y1 - y0)
        rank = torch.repeat_interleave(torch.arange(len(ids), device=device), area)
        local = torch.arange(len(rank), device=device) - torch.repeat_interleave(torch.cumsum(area, 0) - area, area)
        px = x0[rank] + local % box_w[rank]
        py = y0[rank] + local // box_w[rank]
        g = packed[rank]
        dx, dy = px + 0.5 - g[:, 0], py + 0.5 - g[:, 1]
        sigma = 0.5 * (g[:, 2] * dx * dx + g[:, 4] * dy * dy) + g[:, 3] * dx * dy
        keep = (sigma >= 0) & (g[:, 5] * torch.exp(-sigma) >= 1.0 / 255.0)  # pairs the CUDA kernel skips
        rank, pixel = rank[keep], (py * width + px)[keep]
        # enumeration is in depth order, so a stable sort by pixel keeps each pixel's list front to back
        pixel, order = torch.sort(pixel, stable=True)
        rank = rank[order]
        px, py = (pixel % width).to(packed.dtype) + 0.5, (pixel // width).to(packed.dtype) + 0.5
        segment_start = torch.ones_like(pixel, dtype=torch.bool)
        segment_start[1:] = pixel[1:] != pixel[:-1]
        first = torch.cummax(torch.where(segment_start, torch.arange(len(pixel), device=device), 0), 0).values

    g = packed[rank]
    dx, dy = px - g[:, 0], py - g[:, 1]
    sigma = 0.5 * (g[:, 2] * dx * dx + g[:, 4] * dy * dy) + g[:, 3] * dx * dy
    alpha = torch.clamp_max(g[:, 5] * torch.exp(-sigma), 0.999)
    log_transmit = torch.log1p(-alpha.double())
    running = torch.cumsum(log_transmit, 0) - log_transmit  # exclusive prefix sum over all pairs
    transmittance = torch.exp(running - running[first]).to(alpha.dtype)  # restart at each pixel's first pair
    with torch.no_grad():
        # stop where the transmittance after this Gaussian would drop to 1e-4, as the CUDA kernel does
        alive = transmittance * (1 - alpha) > 1e-4
    weights = torch.where(alive, alpha * transmittance, 0.0)
    contributions = torch.cat([weights[:, None] * g[:, 6:], weights[:, None]], dim=1)
    accumulated = torch.zeros(width * height, channels + 1, device=device, dtype=packed.dtype)
    accumulated = accumulated.index_add(0, pixel, contributions).reshape(height, width, channels + 1)
    return accumulated[..., :channels], accumulated[..., channels:]


def rasterize_reference(means: torch.Tensor, quats: torch.Tensor, scales: torch.Tensor, opacities: torch.Tensor,
                        sh_coeffs: torch.Tensor, viewmat: torch.Tensor, K: torch.Tensor, width: int, height: int,
                        sh_degree: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The CPU stand-in for `gsplat.rasterization` (one camera, packed=False); returns (1,H,W,3), (1,H,W,1), info."""
    from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci, _spherical_harmonics

    covars, _ = _quat_scale_to_covar_preci(quats, scales, compute_covar=True, compute_preci=False, triu=False)
    radii, means2d, depths, conics, _ = _fully_fused_projection(means, covars, viewmat[None], K[None], width, height)
    camera_center = torch.linalg.inv(viewmat)[:3, 3]
    colors = _spherical_harmonics(sh_degree, means - camera_center, sh_coeffs)
    colors = torch.clamp_min(colors + 0.5, 0.0)  # the same offset as gsplat's rasterization
    image, alpha = composite_sorted_pairs(means2d[0], conics[0], opacities, colors, depths[0], radii[0], width, height)
    info = {"means2d": means2d, "radii": radii, "depths": depths, "conics": conics, "width": width,
            "height": height, "n_cameras": 1, "gaussian_ids": None}
    return image[None], alpha[None], info


def relocation_torch(opacities: torch.Tensor, scales: torch.Tensor, ratios: torch.Tensor,
                     binoms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 9 of "3D Gaussian Splatting as Markov Chain Monte Carlo", for `gsplat.relocation.compute_relocation`.

    A Gaussian copied into n Gaussians gets opacity 1-(1-o)^(1/n) and its scale multiplied by
    o / sum_{i=1..n} sum_{k=0..i-1} C(i-1,k) (-1)^k o'^(k+1) / sqrt(k+1). Evaluated in float64: the alternating
    binomial sum cancels badly in float32 for large n.
    """
    n_max = binoms.shape[0]
    n = ratios.clamp(1, n_max).long()
    opacity = opacities.double()
    new_opacity = 1.0 - (1.0 - opacity) ** (1.0 / n.double())
    k = torch.arange(n_max, device=opacities.device, dtype=torch.float64)
    coefficient = binoms.double() * (-1.0) ** k / torch.sqrt(k + 1)  # [i-1, k]
    powers = new_opacity[:, None] ** (k + 1)  # [N, k]
    per_i = powers @ coefficient.T  # [N, i-1]
    used = torch.arange(1, n_max + 1, device=opacities.device)[None] <= n[:, None]
    denominator = (per_i * used).sum(dim=1)
    new_scales = (opacity / denominator)[:, None] * scales.double()
    return new_opacity.to(opacities.dtype), new_scales.to(scales.dtype)


@contextlib.contextmanager
def gsplat_strategy_ops_on_cpu():
    """Swap the two CUDA kernels that gsplat's MCMC ops call for torch equivalents, for this block only."""
    import gsplat.strategy.ops as ops
    from gsplat.cuda._torch_impl import _quat_scale_to_covar_preci

    with mock.patch.object(ops, "compute_relocation", relocation_torch), \
            mock.patch.object(ops, "quat_scale_to_covar_preci", _quat_scale_to_covar_preci):
        yield
