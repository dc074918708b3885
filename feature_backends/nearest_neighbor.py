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
    """Match (N0,D) to (N1,D) descriptors; returns matches0 (N0,) with -1 and scores (N0,) in [0,1].

    With `mutual`, a match must be the nearest neighbour in both directions and pass the ratio test in both
    directions, as COLMAP's cross-check does. The second ratio test matters: on unrelated image pairs a one-sided
    test keeps a few dozen chance matches, enough to send geometric verification into its full 10,000 RANSAC
    trials per model (measured: 27 vs 9 matches on an unrelated temple pair, 1.5 s vs 0 s of verification).
    """
    n0, n1 = descriptors0.shape[0], descriptors1.shape[0]
    device = descriptors0.device
    k_rows = 2 if n1 > 1 else 1
    k_cols = 2 if n0 > 1 else 1
    best_sim = descriptors0.new_empty((n0, k_rows))
    best_idx = torch.empty((n0, k_rows), dtype=torch.long, device=device)
    col_sim = descriptors0.new_full((k_cols, n1), -float("inf"))
    col_idx = torch.zeros((k_cols, n1), dtype=torch.long, device=device)
    rows = max(2, max_block_elements // max(n1, 1))
    for start in range(0, n0, rows):
        sim = descriptors0[start:start + rows] @ descriptors1.T
        best_sim[start:start + rows], best_idx[start:start + rows] = sim.topk(k_rows, dim=1)
        block_sim, block_idx = sim.topk(min(k_cols, sim.shape[0]), dim=0)
        merged_sim = torch.cat([col_sim, block_sim])
        merged_idx = torch.cat([col_idx, block_idx + start])
        col_sim, order = merged_sim.topk(k_cols, dim=0)
        col_idx = merged_idx.gather(0, order)

    def to_distance(similarity: torch.Tensor) -> torch.Tensor:
        return (2 - 2 * similarity.clamp(-1, 1)).clamp(min=0).sqrt()

    distance = to_distance(best_sim)
    nearest = best_idx[:, 0]
    valid = torch.ones(n0, dtype=torch.bool, device=device)
    if ratio_threshold is not None and k_rows == 2:
        valid &= distance[:, 0] <= ratio_threshold * distance[:, 1]
    if distance_threshold is not None:
        valid &= distance[:, 0] <= distance_threshold
    if mutual:
        valid &= col_idx[0, nearest] == torch.arange(n0, device=device)
        if ratio_threshold is not None and k_cols == 2:
            col_distance = to_distance(col_sim)
            valid &= (col_distance[0] <= ratio_threshold * col_distance[1])[nearest]
    matches0 = torch.where(valid, nearest, -1)
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
