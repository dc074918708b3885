"""Mutual nearest neighbour matching with Lowe's ratio test, batched in torch (CPU or CUDA).

The whole similarity matrix is computed as one matrix product, split into row chunks only when it would
exceed `max_block_elements`; no Python loop runs over keypoints. Descriptors are assumed L2-normalised
(RootSIFT, DeDoDe, DISK ... are), so the Euclidean distance is sqrt(2 - 2 * similarity).
"""

from __future__ import annotations

import torch

from .base import SparseMatcher


def mutual_nearest_neighbors(
    descriptors0: torch.Tensor,
    descriptors1: torch.Tensor,
    ratio_threshold: float | None = 0.8,
    distance_threshold: float | None = None,
    mutual: bool = True,
    max_block_elements: int = 1 << 26,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Match (N0,D) to (N1,D) descriptors; returns matches0 (N0,) with -1 and scores (N0,) in [0,1]."""
    n0, n1 = descriptors0.shape[0], descriptors1.shape[0]
    k = 2 if (ratio_threshold is not None and n1 > 1) else 1
    best_sim = descriptors0.new_empty((n0, k))
    best_idx = torch.empty((n0, k), dtype=torch.long, device=descriptors0.device)
    col_best = descriptors0.new_full((n1,), -float("inf"))
    col_idx = torch.zeros((n1,), dtype=torch.long, device=descriptors0.device)
    rows = max(1, max_block_elements // max(n1, 1))
    for start in range(0, n0, rows):
        sim = descriptors0[start:start + rows] @ descriptors1.T
        best_sim[start:start + rows], best_idx[start:start + rows] = sim.topk(k, dim=1)
        block_max, block_arg = sim.max(dim=0)
        better = block_max > col_best
        col_best = torch.where(better, block_max, col_best)
        col_idx = torch.where(better, block_arg + start, col_idx)
    distance = (2 - 2 * best_sim.clamp(-1, 1)).clamp(min=0).sqrt()
    valid = torch.ones(n0, dtype=torch.bool, device=descriptors0.device)
    if k == 2:
        valid &= distance[:, 0] <= ratio_threshold * distance[:, 1]
    if distance_threshold is not None:
        valid &= distance[:, 0] <= distance_threshold
    matches0 = torch.where(valid, best_idx[:, 0], -1)
    if mutual:
        arange = torch.arange(n0, device=descriptors0.device)
        valid &= col_idx[best_idx[:, 0]] == arange
        matches0 = torch.where(valid, matches0, -1)
    scores = torch.where(valid, (best_sim[:, 0] + 1) / 2, best_sim.new_zeros(()))
    return matches0, scores


class MutualNearestNeighbor(SparseMatcher):
    default_conf = {
        "ratio_threshold": 0.8,  # Lowe's ratio on Euclidean distances; None disables
        "distance_threshold": None,  # maximum Euclidean distance; None disables
        "mutual": True,
    }

    def _match(self, data):
        matches0, scores = mutual_nearest_neighbors(
            data["descriptors0"][0].T.float(),
            data["descriptors1"][0].T.float(),
            ratio_threshold=self.conf.ratio_threshold,
            distance_threshold=self.conf.distance_threshold,
            mutual=self.conf.mutual,
        )
        return {"matches0": matches0[None], "matching_scores0": scores[None]}
